"""Ctrl-C on ``alignflow ingest``: the terminal's SIGINT to the whole foreground group ends the command at once,
with one line and exit 130, and leaves no process, no temporary folder and no dataset folder behind; SIGTERM
(``kill``, ``timeout``) the same way, with exit 143. Its
helpers (Prefect's temporary server, the reaper, the reading workers, the contract process) run in process
groups of their own, so the command stops them in order; before, the server died with the interrupt and the
command hung in Prefect's exit, waiting on it."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from alignflow.tasks.ingest.synthetic import generate_dump


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return generate_dump(tmp_path_factory.mktemp("dump"), questions=20_000, seed=3)


def _in_read(work: Path, me: psutil.Process) -> bool:
    return any("ranges import serve" in _cmdline(p) for p in _tree(me))


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def _in_build(work: Path, me: psutil.Process) -> bool:
    return any((work / "data" / "ingest").glob(".*.tmp-*/posts.parquet"))


def _dask_cluster_up(work: Path, me: psutil.Process) -> bool:
    """The local Dask cluster's workers are up (their host process started them): the ranges are being read."""
    if not any("dask spec tcp://" in _cmdline(p) for p in _tree(me)):
        return False
    time.sleep(1.0)  # the workers join the scheduler and take their first ranges
    return True


def _later_in_build(work: Path, me: psutil.Process) -> bool:
    if not _in_build(work, me):
        return False
    time.sleep(0.6)  # past the walk's first batches: the builder waits on verdicts, writes Parquet
    return True


def _as_a_terminal_job() -> None:
    """SIGINT and SIGTERM at their defaults in the command, as in a job a terminal starts. The suite itself may
    run with SIGINT ignored (a background job of a non-interactive shell, as some CI runners start it), which
    every child would inherit: Ctrl-C would then do nothing, as it should for such a job."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


# Ctrl-C in a terminal: SIGINT to the foreground process group; ``kill``, ``timeout``: SIGTERM to the command
STOPS = {"ctrl-c": (signal.SIGINT, True, 130, "interrupted"), "sigterm": (signal.SIGTERM, False, 143, "terminated")}


@pytest.mark.slow
@pytest.mark.parametrize(("when", "stop", "runner"),
                         [(_in_read, "ctrl-c", "local"), (_in_build, "ctrl-c", "local"),
                          (_later_in_build, "ctrl-c", "local"), (_in_read, "sigterm", "local"),
                          (_later_in_build, "sigterm", "local"), (_dask_cluster_up, "ctrl-c", "dask")],
                         ids=["read-ctrl-c", "build-ctrl-c", "later-in-build-ctrl-c", "read-sigterm",
                              "later-in-build-sigterm", "dask-read-ctrl-c"])
def test_an_interrupted_ingest_ends_at_once_and_leaves_nothing(site, tmp_path, when, stop, runner):
    """``dask``: the local Dask cluster of ``ingest.runner=dask`` (its host process, scheduler and workers in a
    group of their own); before, they got the terminal's SIGINT too and the command ended with exit 1 and Dask's
    tracebacks after 11-41 s."""
    if runner == "dask":
        pytest.importorskip("prefect_dask", reason="ingest.runner=dask needs the [dask] extra")
    signum, to_group, code, line = STOPS[stop]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    work = tmp_path / "w"
    exe = Path(sys.executable).parent / "alignflow"
    proc = subprocess.Popen([str(exe), "ingest", str(site), "--workdir", str(work), "--set", "ingest.workers=2",
                             "--set", "ingest.range_mb=1", "--set", f"ingest.runner={runner}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True,  # its own group, as a terminal's foreground job
                            preexec_fn=_as_a_terminal_job)
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and not when(work, me):
        time.sleep(0.02)
    helpers = _tree(me)
    assert proc.poll() is None and helpers, "the ingest ended before the moment to interrupt it"
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for helper in helpers:
            helper.kill()
        pytest.fail("the interrupted ingest did not end within 60 s")
    err = err.decode()
    assert proc.returncode == code, err[-3000:]
    assert err.splitlines()[-1] == line and "Traceback" not in err, err[-3000:]
    # Prefect's "Crash detected! ..." and "Finished in state Crashed(...)" records said the stop three more times
    assert "| ERROR" not in err, err[-3000:]
    gone, alive = psutil.wait_procs(helpers, timeout=20)
    for helper in alive:
        helper.kill()
    assert not alive, [_cmdline(p)[:120] for p in alive]
    ingest = work / "data" / "ingest"  # absent when the interrupt came while the command started (read ahead)
    left = list(ingest.iterdir()) if ingest.exists() else []
    assert not [p.name for p in left if ".tmp-" in p.name]  # no temporary folder
    # a dataset folder only if the build had finished and renamed it into place (the interrupt then came in the
    # tracking after it): complete, as a rerun would trust it
    assert all((p / "manifest.json").is_file() for p in left), [p.name for p in left]
    if (work / "mlflow.db").exists():  # the run, if it had begun, is ended as failed, not left running
        with sqlite3.connect(work / "mlflow.db") as db:
            assert {s for (s,) in db.execute("SELECT status FROM runs")} <= {"FAILED"}


# A command whose interrupt a library turns into an error of its own (as pydantic's serializer does with a
# KeyboardInterrupt raised in a callback, seen on ingest.runner=dask); "none": the same error without a signal.
_WRAPPING_COMMAND = """
import os, signal, sys, time
from alignflow.flows import cli

