"""The staging store: posts grouped by question in a deterministic order, duplicates and votes accounted for."""

from __future__ import annotations

import random
import re
import sqlite3

import pytest

from alignflow.tasks.ingest.records import PostRecord
from alignflow.tasks.ingest.scoring import numeric_key
from alignflow.tasks.ingest.store import (_DISTINCT_IDS, _DUPLICATES_SELECT, _VOTE_SUMMARY_SELECT, POST_TYPES,
                                         StagingStore, post_row, shard_image, sqlite_image)


def _post(site: str, pid: str, qid: str, *, body: str = "b", line: int | None = None, score: int = 0) -> PostRecord:
    kind = "question" if pid == qid else "answer"
    return PostRecord(site=site, source="stackexchange", post_id=pid, kind=kind, question_id=qid, title=f"t{qid}",
                      body=body, score=score, source_file=f"{site}/Posts.xml", line=line)


def _walk(store: StagingStore) -> list[tuple[tuple[str, str], list[str]]]:
    return [(key, [p.post_id for p in rows]) for key, rows in store.grouped_posts()]


def test_the_walk_groups_every_question_in_site_and_id_order(tmp_path):
    rnd = random.Random(7)
    posts, expected = [], {}
    for site in ("b.site", "a.site"):
        for q in range(1, 300):
            qid = str(q * 10)
            answers = [str(q * 10 + k) for k in range(1, rnd.randrange(1, 5))]
            expected[(site, qid)] = [qid, *sorted(answers, key=numeric_key)]
            posts.append(_post(site, qid, qid))
            posts += [_post(site, a, qid) for a in answers]
    rnd.shuffle(posts)  # answers before their question, sites interleaved
    store = StagingStore(tmp_path / "s.sqlite", batch=97)
    for post in posts:
        store.add_post(post)
    store.finish_loading()
    want = sorted(expected.items(), key=lambda kv: (kv[0][0], numeric_key(kv[0][1])))
    assert _walk(store) == want
    store.close()


def test_the_walk_comes_in_chunks_of_whole_questions(tmp_path):
    """Chunks end where a question ends; a question longer than a chunk is one longer chunk; nothing is read
    twice or lost, and columns without a value in a chunk keep their types. The store's folder name is a
    path, whatever it holds."""
    store = StagingStore(tmp_path / "a ?#%é folder" / "s.sqlite")
    sizes = [1, 3, 2, 9, 1, 4, 3, 3, 1, 2]  # rows per question (question + answers)
    for q, size in enumerate(sizes, start=1):
        qid = str(q * 100)
        store.add_post(_post("s", qid, qid, line=q))
        for k in range(1, size):
            store.add_post(_post("s", str(q * 100 + k), qid))  # line None: a column of nulls in some chunks
    store.finish_loading()
    whole = [post_id for _, rows in store.grouped_posts() for post_id in (p.post_id for p in rows)]
    store.db.execute("PRAGMA cache_size=-64")  # a 64 KiB page cache: the writes below spill to the file
    chunks = []
    for chunk in store.walk_chunks(rows=3):  # the builder quarantines rows between two chunks
        chunks.append(chunk)
        for i in range(300):
            store.quarantine(source_file="f", reason="test", line=i, detail="x" * 1000)
        store.flush()
    assert [pid for c in chunks for pid in c.column("post_id").to_pylist()] == whole
    assert len(chunks) >= 5
    assert [c.column("post_id").to_pylist() for c in chunks if "400" in c.column("post_id").to_pylist()] == \
        [["400", *(str(400 + k) for k in range(1, 9))]]  # longer than a chunk: a chunk of its own
    for chunk in chunks:
        assert len(chunk) <= 3 or len(set(chunk.column("question_id").to_pylist())) == 1
        assert chunk.schema.field("line").type == "int64" and chunk.schema.field("author").type == "string"
        assert chunk.schema.field("created_ts").type == "double"  # no value in the store: read as integers, cast
    for before, after in zip(chunks, chunks[1:]):  # no question is cut between two chunks
        assert before.column("question_id")[-1] != after.column("question_id")[0]
    store.close()


