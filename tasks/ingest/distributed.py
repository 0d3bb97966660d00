"""Range tasks on a Dask cluster, through Prefect's DaskTaskRunner (``ingest.runner=dask``).

Each :class:`~.ranges.RangeTask` becomes one Prefect task run (``read-range``)
on a Dask worker; the parent gathers the results in task order, so the
staging store is replayed exactly as with local worker processes and the
datasets are byte-identical. At most two tasks per worker thread are in flight,
which bounds the results held in memory whatever the size of the input.

``ingest.address`` names a running scheduler (``tcp://host:8786``); empty
starts a cluster for the run on this machine: ``ingest.workers`` processes,
one thread each, listening on 127.0.0.1 only, no dashboard.

Workers open the SOURCE files themselves, by the paths this machine gave:
workers on other machines need the same paths (a shared filesystem). Their
Prefect task runs report to the API this process uses, so that API must be
reachable from them (a temporary local server is, for workers on this
machine). Both are checked on every worker before any range is sent, and
a failure is one user error.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack
from urllib.parse import urlsplit

from .errors import IngestError
from .ranges import RangeResult, RangeTask, read_packed

CONNECT_SECONDS = 10.0  # reaching the scheduler
WORKERS_SECONDS = 60.0  # waiting for a first worker to join a scheduler that has none


def scheduler_endpoint(address: str) -> tuple[str, int]:
    """Host and port of a ``tcp://host:port`` (or ``host:port``) scheduler address; IngestError if malformed."""
    text = address.strip()
    parts = urlsplit(text if "://" in text else f"tcp://{text}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or port is None:
        raise IngestError(f"ingest.address: not a Dask scheduler address: {address!r} (expected tcp://host:port)")
    return parts.hostname, port


def check_reachable(address: str, timeout: float = CONNECT_SECONDS) -> None:
    """Fail with one line naming ``address`` when nothing accepts connections there."""
    host, port = scheduler_endpoint(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise IngestError(f"cannot reach the Dask scheduler at {address} (ingest.address): {reason}") from None


def worker_problems(paths: list[str], api_url: str | None) -> list[str]:
    """Run on a worker: what stops it from doing range tasks (unreadable SOURCE files, Prefect's API out of reach)."""
    problems = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            problems.append(f"cannot read {path} ({exc.strerror or type(exc).__name__}); workers need the same "
                            "paths as this machine (a shared filesystem)")
            break
    if api_url:
        import urllib.request

        try:
            with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=10):
                pass
        except Exception as exc:  # noqa: BLE001 - any failure means the worker cannot report its task runs
            problems.append(f"cannot reach Prefect's API at {api_url} ({' '.join(str(exc).split())}); set "
                            "PREFECT_API_URL to a Prefect server both this machine and the workers reach")
    return problems


def check_workers(client, paths: list[str], api_url: str) -> int:
    """Every worker can read ``paths`` and reach ``api_url``; returns the number of worker threads."""
    info = client.scheduler_info()
    if not info.get("workers"):
        try:
            client.wait_for_workers(1, timeout=WORKERS_SECONDS)
        except Exception:  # distributed raises TimeoutError (or its own) after the timeout
            raise IngestError(f"no Dask worker joined the scheduler at {client.scheduler.address} within "
                              f"{WORKERS_SECONDS:.0f} s (ingest.address)") from None
        info = client.scheduler_info()
    replies = client.run(worker_problems, paths, api_url)
    for worker, problems in sorted(replies.items()):
        if problems:
            raise IngestError(f"Dask worker {worker}: {problems[0]}")
    return max(1, sum(w.get("nthreads", 1) for w in info["workers"].values()))


def _prefect_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    @task(name="read-range", task_run_name="read {task.label} bytes {task.start}-{task.end}",
          cache_policy=NO_CACHE, persist_result=False)
    def read_range_task(task: RangeTask) -> RangeResult:
        return read_packed(task)

    return read_range_task


def _api_url() -> str:
    """The Prefect API this process reports to (a temporary local server's when none is configured)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def _runner_class():
    """Prefect's DaskTaskRunner, or the one-line error of a missing extra (before any cluster is started)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise IngestError("ingest.runner=dask needs prefect-dask: pip install 'alignflow[dask]'") from None
    return DaskTaskRunner


def run_tasks_on_dask(tasks: list[RangeTask], address: str, workers: int) -> Iterator[tuple[RangeTask, RangeResult]]:
    """Results of ``tasks`` in order, each read as a Prefect task run on a Dask worker."""
    if not tasks:
        return
    runner_class = _runner_class()
    given = address  # the user's scheduler, or none: a cluster is started for the run
    if address:
        check_reachable(address)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    read_range_task = _prefect_task()
    api_url = _api_url()
    with ExitStack() as stack:
        # task runs on the workers report to this process's API, not to temporary servers of their own
        stack.enter_context(temporary_settings({PREFECT_API_URL: api_url}))
        if not address:  # a cluster for this run, on this machine (.dask_cluster)
            from .dask_cluster import local_cluster

            address = stack.enter_context(local_cluster(workers))
        runner = stack.enter_context(runner_class(address=address,
                                                  client_kwargs={"timeout": f"{CONNECT_SECONDS:.0f}s"}))
        try:
            client = runner.client
        except OSError as exc:  # the scheduler went away between the check and the connection
            where = "ingest.address" if given else "the local cluster started for this run"
            raise IngestError(f"cannot connect to the Dask scheduler at {address} ({where}): {exc}") from None
        threads = check_workers(client, sorted({t.path for t in tasks}), api_url)
        window = 2 * threads
        pending: deque = deque()
        sent = 0
        try:
            for i, task in enumerate(tasks):
                while sent < len(tasks) and sent < i + window:
                    pending.append(runner.submit(read_range_task, {"task": tasks[sent]}))
                    sent += 1
                yield task, pending.popleft().result()
        finally:
            for future in pending:  # an error stopped the replay: drop what is still queued
                future.wrapped_future.cancel()
