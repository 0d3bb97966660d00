"""The Reddit reply walk on a process of its own, beside the builder's walk over the submissions.

With ``ingest.reddit_reply_pairs`` on, the build walks two stores one after the other: the staging store's
submissions and their top-level comments, then the reply store's replies by parent comment
(:func:`.reddit_replies.walk_reply_pairs`). Both are Python loops on the builder's process, while the contract
process leaves most of the second core idle: at 1 GiB of comments the reply walk was ~13 of the builder's ~28
CPU-seconds. With several workers, :class:`ReplyWalker` runs the reply walk (and the reply store's indexes
before it) on a second process from the start of the index phase. The walk's output, the rows of each parent's
prompt and pairs and the counts at the end, is spooled to a file in the build's temporary folder, a record
(a length, then a pickle) at a time. Once the builder's own walk is done it replays that file into its
writers while the walk goes on, record by record as they are written, with the same calls, in the same
order, as the walk on its own process would make (:func:`.reddit_replies.add_reply_group`), so the datasets
are the same bytes whatever the number of workers, and the pairs' Parquet files and contracts are done
beside the end of the walk rather than after it.

Failure modes: an error in the walk is written to the spool and raised again in the builder; a walker that
dies without finishing (killed, out of memory, also before it has read its work) is an error naming its exit
status (a record it left half written is never read); a builder that fails or is killed stops the walker
(:meth:`ReplyWalker.close`; the walker also checks, every :data:`PARENT_CHECK_EVERY` parents with pairs, that
the process that started it is still its parent, and stops when it is not).
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

from alignflow.config import IngestConfig
from alignflow.tasks.processes import OWN_PROCESS_GROUP

# groups written to the spool per record: one pickle per group cost ~3 us of overhead each on both sides
GROUPS_PER_RECORD = 256
# SQLite's page cache in the walker (its indexes' sorts and the walk): the process lives beside the builder and the
# contract process, and the tree's peak must stay under 1 GiB
CACHE_MB = 8
# how long the builder sleeps between two looks at the spool when the walker has not written its next record yet
RECORD_POLL_SECONDS = 0.002
# how often (in parents with pairs) the walker checks that the builder that started it is still there
PARENT_CHECK_EVERY = 64


class ReplyWalker:
    """Start the walk over ``replies_path`` (a closed, unindexed :class:`.reddit_replies.ReplyStore`) now on a
    process of its own; :meth:`replay` hands its output to a builder; :meth:`close` stops it."""

    def __init__(self, replies_path: Path, cfg: IngestConfig, spool_path: Path, *,
                 groups_per_record: int = GROUPS_PER_RECORD, builder_pid: int | None = None) -> None:
        self.spool_path = Path(spool_path)
        self.spool_path.write_bytes(b"")  # the walker appends to it; the builder reads it as it grows
        cmd = [sys.executable, "-c", "from alignflow.tasks.ingest.reply_walker import serve; serve()"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, **OWN_PROCESS_GROUP)
        self.cpu_seconds = 0.0  # the walker's CPU (its indexes and walk), once replayed
        self.wait_seconds = 0.0  # how long the builder waited for the walker to finish
        self.index_seconds = 0.0  # how long the walker took to build the reply store's indexes, before its walk
        try:
            message = (str(replies_path), cfg, str(self.spool_path), builder_pid or os.getpid(), groups_per_record)
            try:
                pickle.dump(message, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self.proc.stdin.close()
            except BrokenPipeError:  # the walker died before it read its work: the same error as dying later
                raise _ended_early(self.proc.wait()) from None
        except BaseException:
            self.close()
            raise

    def replay(self, builder) -> None:
        """Add the walk's groups and counts to ``builder`` (a :class:`.build.Builder`) as the walker spools them,
        until its last record; then check that it ended well."""
        from .reddit_replies import add_reply_counts, add_reply_group

        finished = False
        try:
            with open(self.spool_path, "rb", buffering=0) as spool:
                while not finished and (record := self._next_record(spool)) is not None:
                    if record[0] == "groups":
                        for prompt, pairs in record[1]:
                            add_reply_group(builder, prompt, pairs)
                    elif record[0] == "done":
                        add_reply_counts(builder, record[1], record[2])
                        self.cpu_seconds, self.index_seconds = record[3], record[4]
                        finished = True
                    else:  # ("error", exception): the walk's own error
                        raise record[1]
            waited = time.perf_counter()
            code = self.proc.wait()
            self.wait_seconds += time.perf_counter() - waited
        finally:
            self.spool_path.unlink(missing_ok=True)
        if not finished or code != 0:
            raise _ended_early(code)

    def _next_record(self, spool) -> tuple | None:
        waited = time.perf_counter()
        try:
            return read_record(spool, lambda: self.proc.poll() is None)
        finally:
            self.wait_seconds += time.perf_counter() - waited

    def close(self) -> None:
        """Stop the walker if it still runs (the build failed or is done) and remove its spool."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.spool_path.unlink(missing_ok=True)