def test_chunks_are_bounded_by_their_text_too(tmp_path):
    """Long texts make short chunks: a chunk holds about ``text_bytes`` of titles and bodies (more only when one
    question alone is larger, then it is that question alone)."""
    store = StagingStore(tmp_path / "s.sqlite")
    rnd = random.Random(3)
    for q in range(1, 60):
        qid = str(q * 100)
        store.add_post(_post("s", qid, qid, body="q" * rnd.randrange(1, 3000)))
        for k in range(1, rnd.randrange(1, 6)):
            store.add_post(_post("s", str(q * 100 + k), qid, body="é" * rnd.randrange(1, 3000)))
    store.add_post(_post("s", "9900", "9900", body="x" * 50_000))  # one question over the budget
    store.finish_loading()
    whole = [p.post_id for _, rows in store.grouped_posts() for p in rows]
    chunks = list(store.walk_chunks(rows=1000, text_bytes=10_000))
    assert [pid for c in chunks for pid in c.column("post_id").to_pylist()] == whole
    assert len(chunks) > 10
    for chunk in chunks:
        size = sum(len(t.encode()) for col in ("title", "body") for t in chunk.column(col).to_pylist())
        assert size <= 10_000 or len(set(chunk.column("question_id").to_pylist())) == 1
    assert chunks[-1].column("post_id").to_pylist() == ["9900"]
    store.close()


def test_duplicate_ids_are_quarantined_and_left_out_of_the_walk_and_the_votes(tmp_path):
    store = StagingStore(tmp_path / "s.sqlite", batch=2)
    store.register_vote_file("s", "s/Votes.xml")
    store.add_post(_post("s", "1", "1", line=3, score=1))
    store.add_post(_post("s", "2", "1", line=4, body="first", score=2))
    store.add_post(_post("s", "2", "1", line=9, body="second"))  # same Id later in the input
    store.add_post(_post("s", "3", "1", line=5))
    store.add_vote_counts({("s", "2"): [2, 0, 0], ("s", "99"): [4, 1, 0]})
    store.add_vote_counts({("s", "2"): [1, 0, 1], ("s", "1"): [1, 0, 0]})  # summed with the first counts
    store.finish_loading()
    quarantined = list(store.quarantined())
    assert [(q[0], q[1], q[2], q[5]) for q in quarantined] == [("s/Posts.xml", 9, "2", "duplicate_id")]
    ((key, rows),) = list(store.grouped_posts())
    assert key == ("s", "1") and [p.post_id for p in rows] == ["1", "2", "3"]
    assert rows[1].body == "first" and (rows[1].upvotes, rows[1].accept_votes) == (3, 1)
    assert (rows[2].upvotes, rows[2].downvotes) == (0, 0)  # the site has votes: none is 0, not None
    # three posts; scores equal to up - down for "1" (1 - 0) and "3" (0 - 0), not "2" (2 vs 3)
    assert store.vote_score_agreement("s") == (3, 2)
    # votes on read posts: 1 + 3 + 1 (accept); on post 99, which is not in Posts.xml: 5
    assert store.vote_accounting() == {"s/Votes.xml": {"kept:votes_on_posts_read": 5,
                                                       "dropped:votes_on_posts_not_kept": 5}}
    store.close()


def test_a_site_without_votes_gives_none_not_zero(tmp_path):
    store = StagingStore(tmp_path / "s.sqlite")
    store.add_post(_post("s", "1", "1"))
    store.add_post(_post("s", "2", "1"))
    store.finish_loading()
    ((_, rows),) = list(store.grouped_posts())
    assert [(p.upvotes, p.downvotes, p.accept_votes) for p in rows] == [(None, None, 0), (None, None, 0)]
    assert store.vote_accounting() == {}
    store.close()


def test_odd_ids_sort_after_numeric_ones_and_ties_keep_input_order(tmp_path):
    """Non-numeric ids sort after numeric ones; two ids with the same sort key ("7", "007") keep input order."""
    store = StagingStore(tmp_path / "s.sqlite")
    for pid in ("x9", "007", "7", "10"):
        store.add_post(_post("s", pid, "5"))
    store.add_post(_post("s", "5", "5"))
    store.add_post(_post("s", "é", "é"))
    store.finish_loading()
    assert _walk(store) == [(("s", "5"), ["5", "007", "7", "10", "x9"]), (("s", "é"), ["é"])]
    store.close()


