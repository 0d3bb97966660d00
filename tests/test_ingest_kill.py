"""SIGKILL at any point: no dataset folder a rerun would trust, and the rerun gives the digests of an unbroken run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from alignflow.config import load_config
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
from alignflow.tasks.ingest.synthetic import generate_dump
from flowkit import kill_child_when_seen

SETS = ["ingest.workers=2", "ingest.range_mb=0.1"]

INGEST = """
import sys
from alignflow.config import load_config
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
if __name__ == "__main__":
    cfg = load_config(None, sys.argv[3:]).ingest
    execute_ingest(plan_ingest([sys.argv[1]], sys.argv[2], cfg), cfg)
"""


def _run(site: Path, work: Path):
    cfg = load_config(None, SETS).ingest
    return execute_ingest(plan_ingest([site], work, cfg), cfg)


def _trusted(work: Path) -> list[Path]:
    base = work / "data" / "ingest"
    return [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")] if base.exists() else []


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return generate_dump(tmp_path_factory.mktemp("dump"), questions=1500, seed=5)


@pytest.fixture(scope="module")
def reference(site, tmp_path_factory):
    result = _run(site, tmp_path_factory.mktemp("ref"))
    return {k: v["digest"] for k, v in result.datasets.items()}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_parent_killed_at_a_random_point(site, reference, tmp_path, seed):
    work = tmp_path / "work"
    script = tmp_path / "ingest.py"
    script.write_text(INGEST)
    proc = subprocess.Popen([sys.executable, str(script), str(site), str(work), *SETS])
    time.sleep(random.Random(seed).uniform(1.0, 6.0))
    children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(children, timeout=20)  # workers see their input close and exit
    for folder in _trusted(work):  # only a finished run renames its folder into place
        assert json.loads((folder / "manifest.json").read_text())["datasets"]
    rerun = _run(site, work)
    assert {k: v["digest"] for k, v in rerun.datasets.items()} == reference
    assert not [p for p in (work / "data" / "ingest").iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_worker_killed_midway(site, reference, tmp_path):
    killed: list[int] = []
    work = tmp_path / "work"
    killer = threading.Thread(target=kill_child_when_seen, args=("ranges import serve", killed), kwargs={"poll": 0.05})
    killer.start()
    with pytest.raises(RuntimeError, match="worker process .* exited"):
        _run(site, work)
    killer.join()
    assert killed and _trusted(work) == []
    rerun = _run(site, work)
    assert {k: v["digest"] for k, v in rerun.datasets.items()} == reference
