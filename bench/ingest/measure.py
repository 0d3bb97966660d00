"""How the ingest benches (``run.py``: Stack Exchange, ``reddit.py``: Pushshift) measure a subprocess and its floor.

* :func:`run_measured`: a command's wall seconds, the CPU seconds of its process tree, and its tree's peak RSS
  (psutil every 0.2 s: the RSS of the process and all its children summed, and the parts at the peak);
* :func:`mean_floor`: the floor the ratios are taken against, the mean of its passes (one before the ingest
  runs and one after them: the speed of a shared host drifts over the minutes in between).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402  (bench/common.py)


def cpu_model() -> str:
    """The CPU's model name, as the generated report names the machine (``bench/common.py``): the floor's speed and
    the command's move differently from one CPU to another, so figures compare only on the same model."""
    return common.machine_info()["cpu_model"]


def tree_rss(proc: psutil.Process) -> tuple[int, list[tuple[str, int]]]:
    """Summed RSS of ``proc`` and its descendants, and the per-process parts (command line, RSS)."""
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, []
    total, parts = 0, []
    for p in procs:
        try:
            rss = p.memory_info().rss
            name = " ".join(p.cmdline()[:8])[:240]
        except psutil.Error:
            continue
        total += rss
        parts.append((name, rss))
    return total, parts


def run_measured(cmd: list[str], log_dir: Path, name: str, env: dict | None = None) -> dict:
    """Run ``cmd`` (in the repository root; stdout and stderr to ``log_dir/name.stdout|.stderr``): its wall
    seconds, the peak RSS of its tree in bytes and MiB with the processes at the peak, its exit code, and the CPU
    seconds (user and system) of the command and of every process under it that was waited for, which in the
    ingest is all of them (readers, the contract process, Prefect's server): what the kernel adds to this
    process's children's usage once the command is reaped. One command at a time."""
    out_path, err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    before = _children_cpu()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        popen = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        proc = psutil.Process(popen.pid)
        peak, peak_parts = 0, []
        while popen.poll() is None:
            rss, parts = tree_rss(proc)
            if rss > peak:
                peak, peak_parts = rss, parts
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    return {
        "returncode": popen.returncode,
        "wall_seconds": wall,
        "cpu_seconds": _children_cpu() - before,
        "peak_rss_bytes": peak,
        "peak_rss_mib": peak / MIB,
        "peak_rss_processes": [{"cmd": c, "rss_mib": round(r / MIB, 1)} for c, r in peak_parts],
        "stdout": out_path,
        "stderr": err_path,
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def workers_ratio_ceiling(one_worker_wall: float, most_workers_cpu: float, cores: int) -> float:
    """The most that "most workers against one" could be on ``cores`` cores, given the CPU seconds the run with
    most workers used: that run at best spreads them evenly over every core (its wall ``most_workers_cpu /
    cores``), against the wall the one-worker run took. The one-worker run is no single thread (its walk reads
    ahead on a thread, Prefect's server is a process of its own), so it already keeps more than one core busy
    part of the time, which is what this ceiling shows."""
    return cores * one_worker_wall / most_workers_cpu


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log."""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def mean_floor(passes: list[dict], size_mib: float, means: tuple[str, ...] = ("wall_seconds",),
               maxima: tuple[str, ...] = ("peak_rss_mib",)) -> dict:
    """The floor the ratios are taken against: the first pass's fields, with ``means`` averaged and ``maxima``
    the largest over the passes, ``mib_per_s`` from the mean wall, and every pass under ``passes``."""
    floor = {**passes[0]}
    for key in means:
        floor[key] = sum(p[key] for p in passes) / len(passes)
    for key in maxima:
        floor[key] = max(p[key] for p in passes)
    floor["mib_per_s"] = size_mib / floor["wall_seconds"]
    floor["passes"] = [{**p, "mib_per_s": size_mib / p["wall_seconds"]} for p in passes]
    return floor
