"""Parallel reading of dump tables: byte ranges cut at row starts, parsed by worker processes.

A Stack Exchange dump table holds one ``<row .../>`` per line (newlines inside
values are written as ``&#xA;``); a table an XML library wrote may hold several
rows on a line, or all of them. No ``<`` is written inside a value, so a table can
be cut at the starts of rows (of their lines, where they begin one) into ranges
that parse on their own: each worker wraps its range in the table's root element
and runs the same :class:`~.xmlstream.RowParser` and row readers as the
one-process path, with every check they make. A worker keeps what it read as a
list of sink calls, its posts and per-post vote sums packed into an SQLite image
(:func:`pack`); the parent replays the results into the staging store in file
order, adding each range's line offset, so the store holds exactly the rows of a
one-process read and the datasets are byte-identical whatever the number of
workers. Votes are summed per post in the worker (their order does not matter).

A range whose every row is in the dumps' plain form (double-quoted attributes,
only the predefined and numeric character references: what every dump writes)
is read from its bytes in C instead of by libxml2, one row or several per line:
Votes.xml rows are counted (tasks/ingest/_fastvotes.c, :func:`scan_votes`) and
Posts.xml rows become store rows (tasks/ingest/_fastposts.c, :func:`scan_posts`),
with the rows the reader would quarantine handed to it. Any other row, anywhere
in the range, sends the whole range to the parser, which decides what it means.

Files too small to cut are read in one range. A table inside a .7z archive is
decompressed into a temporary file and read in ranges as it is written
(:func:`growing_range_tasks`, ``run.read_archive_site``). Larger tables with
anything but a declaration, comments and processing instructions before their
root (:func:`plain_head`) are not read in ranges: ``run.read_stackexchange``
streams them into the store, in order.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from alignflow.tasks.processes import OWN_PROCESS_GROUP

from .errors import IngestError
from .records import PairRecord, PostRecord
from .store import POST_TYPES, SHARDS, VOTE_TYPES, post_row

# A row's start: "<row" after the ">" that ends the element before it (a row, or the table's root) and white space
_ROW_START = re.compile(rb">([ \t\r\n]*)<row[ \t\r\n/>]")
_CUT_WINDOW = 1 << 20
READ_CHUNK = 1 << 20


def default_workers() -> int:
    """All cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cut_points(path: Path, range_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of ``path`` that start at rows (the first starts at 0 and holds the prolog): at the start of the
    row's line when it begins one, as in the dumps, else at its ``<row``, for tables written with several rows on
    a line (an XML library writes no line ends between elements: a whole table can be one line)."""
    size = path.stat().st_size
    if size <= range_bytes:
        return [(0, size)]
    cuts = [0]
    with open(path, "rb") as fh:
        target = range_bytes
        while target < size:
            found = _next_cut(fh, target, size)
            if found is None:
                break
            cuts.append(found)
            target = found + range_bytes
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _next_cut(fh, target: int, size: int) -> int | None:
    """Where :func:`cut_points` cuts at or after byte ``target``, looking at the file's first ``size`` bytes only
    (None: no row starts there). A cut found in fewer bytes is the one found in more."""
    pos = target
    while pos < size:
        fh.seek(pos)
        m = _ROW_START.search(fh.read(min(_CUT_WINDOW + 64, size - pos)))
        if m is not None and m.start() < _CUT_WINDOW:
            gap = m.group(1)
            return pos + m.start(1) + (gap.rfind(b"\n") + 1 or len(gap))
        pos += _CUT_WINDOW
    return None


def growing_range_tasks(spool, site: str, table: str, label: str, *, range_bytes: int, on_bad_row: str,
                        max_chars: int, max_row_bytes: int) -> Iterator[RangeTask]:
    """The range tasks of a table that is still being written (``spool``: a
    :class:`~.stackexchange.SpooledTable`), each made as soon as its bytes, and those that place its end, are
    written; cut as :func:`cut_points` cuts the finished file. The spool's error, if any, is raised after the
    tasks of the bytes before it."""
    path = str(spool.path)
    start, index = 0, 0
    with open(spool.path, "rb") as fh:
        while True:
            target = start + range_bytes
            cut, have = None, spool.wait_for(target + _CUT_WINDOW)
            while (cut := _next_cut(fh, target, have)) is None:
                more = spool.wait_for(have + _CUT_WINDOW)
                if more == have:  # the table ended
                    break
                have = more
            if cut is None:
                if spool.error is not None:
                    raise spool.error
                yield RangeTask(index, table, site, path, label, start, have, index == 0, True, on_bad_row,
                                max_chars, max_row_bytes)
                return
            yield RangeTask(index, table, site, path, label, start, cut, index == 0, False, on_bad_row, max_chars,
                            max_row_bytes)
            start, index = cut, index + 1


# -- what a worker reads ---------------------------------------------------------------
@dataclass
class RangeResult:
    index: int
    newlines: int
    calls: list[tuple] = field(default_factory=list)  # ("post", row) | ("pair", record) | ("q", kwargs) | ("count", ...)
    votes: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    # an IngestError, with its line relative to the range; "at_cut": raised at the range's end, not the table's
    error: dict[str, Any] | None = None
    shard: bytes | None = None  # the posts and votes as an SQLite image (pack), instead of "post" calls and votes
    seconds: dict[str, float] = field(default_factory=dict)  # "parse" (lxml), "HTML to text", "rows" (the rest)


class RecordingSink:
    """A :class:`~.records.RecordSink` that keeps the calls for the parent to replay."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.votes: dict[tuple[str, str], list[int]] = {}
        self._counts: dict[tuple[str, str], int] = {}

    def add_post(self, post: PostRecord) -> None:
        self.calls.append(("post", post_row(post)))

    def add_vote(self, site: str, post_id: str, vote_type: int) -> None:
        entry = self.votes.get((site, post_id))
        if entry is None:
            entry = self.votes[(site, post_id)] = [0, 0, 0]
        entry[{2: 0, 3: 1, 1: 2}[vote_type]] += 1

    def add_pair(self, pair: PairRecord) -> None:
        self.calls.append(("pair", pair))

    def quarantine(self, **kwargs) -> None:
        self.calls.append(("q", kwargs))

    def count(self, source_file: str, key: str, n: int = 1) -> None:
        # summed here and sent once per key at the end (finish): a count per row between the posts
        # would double the calls to pickle and replay, and cut the posts into one-row batches
        self._counts[(source_file, key)] = self._counts.get((source_file, key), 0) + n

    def finish(self) -> list[tuple]:
        """The calls to replay: the recorded ones, then one ``count`` per key (counts are order-free)."""
        return [*self.calls, *(("count", src, key, n) for (src, key), n in self._counts.items())]


@dataclass(frozen=True)
class RangeTask:
    index: int
    table: str  # "Posts" | "Votes"
    site: str
    path: str
    label: str
    start: int
    end: int
    first: bool
    last: bool
    on_bad_row: str
    max_chars: int
    max_row_bytes: int


# -- Votes.xml without a parser ------------------------------------------------------------
# White space between rows: " ", "\t" and line ends ("\n", "\r\n"). A lone "\r" is a line end to XML that the
# ranges' line counts (of "\n") would miss: a range with one goes to the parser.
_GAP = rb'(?:[ \t\n]|\r\n)*'
# A vote row as the dumps write it: fixed attributes in a fixed order, ASCII digits and a date; the group (``%s``:
# capturing, or not) is its PostId and VoteTypeId. A range of such rows only, one or several to a line (its first
# range: after a plain head; its last: before the closing tag), holds nothing an XML parser could refuse or read
# differently, so its votes are counted from the bytes; any other range is parsed with lxml like every table.
_VOTE_ROW = (rb'<row Id="[0-9]{1,18}" PostId="(%s[0-9]{1,18}" VoteTypeId="[0-9]{1,18})"'
             rb'(?: UserId="-?[0-9]{1,18}")?(?: CreationDate="[0-9T:.-]{1,40}")?(?: BountyAmount="[0-9]{1,18}")? ?/>')
_VOTE_KEYS = re.compile(_VOTE_ROW % b"")
_VOTE_ROWS = re.compile(_GAP + rb'(?:' + _VOTE_ROW % b"?:" + _GAP + rb')*')
# A table's head and end as the dumps write them, or an XML library (single quotes, "UTF-8", no line ends): a range
# that starts or ends otherwise goes to the parser.
_PLAIN_HEAD = {table: re.compile(rb'(?:\xef\xbb\xbf)?(?:<\?xml version=(["\'])1\.0\1 encoding=(["\'])(?i:utf-8)\2'
                                 rb'(?: standalone=(["\'])(?:yes|no)\3)? ?\?>)?' + _GAP + b'<' + table.lower().encode()
                                 + b'>' + _GAP) for table in ("Posts", "Votes")}
_PLAIN_END = {table: re.compile(rb'</' + table.lower().encode() + rb'>[ \t\r\n]*\Z') for table in ("Posts", "Votes")}
_VOTE_TYPE_SLOT = {b"2": 0, b"3": 1, b"1": 2}

try:  # tally_votes and scan_votes's tally in C (tasks/ingest/_fastvotes.c); None: built without a C compiler
    from . import _fastvotes
    from ._fastvotes import count_votes as _count_votes
except ImportError:  # pragma: no cover - an install without a C compiler
    _fastvotes = _count_votes = None
try:  # scan_posts's reader in C (tasks/ingest/_fastposts.c); None: built without a C compiler or libsqlite3
    from . import _fastposts
except ImportError:  # pragma: no cover - an install without a C compiler
    _fastposts = None


def count_vote_lines(data: bytes) -> tuple[dict[bytes, int], int] | None:
    """Votes per ``b'<PostId>" VoteTypeId="<type>'`` in ``data`` (whole lines), and the number of rows;
    None unless it is plain vote rows, one or several to a line (:data:`_VOTE_ROWS`)."""
    from collections import Counter

    if _VOTE_ROWS.fullmatch(data) is None:
        return None
    keys = _VOTE_KEYS.findall(data)
    return Counter(keys), len(keys)


def tally_votes(data: bytes, site: str, votes: dict[tuple[str, str], list[int]]) -> tuple[int, int] | None:
    """Add the votes of ``data`` (whole lines) to ``votes``: ``(site, post_id) -> [up, down, accepted]``.
    Returns the rows and the votes of other types, or None (``votes`` untouched) unless it is plain vote
    rows. Counted in C (tasks/ingest/_fastvotes.c) where built, else by :func:`count_vote_lines`."""
    if _count_votes is not None:
        return _count_votes(data, site, votes)
    counted = count_vote_lines(bytes(data))
    if counted is None:
        return None
    other = 0
    for key, n in counted[0].items():
        post_id, _, vote_type = key.partition(b'" VoteTypeId="')
        slot = _VOTE_TYPE_SLOT.get(vote_type)
        if slot is None:
            other += n
            continue
        k = (site, post_id.decode("ascii"))
        entry = votes.get(k)
        if entry is None:
            entry = votes[k] = [0, 0, 0]
        entry[slot] += n
    return counted[1], other


def _newlines(data: bytearray, start: int, end: int) -> int:
    """``data.count(b"\\n", start, end)``, in C where built (tasks/ingest/_fastvotes.c, ~5x faster)."""
    return _fastvotes.newlines(data, start, end) if _fastvotes is not None else data.count(b"\n", start, end)


def _line_chunks(task: RangeTask, chunk: int, before: bytes = b"\n") -> Iterator[tuple[bytearray, int, int]]:
    """The range's bytes in pieces of about ``chunk`` bytes that end at line ends (the last: at the range's end),
    each as ``(buffer, start, end)``: the piece is ``buffer[start:end]``. One buffer is read into and reused, so
    a piece is valid only until the next one is asked for; no piece is copied (a range a little over ``chunk``
    bytes, the usual case, is read whole). ``before=b"<"``: pieces end right before a ``<`` instead (after the
    white space that follows a row), where rows need not be one per line. Raises :class:`_NotPlain` rather than
    hold a line longer than the task's ``max_row_bytes`` (a range with no row start to cut at: a huge attribute)."""
    size = task.end - task.start
    chunk = size if size <= chunk + chunk // 4 else chunk
    buffer = bytearray(chunk)
    with open(task.path, "rb") as fh:
        fh.seek(task.start)
        left, have = size, 0  # ``have``: bytes of a line carried from the last piece, at the buffer's start
        while left > 0:
            want = min(chunk, left)
            if have + want > len(buffer):  # a line longer than the buffer
                if have > task.max_row_bytes:  # a row over the cap: the parser skips it without holding it
                    raise _NotPlain
                buffer.extend(bytes(have + want - len(buffer)))
            with memoryview(buffer) as view:
                got = fh.readinto(view[have:have + want])
            if not got:
                raise EOFError(task.path)
            left -= got
            end = have + got
            if left <= 0:
                cut = end
            elif before == b"\n":
                cut = buffer.rfind(b"\n", 0, end) + 1
            else:
                cut = max(buffer.rfind(before, 0, end), 0)
            if cut:
                yield buffer, 0, cut
            buffer[:end - cut] = buffer[cut:end]  # the unfinished line moves to the start
            have = end - cut


class _NotPlain(Exception):
    """The range holds something only the XML parser decides."""


class _PlainRows:
    """Iterating gives a range's row lines, in pieces of whole lines (``before=b"<"``: pieces that end before a
    ``<``, for rows that need not be one per line), each with the number of its first line (the range's first
    line is 1), without the table's head (first range) or end (last range). Raises :class:`_NotPlain` when its
    head or end is not in a plain form. ``newlines``: those of the whole range, once iterated."""

    def __init__(self, task: RangeTask, chunk: int, before: bytes = b"\n") -> None:
        self.task, self.chunk, self.before, self.newlines = task, chunk, before, 0

    def __iter__(self) -> Iterator[tuple[memoryview, int]]:
        """Each piece is a view of :func:`_line_chunks`'s buffer, released when the next piece is asked for."""
        task = self.task
        head_done, ended = not task.first, False
        try:
            for buffer, start, end in _line_chunks(task, self.chunk, self.before):
                if ended:  # bytes after the closing tag
                    raise _NotPlain
                line = 1 + self.newlines
                self.newlines += _newlines(buffer, start, end)
                if not head_done:
                    m = _PLAIN_HEAD[task.table].match(buffer, start, end)
                    if m is None:
                        raise _NotPlain
                    line += _newlines(buffer, start, m.end())
                    start, head_done = m.end(), True
                if task.last:
                    m = _PLAIN_END[task.table].search(buffer, start, end)
                    if m is not None:  # what comes before it is the scanner's to check
                        end, ended = m.start(), True
                with memoryview(buffer) as view, view[start:end] as data:
                    yield data, line
        except EOFError:
            raise _NotPlain from None
        if not head_done or (task.last and not ended):
            raise _NotPlain


def scan_votes(task: RangeTask, chunk: int = 8 << 20) -> RangeResult | None:
    """The result of a Votes.xml range counted from its bytes; None when it needs the XML parser.

    With the C extension the counts stay in C and come back as the range's SQLite image (the form :func:`pack`
    gives a dict of them, rows in the order of the post ids); without it, as a dict for :func:`pack`."""
    started, cpu_started = time.perf_counter(), time.process_time()
    tally = _fastvotes.open_tally() if _fastvotes is not None and _count_votes is not None and SHARDS else None
    votes: dict[tuple[str, str], list[int]] = {}
    rows = other = 0
    plain = _PlainRows(task, chunk)
    try:
        for data, _ in plain:
            counted = tally_votes(data, task.site, votes) if tally is None else _fastvotes.tally_lines(tally, data)
            if counted is None:
                return None
            rows += counted[0]
            other += counted[1]
    except _NotPlain:
        return None
    calls: list[tuple] = []
    if rows:
        calls.append(("count", task.label, "rows", rows))
    if other:
        calls.append(("count", task.label, "skipped:other_vote_type", other))
    shard = None
    if tally is not None and rows > other:  # some vote of type 2, 3 or 1
        shard = _fastvotes.tally_image(tally, task.site, POST_TYPES, VOTE_TYPES)
    seconds = {"Votes.xml parse and count": time.perf_counter() - started,
               "Votes.xml CPU": time.process_time() - cpu_started}
    return RangeResult(task.index, plain.newlines, calls, votes, shard=shard, seconds=seconds)


def scan_posts(task: RangeTask, chunk: int = 8 << 20) -> RangeResult | None:
    """The result of a Posts.xml range read from its bytes in C (tasks/ingest/_fastposts.c), its posts already
    in the SQLite image the parent loads (:func:`pack`'s form): rows in the dumps' plain form are inserted
    there, and the rows :class:`~.stackexchange.PostRowReader` would quarantine or refuse go to it. None when
    the range needs the XML parser (a line that is not a plain row, a row the reader refuses with
    ``on_bad_row="error"``), or the extension is not built."""
    if _fastposts is None or not SHARDS:
        return None
    from .clean import c_renderer, html_to_text
    from .stackexchange import POST_TYPE_NAMES, PostRowReader

    started, cpu_started = time.perf_counter(), time.process_time()
    sink = RecordingSink()
    reader = PostRowReader(task.site, task.label, sink, on_bad_row=task.on_bad_row, max_chars=task.max_chars)

    def odd(attrib: dict, line: int) -> tuple | None:
        """The reader's store row for a row the C reader leaves to it (None: quarantined or skipped)."""
        before = len(sink.calls)
        reader(attrib, line)
        return sink.calls.pop()[1] if len(sink.calls) > before and sink.calls[-1][0] == "post" else None

    shard = _fastposts.open_shard(POST_TYPES, VOTE_TYPES)
    direct = c_renderer()  # html_to_text's C renderer, called from C on each body's bytes
    rows, render_seconds = 0, 0.0
    skipped: dict[str, int] = {}
    plain = _PlainRows(task, chunk, b"<")
    try:
        for data, line in plain:
            got = _fastposts.scan_posts(shard, data, line, task.site, task.label, task.max_chars,
                                        task.max_row_bytes, html_to_text, odd, direct)
            if got is None:
                return None
            found_skipped, n, seconds = got
            rows += n
            render_seconds += seconds
            for post_type, k in found_skipped.items():
                skipped[post_type] = skipped.get(post_type, 0) + k
    except _NotPlain:
        return None
    except IngestError:  # a refused row: the parser's path reports it, with everything read before it
        return None
    image = _fastposts.finish_shard(shard)
    if rows:
        sink.count(task.label, "rows", rows)
    for post_type, k in skipped.items():
        sink.count(task.label, f"skipped:{POST_TYPE_NAMES.get(post_type, 'post_type_' + post_type)}", k)
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    seconds = {"Posts.xml rows read in C (parse, decode, checks, store rows)": total - render_seconds,
               "Posts.xml HTML to text": render_seconds, "Posts.xml CPU": cpu}
    return RangeResult(task.index, plain.newlines, sink.finish(), sink.votes, shard=image, seconds=seconds)


def read_range(task: RangeTask) -> RangeResult:
    """Parse one byte range of a dump table (runs in a worker process)."""
    fast = scan_votes(task) if task.table == "Votes" else scan_posts(task)
    if fast is not None:
        return fast
    from .clean import html_to_text
    from .stackexchange import PostRowReader, VoteRowReader
    from .xmlstream import RowParser

    sink = RecordingSink()
    root = task.table.lower()
    row_seconds, html_seconds = [0.0], [0.0]

    def timed_html(text, _render=html_to_text, _clock=time.perf_counter):
        t = _clock()
        try:
            return _render(text)
        finally:
            html_seconds[0] += _clock() - t

    if task.table == "Posts":
        reader = PostRowReader(task.site, task.label, sink, on_bad_row=task.on_bad_row, max_chars=task.max_chars,
                               render=timed_html)
    else:
        reader = VoteRowReader(task.site, task.label, sink, on_bad_row=task.on_bad_row)

    def timed_reader(attrib, line, _reader=reader, _clock=time.perf_counter):
        t = _clock()
        try:
            _reader(attrib, line)
        finally:
            row_seconds[0] += _clock() - t

    parser = RowParser(task.label, timed_reader if task.table == "Posts" else reader, root=root,
                       max_row_bytes=task.max_row_bytes, on_oversize=getattr(reader, "oversized", None))
    newlines = 0
    fed = False  # every byte of the range parsed without an error
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        if not task.first:
            parser.feed(f"<{root}>".encode())
        with open(task.path, "rb") as fh:
            fh.seek(task.start)
            left = task.end - task.start
            while left > 0:
                chunk = fh.read(min(READ_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                newlines += chunk.count(b"\n")
                parser.feed(chunk)
        fed = True
        if not task.last:
            parser.feed(f"</{root}>".encode())
        parser.close()
    except IngestError as exc:
        return RangeResult(task.index, newlines, sink.finish(), sink.votes,
                           error=dict(message=exc.reason, path=exc.path, line=exc.line, row_id=exc.row_id,
                                      field=exc.field, at_cut=fed and not task.last))
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if task.table == "Posts":
        seconds = {"Posts.xml parse": total - row_seconds[0], "Posts.xml HTML to text": html_seconds[0],
                   "Posts.xml rows (decode, checks, records)": row_seconds[0] - html_seconds[0], "Posts.xml CPU": cpu}
    else:
        seconds = {"Votes.xml parse and count": total, "Votes.xml CPU": cpu}
    return RangeResult(task.index, newlines, sink.finish(), sink.votes, seconds=seconds)


def pack(result: RangeResult) -> RangeResult:
    """Move a range's posts and vote counts into an SQLite image (:func:`~.store.shard_image`), which the
    parent copies into the store in one statement per table.

    Posts are most of what a range holds: pickled row by row, then unpickled and inserted, they cost the
    parent (which replays every range, in order) more CPU than parsing costs each worker. As an image they
    cost the worker one insert and the parent one copy. Left as it is when this Python's SQLite cannot
    serialise a database.
    """
    from .store import SHARDS, shard_image

    posts = [call[1] for call in result.calls if call[0] == "post"]
    if not SHARDS or not (posts or result.votes):
        return result
    result.shard = shard_image(posts, result.votes)
    result.calls = [call for call in result.calls if call[0] != "post"]
    result.votes = {}
    return result


def read_packed(task: RangeTask) -> RangeResult:
    """:func:`read_range`, its result packed for the parent (:func:`pack`): what task runners run."""
    return pack(read_range(task))


HEAD_BYTES = 1 << 12  # how much of a table :func:`plain_head` looks at


def plain_head(path: Path, root: str) -> bool:
    """True when the table starts with an optional XML declaration, then comments and processing instructions if
    any, then its root element (within its first 4 KiB): nothing that changes how the rows after it parse, so it
    can be cut into ranges. A document type declaration may define entities: such a table is read whole."""
    with open(path, "rb") as fh:
        return cuttable_head(fh.read(HEAD_BYTES), root)


def cuttable_head(head: bytes, root: str) -> bool:
    """:func:`plain_head` of a table's first :data:`HEAD_BYTES` bytes."""
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    while head.startswith((b"<?", b"<!--")):
        close = b"?>" if head.startswith(b"<?") else b"-->"
        end = head.find(close, 2)
        if end < 0:
            return False
        head = head[end + len(close):].lstrip()
    return re.match(rb"<" + root.encode() + rb"[ \t\r\n>]", head) is not None


def range_tasks(site: str, table: str, path: Path, label: str, *, range_bytes: int, on_bad_row: str,
                max_chars: int, max_row_bytes: int, start_index: int = 0) -> list[RangeTask]:
    ranges = cut_points(path, range_bytes) if plain_head(path, table.lower()) else [(0, path.stat().st_size)]
    return [
        RangeTask(start_index + i, table, site, str(path), label, a, b, i == 0, i == len(ranges) - 1, on_bad_row,
                  max_chars, max_row_bytes)
        for i, (a, b) in enumerate(ranges)
    ]


class Replayer:
    """Replays range results into the store in task order, fixing line numbers across ranges."""

    def __init__(self, store) -> None:
        self.store = store
        self.line_offset: dict[str, int] = {}

    def apply(self, task: RangeTask, result: RangeResult) -> None:
        off = self.line_offset.get(task.label, 0) if not task.first else 0
        store = self.store
        if result.shard is not None:
            store.add_shard(result.shard, off)
        posts: list[tuple] = []
        for call in result.calls:
            kind = call[0]
            if kind == "post":
                row = call[1]
                posts.append(row if not off or row[-1] is None else (*row[:-1], row[-1] + off))
                continue
            if posts:
                store.add_post_rows(posts)
                posts = []
            if kind == "count":
                store.count(call[1], call[2], call[3])
            elif kind == "q":
                kw = call[1]
                if off and kw.get("line") is not None:
                    kw = {**kw, "line": kw["line"] + off}
                store.quarantine(**kw)
            elif kind == "pair":
                store.add_pair(call[1])
        if posts:
            store.add_post_rows(posts)
        if result.votes:
            store.add_vote_counts(result.votes)
        if result.error is not None:
            err = result.error
            message, line = err["message"], err["line"]
            if line is not None and off:
                # libxml2 repeats the line inside its own message: both count from the range's first line
                message = re.sub(rf"\bline {line}\b", f"line {line + off}", message)
                line += off
            raise IngestError(message, path=err["path"], line=line, row_id=err["row_id"], field=err["field"])
        self.line_offset[task.label] = off + result.newlines


def run_tasks(tasks: Iterable[RangeTask], workers: int, *,
              ahead: bool = True) -> Iterator[tuple[RangeTask, RangeResult]]:
    """Results of ``tasks`` in order: in this process (one worker) or on worker processes (several).

    Task ``i`` goes to worker ``i % n``; each worker has at most two tasks in
    flight, so results waiting for the parent never hold more than a few
    ranges in memory (beyond the first tasks, if :func:`read_ahead` sent them).
    ``tasks`` may be made as they are sent (:func:`growing_range_tasks`): an :class:`IngestError` raised while
    making one is raised after the results of the tasks before it. ``ahead=False``: tasks no read-ahead was made
    for (an archive's table), which leave one alone.
    """
    made = tasks if isinstance(tasks, list) else None
    if workers <= 1 or (made is not None and len(made) <= 1):
        if ahead:
            drop_read_ahead()
        for task in tasks:
            yield task, read_packed(task)
        return
    n = min(workers, len(made)) if made is not None else workers
    pool, sent = (ahead and made is not None and adopt_read_ahead(made, n)) or (
        WorkerProcesses(n, eager=made is None), 0)
    pending: deque[RangeTask] = deque(made[:sent]) if made is not None else deque()
    rest = iter(made[sent:]) if made is not None else iter(tasks)
    received, failure, ended = 0, None, False
    try:
        while True:
            while not ended and len(pending) < 2 * n:
                try:
                    task = next(rest)
                except StopIteration:
                    ended = True
                    break
                except IngestError as exc:  # raised once the results before it are in
                    failure, ended = exc, True
                    break
                pool.send(sent % n, task)
                pending.append(task)
                sent += 1
            if not pending:
                break
            task = pending.popleft()
            result = pool.receive(received % n)
            received += 1
            yield task, result
    finally:
        pool.close(kill=received < sent)  # stopped early (an error): the tasks still queued are not wanted
    if failure is not None:
        raise failure


def rejoin_cuts(results: Iterator[tuple[RangeTask, RangeResult]]) -> Iterator[tuple[RangeTask, RangeResult]]:
    """``results`` (in task order) as if no range had been cut inside a comment, a CDATA section or a processing
    instruction.

    A range starts at a ``<row`` after a ``>`` (:func:`cut_points`), and such markup may hold one: rows commented
    out by hand, one to a line. The range before that cut then parses without an error up to its own end, where
    the markup is still open: its error is ``at_cut``. That range is read again here, in this process, with the
    next range joined to it (and the one after, while the markup stays open), and the next range's own result,
    read from inside the markup, is dropped. Any other error found at a cut is found again by the joined read,
    at its own place. A table cut outside markup (every dump) never comes here.
    """
    results = iter(results)
    for task, result in results:
        while result.error is not None and result.error.get("at_cut"):
            following, _ = next(results)  # same table: a range with an error at its cut is not the table's last
            task = replace(task, end=following.end, last=following.last)
            result = read_packed(task)
        yield task, result


# -- reading ahead while the command starts -------------------------------------------------------------------
# While ``alignflow ingest`` starts (imports, Prefect's server booting) the machine is not busy all the time.
# The first range tasks of a large read can go to the workers then (:func:`read_ahead`), at the lowest priority
# (nice 19), so that they take only the time the start-up leaves: at equal priority they slowed the server's boot
# and the cache key's hashing, which the flow waits for, by more than they read. :func:`run_tasks` adopts them,
# and their results, if its tasks begin with the same ones on as many workers, over the same unchanged files, and
# gives them back normal priority where it may; otherwise they are dropped (workers killed, results thrown away)
# and the read starts as if none had been sent.
READ_AHEAD_NICE = 19
# At most this many tasks are sent ahead: they wait, pickled, in the workers' input pipes (64 KiB on Linux, a few
# hundred bytes a task), and a full pipe would hold the command's start until a worker reads on (tiny ranges).
READ_AHEAD_MAX_TASKS = 64
_AHEAD: list[tuple[list[RangeTask], int, WorkerProcesses, list[tuple[int, int]]]] = []
_AT_EXIT: list[bool] = []  # drop_read_ahead is registered to run at exit


def file_stamp(path: str | Path) -> tuple[int, int, int, int]:
    """What changes when a file is written to or replaced: its device, inode, size and modification time."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _stamps(tasks: list[RangeTask]) -> list[tuple[int, int, int, int] | None]:
    """Each task's file's :func:`file_stamp` (None if gone): a file changed after its tasks were sent voids them."""
    out = []
    for task in tasks:
        try:
            out.append(file_stamp(task.path))
        except OSError:
            out.append(None)
    return out


def read_ahead(tasks: list[RangeTask], workers: int) -> None:
    """Send ``tasks`` (the first ones of a read on ``workers`` processes, task ``i`` to worker ``i % workers``,
    as :func:`run_tasks` deals them; the first ``READ_AHEAD_MAX_TASKS``) to new worker processes now. Their
    results wait in this process (``eager``): keep ``tasks`` to what may wait in memory. Workers not adopted
    are killed at exit."""
    import atexit

    tasks = list(tasks[:READ_AHEAD_MAX_TASKS])
    if workers <= 1 or not tasks:
        return
    drop_read_ahead()
    pool = WorkerProcesses(workers, eager=True, nice=READ_AHEAD_NICE)
    _AHEAD.append((tasks, workers, pool, _stamps(tasks)))
    if not _AT_EXIT:
        atexit.register(drop_read_ahead)
        _AT_EXIT.append(True)
    for i, task in enumerate(tasks):
        pool.send(i % workers, task)


def adopt_read_ahead(tasks: list[RangeTask], workers: int) -> tuple[WorkerProcesses, int] | None:
    """The workers of :func:`read_ahead` and how many of ``tasks`` they already have, if they were sent the
    first of ``tasks`` on ``workers`` processes and the files are unchanged; else None (any are dropped)."""
    while _AHEAD:
        sent, n, pool, stamps = _AHEAD.pop()
        if n == workers and tasks[: len(sent)] == sent and _stamps(sent) == stamps:
            pool.renice(os.getpriority(os.PRIO_PROCESS, 0))  # as this process, if permitted (root, RLIMIT_NICE)
            return pool, len(sent)
        pool.close(kill=True)
    return None


def drop_read_ahead() -> None:
    """Kill the workers of a read-ahead nobody adopted (a cache hit, another plan, a failure before reading)."""
    while _AHEAD:
        _AHEAD.pop()[2].close(kill=True)


class WorkerProcesses:
    """``n`` Python processes running :func:`serve`: tasks in on stdin, results out on stdout (pickles).

    Plain subprocesses rather than ``multiprocessing``: they never re-import
    the caller's main module and never fork a process that runs threads; a
    worker whose parent dies reads end-of-file and exits.
    """

    def __init__(self, n: int, module: str = "alignflow.tasks.ingest.ranges", *, eager: bool = False,
                 nice: int = 0) -> None:
        """``module``: whose ``serve()`` the workers run (this one: range tasks). ``eager``: a thread per worker
        reads its results as soon as they are written, so a worker whose result waits for its turn goes on
        with its next task instead of blocking on its pipe (the results wait here, as many as are in flight).
        ``nice``: the workers' scheduling priority (``nice(1)``; 19: they run on what other processes leave)."""
        import subprocess
        import sys

        cmd = [sys.executable, "-c", f"from {module} import serve; serve()"]
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **OWN_PROCESS_GROUP)
                      for _ in range(n)]
        if nice:
            self.renice(nice)
        self.results: list[queue.SimpleQueue] | None = None  # eager: each worker's results, in order
        self.readers: list[threading.Thread] = []
        if eager:
            self.results = [queue.SimpleQueue() for _ in self.procs]
            self.readers = [threading.Thread(target=self._read, args=(proc, results), daemon=True)
                            for proc, results in zip(self.procs, self.results)]
            for reader in self.readers:
                reader.start()

    def renice(self, nice: int) -> bool:
        """Set the workers' priority; False where this process may not (raising it back needs privileges)."""
        try:
            for proc in self.procs:
                os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
        except (OSError, AttributeError):  # not permitted, a worker gone, or not POSIX
            return False
        return True

    @staticmethod
    def _read(proc, results: queue.SimpleQueue) -> None:
        """Reader thread: every (kind, value) result of one worker into ``results``; None at its end."""
        import pickle

        try:
            while True:
                results.put(pickle.load(proc.stdout))
        except EOFError:
            results.put(None)
        except BaseException as exc:  # noqa: BLE001  a result that does not unpickle: raised in receive()
            results.put(("error", exc))

    def send(self, worker: int, task: Any) -> None:
        import pickle

        proc = self.procs[worker]
        try:
            pickle.dump(task, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(f"ingest worker process {proc.pid} exited (code {proc.wait()})") from None

    def receive(self, worker: int) -> Any:
        import pickle

        proc = self.procs[worker]
        if self.results is not None:
            reply = self.results[worker].get()
            if reply is None:
                raise RuntimeError(f"ingest worker process {proc.pid} exited (code {proc.wait()})")
            kind, value = reply
        else:
            try:
                kind, value = pickle.load(proc.stdout)
            except EOFError:
                raise RuntimeError(f"ingest worker process {proc.pid} exited (code {proc.wait()})") from None
        if kind == "error":
            raise value
        return value

    def close(self, *, kill: bool = False) -> None:
        """Let the workers finish the tasks sent and exit; ``kill``: stop them now, their tasks unread."""
        for proc in self.procs:
            if kill:
                proc.kill()
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
                proc.wait()
        for reader in self.readers:
            reader.join(timeout=10)


def serve() -> None:
    """Worker process loop: read tasks from stdin until it closes, write each result to stdout."""
    import pickle

    from .pipes import worker_streams

    stdin, stdout = worker_streams()  # buffered even under PYTHONUNBUFFERED; print() goes to stderr
    while True:
        try:
            task = pickle.load(stdin)
        except EOFError:
            return
        try:
            reply = ("ok", read_packed(task))
        except Exception as exc:  # a bug: shown in the parent with its type and message
            reply = ("error", RuntimeError(f"ingest worker failed on {task.label} bytes {task.start}-{task.end}: "
                                           f"{type(exc).__name__}: {exc}"))
        pickle.dump(reply, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()