def test_worker_images_land_in_order_between_the_rows_added_around_them(tmp_path):
    """Posts added row by row, then images (line numbers moved by their range's offset), then rows again:
    the store keeps that order and sums the votes."""
    store = StagingStore(tmp_path / "s.sqlite", batch=1000)
    store.add_post(_post("s", "1", "1", line=1))
    image = shard_image([post_row(_post("s", "2", "1", line=1)), post_row(_post("s", "3", "1", line=2))],
                        {("s", "2"): [2, 1, 0]})
    store.add_shard(image, line_offset=10)
    store.add_shard(shard_image([post_row(_post("s", "4", "1", line=3))], {("s", "2"): [1, 0, 1]}), line_offset=20)
    store.add_post(_post("s", "5", "1", line=99))
    store.flush()
    rows = store.db.execute("SELECT post_id, line FROM posts ORDER BY rid").fetchall()
    assert rows == [("1", 1), ("2", 11), ("3", 12), ("4", 23), ("5", 99)]
    assert store.db.execute("SELECT up, down, acc FROM votes WHERE post_id = '2'").fetchone() == (3, 1, 1)
    store.close()


def test_an_image_that_fails_halfway_reports_its_own_error(tmp_path):
    """An image without a votes table: its posts are copied, then the votes copy fails. The error raised is
    that one, not the one detaching the image inside the failed transaction would give."""
    store = StagingStore(tmp_path / "s.sqlite")
    posts_only = sqlite_image({"posts": (POST_TYPES, [post_row(_post("s", "1", "1", line=1))])})
    with pytest.raises(sqlite3.OperationalError, match="no such table: shard.votes"):
        store.add_shard(posts_only)


def test_duplicates_and_vote_checks_match_a_row_by_row_count_and_read_the_id_index_only(tmp_path):
    """Two sites, ids repeated at random, votes on read posts, on repeated ones and on absent ones: the
    duplicates quarantined, the score agreement and the vote accounting equal a count made row by row
    in Python. The queries behind them read the ``posts_by_id`` index only (SQLite's plan says so):
    the table holds every text, and reading it was most of their time at 1 GiB."""
    rng = random.Random(7)
    store = StagingStore(tmp_path / "s.sqlite", batch=16)
    rows = []  # (site, post_id, score, line) in input order
    for line in range(400):
        site = rng.choice(("a", "b"))
        pid = str(rng.randrange(150))
        rows.append((site, pid, rng.randrange(-2, 5), line))
        store.add_post(_post(site, pid, pid, line=line, score=rows[-1][2]))
    votes: dict[tuple[str, str], list[int]] = {}
    for site in ("a", "b"):
        store.register_vote_file(site, f"{site}/Votes.xml")
        for pid in map(str, range(0, 200, 3)):  # some of these ids were never read
            votes[(site, pid)] = [rng.randrange(4), rng.randrange(3), rng.randrange(2)]
    store.add_vote_counts({key: list(value) for key, value in votes.items()})
    store.finish_loading()

    first: dict[tuple[str, str], tuple[int, int]] = {}  # (site, id) -> (score, line) of its first row
    repeated = []
    for site, pid, score, line in rows:
        if (site, pid) in first:
            repeated.append((f"{site}/Posts.xml", line, pid))
        else:
            first[(site, pid)] = (score, line)
    assert repeated  # the draw has repeats
    quarantined = [(q[0], q[1], q[2]) for q in store.quarantined() if q[5] == "duplicate_id"]
    assert quarantined == sorted(repeated)
    for site in ("a", "b"):
        kept = {pid: score for (s, pid), (score, _) in first.items() if s == site}
        agree = sum(score == votes.get((site, pid), [0, 0, 0])[0] - votes.get((site, pid), [0, 0, 0])[1]
                    for pid, score in kept.items())
        assert store.vote_score_agreement(site) == (len(kept), agree)
        on_read = sum(sum(votes[(site, pid)]) for pid in kept if (site, pid) in votes)
        total = sum(sum(v) for (s, _), v in votes.items() if s == site)
        assert store.vote_accounting()[f"{site}/Votes.xml"] == {
            "kept:votes_on_posts_read": on_read, "dropped:votes_on_posts_not_kept": total - on_read}

    def plan(sql: str, *args) -> list[str]:
        return [row[-1] for row in store.db.execute("EXPLAIN QUERY PLAN " + sql, args)]

    for steps in (plan(_VOTE_SUMMARY_SELECT, "a"), plan(_DUPLICATES_SELECT), plan(_DISTINCT_IDS)):
        # every step on posts goes through the index; only the duplicates' own rows are then looked up
        on_posts = [step for step in steps if re.match(r"(SCAN|SEARCH) (posts|p)\b", step)]
        assert on_posts and all("INDEX posts_by_id" in step for step in on_posts), steps
    assert any("COVERING INDEX posts_by_id" in step for step in plan(_VOTE_SUMMARY_SELECT, "a"))
    store.close()


