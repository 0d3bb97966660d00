"""A Pushshift file parsed on worker processes, handed to the sink in file order.

A ``.zst`` month is one compressed stream: it cannot be cut into byte ranges
the way a plain ``Posts.xml`` is. What costs is not the decompression (a few
hundred MiB/s) but, per line, JSON parsing, validation and text cleaning. So
one process (the parent) decompresses and cuts the text into chunks of whole
lines (:data:`CHUNK_BYTES`), and ``workers`` processes parse them. Each chunk's
result is what the one-process reader would have handed the sink and the
reply store: its posts, comments and submissions as SQLite images (rows of
those stores' tables, copied in one statement per table), the rest as a list
of calls (``quarantine``, ``count``). The parent replays them chunk by chunk
in file order, so the stores receive exactly what :func:`.reddit.read_reddit`
with one process gives, and the datasets are byte-identical.

In a worker, orjson parses each line's bytes and an ordinary comment or
submission is checked and cleaned in C (``_fastreddit``: :func:`_fast_comment`,
:func:`_fast_submission`, half the CPU a line); a line of any other shape goes
to :func:`.reddit.read_line`, which decides what it is, so the rows are the
same either way (``tests/test_reddit_fast.py``).

Errors are those of the one-process reader, at the same line: a worker
decodes each line strictly as UTF-8 and raises on the first bad byte or (with
``on_bad_row="error"``) the first bad row; the parent replays every earlier
chunk first, so the first error in file order is the one raised. A truncated or
corrupt stream raises in the parent after the chunks before it are replayed.
Lines longer than ``max_line_bytes`` are never held whole: the parent keeps
their first bytes and skips to the next newline.

Memory: at most ``2 * workers`` chunks in flight, plus one line of at most
``max_line_bytes``. Workers are plain subprocesses (``python -c``) talking
pickles over pipes, like ``ranges.py``'s: nothing is forked from a process that
runs threads. Each worker reads its pipe on a thread of its own, so a large
chunk being sent never waits on a result being written.
"""

from __future__ import annotations

import pickle
import sys
from collections import deque
from pathlib import Path

import orjson
import zstandard

from .clean import clean_plain_text
from .errors import IngestError
from .heap import trim_heap
from .lines import OVERSIZED_HEAD_BYTES, OversizedLine, _TruncatedStream, open_binary
from .ranges import WorkerProcesses
from .pipes import worker_streams
from .records import PostRecord
from .reddit import DELETED_MARKERS, read_line
from .reddit_replies import REPLY_TABLES, Node, Submission, comment_row, replies_image
from .scoring import numeric_key
from .store import SHARD_TABLES, SHARDS, post_row, shard_image

try:  # ordinary rows checked in C (tasks/ingest/_fastreddit.c); None: built without a C compiler
    from ._fastreddit import Image as _Image
    from ._fastreddit import comment_fields as _comment_fields
    from ._fastreddit import store_comment as _store_comment
    from ._fastreddit import store_submission as _store_submission
    from ._fastreddit import submission_fields as _submission_fields
except ImportError:  # pragma: no cover - depends on the build
    _Image = _comment_fields = _store_comment = _store_submission = _submission_fields = None

__all__ = ["CHUNK_BYTES", "parse_chunk", "read_in_workers", "serve"]

CHUNK_BYTES = 4 << 20  # decompressed bytes per chunk of lines
_READ_BYTES = 1 << 20  # at most this much per read (one read of the underlying stream at a time)


_POST_FIELDS = PostRecord.__slots__


