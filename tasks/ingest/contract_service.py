"""Data-contract checks on a second process, so the walk over questions goes on meanwhile.

The builder hands each batch to :meth:`ContractService.submit` and collects the
result (in submission order) when it next needs it. One worker process runs
:func:`alignflow.data_contracts.validate` on every batch; a sender thread and a
receiver thread move batches (Arrow tables, made into the pandas frames GX checks
on the worker side) and results over its pipes, so neither side ever waits on the
other's pipe buffer. A batch travels as an Arrow IPC file in shared memory
(:class:`SharedBatches`) that the worker maps without copying, or, where there is
none, pickled on the pipe. A batch submitted with a :class:`~.build.CheckedWrite`
is also written by the worker once checked (its valid rows, into the dataset's
Parquet file, which the worker keeps open until :meth:`ContractService.close_file`),
so the builder lets go of the batch as soon as it is sent. The result comes back
without the rows: the valid rows' index, the rejected rows' failing expectations
and the fields their quarantine needs, the rows written, statistics, table
failures, Data Docs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import queue
import shutil
import subprocess
import sys
import threading
import tempfile
import time
from typing import Any

from alignflow.tasks.processes import OWN_PROCESS_GROUP, lower_priority, may_raise_priority


_PRESTARTED: list[subprocess.Popen] = []  # a worker started ahead of need by :func:`prestart`
_YIELDING: set[int] = set()  # the pids of prestarted workers at PRESTART_NICE, to be given this one's back

# A worker started ahead of need loads its libraries (~2 CPU-s, Great Expectations above all) while the command
# starts up; so do the command itself (~2.5 CPU-s of imports) and Prefect's server (~2.2), which the flow waits
# for, on the same two cores. At this nice value the worker takes what they leave; it gets this process's
# priority back when a ContractService adopts it, before the read phase. Only where that may be done
# (processes.may_raise_priority): elsewhere it starts at this process's priority, as before. 302 MiB of real
# rows, 2 workers, alternating (2-core machine, 2026-12-05): 9.94-10.57 s at equal priority, 9.12-10.24 at 5,
# 9.74-10.36 at 10, 9.96-10.38 at 19 (three rounds); then 9.95-10.17 s at equal priority against 9.53-9.92 at 5
# (four pairs, the mean 10.01 -> 9.68 s).
PRESTART_NICE = 5

# Up to this much input, the worker starts with the command (or before the read phase): the read is shorter
# than the worker's ~4-5 s of imports, so loading them early saves wall time. Past it, the worker starts when
# the build begins: an idle worker (~275 MiB once GX is loaded) would otherwise sit beside the read workers
# and the decompressor through the whole read phase, which is where a Pushshift month peaks in memory; the
# builder keeps walking while the worker loads, since results are collected one batch behind.
EARLY_START_MAX_BYTES = 256 << 20
# Dump XML in plain files (Stack Exchange sites) is read with little memory: at 1 GiB with 2 workers the tree
# holds ~640 MiB while reading (~830 MiB with the idle worker beside it) against ~910 MiB in the build. Up to this
# much of it, the worker starts early too. On 301 MiB of real rows (bench/REPORT.md) the command took 28.5 and 29.1 s
# against 30.5 and 30.2 s, alternating, the builder waiting 3.3-4.2 s for its first verdicts instead of 6.6-6.7 s.
# Past it, the worker's ~3 CPU-s of imports slow the busy start-up for nothing: the phase between the read and the
# build (indexes), where it loads otherwise, grows with the input (~3.7 s at 1 GiB).
EARLY_START_MAX_XML_BYTES = 512 << 20
# A compressed file counts as this many times its size (zstd on Pushshift JSON: about 6x; 7z on XML: 5-10x).
COMPRESSED = {".zst": 8, ".7z": 8, ".gz": 6, ".bz2": 8, ".xz": 8}


def start_early(paths: list[str | os.PathLike]) -> bool:
    """Whether the contract worker should start before the read phase, for the input under ``paths``."""
    files = _input_files(paths)
    xml = bool(files) and all(f.lower().endswith(".xml") for f in files)
    return sum(map(_input_bytes, files)) <= (EARLY_START_MAX_XML_BYTES if xml else EARLY_START_MAX_BYTES)


def input_size(paths: list[str | os.PathLike]) -> int:
    """The bytes of input under ``paths`` (files, and files in folders), compressed files at their estimated
    uncompressed size (:data:`COMPRESSED`). Paths that cannot be read count as nothing; the plan reports them."""
    return sum(map(_input_bytes, _input_files(paths)))


def _input_files(paths: list[str | os.PathLike]) -> list[str]:
    files = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            files += [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
        else:
            files.append(path)
    return files


def _input_bytes(path: str) -> int:
    try:
        return os.stat(path).st_size * COMPRESSED.get(os.path.splitext(path)[1].lower(), 1)
    except OSError:
        return 0


# Pipe buffer for the batches sent to the worker: with Linux's default 64 KiB, an 8 MiB batch is 128 writes
# and as many wake-ups of the reader; 1 MiB (the most an unprivileged process may ask by default) about
# halves the CPU both sides spend moving batches (a 1.6 GiB stream of pickled Arrow tables on this 2-core
# machine: 2.5-3.4 CPU-s in all at 64 KiB, 1.3-2.6 at 1 MiB).
PIPE_BYTES = 1 << 20


def _spawn() -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from alignflow.tasks.ingest.contract_service import serve; serve()"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **OWN_PROCESS_GROUP)
    _widen_pipe(proc.stdin)
    return proc


def _widen_pipe(pipe) -> None:
    """Ask for a :data:`PIPE_BYTES` buffer on ``pipe`` (Linux); elsewhere, or if refused, it stays as it is."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return
    set_size = getattr(fcntl, "F_SETPIPE_SZ", 1031 if sys.platform.startswith("linux") else None)
    if set_size is None:
        return
    try:
        fcntl.fcntl(pipe.fileno(), set_size, PIPE_BYTES)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size, or not a pipe: the default buffer works, a little slower


