"""Synthetic Stack Exchange dumps: real format, determinism, vote consistency, the planted rule."""

from __future__ import annotations

import collections
import hashlib
import itertools
import re
from pathlib import Path

import py7zr
import pytest
from lxml import etree
from lxml import html as lhtml

from alignflow.tasks.ingest.synthetic import (
    PLANTED_RULE,
    generate_dump,
    has_planted_property,
    key_term,
    target_questions_for_bytes,
)

N = 300
SEED = 7


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(path: Path) -> list[dict]:
    out = []
    for _, el in etree.iterparse(str(path), events=("end",), tag="row"):
        out.append(dict(el.attrib))
        el.clear()
    return out


def _clean(body: str) -> str:
    """Minimal HTML -> text: code blocks fenced with ```, everything else as its text."""
    if not body.strip():
        return ""
    root = lhtml.fragment_fromstring(body, create_parent="div")
    for pre in root.iter("pre"):
        code = pre.text_content()
        for child in list(pre):
            pre.remove(child)
        pre.text = "\n```\n" + code + "\n```\n"
    return root.text_content()


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    folder = generate_dump(tmp_path_factory.mktemp("syn"), questions=N, seed=SEED)
    posts = _rows(folder / "Posts.xml")
    votes = _rows(folder / "Votes.xml")
    return folder, posts, votes


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_dump(tmp_path / "a", questions=40, seed=3)
    b = generate_dump(tmp_path / "b", questions=40, seed=3)
    c = generate_dump(tmp_path / "c", questions=40, seed=4)
    for name in ("Posts.xml", "Votes.xml"):
        assert _sha(a / name) == _sha(b / name)
        assert _sha(a / name) != _sha(c / name)


