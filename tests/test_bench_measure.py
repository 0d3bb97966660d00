"""bench/ingest/measure.py: the CPU seconds of a command's whole process tree, and the ceiling they put on the
ratio of most workers against one."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "ingest"))

import measure  # noqa: E402  (bench/ingest/measure.py)

# a command whose CPU is spent in a grandchild, the way the ingest's readers and Prefect's server are
BURN = textwrap.dedent("""
    import subprocess, sys
    code = "import time\\nend = time.process_time() + 0.6\\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", code], check=True)
""")


def test_the_cpu_of_a_grandchild_counts_as_the_commands(tmp_path):
    run = measure.run_measured([sys.executable, "-c", BURN], tmp_path, "burn")
    assert run["returncode"] == 0
    assert run["cpu_seconds"] >= 0.6  # the grandchild's 0.6 CPU-s, and the interpreters' start
    assert run["cpu_seconds"] <= run["wall_seconds"] * (measure.psutil.cpu_count() or 1) + 0.05


def test_a_second_command_is_measured_from_zero(tmp_path):
    first = measure.run_measured([sys.executable, "-c", BURN], tmp_path, "first")
    second = measure.run_measured([sys.executable, "-c", "pass"], tmp_path, "second")
    assert second["cpu_seconds"] < first["cpu_seconds"] / 2


@pytest.mark.parametrize(("wall_1", "cpu_most", "cores", "ceiling"), [
    (36.0, 48.0, 2, 1.5),  # the most-workers run used more CPU than one core gives in the one-worker's wall
    (40.0, 40.0, 2, 2.0),  # the same CPU as a single-threaded one-worker run: at best twice as fast
    (30.0, 30.0, 4, 4.0),
])
def test_the_ceiling_spreads_the_cpu_of_most_workers_over_every_core(wall_1, cpu_most, cores, ceiling):
    assert measure.workers_ratio_ceiling(wall_1, cpu_most, cores) == pytest.approx(ceiling)