def test_the_walks_size_probe_reads_its_index_not_the_table_of_texts(tmp_path):
    """The walk cuts its chunks by the size of the texts it will read next. That size is the last column
    of the walk's index, so the probe reads the index alone: every column it reads comes from the index's
    cursor (SQLite's program says so), and the sizes are the UTF-8 bytes of title and body."""
    from alignflow.tasks.ingest.store import _SIZES_SELECT, _WALK_ORDER

    store = StagingStore(tmp_path / "s.sqlite")
    store.add_post(_post("s", "1", "1", body="héllo"))
    store.add_post(_post("s", "2", "1", body="ü" * 10))
    store.finish_loading()
    sql = _SIZES_SELECT + "WHERE (p.site, p.qkey) > (?, ?)" + _WALK_ORDER
    root = dict(store.db.execute("SELECT name, rootpage FROM sqlite_master WHERE type IN ('table', 'index')"))
    program = list(store.db.execute("EXPLAIN " + sql, ("", "", 10)))
    cursors = {row[2]: row[3] for row in program if row[1] == "OpenRead"}  # cursor -> root page
    read_from = {cursors[row[2]] for row in program if row[1] == "Column"}
    assert read_from == {root["posts_by_question"]}, (read_from, root)
    sizes = [n for (n,) in store.db.execute(sql, ("", "", 10))]
    assert sizes == [len("t1".encode()) + len("héllo".encode()), len("t1".encode()) + len(("ü" * 10).encode())]
    store.close()


def test_vote_summaries_made_beside_the_walks_index_raise_their_error_in_the_caller(tmp_path, monkeypatch):
    """The vote summaries are read on a thread while the walk's index is built; they are the ones a query
    on the finished store gives, and an error on that thread reaches the caller of finish_loading."""
    import sqlite3

    from alignflow.tasks.ingest import store as store_module

    store = StagingStore(tmp_path / "s.sqlite")
    for i in range(50):
        store.add_post(_post("a", str(i), str(i - i % 5), line=i, score=i % 3))
    store.register_vote_file("a", "a/Votes.xml")
    store.add_vote_counts({("a", str(i)): [i % 3, 0, 1] for i in range(0, 60, 2)})
    store.finish_loading()
    threaded = store.vote_summary("a")
    assert threaded == tuple(store.db.execute(_VOTE_SUMMARY_SELECT, ("a",)).fetchone())
    assert threaded[0] == 50 and 0 < threaded[1] < 50
    store.close()

    broken = StagingStore(tmp_path / "t.sqlite")
    broken.add_post(_post("a", "1", "1"))
    broken.register_vote_file("a", "a/Votes.xml")
    monkeypatch.setattr(store_module, "_VOTE_SUMMARY_SELECT", "SELECT no_such_column FROM posts WHERE site = ?")
    with pytest.raises(sqlite3.OperationalError, match="no_such_column"):
        broken.finish_loading()
    broken.close()


def test_the_walk_makes_its_adbc_calls_off_the_main_thread(tmp_path, monkeypatch):
    # on the main thread ADBC takes SIGINT over and its SQLite driver cannot cancel: Ctrl-C was lost or mangled
    import threading

    import adbc_driver_sqlite.dbapi as adbc

    threads = []
    connect = adbc.connect

    def recording_connect(*args, **kwargs):
        threads.append(threading.current_thread())
        return connect(*args, **kwargs)

    monkeypatch.setattr(adbc, "connect", recording_connect)
    store = StagingStore(tmp_path / "s.sqlite")
    for q in range(3):
        store.add_post(_post("a.site", str(q * 10), str(q * 10)))
        store.add_post(_post("a.site", str(q * 10 + 1), str(q * 10)))
    store.finish_loading()
    assert [len(rows) for _, rows in _walk(store)] == [2, 2, 2]
    assert threads and threads[0] is not threading.main_thread()