def prestart() -> None:
    """Start the worker now, so it loads its libraries (~4-5 s, GX above all) while the command is still
    starting up (its own imports, Prefect's server), at :data:`PRESTART_NICE` where its priority can be
    given back. The next :class:`ContractService` adopts it (and gives it this process's priority); if none
    comes (a cache hit), it is stopped when this process exits, and it exits by itself when this process
    dies (end of its input)."""
    if not _PRESTARTED:
        proc = _spawn()
        _PRESTARTED.append(proc)
        if may_raise_priority() and lower_priority(proc.pid, PRESTART_NICE):
            _YIELDING.add(proc.pid)
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
            if proc.pid in _YIELDING:  # from here on its checks are what the builder waits for
                _YIELDING.discard(proc.pid)
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0))
            return proc
        _YIELDING.discard(proc.pid)
        proc.wait()
    return _spawn()


# Where batches are handed over: a RAM-backed file system. Pickling an 8 MiB Arrow table onto the pipe and
# back copies it four times (pickle, pipe in, pipe out, unpickle); an IPC file there is written once (without
# the GIL, on the sender thread) and mapped by the worker without a copy. At 1 GiB the builder handed over
# ~1.4 GiB of batches: 1.0 CPU-s in the builder's sender and 2.0 in the worker's unpickling (py-spy).
SHARED_MEMORY = "/dev/shm"
_SHARED_PREFIX = "alignflow-batches-"


