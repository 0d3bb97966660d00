"""Column ids and splits (tasks/ingest/ids.py) give exactly what short_id and assign_split give row by row."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from alignflow.tasks.ingest import ids
from alignflow.tasks.ingest.scoring import assign_split, short_id

needs_c = pytest.mark.skipif(ids._fastids is None, reason="the _fastids extension is not built here (no C "
                             "compiler or libcrypto headers); the hashlib path is tested below either way")


def _columns(n: int, seed: int = 0) -> tuple[pa.Array, pa.Array, pa.Array]:
    rng = random.Random(seed)
    sites = ["datascience.stackexchange.com", "ünïcode.例え.com", "", "a:b\x1fc", "x" * 300]
    site = pa.array([rng.choice(sites) for _ in range(n)])
    question = pa.array([str(rng.randrange(10**12)) if rng.random() > 0.02 else "" for _ in range(n)])
    answer = pa.array([rng.choice(["7", "0042", "t3_abc", "é"]) + str(rng.randrange(10**6)) for _ in range(n)])
    return site, question, answer


@pytest.fixture(params=["c", "hashlib"])
def path(request, monkeypatch):
    if request.param == "c":
        if ids._fastids is None:
            pytest.skip("the _fastids extension is not built here")
    else:
        monkeypatch.setattr(ids, "_fastids", None)
    return request.param


def test_short_ids_are_short_id_of_each_row(path):
    site, question, answer = _columns(20_000)
    rows = list(zip(site.to_pylist(), question.to_pylist(), answer.to_pylist()))
    assert ids.short_ids(site, question, answer).to_pylist() == [short_id(*r) for r in rows]
    assert ids.short_ids(site, question).to_pylist() == [short_id(s, q) for s, q, _ in rows]
    assert ids.short_ids(site, question, length=64).to_pylist() == [short_id(s, q, length=64) for s, q, _ in rows]
    assert ids.short_ids(site, question).type == pa.string()


def test_short_ids_take_slices_chunks_large_strings_shared_values_and_nulls(path):
    site, question, _ = _columns(50, seed=1)
    part = site.slice(7, 20), question.slice(7, 20)
    expected = [short_id(s, q) for s, q in zip(part[0].to_pylist(), part[1].to_pylist())]
    assert ids.short_ids(*part).to_pylist() == expected
    chunked = pa.chunked_array([part[0].slice(0, 5), part[0].slice(5)])
    assert ids.short_ids(chunked, part[1].cast(pa.large_string())).to_pylist() == expected
    assert ids.short_ids("shared.site", question).to_pylist() == [short_id("shared.site", q)
                                                                 for q in question.to_pylist()]
    with_null = pa.array(["a", None, "c"])
    assert ids.short_ids(with_null, pa.array(["1", "2", "3"])).to_pylist() == [
        short_id("a", "1"), short_id(None, "2"), short_id("c", "3")]  # spelled "None", as row by row
    assert ids.short_ids(pa.array([], pa.string()), pa.array([], pa.string())).to_pylist() == []
    numbers = pa.array([1.5, 2.0, 3.0])  # not text: spelled by str(), as row by row ("2.0", not Arrow's "2")
    assert ids.short_ids(numbers, pa.array(["a", "b", "c"])).to_pylist() == [
        short_id(1.5, "a"), short_id(2.0, "b"), short_id(3.0, "c")]


@pytest.mark.parametrize("train,validation", [(0.8, 0.1), (0.5, 0.5), (1.0, 0.0), (0.0, 0.0), (0.333, 0.333)])
def test_splits_are_assign_split_of_each_row(path, train, validation):
    site, question, _ = _columns(20_000, seed=2)
    salt = "alignflow:v1"
    expected = [assign_split(s, q, train=train, validation=validation, salt=salt)
                for s, q in zip(site.to_pylist(), question.to_pylist())]
    got = ids.splits(site, question, train=train, validation=validation, salt=salt).to_pylist()
    assert got == expected


@needs_c
def test_the_extension_refuses_offsets_outside_its_data():
    with pytest.raises(ValueError, match="outside"):
        ids._fastids.hex_digests(b"abc", pa.py_buffer(bytes([0, 0, 0, 0, 9, 0, 0, 0])), 4, 20)
    with pytest.raises(ValueError, match="outside"):
        ids._fastids.first_words(b"abc", pa.py_buffer(bytes([2, 0, 0, 0, 1, 0, 0, 0])), 4)
    with pytest.raises(ValueError, match="length"):
        ids._fastids.hex_digests(b"abc", pa.py_buffer(bytes(8)), 4, 65)
    with pytest.raises(ValueError, match="offset_bytes"):
        ids._fastids.hex_digests(b"abc", pa.py_buffer(bytes(8)), 3, 20)
