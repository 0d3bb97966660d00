"""Reddit reply pairs (ingest.reddit_reply_pairs): ancestor chains, prompts, SHP rules among siblings, the walk."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pandas as pd
import pytest

from alignflow.config import RedditConfig, load_config
from alignflow.tasks.ingest.reddit import shp_pairs
from alignflow.tasks.ingest.reddit_replies import (
    Node,
    ReplyStore,
    Submission,
    ancestor_chain,
    render_reply_prompt,
    reply_pairs,
)
from alignflow.tasks.ingest.records import PostRecord
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest

CFG = RedditConfig()
TEMPLATE = "Question: {title}\n\n{body}\n\nAnswer: "


def node(cid, parent="t3_p", score=5, ts=100.0, author="name:u", distinguished=False, link="p", body=None):
    return Node(cid, parent, link, "reddit/test", body or f"body {cid}", score, ts, author, distinguished)


# --------------------------------------------------------------------------- ancestor chains


def lookup_of(*nodes):
    table = {n.id: n for n in nodes}
    return table.get


def test_chain_reaches_the_top_level_comment_oldest_first():
    top, mid, par = node("a"), node("b", "t1_a"), node("c", "t1_b")
    chain, stop = ancestor_chain("c", lookup_of(top, mid, par))
    assert [n.id for n in chain] == ["a", "b", "c"] and stop == "top"


def test_chain_stops_below_a_missing_ancestor():
    chain, stop = ancestor_chain("c", lookup_of(node("b", "t1_gone"), node("c", "t1_b")))
    assert [n.id for n in chain] == ["b", "c"] and stop == "missing"


def test_chain_without_its_parent_is_empty():
    assert ancestor_chain("nope", lookup_of(node("a"))) == ([], "no_parent")


def test_chain_is_capped_keeping_the_nearest_ancestors():
    nodes = [node("n0")] + [node(f"n{i}", f"t1_n{i - 1}") for i in range(1, 10)]
    chain, stop = ancestor_chain("n9", lookup_of(*nodes), max_comments=3)
    assert [n.id for n in chain] == ["n7", "n8", "n9"] and stop == "depth"


def test_chain_never_loops():
    chain, stop = ancestor_chain("x", lookup_of(node("x", "t1_y"), node("y", "t1_x")))
    assert [n.id for n in chain] == ["y", "x"] and stop == "missing"


# --------------------------------------------------------------------------- prompts


def test_prompt_with_submission_has_title_text_and_comments_in_order():
    prompt = render_reply_prompt(TEMPLATE, site="reddit/test", chain=["first", "second"],
                                 submission_title="Why?", submission_body="Because.")
    assert prompt == "Question: Why?\n\nBecause.\n\nComment: first\n\nComment: second\n\nAnswer: "


def test_prompt_without_submission_names_the_subreddit():
    prompt = render_reply_prompt(TEMPLATE, site="reddit/test", chain=["only"], submission_title=None)
    assert prompt == "Question: A comment thread in r/test\n\nComment: only\n\nAnswer: "


def test_prompt_budget_drops_oldest_comments_but_keeps_the_parent():
    chain = ["a" * 50, "b" * 50, "c" * 50]
    prompt = render_reply_prompt(TEMPLATE, site="reddit/t", chain=chain, submission_title="T", max_chars=100)
    assert "a" * 50 not in prompt and "b" * 50 in prompt and "c" * 50 in prompt
    prompt = render_reply_prompt(TEMPLATE, site="reddit/t", chain=["x" * 500], submission_title="T", max_chars=100)
    assert "x" * 500 in prompt


# --------------------------------------------------------------------------- rules


def ids(pairs):
    return [(c.id, r.id) for c, r in pairs]


PARENT = node("par", "t3_p", author="name:op")


def test_reply_pair_higher_score_written_later_wins():
    pairs, counts, fates = reply_pairs(PARENT, [node("old", "t1_par", 3, 100), node("new", "t1_par", 10, 200)], CFG)
    assert ids(pairs) == [("new", "old")] and fates == {"old": "kept", "new": "kept"}


@pytest.mark.parametrize("old, new, reason", [
    (node("old", "t1_par", 10, 100), node("new", "t1_par", 3, 200), "not_written_later"),
    (node("old", "t1_par", 2, 100), node("new", "t1_par", 3, 200), "score_ratio_too_low"),
    (node("old", "t1_par", 5, 100), node("new", "t1_par", 5, 200), "tie"),
])
def test_reply_pair_rules(old, new, reason):
    pairs, counts, fates = reply_pairs(PARENT, [old, new], CFG)
    assert pairs == [] and counts[reason] == 1 and set(fates.values()) == {"unpaired"}


def test_reply_filters_name_each_reply():
    replies = [node("a", "t1_par", 3, 100), node("b", "t1_par", 10, 200),
               node("op", "t1_par", 50, 300, author="name:op"),  # the parent's author answering
               node("mod", "t1_par", 50, 300, distinguished=True),
               node("low", "t1_par", 1, 50)]
    pairs, counts, fates = reply_pairs(PARENT, replies, CFG)
    assert ids(pairs) == [("b", "a")]
    assert fates == {"a": "kept", "b": "kept", "op": "op_comment", "mod": "distinguished",
                     "low": "comment_score_too_low"}
    assert (counts["op_comment"], counts["distinguished"], counts["comment_score_too_low"]) == (1, 1, 1)


def test_reply_submission_score_applies_when_known():
    replies = [node("old", "t1_par", 3, 100), node("new", "t1_par", 10, 200)]
    pairs, counts, fates = reply_pairs(PARENT, replies, CFG, submission_score=9)
    assert pairs == [] and counts["post_score_too_low"] == 1 and set(fates.values()) == {"post_score_too_low"}
    assert len(reply_pairs(PARENT, replies, CFG, submission_score=10)[0]) == 1
    assert len(reply_pairs(PARENT, replies, CFG, submission_score=None)[0]) == 1  # comment-only: not applied


def test_reply_cap_deterministic_and_order_free():
    replies = [node(f"r{i:02d}", "t1_par", 2 ** (i // 2 + 1), 100.0 + i) for i in range(12)]
    pairs, counts, fates = reply_pairs(PARENT, replies, CFG, seed=4)
    assert len(pairs) == CFG.max_pairs_per_post and counts["capped"] > 0
    expected = sorted(
        [(c, r) for c, r in ((a.id, b.id) for a in replies for b in replies)
         if _valid(replies, c, r)], key=lambda p: hashlib.sha256(f"4:{p[0]}:{p[1]}".encode()).hexdigest())[:5]
    assert ids(pairs) == expected
    shuffled = replies[:]
    random.Random(1).shuffle(shuffled)
    assert reply_pairs(PARENT, shuffled, CFG, seed=4)[0] == pairs
    assert sum(v == "kept" for v in fates.values()) == len({x for p in expected for x in p})


def _valid(replies, c, r):
    a, b = next(x for x in replies if x.id == c), next(x for x in replies if x.id == r)
    return a.score > b.score and a.created_ts > b.created_ts and a.score >= 2 * b.score


def test_comments_beyond_the_per_post_limit_are_not_considered():
    q = PostRecord(site="s", source="reddit", post_id="p", kind="question", question_id="p", score=100)
    answers = [PostRecord(site="s", source="reddit", post_id=f"c{i}", kind="answer", question_id="p",
                          score=i + 2, created_ts=float(i)) for i in range(10)]
    cfg = CFG.model_copy(update={"max_comments_per_post": 4, "max_pairs_per_post": 100})
    pairs, counts, fates = shp_pairs(q, answers, cfg, with_fates=True)
    assert counts["not_considered"] == 6
    assert {p.post_id for pair in pairs for p in pair} <= {"c6", "c7", "c8", "c9"}
    assert fates == {f"c{i}": "not_considered" for i in range(6)}


# --------------------------------------------------------------------------- the store


def test_store_groups_replies_by_parent_and_flags_repeated_ids(tmp_path):
    store = ReplyStore(tmp_path / "r.sqlite", batch=2)
    store.add_comment(node("top"), reply=False)
    for n in [node("b", "t1_top"), node("a", "t1_top"), node("x", "t1_b", link="q"), node("a", "t1_top")]:
        store.add_comment(n, reply=True)
    store.add_submission(Submission("p", "reddit/test", "T", "", 50, "name:op"))
    store.close()
    store = ReplyStore(tmp_path / "r.sqlite", create=False)
    store.finish_loading()
    groups = [(parent, [(n.id, dup) for n, dup in g], p and p.id) for parent, g, p in store.reply_groups()]
    assert groups == [("t1_top", [("a", False), ("a", True), ("b", False)], "top"), ("t1_b", [("x", False)], "b")]
    assert store.lookup("top").body == "body top" and store.lookup("nope") is None
    assert store.submission("p").title == "T" and store.submission("q") is None


# --------------------------------------------------------------------------- through ingest


def c(cid, parent, score, t, author="u", link="p1", sub="reddit.com"):
    return {"id": cid, "parent_id": parent, "link_id": f"t3_{link}", "subreddit": sub, "author": author,
            "body": f"text of {cid} &amp; more", "score": score, "created_utc": t, "ups": score}


def comment_month(path: Path) -> Path:
    rows = [
        c("a", "t3_p1", 5, 100, author="alice"),
        c("b", "t1_a", 2, 200), c("d", "t1_a", 8, 300, author="dave"), c("e", "t1_a", 1, 250),  # e: score < 2
        c("i", "t1_a", 9, 600, author="alice"),  # the parent's author
        c("f", "t1_d", 3, 400), c("g", "t1_d", 10, 500),  # under d (a reply itself): context a, d
        c("h", "t1_gone", 5, 500),  # parent not in the input
        {"id": "k", "parent_id": "t1_a", "link_id": "t3_p1", "subreddit": "reddit.com", "author": "u",
         "body": "[deleted]", "score": 9, "created_utc": 700},  # quarantined by the reader
        c("m", "t3_p2", 3, 100, author="mia", link="p2"), c("n", "t1_m", 2, 150, link="p2"), c("o", "t1_m", 6, 160, link="p2"),
        c("b", "t1_a", 2, 200),  # a repeated row
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path, sources, *overrides, work="work"):
    cfg = load_config(None, list(overrides)).ingest
    return execute_ingest(plan_ingest([str(s) for s in sources], tmp_path / work, cfg), cfg)


def test_comment_month_alone_gives_reply_pairs_with_exact_counts(tmp_path):
    rc = comment_month(tmp_path / "RC_2006-01.jsonl")
    off = run(tmp_path, [rc], work="off")
    assert off.datasets["pairs"]["rows"] == 0
    assert any("RS_2006-01" in w and "ingest.reddit_reply_pairs" in w for w in off.report["warnings"])

    on = run(tmp_path, [rc], "ingest.reddit_reply_pairs=true", work="on")
    counts = on.report["files"][str(rc)]
    assert counts["adds_up"] and counts["rows"] == 13
    assert {k: v for k, v in counts.items() if k.startswith(("kept", "skipped", "quarantined"))} == {
        "kept:reply": 6,  # b, d under a; f, g under d; n, o under m
        "skipped:reply_comment_score_too_low": 1,  # e
        "skipped:reply_op_comment": 1,  # i
        "skipped:reply_parent_missing": 1,  # h
        "skipped:reply_duplicate": 1,  # the second b
        "quarantined:orphan_answer": 2,  # a, m: top-level comments without their submissions
        "quarantined:deleted_body": 1,  # k
    }
    pairs = pd.read_parquet(on.datasets["pairs"]["path"])
    assert sorted(zip(pairs.chosen_id, pairs.rejected_id)) == [("d", "b"), ("g", "f"), ("o", "n")]
    assert on.report["pairs"]["reply:prompts"] == 3 and on.report["pairs"]["reply:kept"] == 3
    by_pair = dict(zip(pairs.chosen_id, pairs.prompt))
    assert by_pair["g"] == ("Question: A comment thread in r/reddit.com\n\nComment: text of a & more\n\n"
                            "Comment: text of d & more\n\nAnswer: ")
    assert set(pairs.question_id) == {"p1", "p2"}
    prompts = pd.read_parquet(on.datasets["prompts"]["path"])
    assert len(prompts) == 3 and set(prompts.prompt) == set(pairs.prompt)
    assert any("in reply pairs" in w for w in on.report["warnings"])


def test_reply_pairs_are_deterministic_across_reruns_and_workers(tmp_path, monkeypatch):
    from alignflow.tasks.ingest import reddit_parallel, sources

    monkeypatch.setattr(sources, "REDDIT_WORKERS_MIN_BYTES", 0)  # parse even this tiny file on workers
    monkeypatch.setattr(reddit_parallel, "CHUNK_BYTES", 300)
    rc = comment_month(tmp_path / "RC_2006-01.jsonl")
    digests = []
    for work, workers in (("w1", 1), ("w1b", 1), ("w2", 2)):
        result = run(tmp_path, [rc], "ingest.reddit_reply_pairs=true", f"ingest.workers={workers}", work=work)
        digests.append({k: v["digest"] for k, v in result.datasets.items()})
    assert digests[0] == digests[1] == digests[2]


def test_with_submissions_the_prompt_has_the_title_and_splits_follow_the_thread(tmp_path):
    rc = comment_month(tmp_path / "RC_2006-01.jsonl")
    rs = tmp_path / "RS_2006-01.jsonl"
    rs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "p1", "title": "Big &amp; news", "selftext": "", "score": 50, "subreddit": "reddit.com",
         "created_utc": 50, "author": "op"},
        {"id": "p2", "title": "Small", "selftext": "", "score": 1, "subreddit": "reddit.com", "created_utc": 50,
         "author": "op"},
    ]))
    result = run(tmp_path, [rs, rc], "ingest.reddit_reply_pairs=true", "ingest.split.train=0.34",
                 "ingest.split.validation=0.33", "ingest.split.test=0.33")
    pairs = pd.read_parquet(result.datasets["pairs"]["path"])
    assert sorted(zip(pairs.chosen_id, pairs.rejected_id)) == [("d", "b"), ("g", "f")]  # p2 scores 1 < 10
    assert result.report["files"][str(rc)]["skipped:reply_post_score_too_low"] == 2
    assert all(p.startswith("Question: Big & news\n\nComment: text of a") for p in pairs.prompt)
    posts = pd.read_parquet(result.datasets["posts"]["path"])
    thread_split = posts.set_index("post_id").loc["p1", "split"]
    assert set(pairs.split) == {thread_split}
    assert result.report["adds_up"]


def test_synthetic_month_is_deterministic_and_gives_reply_pairs(tmp_path):
    from alignflow.tasks.ingest.synthetic_reddit import generate_month

    a = generate_month(tmp_path / "a", rc_bytes=60_000, seed=3)
    b = generate_month(tmp_path / "b", rc_bytes=60_000, seed=3)
    assert a.rc.read_bytes() == b.rc.read_bytes() and a.rs.read_bytes() == b.rs.read_bytes()
    assert a.rc_bytes >= 60_000 and a.comments > 50
    result = run(tmp_path, [a.rc], "ingest.reddit_reply_pairs=true")  # comments only
    assert result.report["adds_up"] and result.report["pairs"]["reply:kept"] > 0
    assert result.datasets["pairs"]["rows"] == result.report["pairs"]["reply:kept"]


def test_a_lone_reply_gets_the_fate_the_shp_rules_give_it():
    """The walk gives a parent with one reply (most parents) its fate by lone_reply_fate, without shp_pairs: the
    fate and the one count are reply_pairs', over authors, flags, scores and submission scores around each
    rule's edge."""
    from alignflow.tasks.ingest.reddit import SHP_COUNT_KEYS
    from alignflow.tasks.ingest.reddit_replies import lone_reply_fate

    configs = [CFG, RedditConfig(drop_op_comments=False, drop_distinguished=False, min_comment_score=-5)]
    authors = ["name:u", "name:v", "", "name:[deleted]"]
    seen = set()
    for cfg in configs:
        for parent_author in authors:
            for author in authors:
                for distinguished in (False, True):
                    for score in (-6, cfg.min_comment_score - 1, cfg.min_comment_score, 50):
                        for sub_score in (None, cfg.min_post_score - 1, cfg.min_post_score):
                            parent = node("p1", author=parent_author)
                            reply = node("r1", parent="t1_p1", score=score, author=author,
                                         distinguished=distinguished)
                            fate = lone_reply_fate(parent, reply, cfg, sub_score)
                            counts = dict.fromkeys(SHP_COUNT_KEYS, 0)
                            if fate != "unpaired":
                                counts[fate] = 1
                            assert reply_pairs(parent, [reply], cfg, submission_score=sub_score) == \
                                ([], counts, {"r1": fate}), (cfg, parent_author, author, distinguished, score, sub_score)
                            seen.add(fate)
    assert seen == {"post_score_too_low", "op_comment", "distinguished", "comment_score_too_low", "unpaired"}


