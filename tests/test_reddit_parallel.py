"""Pushshift files parsed on worker processes give exactly what one process gives (rows, order, errors)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import zstandard

from alignflow.tasks.ingest import reddit_parallel
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.reddit import read_reddit
from alignflow.tasks.ingest.reddit_replies import comment_row
from alignflow.tasks.ingest.records import ListSink


class Replies:
    """Records what the reply store receives, in one shape for both paths."""

    def __init__(self):
        self.rows = []

    def add_comment(self, node, *, reply):
        self.rows.append(comment_row(node, reply))

    def add_comment_rows(self, rows):
        self.rows.extend(rows)

    def add_submission(self, sub):
        self.rows.append(sub)


def comment(i, **kw):
    obj = {"id": f"c{i}", "parent_id": "t3_p" if i % 3 else f"t1_c{i - 1}", "link_id": "t3_p", "subreddit": "s",
           "author": f"u{i % 7}", "body": f"comment {i} " + "x" * (i % 50), "score": i % 11, "created_utc": 1000 + i}
    obj.update(kw)
    return json.dumps(obj)


def write(path: Path, lines: list[str | bytes], *, zst: bool, end: bytes = b"\n") -> Path:
    data = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + end
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if zst else data)
    return path


def read_both(path: Path, monkeypatch, **kw):
    """(sink, replies, error) with one process and with two workers cutting tiny chunks."""
    monkeypatch.setattr(reddit_parallel, "CHUNK_BYTES", 700)
    monkeypatch.setattr(reddit_parallel, "_READ_BYTES", 97)
    out = []
    for workers in (1, 2):
        sink, replies, error = ListSink(), Replies(), None
        try:
            read_reddit(path, sink, replies=replies, workers=workers, **kw)
        except IngestError as exc:
            error = str(exc)
        out.append((sink.posts, sink.quarantined, dict(sink.counts), replies.rows, error))
    return out


@pytest.mark.parametrize("zst", [False, True])
def test_same_rows_in_the_same_order(tmp_path, monkeypatch, zst):
    lines = [comment(i) for i in range(1, 120)]
    lines[5] = ""  # blank lines count as lines, not rows
    lines[6] = "   "
    lines[10] = "not json"
    lines[11] = comment(11, body="[deleted]")
    lines[12] = comment(12, body="a\r\nb &gt; c")
    lines[20] = "x" * 3000  # longer than max_line_bytes: quarantined unread
    lines[21] = comment(21, body="y" * 900)  # shorter than the limit but longer than a chunk
    lines[0] = "\ufeff" + lines[0]
    path = write(tmp_path / ("RC_2015-01.zst" if zst else "RC_2015-01.jsonl"), lines, zst=zst, end=b"")
    one, two = read_both(path, monkeypatch, on_bad_row="quarantine", max_line_bytes=2048)
    assert one == two
    posts, quarantined, counts, rows, error = one
    assert error is None and counts[(str(path), "rows")] == 117
    assert {q["reason"] for q in quarantined} == {"not_json", "too_large", "deleted_body"}
    assert [q["line"] for q in quarantined if q["reason"] == "too_large"] == [21]
    assert len(rows) > 100 and any(r[-1] == 1 for r in rows)


@pytest.mark.parametrize("bad, message", [
    (b"\xff\xfe bad bytes", "not valid UTF-8"),
    (b'{"id": "x", "parent_id": "t3_p", "subreddit": "s", "score": "many", "created_utc": 1}', "`score`"),
])
def test_same_first_error_at_the_same_line(tmp_path, monkeypatch, bad, message):
    lines = [comment(i).encode() for i in range(1, 60)]
    lines[40] = bad
    lines[50] = b"\xff later error"
    path = write(tmp_path / "RC_2015-01.jsonl", lines, zst=False)
    one, two = read_both(path, monkeypatch)
    assert one[4] == two[4] and message in one[4] and "line 41" in one[4]


def test_truncated_stream_same_error(tmp_path, monkeypatch):
    path = write(tmp_path / "RC_2015-01.zst", [comment(i) for i in range(1, 400)], zst=True)
    path.write_bytes(path.read_bytes()[:-40])
    one, two = read_both(path, monkeypatch)
    assert one[4] == two[4] and "truncated" in one[4]


def test_empty_file_same_error(tmp_path, monkeypatch):
    path = write(tmp_path / "RC_2015-01.jsonl", ["", "  ", ""], zst=False)
    one, two = read_both(path, monkeypatch)
    assert one[4] == two[4] and "empty file" in one[4]


def test_oversized_last_line_without_newline(tmp_path, monkeypatch):
    path = write(tmp_path / "RC_2015-01.jsonl", [comment(1), "z" * 5000], zst=False, end=b"")
    one, two = read_both(path, monkeypatch, on_bad_row="quarantine", max_line_bytes=1024)
    assert one == two and [q["reason"] for q in one[1]] == ["too_large"]


def submission(i, **kw):
    obj = {"id": f"p{i}", "subreddit": "s", "title": f"title {i}", "selftext": f"text {i}", "author": f"a{i % 5}",
           "score": i % 13, "created_utc": 900 + i, "num_comments": 3}
    obj.update(kw)
    return json.dumps(obj)


def test_workers_hand_rows_to_the_stores_as_sqlite_images(tmp_path, monkeypatch):
    """Into the real staging and reply stores, two workers hand posts, comments and submissions over as SQLite
    images (not row by row): the tables hold the same rows in the same order as with one process."""
    from alignflow.tasks.ingest.reddit_replies import ReplyStore
    from alignflow.tasks.ingest.store import StagingStore

    monkeypatch.setattr(reddit_parallel, "CHUNK_BYTES", 700)
    monkeypatch.setattr(reddit_parallel, "_READ_BYTES", 97)
    comments = [comment(i) for i in range(1, 150)]
    comments[30] = comment(7, body="the same id again")  # a repeated id: the first row keeps it (rid order)
    comments[40] = "not json"
    files = [write(tmp_path / "RS_2015-01.jsonl", [submission(i) for i in range(1, 60)], zst=False),
             write(tmp_path / "RC_2015-01.zst", comments, zst=True)]
    packed = []
    real = reddit_parallel._replay

    def replay(recorded, *args):
        packed.append(recorded[2] != (None, None))
        return real(recorded, *args)

    monkeypatch.setattr(reddit_parallel, "_replay", replay)
    tables = []
    for workers in (1, 2):
        store = StagingStore(tmp_path / f"w{workers}" / "staging.sqlite")
        replies = ReplyStore(tmp_path / f"w{workers}" / "replies.sqlite")
        for path in files:
            read_reddit(path, store, replies=replies, workers=workers, on_bad_row="quarantine")
        store.flush()
        replies.close()
        replies = ReplyStore(tmp_path / f"w{workers}" / "replies.sqlite", create=False)
        tables.append([store.db.execute("SELECT * FROM posts ORDER BY rid").fetchall(),
                       store.db.execute("SELECT * FROM quarantine ORDER BY line").fetchall(), dict(store.counts),
                       replies.db.execute("SELECT * FROM comments ORDER BY rid").fetchall(),
                       replies.db.execute("SELECT * FROM submissions ORDER BY rid").fetchall()])
    assert packed and all(packed)  # two workers: every chunk came as images
    one, two = tables
    assert one == two
    posts, quarantined, _counts, comment_rows, submission_rows = one
    assert len(posts) > 100 and len(comment_rows) > 100 and len(submission_rows) == 59 and len(quarantined) == 1
    assert [r[1] for r in comment_rows].count("c7") == 2


def test_eager_workers_go_on_while_their_results_wait(tmp_path):
    """With ``eager=True`` a thread reads each worker's results off its pipe as they come: a worker given two
    chunks parses both before the parent asks for the first (results far larger than a pipe's buffer would
    otherwise hold it at its first write), and the results come back in order, equal to those read without."""
    from alignflow.tasks.ingest.ranges import WorkerProcesses

    path = write(tmp_path / "RC_2015-01", [comment(i, body="y" * 4000) for i in range(400)], zst=False)
    lines = path.read_bytes().rstrip(b"\n").split(b"\n")
    tasks = [(str(path), "comments", first, [b"\n".join(lines[first:first + 200])], "unknown", "error", 1 << 20,
              True, True) for first in (0, 200)]
    results = {}
    for eager in (False, True):
        pool = WorkerProcesses(1, "alignflow.tasks.ingest.reddit_parallel", eager=eager)
        try:
            for task in tasks:
                pool.send(0, task)
            if eager:
                deadline = time.monotonic() + 120
                while pool.results[0].qsize() < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert pool.results[0].qsize() == 2  # both parsed, neither received yet
            results[eager] = [pool.receive(0) for _ in tasks]
        finally:
            pool.close()
    assert results[True] == results[False]
    assert sum(len(image) for image in results[True][0][0][2]) > 1 << 20  # each result: over a MiB of images


def test_eager_worker_that_dies_is_reported(tmp_path):
    from alignflow.tasks.ingest.ranges import WorkerProcesses

    pool = WorkerProcesses(1, "alignflow.tasks.ingest.reddit_parallel", eager=True)
    try:
        pool.procs[0].kill()
        with pytest.raises(RuntimeError, match=r"ingest worker process \d+ exited"):
            pool.receive(0)
    finally:
        pool.close()