class _Recorder:
    """Records the calls a reader makes on its sink and reply store, to replay them elsewhere.

    Records travel as plain tuples (pickling dataclasses costs more than parsing them); counts are
    summed per chunk (their order does not matter); consecutive comments for the reply store go as
    one batch of its rows."""

    def __init__(self, pack: bool = False) -> None:
        self.calls: list[tuple] = []
        self.counts: dict[str, int] = {}
        self._nodes: list[tuple] | None = None
        # pack: posts, comments and submissions kept as rows of their tables, for SQLite images (see images()):
        # written into the images as they come where the C module is built, else kept in lists until the end
        self.pack = pack
        self.posts: list[tuple] = []
        self.comments: list[tuple] = []
        self.submissions: list[tuple] = []
        self.post_image = self.reply_image = None
        if pack and _Image is not None:
            self.post_image, self.reply_image = _Image(SHARD_TABLES), _Image(REPLY_TABLES)

    def images(self) -> tuple[bytes | None, bytes | None]:
        """(posts for the staging store, comments and submissions for the reply store) as SQLite images, which
        the parent copies in one statement per table instead of unpickling and inserting row by row."""
        if self.post_image is not None:
            posts = self.post_image.serialize() if self.post_image.rows(0) else None
            replies = self.reply_image.serialize() if self.reply_image.rows(0) or self.reply_image.rows(1) else None
            return posts, replies
        posts = shard_image(self.posts, {}) if self.posts else None
        replies = replies_image(self.comments, self.submissions) if self.comments or self.submissions else None
        return posts, replies

    def add_post_row(self, row: tuple) -> None:
        if self.post_image is not None:
            self.post_image.add(0, row)
        else:
            self.posts.append(row)

    def add_comment_row(self, row: tuple) -> None:
        if self.reply_image is not None:
            self.reply_image.add(0, row)
        else:
            self.comments.append(row)

    def add_submission_row(self, row: tuple) -> None:
        if self.reply_image is not None:
            self.reply_image.add(1, row)
        else:
            self.submissions.append(row)

    # RecordSink
    def add_post(self, post) -> None:
        if self.pack:
            self.add_post_row(post_row(post))
            return
        self._nodes = None
        self.calls.append(("p", tuple([getattr(post, f) for f in _POST_FIELDS])))

    def quarantine(self, **kw) -> None:
        self._nodes = None
        self.calls.append(("q", kw))

    def count(self, source_file: str, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def add_pair(self, pair) -> None:  # not made by the Reddit reader; kept for the sink protocol
        self._nodes = None
        self.calls.append(("r", pair))

    # ReplyStore
    def add_comment(self, node, *, reply: bool) -> None:
        if self.pack:
            self.add_comment_row(comment_row(node, reply))
            return
        if self._nodes is None:
            self._nodes = []
            self.calls.append(("n", self._nodes))
        self._nodes.append(comment_row(node, reply))

    def add_submission(self, sub) -> None:
        if self.pack:
            self.add_submission_row((sub.id, sub.site, sub.title, sub.body, sub.score, sub.author))
            return
        self._nodes = None
        self.calls.append(("s", sub.id, sub.site, sub.title, sub.body, sub.score, sub.author))


def _checked(raw: bytes, rec: _Recorder, store, fields_of, lineno: int, license: str, file: str,
             with_replies: bool):
    """What the C module makes of the line orjson parses: with images (``rec.post_image``), ``store``'s answer
    (an int: the rows are in the images; a tuple of fields: a text for Python to clean; None); without,
    ``fields_of``'s (a tuple of fields, or None). None too when the line is not JSON."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if rec.post_image is not None:
        return store(obj, rec.post_image, rec.reply_image, lineno, license, file, with_replies)
    return fields_of(obj)


def _count(rec: _Recorder, *keys: str) -> None:
    counts = rec.counts
    for key in keys:
        counts[key] = counts.get(key, 0) + 1


def _fast_comment(raw: bytes, lineno: int, rec: _Recorder, file: str, license: str, with_replies: bool) -> bool:
    """An ordinary comment line stored as :func:`.reddit.read_line` stores it, in under half its time; False
    (nothing stored) for any other line, which the caller then hands to ``read_line``.

    orjson parses the line's bytes (it refuses what ``json.loads`` refuses, and bytes that are not UTF-8);
    ``_fastreddit.comment_fields`` gives the values the reader's checks would give, or None when the line
    takes one of their other branches (an error, a quarantine, a value in an unusual form). With images in
    C, ``_fastreddit.store_comment`` also writes the rows, unless the text needs ``clean_plain_text``."""
    fields = _checked(raw, rec, _store_comment, _comment_fields, lineno, license, file, with_replies)
    if fields is None:
        return False
    if fields.__class__ is int:  # in the images: stored (1), or a reply left out (2)
        _count(rec, "rows", "skipped:reply") if fields == 2 else _count(rec, "rows")
        return True
    post_id, parent, question_id, site, score, created, author, distinguished, body, final, is_reply = fields
    if not final:  # not plain ASCII: the reader's own checks and cleaning
        stripped = body.strip()
        if not stripped or stripped in DELETED_MARKERS:
            return False
        body = clean_plain_text(body)
        if not body.strip():
            return False
    _count(rec, "rows")
    if with_replies:
        if rec.pack:  # comment_row(Node(...), is_reply), without the Node
            rec.add_comment_row((post_id, parent, question_id, site, body, score, created, author, distinguished,
                                 license, file, lineno, is_reply))
        else:
            rec.add_comment(Node(post_id, parent, question_id, site, body, score, created, author,
                                 bool(distinguished), license, file, lineno), reply=bool(is_reply))
        if is_reply:
            return True
    elif is_reply:
        _count(rec, "skipped:reply")
        return True
    if rec.pack:  # post_row(PostRecord(kind="answer", ...)), without the PostRecord
        rec.add_post_row((site, "reddit", post_id, numeric_key(post_id), "answer", 1, question_id,
                          numeric_key(question_id), "", body, "", score, "", author, license, "", created,
                          distinguished, file, lineno))
    else:
        rec.add_post(PostRecord(site=site, source="reddit", post_id=post_id, kind="answer", question_id=question_id,
                                body=body, score=score, author=author, license=license, created_ts=created,
                                distinguished=bool(distinguished), source_file=file, line=lineno))
    return True


def _fast_submission(raw: bytes, lineno: int, rec: _Recorder, file: str, license: str,
                     with_replies: bool) -> bool:
    """:func:`_fast_comment` for a submission line (:func:`.reddit._submission`'s rows)."""
    fields = _checked(raw, rec, _store_submission, _submission_fields, lineno, license, file, with_replies)
    if fields is None:
        return False
    if fields.__class__ is int:  # in the images
        _count(rec, "rows")
        return True
    post_id, site, score, created, author, title, body, body_final = fields
    if not body_final:  # not plain ASCII: the reader's own rule and cleaning
        body = "" if body.strip() in DELETED_MARKERS else clean_plain_text(body)
    _count(rec, "rows")
    if with_replies:
        if rec.pack:
            rec.add_submission_row((post_id, site, title, body, score, author))
        else:
            rec.add_submission(Submission(post_id, site, title, body, score, author))
    if rec.pack:  # post_row(PostRecord(kind="question", ...)), without the PostRecord
        key = numeric_key(post_id)
        rec.add_post_row((site, "reddit", post_id, key, "question", 0, post_id, key, title, body, "", score, "",
                          author, license, "", created, 0, file, lineno))
    else:
        rec.add_post(PostRecord(site=site, source="reddit", post_id=post_id, kind="question", question_id=post_id,
                                title=title, body=body, score=score, author=author, license=license,
                                created_ts=created, source_file=file, line=lineno))
    return True


def parse_chunk(task: tuple) -> tuple[list[tuple], str | None, int]:
    """Parse one chunk of whole lines as the one-process reader would.

    ``task = (file, kind, first_line, pieces, default_license, on_bad_row, max_line_bytes, with_replies, pack)``,
    ``pieces`` a list of ``bytes`` (whole lines, newline-terminated but maybe the file's last) or
    :class:`OversizedLine` (a line the parent did not keep). Returns ``((calls, counts, images), kind,
    non_blank_lines)``; an :class:`IngestError` ends the calls as ``("e", error)``. With ``pack``, posts,
    comments and submissions are in ``images`` (:meth:`_Recorder.images`) rather than in the calls.
    """
    file, kind, lineno, pieces, default_license, on_bad_row, max_line_bytes, with_replies, pack = task
    rec = _Recorder(pack)
    replies = rec if with_replies else None
    non_blank = 0
    # most lines take _fast_comment or _fast_submission (not line 1, which may start with a BOM)
    fast = None if _comment_fields is None else {"comment": _fast_comment, "submission": _fast_submission}.get(kind)
    try:
        for piece in pieces:
            if isinstance(piece, OversizedLine):
                lineno += 1
                non_blank += 1
                kind = read_line(piece, lineno, kind, rec, file, default_license, on_bad_row, max_line_bytes, replies)
                continue
            for raw in piece.split(b"\n"):
                lineno += 1
                if (fast is not None and lineno > 1 and len(raw) <= max_line_bytes
                        and fast(raw, lineno, rec, file, default_license, with_replies)):
                    non_blank += 1
                    continue
                if len(raw) > max_line_bytes:
                    text = OversizedLine(raw[:OVERSIZED_HEAD_BYTES].decode("utf-8", errors="replace"))
                else:
                    try:
                        text = raw.decode("utf-8", errors="strict")
                    except UnicodeDecodeError as exc:
                        bad = raw[exc.start : exc.end]
                        raise IngestError(f"not valid UTF-8: byte(s) {bad.hex(' ')} at byte {exc.start} of the line",
                                          path=file, line=lineno) from None
                    if lineno == 1 and text.startswith("\ufeff"):
                        text = text[1:]
                    text = text.rstrip("\r\n")
                    if not text.strip():
                        continue
                non_blank += 1
                kind = read_line(text, lineno, kind, rec, file, default_license, on_bad_row, max_line_bytes, replies)
    except IngestError as exc:
        rec.calls.append(("e", exc))
    return (rec.calls, rec.counts, rec.images() if pack else (None, None)), kind, non_blank


def _replay(recorded: tuple, file: str, sink, replies) -> None:
    calls, counts, (posts, comments) = recorded
    # the rows before an error are in the images too: the one-process reader stored them before raising
    if posts is not None:
        sink.add_shard(posts)
    if comments is not None:
        replies.add_shard(comments)
    for call in calls:
        tag = call[0]
        if tag == "n":
            replies.add_comment_rows(call[1])
        elif tag == "p":
            sink.add_post(PostRecord(*call[1]))
        elif tag == "q":
            sink.quarantine(**call[1])
        elif tag == "s":
            replies.add_submission(Submission(*call[1:]))
        elif tag == "r":
            sink.add_pair(call[1])
        elif tag == "e":
            raise call[1]
    for key, n in counts.items():
        sink.count(file, key, n)


def _stream_error(exc: Exception, file: str, line: int) -> IngestError:
    if isinstance(exc, _TruncatedStream):
        return IngestError(str(exc), path=file, line=line)
    if isinstance(exc, zstandard.ZstdError):
        return IngestError(f"corrupt zstd stream: {exc}", path=file, line=line)
    if isinstance(exc, EOFError):
        return IngestError(f"truncated compressed stream: {exc}", path=file, line=line)
    return IngestError(f"cannot read: {exc}", path=file, line=line)


def _chunks(path: Path, max_line_bytes: int, chunk_bytes: int):
    """Yield ``(lines_before, pieces)``: whole lines of the decompressed file, about ``chunk_bytes`` at a time.

    A piece is ``bytes`` of lines joined by ``\\n`` (no final newline), or an :class:`OversizedLine` for a line
    longer than ``max_line_bytes`` (only its head kept). A truncated or corrupt stream raises
    :class:`_StreamFailed` carrying the complete lines read before it (the one-process reader reads those
    too) and an IngestError naming the line after them, as ``lines.iter_text_lines`` does.
    """
    file = str(path)
    lines_done = 0  # lines placed in pieces (an oversized line: once its newline is found)
    pieces: list = []
    size = 0
    first = 0
    # The open line's bytes read so far (no newline among them). Each block read is cut at its last newline
    # and its complete lines go out as one piece: every byte is copied once (into its piece).
    carry: list[bytes] = []
    carried = 0
    skipping = False  # inside an oversized line: drop bytes until its newline
    try:
        stream = open_binary(path)
    except OSError as exc:
        raise IngestError(f"cannot open: {exc}", path=file) from exc
    with stream:
        while True:
            try:
                data = stream.read1(_READ_BYTES)
            except (_TruncatedStream, zstandard.ZstdError, EOFError, OSError) as exc:
                # the complete lines are in pieces already; the open line is not a line
                raise _StreamFailed(_stream_error(exc, file, lines_done + 1), first, pieces) from None
            if not data:
                break
            if skipping:
                cut = data.find(b"\n")
                if cut < 0:
                    continue
                data, skipping = data[cut + 1 :], False
                lines_done += 1
            nl = data.rfind(b"\n")
            if nl >= 0:
                piece = b"".join((*carry, memoryview(data)[:nl])) if carry else data[:nl]
                carry, carried = [], 0
                pieces.append(piece)
                size += len(piece)
                lines_done += piece.count(b"\n") + 1
                data = data[nl + 1 :]
            if data:
                carry.append(data)
                carried += len(data)
            if carried > max_line_bytes:  # the open line is too long to keep: its head stands for it
                head = b"".join(carry)[:OVERSIZED_HEAD_BYTES]
                pieces.append(OversizedLine(head.decode("utf-8", errors="replace")))
                carry, carried, skipping = [], 0, True
            if size >= chunk_bytes:
                yield first, pieces
                first, pieces, size = lines_done, [], 0
        if carry:
            pieces.append(b"".join(carry))
    if pieces:
        yield first, pieces


class _StreamFailed(Exception):
    def __init__(self, error: IngestError, first: int, pieces: list) -> None:
        super().__init__(str(error))
        self.error, self.first, self.pieces = error, first, pieces


def read_in_workers(path: Path, kind: str, sink, replies, *, workers: int, default_license: str, on_bad_row: str,
                    max_line_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> None:
    """:func:`.reddit.read_reddit` on ``workers`` processes; see the module docstring."""
    file = str(path)
    with_replies = replies is not None
    # posts, comments and submissions as SQLite images, when the parent's stores can take them
    pack = SHARDS and hasattr(sink, "add_shard") and (replies is None or hasattr(replies, "add_shard"))
    # eager: a worker done with a chunk goes on with its next one while its result waits for the in-order replay
    pool = WorkerProcesses(workers, "alignflow.tasks.ingest.reddit_parallel", eager=True)
    in_flight: deque[int] = deque()
    sent = 0
    non_blank = 0
    failure: IngestError | None = None

    def receive() -> None:
        nonlocal non_blank
        calls, _kind, n = pool.receive(in_flight.popleft())
        non_blank += n
        _replay(calls, file, sink, replies)
        del calls
        trim_heap()  # the result was read on a reader thread, into that thread's malloc arena

    def send(first: int, pieces: list) -> None:
        nonlocal sent
        while len(in_flight) >= 2 * workers:
            receive()
        worker = sent % workers
        pool.send(worker, (file, kind, first, pieces, default_license, on_bad_row, max_line_bytes, with_replies, pack))
        in_flight.append(worker)
        sent += 1

    try:
        try:
            for first, pieces in _chunks(path, max_line_bytes, chunk_bytes):
                send(first, pieces)
        except _StreamFailed as failed:
            failure = failed.error
            if failed.pieces:
                send(failed.first, failed.pieces)
        while in_flight:
            receive()
    finally:
        pool.close()
    if failure is not None:
        raise failure
    if not non_blank:
        raise IngestError("empty file (no non-blank line)", path=file)


def serve() -> None:
    """Worker loop: chunks from stdin (read on a thread, so the parent never blocks sending), results to stdout."""
    import queue
    import threading

    stdin, stdout = worker_streams()  # buffered even under PYTHONUNBUFFERED; print() goes to stderr
    tasks: queue.Queue = queue.Queue(maxsize=2)

    def read() -> None:
        while True:
            try:
                tasks.put(pickle.load(stdin))
            except EOFError:
                tasks.put(None)
                return

    threading.Thread(target=read, daemon=True).start()
    while (task := tasks.get()) is not None:
        try:
            reply = ("ok", parse_chunk(task))
        except Exception as exc:  # a bug: shown in the parent with its type and message
            reply = ("error", RuntimeError(f"ingest worker failed on {task[0]} from line {task[2] + 1}: "
                                           f"{type(exc).__name__}: {exc}"))
        pickle.dump(reply, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()
