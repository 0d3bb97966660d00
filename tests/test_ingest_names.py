"""Names that come from the user's folders: in the cache key, safe as MLflow keys, LATEST moved last."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mlflow
import pytest

from alignflow.config import IngestConfig
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
from alignflow.tasks.tracking import param_key


def test_same_bytes_under_another_site_name_is_not_a_cache_hit(fixtures_dir, tmp_path):
    a = tmp_path / "a" / "cooking.stackexchange.com"
    b = tmp_path / "b" / "baking.stackexchange.com"
    for dst in (a, b):
        shutil.copytree(fixtures_dir / "conlang.meta-2020", dst)
    cfg = IngestConfig()
    first = execute_ingest(plan_ingest([a], tmp_path / "work", cfg), cfg)
    second = execute_ingest(plan_ingest([b], tmp_path / "work", cfg), cfg)
    assert not second.cache_hit and second.out_dir != first.out_dir
    import pyarrow.parquet as pq

    assert set(pq.read_table(Path(second.out_dir) / "pairs.parquet").column("site").to_pylist()) == {
        "baking.stackexchange.com"}
    again = execute_ingest(plan_ingest([a], tmp_path / "work", cfg), cfg)
    assert again.cache_hit and again.out_dir == first.out_dir


@pytest.mark.parametrize("name", ["cooking (copy)", ";", ",", "+", "a..b", "é"])
def test_param_keys_from_site_names_are_accepted_by_mlflow(tmp_path, name):
    from mlflow.utils.validation import _validate_param_name

    key = param_key(f"score_source.{name}")
    _validate_param_name(key)
    assert key != param_key("score_source.other") and key == param_key(f"score_source.{name}")


@pytest.mark.slow
def test_unsafe_site_name_ingests_and_moves_latest(fixtures_dir, tmp_path, prefect_harness):
    from alignflow.flows.ingest import ingest

    src = tmp_path / "cooking (copy)"
    shutil.copytree(fixtures_dir / "conlang.meta-2020", src)
    work = tmp_path / "work"
    out = ingest([str(src)], workdir=str(work))
    assert (work / "data" / "ingest" / "LATEST").read_text().strip() == Path(out["out_dir"]).name
    run = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params[param_key("score_source.cooking (copy)")] == "votes"
    assert ingest([str(src)], workdir=str(work))["cache_hit"]


@pytest.mark.slow
def test_latest_stays_when_tracking_fails(fixtures_dir, tmp_path, prefect_harness, monkeypatch):
    from alignflow.flows import ingest as ingest_flow

    work = tmp_path / "work"
    ingest_flow.ingest([str(fixtures_dir / "conlang.meta-2020")], workdir=str(work))
    latest = (work / "data" / "ingest" / "LATEST").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("tracking store unavailable")

    monkeypatch.setattr(ingest_flow.tracking, "log_parquet_input", broken)
    with pytest.raises(RuntimeError, match="tracking store unavailable"):
        ingest_flow.ingest([str(fixtures_dir / "datascience.meta-2024")], workdir=str(work))
    assert (work / "data" / "ingest" / "LATEST").read_text() == latest


def test_foreign_votes_fall_back_to_score_with_a_warning(tmp_path):
    from alignflow.tasks.ingest.errors import IngestError
    from alignflow.tasks.ingest.synthetic import generate_dump

    own = generate_dump(tmp_path / "a", questions=40, seed=1, site="own.stackexchange.com")
    other = generate_dump(tmp_path / "b", questions=40, seed=2, site="other.stackexchange.com")
    cfg = IngestConfig()
    kept = execute_ingest(plan_ingest([own], tmp_path / "w1", cfg), cfg)
    assert kept.report["score_source"] == {"own.stackexchange.com": "votes"} and kept.report["warnings"] == []
    shutil.copy(other / "Votes.xml", own / "Votes.xml")
    mixed = execute_ingest(plan_ingest([own], tmp_path / "w2", cfg), cfg)
    assert mixed.report["score_source"] == {"own.stackexchange.com": "score"}
    assert any("Votes.xml disagrees with Score" in w for w in mixed.report["warnings"])
    strict = IngestConfig(score_source="votes")
    with pytest.raises(IngestError, match="Votes.xml disagrees with Score on .* refuses it"):
        execute_ingest(plan_ingest([own], tmp_path / "w3", strict), strict)


def test_prehashed_digests_are_the_digests_and_a_changed_file_is_hashed_again(tmp_path):
    """The ingest command starts hashing its inputs early (run.prehash): the cache key must not change."""
    import os
    import time

    from alignflow.tasks.ingest import run

    f = tmp_path / "Posts.xml"
    f.write_bytes(b"<posts>\n" + b"<row Id='1' />\n" * 1000 + b"</posts>\n")
    expected = run._sha256(f)
    run.prehash([f], "stackexchange")
    assert len(run._PREHASHED) == 1
    assert run.sha256_file(f) == expected and not run._PREHASHED  # used once, then forgotten
    run.prehash([f], "stackexchange")
    while not next(iter(run._PREHASHED.values())).done():
        time.sleep(0.01)
    f.write_bytes(b"<posts>\n</posts>\n")  # changed after its digest was started
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert run.sha256_file(f) == run._sha256(f) != expected
    run._PREHASHED.clear()
    site = tmp_path / "site"  # several files: hashed side by side, each digest its own file's
    site.mkdir()
    for name, n in (("Posts.xml", 3000), ("Votes.xml", 2000), ("Comments.xml", 10)):
        (site / name).write_bytes(b"<root>\n" + f"<row Id='{name}' />\n".encode() * n + b"</root>\n")
    run.prehash([site], "stackexchange")
    assert len(run._PREHASHED) >= 2
    for file in sorted(site.iterdir()):
        assert run.sha256_file(file) == run._sha256(file), file.name
    assert not run._PREHASHED
    (tmp_path / "empty").mkdir()
    run.prehash([tmp_path / "missing", tmp_path / "empty"], "auto")  # what does not resolve is plan_ingest's
    assert not run._PREHASHED


@pytest.mark.parametrize("name", ["_fasthtml.c", "render_utf8.h"])
def test_a_change_to_the_c_renderer_changes_the_cache_key(fixtures_dir, tmp_path, monkeypatch, name):
    """html_to_text's fast path (tasks/ingest/_fasthtml.c, and the header its callers in C share with it) shapes
    the datasets as much as the Python does."""
    from alignflow.tasks.ingest import run

    code = tmp_path / "code"
    code.mkdir()
    for f in run.code_files():
        shutil.copy(f, code / f.name)
    assert (code / name).exists()
    monkeypatch.setattr(run, "CODE_DIRS", [code])
    cfg = IngestConfig()
    before = plan_ingest([fixtures_dir / "conlang.meta-2020"], tmp_path / "work", cfg).key
    with open(code / name, "a") as fh:
        fh.write("\n/* a change */\n")
    after = plan_ingest([fixtures_dir / "conlang.meta-2020"], tmp_path / "work", cfg).key
    assert before != after


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value of one thread alone is Linux's")
def test_the_digests_are_hashed_on_threads_that_yield_the_cores(tmp_path, monkeypatch):
    """The hashing threads run at run.DIGEST_NICE (the command's start-up and Prefect's server, which the flow
    waits for first, get the cores); the thread that started them keeps its own priority."""
    import os
    import threading

    from alignflow.tasks.ingest import run

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = []
    hash_file = run._sha256

    def recording(path, *args):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return hash_file(path, *args)

    monkeypatch.setattr(run, "_sha256", recording)
    f = tmp_path / "Posts.xml"
    f.write_bytes(b"<posts>\n" + b"<row Id='1' />\n" * 100 + b"</posts>\n")
    run.prehash([f], "stackexchange")
    assert run.sha256_file(f) == hash_file(f)
    assert seen == [max(own, run.DIGEST_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
