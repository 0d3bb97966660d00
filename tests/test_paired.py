"""Already-paired preference files: JSON lines (plain, .zst, .gz) and Parquet."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from alignflow.tasks.ingest import paired
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.paired import prompt_hash, read_pairs_file, split_hh_dialogue
from alignflow.tasks.ingest.records import ListSink

# Anthropic HH-RLHF rows: the prompt is folded into both texts as a dialogue.
HH_SINGLE = {
    "chosen": "\n\nHuman: What are some cuss words in english?\n\nAssistant: I'd rather not list those.",
    "rejected": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list.",
}
HH_MULTI = {
    "chosen": (
        "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt."
        "\n\nHuman: How long should it rise?\n\nAssistant: I would let it rise for about an hour, until doubled."
    ),
    "rejected": (
        "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt."
        "\n\nHuman: How long should it rise?\n\nAssistant: I would not bother."
    ),
}


def write_jsonl(path: Path, rows, compress: str | None = None) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if compress == "zst":
        with open(path, "wb") as fh, zstandard.ZstdCompressor().stream_writer(fh, closefd=False) as w:
            w.write(data)
    elif compress == "gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def rows_add_up(sink: ListSink, path: Path) -> None:
    assert sink.counts[(str(path), "rows")] == len(sink.pairs) + len(sink.quarantined)


def reasons(sink: ListSink) -> list[tuple[str, int]]:
    return [(q["reason"], q["line"]) for q in sink.quarantined]


# --------------------------------------------------------------------------- JSON lines


@pytest.mark.parametrize("compress", [None, "zst", "gz"])
def test_jsonl_pairs_defaults_and_overrides(tmp_path, compress):
    name = {None: "my_prefs.jsonl", "zst": "my_prefs.jsonl.zst", "gz": "my_prefs.jsonl.gz"}[compress]
    rows = [
        {"prompt": "Q1?", "chosen": "good", "rejected": "bad", "chosen_score": 10, "rejected_score": "2.5"},
        {"prompt": "Q1?", "chosen": "better", "rejected": "worse"},
        {"prompt": "Q2?", "chosen": "yes", "rejected": "no", "question_id": 42, "site": "mysite",
         "license": "CC BY-SA 4.0", "extra_column": [1, 2]},
    ]
    path = write_jsonl(tmp_path / name, rows, compress)
    sink = ListSink()
    read_pairs_file(path, sink)
    assert len(sink.pairs) == 3 and sink.quarantined == []
    p0, p1, p2 = sink.pairs
    assert (p0.prompt, p0.chosen, p0.rejected) == ("Q1?", "good", "bad")
    assert (p0.chosen_score, p0.rejected_score) == (10.0, 2.5)
    assert (p1.chosen_score, p1.rejected_score) == (None, None)
    assert p0.question_id == p1.question_id == hashlib.sha256(b"Q1?").hexdigest()[:16] == prompt_hash("Q1?")
    assert p0.site == "my_prefs" and p0.license == "unknown" and p0.source == "pairs"
    assert (p0.source_file, p0.line, p1.line, p2.line) == (str(path), 1, 2, 3)
    assert (p2.question_id, p2.site, p2.license) == ("42", "mysite", "CC BY-SA 4.0")
    rows_add_up(sink, path)


def test_site_argument_and_default_license(tmp_path):
    path = write_jsonl(tmp_path / "x.ndjson", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                               {"prompt": "p", "chosen": "a", "rejected": "b", "site": "own"}])
    sink = ListSink()
    read_pairs_file(path, sink, site="custom", default_license="CC0")
    assert [(p.site, p.license) for p in sink.pairs] == [("custom", "CC0"), ("own", "CC0")]


def test_quarantine_empty_and_identical(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "   "},
        {"prompt": "p", "chosen": None, "rejected": "b"},
        {"prompt": "p", "chosen": "same text", "rejected": "same text"},
        {"prompt": "p", "chosen": "same text\n", "rejected": " same text"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    sink = ListSink()
    read_pairs_file(path, sink)
    assert reasons(sink) == [("empty_text", 1), ("empty_text", 2), ("empty_text", 3), ("identical_texts", 4),
                             ("identical_texts", 5), ("empty_prompt", 6)]
    assert [p.line for p in sink.pairs] == [7]
    assert sink.counts[(str(path), "rows")] == 7
    rows_add_up(sink, path)


def test_hh_rlhf_prompt_split(tmp_path):
    path = write_jsonl(tmp_path / "hh-rlhf.jsonl", [HH_SINGLE, HH_MULTI])
    sink = ListSink()
    read_pairs_file(path, sink)
    single, multi = sink.pairs
    assert single.prompt == "\n\nHuman: What are some cuss words in english?\n\nAssistant:"
    assert (single.chosen, single.rejected) == ("I'd rather not list those.", "Here's an incomplete list.")
    # Both answers start with "I would": the prompt still ends at the last shared "\n\nAssistant:".
    assert multi.prompt.endswith("How long should it rise?\n\nAssistant:")
    assert multi.prompt.startswith("\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour")
    assert multi.chosen == "I would let it rise for about an hour, until doubled."
    assert multi.rejected == "I would not bother."
    assert multi.prompt + " " + multi.chosen == HH_MULTI["chosen"]
    assert single.question_id == prompt_hash(single.prompt) and single.site == "hh-rlhf"


def test_split_hh_dialogue_without_shared_turn():
    assert split_hh_dialogue("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: b") is None
    assert split_hh_dialogue("just text", "other text") is None


def test_hh_without_shared_prefix_is_missing_prompt(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [HH_SINGLE, {"chosen": "good", "rejected": "bad"}])
    with pytest.raises(IngestError) as exc:
        read_pairs_file(path, ListSink())
    assert "broken.jsonl" in str(exc.value) and "line 2" in str(exc.value) and exc.value.field == "prompt"


def test_jsonl_missing_column_names_line_and_column(tmp_path):
    path = write_jsonl(tmp_path / "missing.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a"},
        {"prompt": "p", "rejected": "b"},
    ])
    with pytest.raises(IngestError, match="missing required field.*rejected") as exc:
        read_pairs_file(path, ListSink())
    assert "missing.jsonl" in str(exc.value) and "line 2" in str(exc.value) and exc.value.field == "rejected"

    sink = ListSink()
    read_pairs_file(path, sink, on_bad_row="quarantine")
    assert reasons(sink) == [("missing_field", 2), ("missing_field", 3)]
    assert "chosen" in sink.quarantined[1]["detail"]
    assert len(sink.pairs) == 1
    rows_add_up(sink, path)


def test_jsonl_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, "{not json", "[1]",
                                                 {"prompt": "p", "chosen": ["a"], "rejected": "b"},
                                                 {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": "high"}])
    with pytest.raises(IngestError, match="not JSON") as exc:
        read_pairs_file(path, ListSink())
    assert "bad.jsonl" in str(exc.value) and "line 2" in str(exc.value)
    sink = ListSink()
    read_pairs_file(path, sink, on_bad_row="quarantine")
    assert reasons(sink) == [("not_json", 2), ("not_object", 3), ("bad_value", 4), ("bad_value", 5)]
    assert [q["detail"].split("`")[1] for q in sink.quarantined[2:]] == ["chosen", "chosen_score"]
    rows_add_up(sink, path)


def test_truncated_gz_and_zst(tmp_path):
    rows = [{"prompt": f"question {i}?", "chosen": "x" * (i % 50 + 1) + str(i), "rejected": str(i)} for i in range(3000)]
    for compress in ("gz", "zst"):
        full = write_jsonl(tmp_path / f"full.jsonl.{compress}", rows, compress)
        cut = tmp_path / f"cut.jsonl.{compress}"
        data = full.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(IngestError, match="truncated") as exc:
            read_pairs_file(cut, ListSink(), on_bad_row="quarantine")
        assert f"cut.jsonl.{compress}" in str(exc.value) and "line" in str(exc.value)


def test_non_utf8_and_empty(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(IngestError, match="UTF-8") as exc:
        read_pairs_file(bad, ListSink())
    assert "latin1.jsonl" in str(exc.value) and "line 2" in str(exc.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(IngestError, match="empty file") as exc:
        read_pairs_file(empty, ListSink())
    assert "empty.jsonl" in str(exc.value)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(IngestError, match="unsupported file type"):
        read_pairs_file(path, ListSink())


# --------------------------------------------------------------------------- Parquet


def write_parquet(path: Path, table: pa.Table, row_group_size: int = 3) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_row_groups_in_batches(tmp_path, monkeypatch):
    n = 10
    table = pa.table({
        "prompt": [f"q{i // 2}" for i in range(n)],
        "chosen": [f"good {i}" for i in range(n)],
        "rejected": [f"bad {i}" for i in range(n)],
        "chosen_score": pa.array([float(i) for i in range(n)]),
        "rejected_score": pa.array([None if i == 3 else i for i in range(n)], pa.int64()),
        "license": ["CC BY-SA 4.0"] * n,
        "unused": list(range(n)),
    })
    path = write_parquet(tmp_path / "shp_like.parquet", table)
    assert pq.ParquetFile(path).num_row_groups == 4
    # Never the whole file: whole-table reads are forbidden, batches are small.
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read_table called"))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("ParquetFile.read called"))
    monkeypatch.setattr(paired, "PARQUET_BATCH_ROWS", 2)
    sink = ListSink()
    read_pairs_file(path, sink)
    assert [p.line for p in sink.pairs] == list(range(1, n + 1))
    assert [p.chosen for p in sink.pairs] == [f"good {i}" for i in range(n)]
    assert sink.pairs[3].rejected_score is None and sink.pairs[4].rejected_score == 4.0
    assert sink.pairs[0].question_id == sink.pairs[1].question_id != sink.pairs[2].question_id
    assert {p.site for p in sink.pairs} == {"shp_like"} and sink.pairs[0].license == "CC BY-SA 4.0"
    rows_add_up(sink, path)


def test_parquet_missing_column_fails_up_front(tmp_path):
    path = write_parquet(tmp_path / "nochosen.parquet", pa.table({"prompt": ["p"], "rejected": ["b"], "answer": ["x"]}))
    sink = ListSink()
    with pytest.raises(IngestError, match="missing required column") as exc:
        read_pairs_file(path, sink)
    assert "nochosen.parquet" in str(exc.value) and exc.value.field == "chosen"
    assert sink.counts == {} and sink.pairs == []


def test_parquet_wrong_type_and_quarantine(tmp_path):
    path = write_parquet(tmp_path / "typed.parquet", pa.table({"prompt": ["p"], "chosen": [1], "rejected": ["b"]}))
    with pytest.raises(IngestError, match="column `chosen` has type int64"):
        read_pairs_file(path, ListSink())
    path = write_parquet(tmp_path / "rows.parquet", pa.table({
        "prompt": ["p", "p", "p"], "chosen": ["a", "", "same"], "rejected": ["b", "b", "same"]}))
    sink = ListSink()
    read_pairs_file(path, sink)
    assert reasons(sink) == [("empty_text", 2), ("identical_texts", 3)]
    rows_add_up(sink, path)


def test_parquet_hh_style(tmp_path):
    path = write_parquet(tmp_path / "hh.parquet", pa.table({
        "chosen": [HH_SINGLE["chosen"], HH_MULTI["chosen"]], "rejected": [HH_SINGLE["rejected"], HH_MULTI["rejected"]]}))
    sink = ListSink()
    read_pairs_file(path, sink)
    assert [p.chosen for p in sink.pairs] == ["I'd rather not list those.",
                                              "I would let it rise for about an hour, until doubled."]
    assert all(p.prompt.endswith("\n\nAssistant:") for p in sink.pairs)


def test_parquet_empty_and_not_parquet(tmp_path):
    empty = write_parquet(tmp_path / "empty.parquet", pa.table({"prompt": pa.array([], pa.string()),
                                                                "chosen": pa.array([], pa.string()),
                                                                "rejected": pa.array([], pa.string())}))
    with pytest.raises(IngestError, match="empty file") as exc:
        read_pairs_file(empty, ListSink())
    assert "empty.parquet" in str(exc.value)
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(IngestError, match="not a readable Parquet file") as exc:
        read_pairs_file(fake, ListSink())
    assert "fake.parquet" in str(exc.value)