def _ended_early(code: int | None) -> RuntimeError:
    return RuntimeError(f"the Reddit reply walk's process ended without finishing (exit status {code})")


def serve() -> None:
    """The walker process: read (store path, config, spool path, builder's pid, groups per record) from stdin,
    build the store's indexes, walk it, and spool the groups and the counts (or the error)."""
    replies_path, cfg, spool_path, builder_pid, groups_per_record = pickle.load(sys.stdin.buffer)
    with open(spool_path, "ab") as spool:
        try:
            _walk(Path(replies_path), cfg, spool, builder_pid, groups_per_record)
        except BaseException as exc:  # noqa: BLE001 - handed to the builder, which raises it
            if not isinstance(exc, Exception):  # never a SystemExit or KeyboardInterrupt in the builder
                exc = RuntimeError(f"the Reddit reply walk stopped: {type(exc).__name__}: {exc}")
            try:
                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            write_record(spool, ("error", exc))


def read_record(spool, writer_alive) -> tuple | None:
    """The next whole record of ``spool`` (opened unbuffered), waiting while ``writer_alive()`` for its last byte;
    None once the writer is gone and no whole record is left (a half-written one is never read)."""
    gone = False
    while True:
        at = spool.tell()
        head = spool.read(8)
        if len(head) == 8:
            size = int.from_bytes(head, "little")
            data = spool.read(size)
            if len(data) == size:
                return pickle.loads(data)
        spool.seek(at)  # not whole yet: read again once more is written
        if gone:
            return None
        gone = not writer_alive()  # what a finished writer wrote is all in the file: one more look, then done
        if not gone:
            time.sleep(RECORD_POLL_SECONDS)


def write_record(spool, record: tuple) -> None:
    """One record at the spool's end: its pickle's length (8 bytes), then the pickle; flushed, so that the
    builder reads it now. A reader takes a record only once its last byte is there."""
    data = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
    spool.write(len(data).to_bytes(8, "little"))
    spool.write(data)
    spool.flush()


class BuilderGone(RuntimeError):
    """The process that started the walk is no longer its parent: it died, so the walk stops."""


def _walk(replies_path: Path, cfg: IngestConfig, spool, builder_pid: int, groups_per_record: int) -> None:
    from .reddit_replies import ReplyStore, walk_reply_pairs
    from .scoring import configured_split

    groups: list = []
    walked = 0

    def emit(prompt: dict, pairs: list[dict]) -> None:
        nonlocal walked
        groups.append((prompt, pairs))
        walked += 1
        if len(groups) >= groups_per_record:
            write_record(spool, ("groups", groups))
            groups.clear()
        if walked % PARENT_CHECK_EVERY == 0 and os.getppid() != builder_pid:
            raise BuilderGone(f"the build that started the Reddit reply walk (pid {builder_pid}) is gone")

    replies = ReplyStore(replies_path, create=False, cache_mb=CACHE_MB)
    try:
        started = time.perf_counter()
        replies.finish_loading()
        index_seconds = time.perf_counter() - started
        fates_by_file, walk = walk_reply_pairs(replies, cfg, functools.partial(configured_split, cfg.split), emit)
    finally:
        replies.db.close()
    if groups:
        write_record(spool, ("groups", groups))
    write_record(spool, ("done", fates_by_file, walk, time.process_time(), index_seconds))
