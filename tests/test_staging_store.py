"""The staging store: posts in Parquet parts, grouped and sorted by question in DuckDB, memory bounded."""

from __future__ import annotations

import random

import pytest

from alignflow.tasks.ingest.records import PostRecord
from alignflow.tasks.ingest.scoring import numeric_key
from alignflow.tasks.ingest.store import StagingStore, post_row, posts_table, shift_lines


def _post(site: str, pid: str, qid: str, *, body: str = "b", line: int | None = None, score: int = 0) -> PostRecord:
    kind = "question" if pid == qid else "answer"
    return PostRecord(site=site, source="stackexchange", post_id=pid, kind=kind, question_id=qid, title=f"t{qid}",
                      body=body, score=score, source_file=f"{site}/Posts.xml", line=line)


def _walk(store: StagingStore) -> list[tuple[tuple[str, str], list[str]]]:
    return [(key, [p.post_id for p in rows]) for key, rows in store.grouped_posts()]


def test_the_walk_groups_every_question_in_order_across_chunks(tmp_path):
    """Many small chunks (1 MiB of text each) give the order of one global sort."""
    rnd = random.Random(7)
    posts, expected = [], {}
    for site in ("b.site", "a.site"):
        for q in range(1, 400):
            qid = str(q * 10)
            answers = [str(q * 10 + k) for k in range(1, rnd.randrange(1, 5))]
            expected[(site, qid)] = [qid, *sorted(answers, key=numeric_key)]
            posts.append(_post(site, qid, qid, body="q" * rnd.randrange(500, 3_000)))
            posts += [_post(site, a, qid, body="a" * rnd.randrange(500, 3_000)) for a in answers]
    rnd.shuffle(posts)  # answers before their question, sites interleaved
    store = StagingStore(tmp_path / "s.sqlite", batch=97, memory_mb=64, chunk_mb=1)
    for post in posts:
        store.add_post(post)
    store.finish_loading()
    assert len(store.walk_chunks()) >= 4  # the walk really is cut into chunks (about 5 MiB of text)
    got = _walk(store)
    want = sorted(expected.items(), key=lambda kv: (kv[0][0], numeric_key(kv[0][1])))
    assert got == want
    store.close()
    assert not store.parts_dir.exists() and not store.spill_dir.exists()


def test_duplicate_ids_are_quarantined_and_left_out_of_the_walk_and_the_votes(tmp_path):
    store = StagingStore(tmp_path / "s.sqlite", batch=2)
    store.register_vote_file("s", "s/Votes.xml")
    store.add_post(_post("s", "1", "1", line=3, score=1))
    store.add_post(_post("s", "2", "1", line=4, body="first", score=2))
    store.add_post(_post("s", "2", "1", line=9, body="second"))  # same Id later in the input
    store.add_post_table(posts_table([post_row(_post("s", "3", "1", line=5))]))
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
    with pytest.raises(RuntimeError, match="after the store finished loading"):
        store.add_post_table(posts_table([post_row(_post("s", "4", "1"))]))
    store.close()


def test_an_empty_store_walks_nothing(tmp_path):
    store = StagingStore(tmp_path / "s.sqlite")
    store.register_vote_file("s", "s/Votes.xml")
    store.finish_loading()
    assert list(store.grouped_posts()) == []
    assert store.vote_accounting() == {"s/Votes.xml": {"kept:votes_on_posts_read": 0,
                                                       "dropped:votes_on_posts_not_kept": 0}}
    store.close()


def test_odd_ids_sort_after_numeric_ones_and_ties_keep_input_order(tmp_path):
    """Non-numeric ids sort after numeric ones; two ids with the same sort key ("7", "007") keep input order."""
    store = StagingStore(tmp_path / "s.sqlite")
    for pid in ("x9", "007", "7", "10"):
        store.add_post(_post("s", pid, "5", line=None))
    store.add_post(_post("s", "5", "5"))
    store.add_post(_post("s", "é", "é"))
    assert [(k, ids) for k, ids in _walk(store)] == [(("s", "5"), ["5", "007", "7", "10", "x9"]), (("s", "é"), ["é"])]
    store.close()


def test_shift_lines_adds_the_range_offset_and_keeps_missing_lines_missing():
    table = posts_table([post_row(_post("s", "1", "1", line=2)), post_row(_post("s", "2", "1", line=None))])
    assert shift_lines(table, 40).column("line").to_pylist() == [42, None]
    assert shift_lines(table, 0) is table