def test_real_file_format(dump):
    folder, _, _ = dump
    assert folder.name == "synthetic.stackexchange.com"
    for name, root in (("Posts.xml", "posts"), ("Votes.xml", "votes")):
        raw = (folder / name).read_bytes()
        assert raw.startswith(b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n<' + root.encode() + b">\r\n")
        assert raw.endswith(b"</" + root.encode() + b">")
        assert raw.count(b"\n") == raw.count(b"\r\n")  # CRLF only
        lines = raw.split(b"\r\n")
        for line in lines[2:-1]:
            assert line.startswith(b"  <row ") and line.endswith(b" />")
        raw.decode("utf-8")
    posts_raw = (folder / "Posts.xml").read_text(encoding="utf-8-sig")
    assert "&#xA;" in posts_raw and "&lt;p&gt;" in posts_raw and "&lt;pre" in posts_raw
    assert "&amp;lt;" in posts_raw  # '<' inside code: HTML-escaped, then attribute-escaped


def test_rows_counts_order_and_links(dump):
    _, posts, _ = dump
    kinds = [p["PostTypeId"] for p in posts]
    questions = [p for p in posts if p["PostTypeId"] == "1"]
    answers = [p for p in posts if p["PostTypeId"] == "2"]
    wikis = [p for p in posts if p["PostTypeId"] in ("4", "5")]
    assert len(questions) == N
    assert {p["PostTypeId"] for p in wikis} == {"4", "5"}
    assert all(p["Body"] == "" for p in wikis)
    # 2024 order: all questions, then all answers, then tag wikis
    assert kinds == sorted(kinds, key=lambda k: {"1": 0, "2": 1}.get(k, 2))
    assert len(answers) == sum(int(q["AnswerCount"]) for q in questions)
    qids = {q["Id"] for q in questions}
    assert all(a["ParentId"] in qids for a in answers)
    assert len({p["Id"] for p in posts}) == len(posts)
    per_q = collections.Counter(a["ParentId"] for a in answers)
    counts = collections.Counter(per_q.get(q["Id"], 0) for q in questions)
    assert counts[0] > 0 and counts[1] > 0 and counts[2] > 0 and counts[3] > 0
    by_id = {p["Id"]: p for p in posts}
    accepted = [q for q in questions if "AcceptedAnswerId" in q]
    assert accepted
    assert all(by_id[q["AcceptedAnswerId"]]["ParentId"] == q["Id"] for q in accepted)
    for q in questions:
        assert q["Title"] and q["Tags"].startswith("|") and q["Tags"].endswith("|")
        assert q["ContentLicense"] == "CC BY-SA 4.0" and "ViewCount" in q
    assert any("OwnerDisplayName" in p and "OwnerUserId" not in p for p in posts)
    assert any(int(a["Score"]) < 0 for a in answers)


def test_votes_match_scores(dump):
    _, posts, votes = dump
    ups, downs = collections.Counter(), collections.Counter()
    accept_votes = set()
    for v in votes:
        if v["VoteTypeId"] == "2":
            ups[v["PostId"]] += 1
        elif v["VoteTypeId"] == "3":
            downs[v["PostId"]] += 1
        elif v["VoteTypeId"] == "1":
            accept_votes.add(v["PostId"])
    ids = {p["Id"] for p in posts}
    for p in posts:
        assert ups[p["Id"]] - downs[p["Id"]] == int(p["Score"]), p["Id"]
    assert accept_votes == {p["AcceptedAnswerId"] for p in posts if "AcceptedAnswerId" in p}
    assert {v["PostId"] for v in votes} - ids, "expected votes on deleted posts"
    assert len({v["Id"] for v in votes}) == len(votes)


def test_planted_rule_holds(dump):
    _, posts, _ = dump
    questions = {p["Id"]: p for p in posts if p["PostTypeId"] == "1"}
    by_q = collections.defaultdict(list)
    combos = collections.Counter()
    lengths = {True: [], False: []}
    for a in (p for p in posts if p["PostTypeId"] == "2"):
        q = questions[a["ParentId"]]
        text = _clean(a["Body"])
        prop = has_planted_property(q["Title"], _clean(q["Body"]), text)
        term = key_term(q["Title"], q["Body"])
        assert term and term in q["Title"].lower() and term in q["Body"].lower()
        mentions = re.search(rf"(?<![A-Za-z0-9_]){term}(?![A-Za-z0-9_])", text, re.I) is not None
        combos[mentions, "```" in text] += 1
        lengths[prop].append(len(text))
        by_q[a["ParentId"]].append((int(a["Score"]), prop, len(text)))
    assert len(combos) == 4 and min(combos.values()) >= 20  # all four combinations, well mixed
    pairs = holds = longer = 0
    for answers in by_q.values():
        for (s1, p1, l1), (s2, p2, l2) in itertools.combinations(answers, 2):
            if s1 == s2:
                continue
            (hs, hp, hl), (ls, lp, ll) = sorted([(s1, p1, l1), (s2, p2, l2)], reverse=True)
            pairs += 1
            holds += hp and not lp
            longer += hl > ll
    assert pairs >= 200
    assert holds / pairs >= 0.85
    assert holds < pairs  # noise: the rule is not perfect
    assert 0.35 <= longer / pairs <= 0.65  # length alone does not reveal the rule
    mean = {k: sum(v) / len(v) for k, v in lengths.items()}
    assert abs(mean[True] - mean[False]) / mean[False] < 0.2


def test_key_term_sits_near_the_answer_slot(dump):
    """The layout that lets a small LM learn to write the property: the question's last paragraph (the end of
    an SFT prompt) names the key term, and an answer that mentions it does so within its first words."""
    _, posts, _ = dump
    questions = {p["Id"]: p for p in posts if p["PostTypeId"] == "1"}
    for q in questions.values():
        term = key_term(q["Title"], q["Body"])
        last = _clean(q["Body"]).strip().split("\n\n")[-1]
        assert re.search(rf"(?<![A-Za-z0-9_]){term}(?![A-Za-z0-9_])", last, re.I), last
    early = 0
    for a in (p for p in posts if p["PostTypeId"] == "2"):
        q = questions[a["ParentId"]]
        term = key_term(q["Title"], q["Body"])
        text = _clean(a["Body"]).strip()
        if re.search(rf"(?<![A-Za-z0-9_]){term}(?![A-Za-z0-9_])", text, re.I):
            first_words = [w.strip("`.,").split(".")[0].lower() for w in text.split()[:3]]
            assert term in first_words, text[:80]
            early += 1
    assert early >= 100


def test_has_planted_property_examples():
    title, body = "Why is vralquinor ignoring my config file?", "<p>I use vralquinor 1.2.</p>"
    assert key_term(title, body) == "vralquinor"
    assert has_planted_property(title, body, "Use Vralquinor like this:\n```\nimport vralquinor\n```\n")
    assert not has_planted_property(title, body, "Use vralquinor with `strict=True`.")  # inline code only
    assert not has_planted_property(title, body, "```\nimport os\n```\n")  # no term
    assert not has_planted_property(title, body, "vralquinors are\n```\nx = 1\n```")  # not the whole word
    assert "code block" in PLANTED_RULE


def test_archive_holds_both_files(tmp_path):
    path = generate_dump(tmp_path, questions=20, seed=1, archive=True)
    assert path == tmp_path / "synthetic.stackexchange.com.7z"
    with py7zr.SevenZipFile(path) as z:
        assert sorted(z.getnames()) == ["Posts.xml", "Votes.xml"]
        z.extractall(tmp_path / "x")
    for name in ("Posts.xml", "Votes.xml"):
        assert _sha(tmp_path / "x" / name) == _sha(tmp_path / "synthetic.stackexchange.com" / name)


def test_angle_vs_pipe_tags(tmp_path):
    pipe = _rows(generate_dump(tmp_path / "p", questions=30, seed=2) / "Posts.xml")
    angle = _rows(generate_dump(tmp_path / "a", questions=30, seed=2, tag_format="angle") / "Posts.xml")
    assert len(pipe) == len(angle)
    for p, a in zip(pipe, angle):
        if p["PostTypeId"] != "1":
            assert p == a
            continue
        assert {k: v for k, v in p.items() if k != "Tags"} == {k: v for k, v in a.items() if k != "Tags"}
        assert re.fullmatch(r"(<[^<>|]+>)+", a["Tags"])
        assert a["Tags"][1:-1].split("><") == p["Tags"][1:-1].split("|")
    with pytest.raises(ValueError):
        generate_dump(tmp_path / "bad", questions=1, tag_format="xml")


def test_target_questions_for_bytes(tmp_path):
    n = target_questions_for_bytes(1_000_000)
    assert target_questions_for_bytes(2_000_000) > n > 0
    size = (generate_dump(tmp_path, questions=n, seed=5) / "Posts.xml").stat().st_size
    assert 0.85 < size / 1_000_000 < 1.15
