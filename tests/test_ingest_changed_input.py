"""An input that changes after it was hashed (a dump still being downloaded or appended to, a file replaced) is
refused after the read: its datasets would carry the cache key and digests of other contents. Nothing is kept."""

from __future__ import annotations

import os
import shutil

import pytest

from alignflow.config import load_config
from alignflow.tasks.ingest import run as ingest_run
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
from alignflow.tasks.ingest.synthetic import generate_dump


@pytest.fixture()
def site(tmp_path):
    return generate_dump(tmp_path / "dump", questions=300, seed=1)


def _left(work) -> list[str]:
    base = work / "data" / "ingest"
    return sorted(p.name for p in base.iterdir()) if base.exists() else []


def _append(path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\n")


def _replace(path) -> None:  # the same bytes in a new file (a download that finished, moved into place)
    shutil.copyfile(path, f"{path}.new")
    os.replace(f"{path}.new", path)


@pytest.mark.parametrize("change", [_append, _replace], ids=["appended", "replaced"])
def test_a_file_changed_after_it_was_hashed_is_refused_and_nothing_is_kept(site, tmp_path, change):
    cfg = load_config(None, ["ingest.workers=1"]).ingest
    plan = plan_ingest([site], tmp_path / "w", cfg)
    change(site / "Posts.xml")
    with pytest.raises(IngestError, match="changed while it was read") as err:
        execute_ingest(plan, cfg)
    assert str(site / "Posts.xml") in str(err.value)
    assert _left(tmp_path / "w") == []  # no dataset folder, no temporary folder
    again = execute_ingest(plan_ingest([site], tmp_path / "w", cfg), cfg)  # planned anew: its digest is the file's
    assert again.datasets["pairs"]["rows"] > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_file_changed_during_the_read_is_refused(site, tmp_path, monkeypatch, workers):
    read = ingest_run.read_sources

    def read_then_change(plan, *args, **kwargs):
        out = read(plan, *args, **kwargs)
        _append(site / "Votes.xml")
        return out

    monkeypatch.setattr(ingest_run, "read_sources", read_then_change)
    cfg = load_config(None, [f"ingest.workers={workers}"]).ingest
    with pytest.raises(IngestError, match=r"Votes\.xml: changed while it was read"):
        execute_ingest(plan_ingest([site], tmp_path / "w", cfg), cfg)
    assert _left(tmp_path / "w") == []


def test_a_file_removed_during_the_read_is_refused(site, tmp_path, monkeypatch):
    read = ingest_run.read_sources

    def read_then_remove(plan, *args, **kwargs):
        out = read(plan, *args, **kwargs)
        (site / "Votes.xml").unlink()
        return out

    monkeypatch.setattr(ingest_run, "read_sources", read_then_remove)
    cfg = load_config(None, ["ingest.workers=1"]).ingest
    with pytest.raises(IngestError, match=r"Votes\.xml: was removed while it was read"):
        execute_ingest(plan_ingest([site], tmp_path / "w", cfg), cfg)
    assert _left(tmp_path / "w") == []
