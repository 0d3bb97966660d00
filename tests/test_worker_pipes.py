"""Workers' results come through whole when the worker is stopped and continued while it writes them
(Ctrl-Z then ``fg``, a debugger or a sampling profiler), also under ``PYTHONUNBUFFERED`` (tasks/ingest/pipes.py)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from alignflow.config import load_config
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
from alignflow.tasks.ingest.synthetic import generate_dump

RESULT_BYTES = 8 << 20  # far more than a pipe holds: the write blocks part way until the parent reads

WORKER = """
import pickle, sys
{streams}
sys.stderr.buffer.write(b"R"); sys.stderr.buffer.flush()  # about to write its result
pickle.dump(("ok", bytes(range(256)) * ({n} // 256)), out, protocol=pickle.HIGHEST_PROTOCOL)
out.flush()
"""
STREAMS = {
    "worker_streams": "from alignflow.tasks.ingest.pipes import worker_streams\n_, out = worker_streams()",
    "sys.stdout.buffer": "out = sys.stdout.buffer",  # the stream the workers used before: raw under -u
}


def _stopped_mid_write(streams: str) -> bytes:
    """Start a worker under PYTHONUNBUFFERED=1, let it block in the middle of writing its result, stop and
    continue it, then read everything it wrote."""
    code = WORKER.format(streams=STREAMS[streams], n=RESULT_BYTES)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stderr.read(1) == b"R"
        time.sleep(0.5)  # the pipe is full now and the write waits for room
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGCONT)
        data = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    return data


def test_a_result_comes_through_whole_when_the_worker_is_stopped_mid_write():
    data = _stopped_mid_write("worker_streams")
    kind, value = pickle.loads(data)
    assert kind == "ok" and value == bytes(range(256)) * (RESULT_BYTES // 256)


def test_the_raw_stream_loses_the_rest_of_the_result_there():
    # the control: what a worker writing to sys.stdout.buffer under PYTHONUNBUFFERED sent its parent
    data = _stopped_mid_write("sys.stdout.buffer")
    assert len(data) < RESULT_BYTES
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(data)


def _poke_workers(stop: threading.Event, poked: list[int]) -> None:
    """Stop and continue every process under this one, again and again, until ``stop`` is set."""
    me = psutil.Process()
    while not stop.is_set():
        for child in me.children(recursive=True):
            try:
                child.suspend()
                time.sleep(0.002)
                child.resume()
                poked.append(child.pid)
            except psutil.Error:
                pass
        time.sleep(0.005)


def test_an_ingest_whose_workers_are_stopped_and_continued_gives_the_same_datasets(tmp_path):
    site = generate_dump(tmp_path / "dump", questions=1500, seed=5)
    cfg = load_config(None, ["ingest.workers=2", "ingest.range_mb=0.1"]).ingest
    reference = execute_ingest(plan_ingest([site], tmp_path / "ref", cfg), cfg)
    stop, poked = threading.Event(), []
    poker = threading.Thread(target=_poke_workers, args=(stop, poked))
    poker.start()
    try:
        result = execute_ingest(plan_ingest([site], tmp_path / "poked", cfg), cfg)
    finally:
        stop.set()
        poker.join()
    assert len(set(poked)) >= 2  # the reading workers and the contract process, each stopped many times
    assert {k: v["digest"] for k, v in result.datasets.items()} == {
        k: v["digest"] for k, v in reference.datasets.items()}


@pytest.mark.parametrize("module", ["ranges", "reddit_parallel", "contract_service"])
def test_every_worker_loop_writes_its_results_through_worker_streams(module):
    # the Reddit readers' results are read by the parent as soon as they are written, so their writes seldom
    # wait on a full pipe and a stop in the middle of one is too rare to provoke in a test: their loop is checked
    # to use the same streams as the one the ingest above checks
    import importlib
    import inspect

    source = inspect.getsource(importlib.import_module(f"alignflow.tasks.ingest.{module}").serve)
    assert "worker_streams()" in source and "sys.stdout.buffer" not in source
