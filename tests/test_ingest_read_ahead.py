"""Reading ahead while ``alignflow ingest`` starts: the first byte ranges go to the workers early, the read
phase adopts them only when they are its own first tasks over unchanged files, and the datasets are the same."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from alignflow.config import load_config
from alignflow.tasks.ingest import ranges
from alignflow.tasks.ingest import run as ingest_run
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest, read_ahead, site_range_tasks
from alignflow.tasks.ingest.stackexchange import resolve_sites

SMALL = ("ingest.workers=2", "ingest.range_mb=0.02")  # the fixtures cut into dozens of ranges


def _cfg(*overrides: str):
    return load_config(None, list(overrides)).ingest


def _sites(tmp_path: Path, fixtures_dir: Path) -> list[Path]:
    """Copies of the real sites (a test may touch their files)."""
    out = []
    for name in ("conlang.meta-2020", "datascience.meta-2024"):
        shutil.copytree(fixtures_dir / name, tmp_path / "dumps" / name)
        out.append(tmp_path / "dumps" / name)
    return out


def _ingest(sources, workdir: Path, *overrides: str):
    cfg = _cfg(*overrides)
    return execute_ingest(plan_ingest([str(s) for s in sources], workdir, cfg), cfg)


def _digests(result) -> dict[str, str]:
    return {kind: meta["digest"] for kind, meta in result.datasets.items()}


@pytest.fixture
def pools(monkeypatch):
    """Every WorkerProcesses made, in order."""
    made: list[ranges.WorkerProcesses] = []
    init = ranges.WorkerProcesses.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(ranges.WorkerProcesses, "__init__", recording)
    yield made
    ranges.drop_read_ahead()


def _dead(pool: ranges.WorkerProcesses) -> bool:
    return all(proc.poll() is not None for proc in pool.procs)


def test_the_read_phase_adopts_the_ranges_read_ahead_and_builds_the_same_datasets(fixtures_dir, tmp_path, pools):
    sources = _sites(tmp_path, fixtures_dir)
    one = _ingest(sources, tmp_path / "w1", "ingest.workers=1")
    # part of the ranges ahead (~120 KB of Posts.xml), the rest sent by the read phase to the same workers
    cfg = _cfg(*SMALL)
    assert read_ahead(sources, tmp_path / "w2", cfg, budget=120_000)
    [(sent, n, pool, _)] = ranges._AHEAD
    everything = site_range_tasks(resolve_sites(sources), cfg)
    assert n == 2 and 3 <= len(sent) < len(everything) and everything[: len(sent)] == sent
    # as many first ranges as fit in the budget, a Votes.xml range counting a quarter of its bytes
    assert {t.table for t in sent} == {"Votes", "Posts"}
    cost = [(t.end - t.start) // (4 if t.table == "Votes" else 1) for t in everything]
    assert sum(cost[: len(sent)]) <= 120_000 < sum(cost[: len(sent) + 1])
    assert all(os.getpriority(os.PRIO_PROCESS, proc.pid) == ranges.READ_AHEAD_NICE for proc in pool.procs)
    many = _ingest(sources, tmp_path / "w2", *SMALL)
    assert pools == [pool], "the read phase started workers of its own instead of adopting the read-ahead's"
    assert not ranges._AHEAD and _dead(pool)
    assert _digests(many) == _digests(one) and many.report["files"] == one.report["files"]


def test_a_read_ahead_that_is_not_the_read_phases_own_is_dropped(fixtures_dir, tmp_path, pools):
    sources = _sites(tmp_path, fixtures_dir)
    one = _ingest(sources, tmp_path / "w1", "ingest.workers=1")
    # other ranges (another range size), then the same ranges over a file changed since
    for n, (ahead, used, change) in enumerate([(SMALL, ("ingest.workers=2", "ingest.range_mb=0.03"), None),
                                               (SMALL, SMALL, "touch")]):
        pools.clear()
        assert read_ahead(sources, tmp_path / f"ahead{n}", _cfg(*ahead))
        if change:
            posts = sources[0] / "Posts.xml"
            os.utime(posts, ns=(posts.stat().st_atime_ns, posts.stat().st_mtime_ns + 10**9))
        result = _ingest(sources, tmp_path / f"ahead{n}", *used)
        assert len(pools) == 2 and _dead(pools[0]), "the read-ahead's workers were not dropped"
        assert _digests(result) == _digests(one)


def test_no_read_ahead_where_it_would_be_wasted_or_cannot_apply(fixtures_dir, tmp_path, pools):
    sources = _sites(tmp_path, fixtures_dir)
    workdir = tmp_path / "w"
    assert not read_ahead(sources, workdir, _cfg("ingest.workers=1", "ingest.range_mb=0.02"))
    assert not read_ahead(sources, workdir, _cfg(*SMALL, "ingest.runner=dask"))
    assert not read_ahead([tmp_path / "nothing-here"], workdir, _cfg(*SMALL))  # plan_ingest reports it
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert not read_ahead([*sources, pairs], workdir, _cfg(*SMALL))  # not only dump sites
    assert pools == []
    # the same files with the same sizes built before in this work directory: likely a cache hit
    first = _ingest(sources, workdir, *SMALL)
    assert not first.cache_hit
    pools.clear()
    assert not read_ahead(sources, workdir, _cfg(*SMALL)) and pools == []
    assert read_ahead(sources[:1], workdir, _cfg(*SMALL))  # another input
    ranges.drop_read_ahead()
    assert len(pools) == 1 and _dead(pools[0]) and not ranges._AHEAD
    # tiny ranges: no more tasks than the workers' input pipes hold are sent ahead, and they are still adopted
    pools.clear()
    cfg = _cfg("ingest.workers=2", "ingest.range_mb=0.001")
    assert read_ahead(sources[:1], tmp_path / "tiny", cfg)
    [(sent, _, pool, _)] = ranges._AHEAD
    assert len(sent) == ranges.READ_AHEAD_MAX_TASKS < len(site_range_tasks(resolve_sites(sources[:1]), cfg))
    assert not _ingest(sources[:1], tmp_path / "tiny", "ingest.workers=2", "ingest.range_mb=0.001").cache_hit
    assert pools == [pool] and _dead(pool)


def test_a_cache_hit_drops_the_read_ahead(fixtures_dir, tmp_path, monkeypatch, pools):
    sources = _sites(tmp_path, fixtures_dir)
    first = _ingest(sources, tmp_path / "w", *SMALL)
    monkeypatch.setattr(ingest_run, "_maybe_cached", lambda *_: False)  # as if the manifests had been missed
    pools.clear()
    assert read_ahead(sources, tmp_path / "w", _cfg(*SMALL))
    again = _ingest(sources, tmp_path / "w", *SMALL)
    assert again.cache_hit and _digests(again) == _digests(first)
    assert len(pools) == 1 and _dead(pools[0]) and not ranges._AHEAD