class SharedBatches:
    """The folder of one :class:`ContractService`'s batch files in shared memory (``<pid>-<random>``).

    The sender writes each batch as an Arrow IPC file; the worker maps it, unlinks it and reads the table out
    of the mapping (which lives as long as the table). A batch that cannot be written there (no such file
    system, or it is full) goes pickled on the pipe instead, as every batch does where there is no shared
    memory. The folder is removed by :meth:`close`, and by the worker at the end of its input (its builder
    died); folders left by a killed pair of processes are removed by a later service once an hour old
    (:data:`ABANDONED_AFTER_SECONDS`)."""

    def __init__(self, root: str = SHARED_MEMORY) -> None:
        self.dir: str | None = None
        self._n = 0
        if not os.path.isdir(root) or not os.access(root, os.W_OK):
            return
        _remove_abandoned(root)
        try:
            self.dir = tempfile.mkdtemp(prefix=f"{_SHARED_PREFIX}{os.getpid()}-", dir=root)
        except OSError:
            self.dir = None

    def put(self, table) -> Any:
        """``table`` as written to shared memory (a ``("shared", path)`` reference), or itself if it cannot
        be."""
        if self.dir is None:
            return table
        import pyarrow as pa

        path = os.path.join(self.dir, f"{self._n}.arrow")
        self._n += 1
        try:
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        except (OSError, pa.ArrowException):  # full (ENOSPC) or gone: this batch goes on the pipe
            _unlink(path)
            return table
        return ("shared", path)

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def take_shared(table):
    """The table a :meth:`SharedBatches.put` reference points to (mapped, not copied; the file is unlinked,
    the mapping stays as long as the table); anything else as it is."""
    if not (isinstance(table, tuple) and table[:1] == ("shared",)):
        return table
    path = table[1]
    try:
        return _mapped(path)
    finally:
        _unlink(path)


def _mapped(path: str):
    """The table of an Arrow IPC file, read out of a mapping of it (which stays as long as the table does)."""
    import pyarrow as pa

    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all()


class KeptBatch:
    """A batch the builder hands to the worker and writes itself once it is checked (the datasets of
    ``build.WRITTEN_BY_THE_BUILDER``): ``table`` is the builder's table until the service's sender has written
    it to shared memory, and from then on a mapping of that file. The builder then holds no copy of its own
    beside the one the worker reads: the file's pages are counted once, where they are read. With 2 workers
    the process tree's peak RSS (sampled every 20 ms) fell from 1,008-1,023 to 977-994 MiB at 1 GiB and from
    991-1,000 to 963-969 MiB on 302 MiB of real rows, for ~0.15 CPU-s more in the builder there (the mapping's
    pages are faulted in when it writes the batch; bench/REPORT.md, "the builder's batches kept as the worker's
    shared-memory files")."""

    def __init__(self, table) -> None:
        self.table = table


def kept_table(batch):
    """The table of a :class:`KeptBatch`; anything else as it is."""
    return batch.table if isinstance(batch, KeptBatch) else batch


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# A folder is abandoned when its process is gone and nothing was written or taken in it for this long. The age
# keeps a folder safe whose process this one cannot see (another PID namespace sharing the file system).
ABANDONED_AFTER_SECONDS = 3600


def _remove_abandoned(root: str) -> None:
    """Remove batch folders whose service process no longer exists (both processes were killed)."""
    from alignflow.tasks.processes import process_alive

    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(_SHARED_PREFIX):
            continue
        pid = name[len(_SHARED_PREFIX):].split("-", 1)[0]
        path = os.path.join(root, name)
        try:
            idle = time.time() - os.stat(path).st_mtime
        except OSError:
            continue
        if pid.isdigit() and idle > ABANDONED_AFTER_SECONDS and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