@cli.app.command("stop-me")
def stop_me(signame: str) -> None:
    try:
        if signame != "none":
            os.kill(os.getpid(), getattr(signal, signame))
            time.sleep(10)
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise RuntimeError("a library's own error around the interrupt") from None

sys.argv = ["alignflow", "stop-me", sys.argv[1]]
cli.main()
"""


@pytest.mark.parametrize(("signame", "code", "line"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated"),
                                                       ("none", 1, None)])
def test_an_interrupt_a_library_wrapped_in_its_own_error_is_still_the_stop(signame, code, line):
    env = {k: v for k, v in os.environ.items() if k != "ALIGNFLOW_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", _WRAPPING_COMMAND, signame], env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=_as_a_terminal_job)
    assert proc.returncode == code, proc.stderr[-3000:]
    if line is None:  # no signal came: the error is the command's own, shown in full
        assert "RuntimeError: a library's own error" in proc.stderr
    else:
        assert proc.stderr.strip().splitlines() == [line], proc.stderr[-3000:]
        debug = subprocess.run([sys.executable, "-c", _WRAPPING_COMMAND, signame], env={**env, "ALIGNFLOW_DEBUG": "1"},
                               capture_output=True, text=True, timeout=120, preexec_fn=_as_a_terminal_job)
        assert debug.returncode == code and "RuntimeError: a library's own error" in debug.stderr  # --debug shows it
        assert debug.stderr.strip().splitlines()[-1] == line


# A command whose stop arrives inside a callback Python cannot raise from (a weakref's, as importlib's module locks
# have): the signal's KeyboardInterrupt is "ignored" there, and the command would run on to exit 0.
_SWALLOWING_COMMAND = """
import os, signal, sys, time, weakref
from alignflow.flows import cli

class Thing:
    pass

@cli.app.command("stop-me")
def stop_me(signame: str) -> None:
    thing = Thing()

    def callback(ref):  # the signal's handler runs in here
        os.kill(os.getpid(), getattr(signal, signame))
        for _ in range(100_000):
            pass

    ref = weakref.ref(thing, callback)
    del thing
    time.sleep(3)

sys.argv = ["alignflow", "stop-me", sys.argv[1]]
cli.main()
"""


def _as_a_background_job() -> None:
    """SIGINT ignored, SIGTERM at its default: a background job of a non-interactive shell."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize(("signame", "code", "line", "job"), [
    ("SIGINT", 130, "interrupted", _as_a_terminal_job), ("SIGTERM", 143, "terminated", _as_a_terminal_job),
    ("SIGTERM", 143, "terminated", _as_a_background_job),
], ids=["sigint", "sigterm", "sigterm-background-job"])
def test_a_stop_that_comes_inside_a_callback_still_stops_the_command(signame, code, line, job):
    env = {k: v for k, v in os.environ.items() if k != "ALIGNFLOW_DEBUG"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _SWALLOWING_COMMAND, signame], env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=job)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [line], proc.stderr[-3000:]  # no "Exception ignored" above it
    assert time.monotonic() - started < 60
