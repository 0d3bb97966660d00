"""The local Dask cluster of ``ingest.runner=dask`` without ``ingest.address``, hosted by a helper process.

The host process (:func:`serve`) starts Dask's scheduler and workers as subprocesses of its own
(``SubprocessCluster``: ``python -m dask spec ...``, not forked or spawned from the command, so an unguarded main
script is never re-run), writes the scheduler's address on one line, and closes the cluster when its stdin ends:
when the command closes it (:func:`local_cluster`) or dies. The command starts the host in a process group of its
own (``OWN_PROCESS_GROUP``), and the host's children are in that group too: a Ctrl-C in the terminal reaches the
command only, which stops the cluster in order. Before, the scheduler and workers got the terminal's SIGINT
with the command and closed themselves under it: an interrupted ingest ended with exit 1 and Dask's tracebacks
after 11-41 s instead of ``interrupted``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from alignflow.tasks.processes import OWN_PROCESS_GROUP

from .errors import IngestError

CLOSE_SECONDS = 30.0  # the host's orderly close of its cluster, before its process group is killed


def cluster_kwargs(workers: int) -> dict:
    """``SubprocessCluster``'s keywords: ``workers`` processes of one thread each, loopback only, no dashboard."""
    import logging

    return {
        "n_workers": max(1, workers), "threads_per_worker": 1, "host": "127.0.0.1", "dashboard_address": None,
        "worker_class": "distributed.Worker", "silence_logs": logging.ERROR,
        # the scheduler's HTTP routes (health, metrics) on any free loopback port, not on 8787
        "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
    }


def serve(workers: int) -> None:
    """The host process: start the cluster, say its address, close it once stdin ends."""
    from distributed.deploy.subprocess import SubprocessCluster

    # SIGTERM (the command's last resort, or a user's kill of this process) closes the cluster like stdin's end
    signal.signal(signal.SIGTERM, lambda *_: sys.stdin.close())
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
