"""Data-contract checks on a second process, so the walk over questions goes on meanwhile.

The builder hands each batch to :meth:`ContractService.submit` and collects the
result (in submission order) when it next needs it. One worker process runs
:func:`alignflow.data_contracts.validate` on every batch; a sender thread and a
receiver thread move pickled batches (Arrow tables, made into the pandas frames GX
checks on the worker side) and results over its pipes, so neither side ever
waits on the other's pipe buffer. The result comes back without the
validated rows (the builder still has them): the valid rows' index, the
rejected rows' failing expectations, statistics, table failures, Data Docs.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from typing import Any


_PRESTARTED: list[subprocess.Popen] = []  # a worker started ahead of need by :func:`prestart`

# Up to this much input, the worker starts with the command (or before the read phase): the read is shorter
# than the worker's ~4-5 s of imports, so loading them early saves wall time. Past it, the worker starts when
# the build begins: an idle worker (~275 MiB once GX is loaded) would otherwise sit beside the read workers
# and the decompressor through the whole read phase, which is where a Pushshift month peaks in memory; the
# builder keeps walking while the worker loads, since results are collected one batch behind.
EARLY_START_MAX_BYTES = 256 << 20
# A compressed file counts as this many times its size (zstd on Pushshift JSON: about 6x; 7z on XML: 5-10x).
COMPRESSED = {".zst": 8, ".7z": 8, ".gz": 6, ".bz2": 8, ".xz": 8}


def start_early(paths: list[str | os.PathLike]) -> bool:
    """Whether the contract worker should start before the read phase, for the input under ``paths``."""
    return input_size(paths) <= EARLY_START_MAX_BYTES


def input_size(paths: list[str | os.PathLike]) -> int:
    """The bytes of input under ``paths`` (files, and files in folders), compressed files at their estimated
    uncompressed size (:data:`COMPRESSED`). Paths that cannot be read count as nothing; the plan reports them."""

    def size(path: str) -> int:
        try:
            return os.stat(path).st_size * COMPRESSED.get(os.path.splitext(path)[1].lower(), 1)
        except OSError:
            return 0

    total = 0
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            total += sum(size(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
        else:
            total += size(path)
    return total


def _spawn() -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from alignflow.tasks.ingest.contract_service import serve; serve()"]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def prestart() -> None:
    """Start the worker now, so it loads its libraries (~4-5 s, GX above all) while the command is still
    starting up (its own imports, Prefect's server). The next :class:`ContractService` adopts it; if none
    comes (a cache hit), it is stopped when this process exits, and it exits by itself when this process
    dies (end of its input)."""
    if not _PRESTARTED:
        _PRESTARTED.append(_spawn())
        atexit.register(_stop_prestarted)


def _stop_prestarted() -> None:
    while _PRESTARTED:
        proc = _PRESTARTED.pop()
        proc.kill()
        proc.wait()


def _take_worker() -> subprocess.Popen:
    while _PRESTARTED:
        proc = _PRESTARTED.pop()
        if proc.poll() is None:
            return proc
        proc.wait()
    return _spawn()


class ContractService:
    def __init__(self) -> None:
        self.proc = _take_worker()
        self._out: queue.Queue = queue.Queue()
        self._results: dict[int, Any] = {}
        self._ready = threading.Condition()
        self._submitted = 0
        self._received = 0
        self._failure: BaseException | None = None
        self.wait_seconds = 0.0  # time the builder spent waiting for results
        self.cpu_seconds = 0.0  # CPU seconds of the worker process, known once it has exited
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._sender.start()
        self._receiver.start()

    def submit(self, table, kind: str, **kwargs) -> int:
        """Queue an Arrow table for ``validate`` (as a pandas frame, made on the worker)."""
        ticket = self._submitted
        self._submitted += 1
        self._out.put((table, kind, kwargs))
        return ticket

    def result(self, ticket: int):
        started = time.perf_counter()
        try:
            return self._result(ticket)
        finally:
            self.wait_seconds += time.perf_counter() - started

    def _result(self, ticket: int):
        with self._ready:
            while ticket not in self._results and self._failure is None:
                self._ready.wait()
            if ticket not in self._results:
                raise self._failure  # type: ignore[misc]
            kind, value = self._results.pop(ticket)
        if kind == "error":
            raise value
        return value

    def _send(self) -> None:
        try:
            while (item := self._out.get()) is not None:
                pickle.dump(item, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self.proc.stdin.flush()
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass  # the worker died: the receiver reports it

    def _receive(self) -> None:
        n = 0
        try:
            while True:
                reply = pickle.load(self.proc.stdout)
                with self._ready:
                    self._results[n] = reply
                    self._ready.notify_all()
                n += 1
        except EOFError:
            with self._ready:
                self._failure = RuntimeError(
                    f"data-contract worker process {self.proc.pid} exited (code {self.proc.wait()})")
                self._ready.notify_all()

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        self._out.put(None)
        self._sender.join(timeout=30)
        before = _children_cpu()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._receiver.join(timeout=30)
        self.cpu_seconds = _children_cpu() - before


def _children_cpu() -> float:
    """CPU seconds of this process's children that have exited (the worker, once waited for)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _slim(result):
    """The result without the rows the caller already has."""
    import pandas as pd

    result.valid = pd.DataFrame(index=result.valid.index)
    result.rejected = result.rejected[["expectation"]] if len(result.rejected) else \
        pd.DataFrame({"expectation": pd.Series([], dtype=object)})
    result.result_json = {}
    return result


def serve() -> None:
    """Worker loop: validate each (Arrow table, kind, kwargs) read from stdin; write each result to stdout."""
    from alignflow.data_contracts import validate

    from .build import collect_batch_garbage

    import great_expectations  # noqa: F401  loaded now, while the caller is still reading its input

    collect_batch_garbage(new_objects_stay=True)  # the libraries' objects: out of every later pass
    kinds: set[str] = set()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed must not corrupt the result stream
    while True:
        try:
            table, kind, kwargs = pickle.load(stdin)
        except EOFError:
            return
        try:
            reply = ("ok", _slim(validate(table.to_pandas(), kind, **kwargs)))
        except Exception as exc:  # passed on to the builder as it is (or as its message, if it does not pickle)
            try:
                pickle.dumps(exc)
                reply = ("error", exc)
            except Exception:
                reply = ("error", RuntimeError(f"{type(exc).__name__}: {exc}"))
        pickle.dump(reply, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()
        del table, reply
        # each batch churns frames and GX objects, many in reference cycles; the first batch of a
        # dataset also builds its suite, which stays
        collect_batch_garbage(new_objects_stay=kind not in kinds)
        kinds.add(kind)