class ContractService:
    def __init__(self, shared_root: str = SHARED_MEMORY, *, arrow_allocator: str | None = None) -> None:
        """``arrow_allocator``: the worker's Arrow pool from its first batch on (:func:`.build.use_arrow_allocator`;
        None: the one it starts with)."""
        self.proc = _take_worker()
        self.shared = SharedBatches(shared_root)
        self._out: queue.Queue = queue.Queue()
        if self.shared.dir is not None:  # the worker removes the folder if this process dies first
            self._out.put(("shared", self.shared.dir))
        if arrow_allocator is not None:
            self._out.put(("allocator", arrow_allocator))
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

    def submit(self, table, kind: str, *, write=None, **kwargs) -> int:
        """Queue an Arrow table (or a :class:`KeptBatch`) for ``validate`` (as a pandas frame, made on the
        worker); with ``write`` (a :class:`~.build.CheckedWrite`), the worker then writes its valid rows.
        Returns the result's ticket."""
        return self._put(("check", table, kind, kwargs, write))

    def close_file(self, path: str, schema) -> int:
        """Queue the closing of the Parquet file the worker writes at ``path`` (made with ``schema`` if no batch
        was written to it). Its result (None) comes once the file is complete."""
        return self._put(("close", path, schema))

    def _put(self, item: tuple) -> int:
        ticket = self._submitted
        self._submitted += 1
        self._out.put(item)
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

    def _hand_over(self, batch):
        """What goes on the pipe for a batch: its shared-memory reference, or the table itself. A
        :class:`KeptBatch` written there is mapped here before the worker can unlink the file, and its table
        becomes that mapping: the builder's own copy is freed once this thread lets go of it."""
        import pyarrow as pa

        table = kept_table(batch)
        ref = self.shared.put(table)
        if ref is not table and isinstance(batch, KeptBatch):
            try:
                batch.table = _mapped(ref[1])
            except (OSError, pa.ArrowException):  # the builder keeps its own copy, as without shared memory
                pass
        return ref

    def _send(self) -> None:
        try:
            while (item := self._out.get()) is not None:
                if item[0] == "check":  # the table goes through shared memory where it can
                    item = (item[0], self._hand_over(item[1]), *item[2:])
                pickle.dump(item, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                del item
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

    def finish_docs(self) -> None:
        """Wait until the worker has written every Data Docs page it still owes (raises its error)."""
        self.result(self._put(("docs",)))

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            self.finish_docs()
        self._out.put(None)
        self._sender.join(timeout=30)
        before = _children_cpu()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._receiver.join(timeout=30)
        self.shared.close()
        self.cpu_seconds = _children_cpu() - before


def _children_cpu() -> float:
    """CPU seconds of this process's children that have exited (the worker, once waited for)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _slim(result, table, kind: str):
    """The result without the rows (the fields a rejected row's quarantine needs stay, in ``rejected_fields``)."""
    import pandas as pd

    from .build import rejected_fields

    result.rejected_fields = rejected_fields(table, list(result.rejected.index), kind) if len(result.rejected) else {}
    result.valid = pd.DataFrame(index=result.valid.index)
    result.rejected = result.rejected[["expectation"]] if len(result.rejected) else \
        pd.DataFrame({"expectation": pd.Series([], dtype=object)})
    result.result_json = {}
    return result


class _Files:
    """The Parquet files the worker writes, open from their first batch to their ``close`` message."""

    def __init__(self) -> None:
        self.writers: dict = {}

    def writer(self, path: str, schema):
        from .build import dataset_writer

        if path not in self.writers:
            self.writers[path] = dataset_writer(path, schema)
        return self.writers[path]

    def close(self, path: str, schema) -> None:
        self.writer(path, schema).close()
        del self.writers[path]


def _check(files: _Files, table, kind: str, kwargs: dict, write, docs: list):
    """Check (and maybe write) one batch; its Data Docs, if it has any, go on ``docs``, to be written later."""
    from alignflow.data_contracts import validate

    from .build import write_valid

    table = take_shared(table)
    result = validate(table.to_pandas(), kind, defer_docs=True, **kwargs)
    if result.deferred_docs is not None:
        docs.append(result.deferred_docs)
        result.deferred_docs = None
    result.written = 0
    if write is not None and result.passed:  # a table-level failure stops the build: nothing of it is written
        result.written = write_valid(files.writer(write.path, table.schema), table,
                                     result.valid.index.to_numpy(), write.sizes, write.only_batch)
    return _slim(result, table, kind)


def _input_waiting(stream) -> bool:
    """Whether the next message has started to arrive: its bytes wait on the pipe (or the pipe is closed), or
    the reader already holds them in its buffer, read with the message before, where ``select`` cannot see
    them. The buffer is looked at without blocking: an empty pipe then reads as nothing."""
    import select

    try:
        if select.select([stream], [], [], 0)[0]:
            return True
        peek = getattr(stream, "peek", None)
        if peek is None:
            return False
        fd = stream.fileno()
        os.set_blocking(fd, False)
        try:
            return bool(peek(1))
        finally:
            os.set_blocking(fd, True)
    except (OSError, ValueError):
        return True


def _write_docs(docs: list) -> None:
    while docs:
        docs.pop(0).write()


def serve() -> None:
    """Worker loop: run each message read from stdin (check a batch and maybe write it; close a file); write
    each one's result to stdout."""
    from alignflow.data_contracts.contracts import defer_unused_imports, hide_unused_integrations
    from alignflow.startup import imports_without_gc

    from .build import collect_batch_garbage, use_arrow_allocator
    from .pipes import worker_streams

    hide_unused_integrations()  # this process validates frames and writes Parquet: no SQL, no cloud
    defer_unused_imports()
    with imports_without_gc():
        import great_expectations  # noqa: F401  loaded now, while the caller is still reading its input

    collect_batch_garbage(new_objects_stay=True)  # the libraries' objects: out of every later pass
    kinds: set[str] = set()
    files = _Files()
    # Data Docs of a dataset's first batch are written when no batch waits (and before any file is closed, and
    # when the builder asks: ContractService.finish_docs): the builder gets that batch's verdict without
    # waiting for them. At 1 GiB it waited ~2 s
    # at the start of the build while the four datasets' docs were written one after the other.
    docs: list = []
    docs_error: BaseException | None = None
    shared_dir: str | None = None
    stdin, stdout = worker_streams()  # buffered even under PYTHONUNBUFFERED; print() goes to stderr
    while True:
        if docs and docs_error is None and not _input_waiting(stdin):
            try:
                docs.pop(0).write()
            except Exception as exc:  # reported as the reply to the next message
                docs_error = exc
            continue
        try:
            message = pickle.load(stdin)
        except EOFError:  # the builder is done, or died: its batches in shared memory are no one's now
            if shared_dir is not None:
                shutil.rmtree(shared_dir, ignore_errors=True)
            return
        if message[0] == "shared":  # where the builder's batch files are (no reply)
            shared_dir = message[1]
            continue
        if message[0] == "allocator":  # the Arrow pool of the batches from here on (no reply)
            use_arrow_allocator(message[1])
            continue
        kind = None
        try:
            if docs_error is not None:
                raise docs_error
            if message[0] == "check":
                _, table, kind, kwargs, write = message
                reply = ("ok", _check(files, table, kind, kwargs, write, docs))
            elif message[0] == "docs":
                _write_docs(docs)
                reply = ("ok", None)
            else:
                _, path, schema = message
                _write_docs(docs)  # a closed file is a finished dataset: its docs are there too
                files.close(path, schema)
                reply = ("ok", None)
        except Exception as exc:  # passed on to the builder as it is (or as its message, if it does not pickle)
            try:
                pickle.dumps(exc)
                reply = ("error", exc)
            except Exception:
                reply = ("error", RuntimeError(f"{type(exc).__name__}: {exc}"))
        pickle.dump(reply, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()
        del message, reply
        if kind is not None:
            # each batch churns frames and GX objects, many in reference cycles; the first batch of a
            # dataset also builds its suite, which stays
            collect_batch_garbage(new_objects_stay=kind not in kinds)
            kinds.add(kind)