def test_indexes_built_in_the_background_give_the_same_walk_and_their_error(tmp_path):
    """index_in_background builds finish_loading's indexes on a thread; finish_loading waits for it, and an
    error there is raised in the caller."""
    import sqlite3

    def walk(background: bool, name: str):
        store = ReplyStore(tmp_path / name)
        store.add_comment(node("top"), reply=False)
        for n in [node("b", "t1_top"), node("a", "t1_top"), node("a", "t1_top"), node("x", "t1_gone", link="q")]:
            store.add_comment(n, reply=True)
        store.close()
        store = ReplyStore(tmp_path / name, create=False)
        if background:
            store.index_in_background()
        store.finish_loading()
        return [(parent, [(n.id, dup) for n, dup in g], p and p.id) for parent, g, p in store.reply_groups()]

    assert walk(True, "bg.sqlite") == walk(False, "fg.sqlite") == [
        ("t1_top", [("a", False), ("a", True), ("b", False)], "top"), ("t1_gone", [("x", False)], None)]

    broken = ReplyStore(tmp_path / "broken.sqlite")
    broken.close()
    with sqlite3.connect(tmp_path / "broken.sqlite") as db:
        db.execute("DROP TABLE comments")
    broken = ReplyStore(tmp_path / "broken.sqlite", create=False)
    broken.index_in_background()
    with pytest.raises(sqlite3.OperationalError, match="comments"):
        broken.finish_loading()
