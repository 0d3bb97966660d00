"""The local Dask cluster of ``ingest.runner=dask`` without ``ingest.address``, hosted by a helper process.

The host process (:func:`serve`) starts Dask's scheduler and workers as subprocesses of its own
(``SubprocessCluster``: ``python -m dask spec ...``, not forked or spawned from the command, so an unguarded main
script is never re-run), writes the scheduler's address on one line, and closes the cluster when its stdin ends:
when the command closes it (:func:`local_cluster`) or dies. The command starts the host in a process group of its
own (``OWN_PROCESS_GROUP``), and the host's children are in that group too: a Ctrl-C in the terminal reaches the
command only, which stops the cluster in order. Before, the scheduler and workers got the terminal's SIGINT
with the command and closed themselves under it: an interrupted ingest ended with exit 1 and Dask's tracebacks
after 11-41 s instead of ``interrupted``.

The scheduler and workers preload this module (:func:`dask_setup`): each closes itself once its host is gone. A
host killed with the command (a ``kill -9`` of both, the OOM killer) can close nothing, and they ran on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from alignflow.tasks.processes import OWN_PROCESS_GROUP

from .errors import IngestError

CLOSE_SECONDS = 30.0  # the host's orderly close of its cluster, before its process group is killed
HOST_PID_ENV = "ALIGNFLOW_DASK_HOST_PID"  # the host's pid, for its scheduler's and workers' watch (dask_setup)
HOST_POLL_SECONDS = 0.5
ORPHAN_CLOSE_SECONDS = 10.0  # a scheduler or worker whose host is gone: its own close, then it exits regardless


def cluster_kwargs(workers: int) -> dict:
    """``SubprocessCluster``'s keywords: ``workers`` processes of one thread each, loopback only, no dashboard."""
    import logging

    return {
        "n_workers": max(1, workers), "threads_per_worker": 1, "host": "127.0.0.1", "dashboard_address": None,
        "worker_class": "distributed.Worker", "silence_logs": logging.ERROR,
        # the scheduler's HTTP routes (health, metrics) on any free loopback port, not on 8787
        "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0", "preload": [__name__]},
        "worker_kwargs": {"preload": [__name__]},
    }


def dask_setup(server) -> None:
    """Dask's preload hook, run in the cluster's scheduler and in each worker: a daemon thread that, once the
    process's parent is no longer the host that started it (the host died; the process was handed to init),
    sends the process SIGTERM, on which Dask closes it, and exits it after ``ORPHAN_CLOSE_SECONDS`` if that
    close hangs. Nothing is watched in a process that no host of alignflow's started."""
    host = int(os.environ.get(HOST_PID_ENV) or 0)
    if not host:
        return

    def watch() -> None:
        while os.getppid() == host:
            time.sleep(HOST_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(ORPHAN_CLOSE_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="alignflow-dask-host-watch", daemon=True).start()


def serve(workers: int) -> None:
    """The host process: start the cluster, say its address, close it once stdin ends."""
    from distributed.deploy.subprocess import SubprocessCluster

    # SIGTERM (the command's last resort, or a user's kill of this process) closes the cluster like stdin's end
    signal.signal(signal.SIGTERM, lambda *_: sys.stdin.close())
    os.environ[HOST_PID_ENV] = str(os.getpid())  # inherited by the scheduler and workers: dask_setup
    cluster = SubprocessCluster(**cluster_kwargs(workers))
    try:
        sys.stdout.write(json.dumps({"address": cluster.scheduler_address}) + "\n")
        sys.stdout.flush()
        try:
            while sys.stdin.buffer.read(1 << 16):
                pass
        except (OSError, ValueError):  # stdin closed under the read by the SIGTERM handler
            pass
    finally:
        cluster.close(timeout=CLOSE_SECONDS)


def host_command(workers: int) -> list[str]:
    return [sys.executable, "-c", f"from alignflow.tasks.ingest.dask_cluster import serve; serve({int(workers)})"]


@contextmanager
def local_cluster(workers: int) -> Iterator[str]:
    """A cluster of ``workers`` processes on this machine for the block; yields its scheduler's address."""
    host = subprocess.Popen(host_command(workers), stdin=subprocess.PIPE, stdout=subprocess.PIPE, **OWN_PROCESS_GROUP)
    try:
        line = host.stdout.readline()
        if not line:
            raise IngestError(f"the local Dask cluster of ingest.runner=dask did not start (its host process ended "
                              f"with exit status {host.wait()}; its messages are above)")
        yield json.loads(line)["address"]
    finally:
        _stop(host)


def _stop(host: subprocess.Popen) -> None:
    """Close the host's stdin and wait for its orderly close of the cluster; past ``CLOSE_SECONDS``, kill its
    process group (the host, the scheduler and the workers)."""
    try:
        host.stdin.close()
    except OSError:  # the host is gone already
        pass
    try:
        host.wait(timeout=CLOSE_SECONDS + 5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(host.pid, signal.SIGKILL)  # whatever of the group is left (a worker the close missed)
    except (ProcessLookupError, PermissionError):
        pass
    host.wait()
    host.stdout.close()
