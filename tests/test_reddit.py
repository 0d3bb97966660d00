"""Reddit Pushshift reader and the Stanford SHP pairing rules."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from itertools import combinations
from pathlib import Path

import pytest
import zstandard

from alignflow.config import RedditConfig
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.reddit import SHP_COUNT_KEYS, read_reddit, shp_pairs
from alignflow.tasks.ingest.records import ListSink, PostRecord

# --------------------------------------------------------------------------- builders


def submission(id, **kw):
    """A submission with the key set of a real RS_ file (2015-era plus a few later keys)."""
    obj = {
        "archived": False,
        "author": "curious_george",
        "author_flair_css_class": None,
        "author_flair_text": None,
        "created_utc": "1420070400",  # older dumps: a numeric string
        "distinguished": None,
        "domain": "self.askscience",
        "edited": False,
        "gilded": 0,
        "hidden": False,
        "id": id,
        "is_self": True,
        "link_flair_css_class": None,
        "link_flair_text": None,
        "name": f"t3_{id}",
        "num_comments": 4,
        "over_18": False,
        "permalink": f"/r/askscience/comments/{id}/x/",
        "retrieved_on": 1440000000,
        "score": 25,
        "selftext": "",
        "stickied": False,
        "subreddit": "askscience",
        "subreddit_id": "t5_2qm4e",
        "thumbnail": "self",
        "title": "Why is the sky blue?",
        "ups": 25,
        "url": f"https://www.reddit.com/r/askscience/comments/{id}/x/",
    }
    obj.update(kw)
    return obj


def comment(id, parent="t3_abc", **kw):
    """A comment with the key set documented for real RC_ files."""
    link = parent if parent.startswith("t3_") else "t3_abc"
    obj = {
        "author": "someone",
        "author_flair_css_class": None,
        "author_flair_text": None,
        "body": "A plain answer.",
        "controversiality": 0,
        "created_utc": 1420070500,
        "distinguished": None,
        "edited": False,
        "gilded": 0,
        "id": id,
        "link_id": link,
        "parent_id": parent,
        "retrieved_on": 1425124228,
        "score": 5,
        "stickied": False,
        "subreddit": "askscience",
        "subreddit_id": "t5_2qm4e",
        "ups": 5,
    }
    obj.update(kw)
    return obj


def _lines(rows) -> bytes:
    out = []
    for r in rows:
        if isinstance(r, bytes):
            out.append(r)
        elif isinstance(r, str):
            out.append(r.encode("utf-8"))
        else:
            out.append(json.dumps(r).encode("utf-8"))
    return b"\n".join(out) + b"\n"


def write_jsonl(path: Path, rows) -> Path:
    path.write_bytes(_lines(rows))
    return path


def write_zst(path: Path, rows, *, window_log: int | None = None, frames: int = 1) -> Path:
    data = _lines(rows)
    params = (
        zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log)
        if window_log
        else zstandard.ZstdCompressionParameters.from_level(3)
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    cut = [round(i * len(data) / frames) for i in range(frames + 1)]
    with open(path, "wb") as fh:
        for a, b in zip(cut, cut[1:]):  # each chunk its own frame (zstd -c a b > c)
            with cctx.stream_writer(fh, closefd=False) as w:
                w.write(data[a:b])
    return path


def total(sink: ListSink, file: Path, prefix: str) -> int:
    return sum(n for (f, k), n in sink.counts.items() if f == str(file) and k.startswith(prefix))


def assert_rows_add_up(sink: ListSink, file: Path) -> None:
    rows = sink.counts[(str(file), "rows")]
    mine = [q for q in sink.quarantined if q["source_file"] == str(file)]
    assert rows == len([p for p in sink.posts if p.source_file == str(file)]) + len(mine) + total(
        sink, file, "skipped:"
    )


def reasons(sink: ListSink) -> dict[str, int]:
    out: dict[str, int] = {}
    for q in sink.quarantined:
        out[q["reason"]] = out.get(q["reason"], 0) + 1
    return out


# --------------------------------------------------------------------------- submissions


def test_submissions_long_window_zst(tmp_path):
    rows = [
        submission("abc", title="Why &amp; how is the sky blue?", selftext="I looked up.\r\nIt was blue.",
                   score="31", author="op_user", created_utc="1420070400"),
        submission("abd", selftext="[removed]", score=12, created_utc=1420070401.5, subreddit="AskHistorians"),
        submission("abe", title="[deleted by user]", selftext="[removed]", author="[deleted]"),
        submission("abf", score=None, ups=7, selftext=None),  # link post: no selftext; score only as ups
    ]
    path = write_zst(tmp_path / "RS_2015-01.zst", rows, window_log=31)
    # The file really needs the long window: a default decompressor refuses it.
    with open(path, "rb") as fh, pytest.raises(zstandard.ZstdError, match="too much memory"):
        zstandard.ZstdDecompressor().stream_reader(fh).read()

    sink = ListSink()
    read_reddit(path, sink, default_license="reddit-user-content")

    assert [p.post_id for p in sink.posts] == ["abc", "abd", "abf"]
    abc = sink.posts[0]
    assert (abc.kind, abc.question_id, abc.source, abc.site) == ("question", "abc", "reddit", "reddit/askscience")
    assert abc.title == "Why & how is the sky blue?"
    assert abc.body == "I looked up.\nIt was blue."
    assert abc.score == 31 and isinstance(abc.score, int)
    assert abc.author == "name:op_user"
    assert abc.created_ts == 1420070400.0 and isinstance(abc.created_ts, float)
    assert abc.license == "reddit-user-content"
    assert (abc.source_file, abc.line) == (str(path), 1)
    abd = sink.posts[1]
    assert (abd.body, abd.site, abd.score, abd.created_ts, abd.line) == ("", "reddit/AskHistorians", 12, 1420070401.5, 2)
    assert (sink.posts[2].score, sink.posts[2].body) == (7, "")
    assert reasons(sink) == {"deleted_title": 1}
    assert sink.quarantined[0]["line"] == 3 and sink.quarantined[0]["row_id"] == "abe"
    assert sink.counts[(str(path), "rows")] == 4
    assert_rows_add_up(sink, path)


# --------------------------------------------------------------------------- comments


def _comment_file_rows():
    return [
        comment("c1", body="&gt; quoted\r\n\r\nReply with &amp; entity", score="9", edited=1420080000),
        comment("c2", body="[deleted]", author="[deleted]"),
        comment("c3", body="  [removed]  \n"),
        comment("c4", body=""),
        comment("c5", parent="t1_zzzzzz", body="a reply whose parent is not in the file"),
        comment("c6", parent="t1_c1", body="[deleted]"),  # replies are skipped before body checks
        comment("c7", distinguished="moderator", stickied=True, body="Please follow the rules."),
        {k: v for k, v in comment("c8", body="no score key, only ups", ups=4, created_utc="1420070600").items()
         if k != "score"},
        comment("c9", author="[deleted]", body="author deleted, body kept", created_utc=1420070700.25),
        comment("c10", link_id=None, parent="t3_xyz", body="no link_id: post from parent_id"),
        "",  # blank line: not a row
    ]


@pytest.mark.parametrize("suffix", [".zst", ".jsonl"])
def test_comments_quirks_and_exact_counts(tmp_path, suffix):
    name = tmp_path / f"RC_2015-01{suffix}"
    path = write_zst(name, _comment_file_rows()) if suffix == ".zst" else write_jsonl(name, _comment_file_rows())
    sink = ListSink()
    read_reddit(path, sink)

    assert [p.post_id for p in sink.posts] == ["c1", "c7", "c8", "c9", "c10"]
    assert all(p.kind == "answer" for p in sink.posts)
    by_id = {p.post_id: p for p in sink.posts}
    c1 = by_id["c1"]
    assert c1.question_id == "abc" and c1.site == "reddit/askscience"
    assert c1.body == "> quoted\n\nReply with & entity"
    assert c1.score == 9 and c1.created_ts == 1420070500.0 and c1.line == 1
    assert c1.author == "name:someone" and c1.distinguished is False and c1.license == "unknown"
    assert by_id["c7"].distinguished is True
    assert by_id["c8"].score == 4 and by_id["c8"].created_ts == 1420070600.0
    assert by_id["c9"].author == "name:[deleted]" and by_id["c9"].created_ts == 1420070700.25
    assert by_id["c10"].question_id == "xyz"

    assert reasons(sink) == {"deleted_body": 2, "empty_body": 1}
    assert [(q["row_id"], q["line"]) for q in sink.quarantined] == [("c2", 2), ("c3", 3), ("c4", 4)]
    assert sink.counts[(str(path), "skipped:reply")] == 2
    assert sink.counts[(str(path), "rows")] == 10  # the blank line is not a row
    assert_rows_add_up(sink, path)


def test_kind_from_first_object_keys(tmp_path):
    subs = write_jsonl(tmp_path / "askscience_posts.json", [submission("p1")])
    coms = write_jsonl(tmp_path / "askscience_comments.ndjson", [comment("k1", parent="t3_p1")])
    sink = ListSink()
    read_reddit(subs, sink)
    read_reddit(coms, sink)
    assert [(p.post_id, p.kind, p.question_id) for p in sink.posts] == [("p1", "question", "p1"), ("k1", "answer", "p1")]


def test_kind_unknown_raises(tmp_path):
    path = write_jsonl(tmp_path / "mystery.jsonl", [{"id": "x1", "body": "?"}])
    with pytest.raises(IngestError, match="cannot tell submissions from comments") as exc:
        read_reddit(path, ListSink())
    assert exc.value.path == str(path) and exc.value.line == 1


def test_crlf_lines_and_bom(tmp_path):
    data = b"\xef\xbb\xbf" + json.dumps(comment("a1")).encode() + b"\r\n" + json.dumps(comment("a2")).encode() + b"\r\n"
    path = tmp_path / "RC_2015-02.jsonl"
    path.write_bytes(data)
    sink = ListSink()
    read_reddit(path, sink)
    assert [p.post_id for p in sink.posts] == ["a1", "a2"]


def test_multi_frame_zst(tmp_path):
    rows = [comment(f"m{i}", body=f"answer number {i}") for i in range(300)]
    path = write_zst(tmp_path / "RC_2015-03.zst", rows, frames=3)
    sink = ListSink()
    read_reddit(path, sink)
    assert [p.post_id for p in sink.posts] == [f"m{i}" for i in range(300)]
    assert sink.counts[(str(path), "rows")] == 300


# --------------------------------------------------------------------------- bad input


def _big_comment_rows(n=4000):
    rnd = random.Random(7)
    return [comment(f"b{i}", body="".join(rnd.choice("abcdefghij ") for _ in range(80)))
            for i in range(n)]


@pytest.mark.parametrize("keep", ["half", "all_but_last_byte"])
def test_truncated_zst_raises(tmp_path, keep):
    full = write_zst(tmp_path / "full.zst", _big_comment_rows(), window_log=27)
    data = full.read_bytes()
    assert len(data) > 50_000  # several blocks: half of it decodes to many complete lines
    cut = data[: len(data) // 2] if keep == "half" else data[:-1]
    path = tmp_path / "RC_2015-04.zst"
    path.write_bytes(cut)
    sink = ListSink()
    with pytest.raises(IngestError, match="truncated zstd stream") as exc:
        read_reddit(path, sink)
    assert "RC_2015-04.zst" in str(exc.value) and f"line {exc.value.line}" in str(exc.value)
    # The error comes at the end of what could be decoded, not at the first line.
    assert exc.value.line == len(sink.posts) + 1 > 1
    assert len(sink.posts) < 4000
    # Quarantining bad rows does not hide a truncated file (the cut line is not a "bad row").
    with pytest.raises(IngestError, match="truncated zstd stream"):
        read_reddit(path, ListSink(), on_bad_row="quarantine")


def test_corrupt_zst_raises(tmp_path):
    path = tmp_path / "RC_2015-05.zst"
    path.write_bytes(b"this is not zstd at all\n")
    with pytest.raises(IngestError, match="zstd") as exc:
        read_reddit(path, ListSink())
    assert "RC_2015-05.zst" in str(exc.value) and "line 1" in str(exc.value)


def test_not_json_error_and_quarantine(tmp_path):
    rows = [comment("j1"), '{"id": "j2", "body": "cut off', comment("j3")]
    path = write_jsonl(tmp_path / "RC_2015-06.jsonl", rows)
    with pytest.raises(IngestError, match="not JSON") as exc:
        read_reddit(path, ListSink())
    assert "RC_2015-06.jsonl" in str(exc.value) and "line 2" in str(exc.value)

    sink = ListSink()
    read_reddit(path, sink, on_bad_row="quarantine")
    assert [p.post_id for p in sink.posts] == ["j1", "j3"]
    assert [(q["reason"], q["line"]) for q in sink.quarantined] == [("not_json", 2)]
    assert sink.quarantined[0]["raw"].startswith('{"id": "j2"')
    assert sink.counts[(str(path), "rows")] == 3
    assert_rows_add_up(sink, path)


def test_json_value_not_object(tmp_path):
    path = write_jsonl(tmp_path / "RC_2015-07.jsonl", [comment("o1"), comment("o2"), "[1, 2, 3]"])
    with pytest.raises(IngestError, match="not an object") as exc:
        read_reddit(path, ListSink())
    assert "RC_2015-07.jsonl" in str(exc.value) and "line 3" in str(exc.value)


def test_missing_id(tmp_path):
    bad = {k: v for k, v in comment("gone").items() if k != "id"}
    path = write_jsonl(tmp_path / "RC_2015-08.jsonl", [comment("i1"), bad])
    with pytest.raises(IngestError, match="missing required field `id`") as exc:
        read_reddit(path, ListSink())
    assert "RC_2015-08.jsonl" in str(exc.value) and "line 2" in str(exc.value) and exc.value.field == "id"
    sink = ListSink()
    read_reddit(path, sink, on_bad_row="quarantine")
    assert [(q["reason"], q["line"]) for q in sink.quarantined] == [("missing_field", 2)]


def test_bad_score_names_field(tmp_path):
    path = write_jsonl(tmp_path / "RC_2015-09.jsonl", [comment("s1", score="lots")])
    with pytest.raises(IngestError) as exc:
        read_reddit(path, ListSink())
    assert exc.value.field == "score" and "line 1" in str(exc.value) and "RC_2015-09.jsonl" in str(exc.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".zst"])
def test_non_utf8_reports_line(tmp_path, suffix):
    rows = [comment("u1"), comment("u2"), json.dumps(comment("u3", body="caf\u00e9"), ensure_ascii=False).encode().replace(b"\xc3\xa9", b"\xe9")]
    name = tmp_path / f"RC_2015-10{suffix}"
    path = write_zst(name, rows) if suffix == ".zst" else write_jsonl(name, rows)
    sink = ListSink()
    with pytest.raises(IngestError, match="not valid UTF-8") as exc:
        read_reddit(path, sink)
    assert f"RC_2015-10{suffix}" in str(exc.value) and "line 3" in str(exc.value)
    assert len(sink.posts) == 2


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
@pytest.mark.parametrize("suffix", [".jsonl", ".zst"])
def test_empty_file(tmp_path, content, suffix):
    path = tmp_path / f"RS_2015-11{suffix}"
    if suffix == ".zst" and content:
        path.write_bytes(zstandard.ZstdCompressor().compress(content))
    else:
        path.write_bytes(content)
    with pytest.raises(IngestError, match="empty file") as exc:
        read_reddit(path, ListSink())
    assert f"RS_2015-11{suffix}" in str(exc.value)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "RC_2015-12.bz2"
    path.write_bytes(b"BZh9")
    with pytest.raises(IngestError, match="unsupported file type"):
        read_reddit(path, ListSink())


def test_bad_on_bad_row_value(tmp_path):
    path = write_jsonl(tmp_path / "RC_x.jsonl", [comment("z")])
    with pytest.raises(ValueError, match="on_bad_row"):
        read_reddit(path, ListSink(), on_bad_row="ignore")


# --------------------------------------------------------------------------- SHP rules

CFG = RedditConfig()  # SHP defaults: post >= 10, comments >= 2, ratio >= 2, <= 5 pairs


def q(score=50, author="name:op", post_id="p"):
    return PostRecord(site="reddit/askscience", source="reddit", post_id=post_id, kind="question",
                      question_id=post_id, title="T", score=score, author=author, created_ts=1000.0)


def a(post_id, score, ts, author="name:x", distinguished=False, question_id="p"):
    return PostRecord(site="reddit/askscience", source="reddit", post_id=post_id, kind="answer",
                      question_id=question_id, body=post_id, score=score, author=author, created_ts=ts,
                      distinguished=distinguished)


def ids(pairs):
    return [(c.post_id, r.post_id) for c, r in pairs]


def test_shp_basic_pair_orientation():
    old_low = a("old", 3, ts=2000.0)
    new_high = a("new", 10, ts=3000.0)
    pairs, counts = shp_pairs(q(), [old_low, new_high], CFG)
    assert ids(pairs) == [("new", "old")]
    assert set(counts) == set(SHP_COUNT_KEYS) and sum(counts.values()) == 0


def test_shp_post_score_too_low():
    answers = [a("old", 3, 2000.0), a("new", 10, 3000.0)]
    pairs, counts = shp_pairs(q(score=9), answers, CFG)
    assert pairs == [] and counts["post_score_too_low"] == 1
    pairs, _ = shp_pairs(q(score=10), answers, CFG)
    assert len(pairs) == 1


def test_shp_op_comments():
    answers = [a("old", 3, 2000.0), a("new", 10, 3000.0, author="name:op")]
    pairs, counts = shp_pairs(q(author="name:op"), answers, CFG)
    assert pairs == [] and counts["op_comment"] == 1
    pairs, counts = shp_pairs(q(author="name:op"), answers, CFG.model_copy(update={"drop_op_comments": False}))
    assert ids(pairs) == [("new", "old")] and counts["op_comment"] == 0
    # A deleted OP is not the author of every deleted commenter.
    deleted = [a("old", 3, 2000.0, author="name:[deleted]"), a("new", 10, 3000.0, author="name:[deleted]")]
    pairs, counts = shp_pairs(q(author="name:[deleted]"), deleted, CFG)
    assert ids(pairs) == [("new", "old")] and counts["op_comment"] == 0


def test_shp_distinguished():
    answers = [a("old", 3, 2000.0), a("new", 10, 3000.0, distinguished=True)]
    pairs, counts = shp_pairs(q(), answers, CFG)
    assert pairs == [] and counts["distinguished"] == 1
    pairs, _ = shp_pairs(q(), answers, CFG.model_copy(update={"drop_distinguished": False}))
    assert ids(pairs) == [("new", "old")]


def test_shp_comment_score_too_low():
    pairs, counts = shp_pairs(q(), [a("old", 1, 2000.0), a("new", 10, 3000.0)], CFG)
    assert pairs == [] and counts["comment_score_too_low"] == 1
    pairs, _ = shp_pairs(q(), [a("old", 2, 2000.0), a("new", 10, 3000.0)], CFG)
    assert ids(pairs) == [("new", "old")]


def test_shp_not_written_later():
    # The higher-scored comment is the older one: its score may just be first-mover advantage.
    pairs, counts = shp_pairs(q(), [a("old", 10, 2000.0), a("new", 3, 3000.0)], CFG)
    assert pairs == [] and counts["not_written_later"] == 1
    pairs, counts = shp_pairs(q(), [a("x", 10, 2000.0), a("y", 3, 2000.0)], CFG)  # same second
    assert pairs == [] and counts["not_written_later"] == 1


def test_shp_score_ratio():
    pairs, counts = shp_pairs(q(), [a("old", 2, 2000.0), a("new", 3, 3000.0)], CFG)
    assert pairs == [] and counts["score_ratio_too_low"] == 1
    pairs, _ = shp_pairs(q(), [a("old", 2, 2000.0), a("new", 4, 3000.0)], CFG)  # exactly 2.0
    assert ids(pairs) == [("new", "old")]
    pairs, _ = shp_pairs(q(), [a("old", 2, 2000.0), a("new", 3, 3000.0)], CFG.model_copy(update={"min_score_ratio": 1.5}))
    assert ids(pairs) == [("new", "old")]


def test_shp_tie():
    pairs, counts = shp_pairs(q(), [a("old", 5, 2000.0), a("new", 5, 3000.0)], CFG)
    assert pairs == [] and counts["tie"] == 1


def test_shp_rejects_foreign_answers():
    with pytest.raises(ValueError, match="belongs to question"):
        shp_pairs(q(), [a("x", 5, 2000.0, question_id="other")], CFG)


def test_shp_duplicate_answer_counted_once():
    pairs, counts = shp_pairs(q(), [a("old", 3, 2000.0), a("old", 3, 2000.0), a("new", 10, 3000.0)], CFG)
    assert ids(pairs) == [("new", "old")] and counts["duplicate_answer"] == 1


def _many_answers(n=12):
    # Later comments score higher: every pair with a ratio >= 2 is valid.
    return [a(f"c{i:02d}", 2 ** (i // 2 + 1), 2000.0 + i) for i in range(n)]


def test_shp_cap_is_deterministic_and_stable_hash():
    answers = _many_answers()
    pairs, counts = shp_pairs(q(), answers, CFG, seed=0)
    # Every valid pair, computed independently of shp_pairs.
    valid = []
    for x, y in combinations(answers, 2):
        hi, lo = (x, y) if x.score > y.score else (y, x)
        if hi.score != lo.score and hi.created_ts > lo.created_ts and hi.score >= 2 * lo.score:
            valid.append((hi.post_id, lo.post_id))
    assert len(valid) > 5
    expected = sorted(valid, key=lambda p: hashlib.sha256(f"0:{p[0]}:{p[1]}".encode()).hexdigest())[:5]
    assert ids(pairs) == expected
    assert counts["capped"] == len(valid) - 5
    n_pairs = len(answers) * (len(answers) - 1) // 2
    assert counts["tie"] + counts["not_written_later"] + counts["score_ratio_too_low"] + len(valid) == n_pairs

    shuffled = answers[:]
    random.Random(3).shuffle(shuffled)
    assert ids(shp_pairs(q(), shuffled, CFG, seed=0)[0]) == expected
    other = ids(shp_pairs(q(), answers, CFG, seed=1)[0])
    assert other == sorted(valid, key=lambda p: hashlib.sha256(f"1:{p[0]}:{p[1]}".encode()).hexdigest())[:5]
    assert other != expected
    assert len(shp_pairs(q(), answers, CFG.model_copy(update={"max_pairs_per_post": 100}))[0]) == len(valid)


def test_read_then_pair_end_to_end(tmp_path):
    """RS_ + RC_ files -> posts -> grouped by question -> SHP pairs."""
    rs = write_zst(tmp_path / "RS_2016-01.zst", [
        submission("p1", score=100, author="asker", created_utc=1451606400),
        submission("p2", score=3, created_utc=1451606400),  # post score too low
    ], window_log=31)
    rc = write_zst(tmp_path / "RC_2016-01.zst", [
        comment("e1", parent="t3_p1", score=3, created_utc=1451606500),
        comment("e2", parent="t3_p1", score="40", created_utc=1451606600, edited=1451700000),
        comment("e3", parent="t3_p1", score=50, created_utc=1451606700, author="asker"),  # OP
        comment("e4", parent="t1_e1", score=99, created_utc=1451606800),  # reply
        comment("e5", parent="t3_p1", score=90, created_utc=1451606900, body="[removed]"),
        comment("e6", parent="t3_p2", score=10, created_utc=1451606500),
        comment("e7", parent="t3_p2", score=30, created_utc=1451606600),
    ], window_log=31)
    sink = ListSink()
    read_reddit(rs, sink)
    read_reddit(rc, sink)
    questions = {p.post_id: p for p in sink.posts if p.kind == "question"}
    answers: dict[str, list[PostRecord]] = {}
    for p in sink.posts:
        if p.kind == "answer":
            answers.setdefault(p.question_id, []).append(p)
    got = {qid: ids(shp_pairs(questions[qid], answers.get(qid, []), CFG)[0]) for qid in questions}
    assert got == {"p1": [("e2", "e1")], "p2": []}
    assert reasons(sink) == {"deleted_body": 1}
    assert sink.counts[(str(rc), "skipped:reply")] == 1
    assert_rows_add_up(sink, rs)
    assert_rows_add_up(sink, rc)


def test_iter_lines_streams_without_reading_whole(tmp_path, monkeypatch):
    """The reader consumes the compressed file in bounded chunks, never with one big read."""
    path = write_zst(tmp_path / "RC_2016-02.zst", _big_comment_rows(3000))
    sizes = []
    real_open = open

    class Spy(io.BufferedReader):
        def read(self, n=-1):
            sizes.append(n)
            return super().read(n)

    def spy_open(p, mode="r", *args, **kw):
        if str(p) == str(path) and "b" in mode:
            return Spy(io.FileIO(p, "rb"))
        return real_open(p, mode, *args, **kw)

    monkeypatch.setattr("builtins.open", spy_open)
    sink = ListSink()
    read_reddit(path, sink)
    assert len(sink.posts) == 3000
    assert sizes and all(0 < n <= 1 << 20 for n in sizes) and len(sizes) > 1


@pytest.mark.parametrize("text", [
    '{"id": "a", "score": 3, "body": "x"}',
    '{"a": 1, "a": 2}',  # a repeated key: the last one
    '{"score": 18446744073709551615}',  # the largest integer orjson reads as one
    '{"score": 18446744073709551616}',  # one more: orjson reads a float, json.loads an int
    '{"score": -9223372036854775809}',
    '{"x": {"deep": 123456789012345678901234567890}}',
    '{"score": 1e400}', '{"score": NaN}', '{"x": -Infinity}',
    '{"body": "\\ud800"}',  # a lone surrogate escape: json.loads reads it, the reader then quarantines it
    '{"body": "caf\\u00e9"}', ' [1, 2.5, true, null] ', '"text"', '-0', '1.5e-7',
])
def test_parse_json_line_answers_as_json_loads(text):
    from alignflow.tasks.ingest.reddit import parse_json_line

    # repr: NaN is not equal to itself, and an int must stay an int (1 == 1.0)
    assert repr(parse_json_line(text)) == repr(json.loads(text))


@pytest.mark.parametrize("text", ['{"a": 1', '{"a": 01}', "{'a': 1}", '{"a": "\x01"}', '\ufeff{"a": 1}', "", "nul"])
def test_parse_json_line_raises_as_json_loads(text):
    from alignflow.tasks.ingest.reddit import parse_json_line

    with pytest.raises(json.JSONDecodeError) as ours:
        parse_json_line(text)
    with pytest.raises(json.JSONDecodeError) as theirs:
        json.loads(text)
    assert (ours.value.msg, ours.value.pos) == (theirs.value.msg, theirs.value.pos)
