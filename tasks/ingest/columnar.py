"""The builder's walk over Stack Exchange questions and Reddit submissions, a chunk at a time, as columns.

:meth:`.build.Builder.add_question` makes the rows of one question as Python dicts: each body becomes
a Python string, is copied into a dict for every dataset it appears in, and is encoded back into
Arrow. Here a chunk of the walk (:meth:`.store.StagingStore.walk_chunks`: some thousands of whole
questions, read from SQLite into Arrow in C) stays in Arrow. The per-row work (scores, acceptance,
titles, splits) is NumPy and Arrow compute over its columns, and so are the rules of
:func:`.scoring.rank_pairs` and :func:`.scoring.best_answer` (over answers' positions and scores).
The text of a pair or a demonstration is an Arrow ``take`` of the bodies. What stays in Python runs
per question or per pair and never touches text: the hashes of splits and ids, and ``rank_pairs``
itself for a question with more pairs than the cap.

A chunk of Reddit submissions (each with its top-level comments) is built the same way: scores from
``score``, no demonstrations. Its pairs come from :func:`.reddit.shp_pairs`, called per submission on
slim records of the fields it reads (ids, authors, flags, scores, times), never on the texts.

The rows, their order and the row groups are exactly those of ``add_question``: a test builds the
same inputs both ways and compares the files byte for byte.
"""

from __future__ import annotations

from collections import Counter
from string import Formatter
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .ids import short_ids
from .scoring import Candidate, combined_license, rank_pairs

if TYPE_CHECKING:
    from .build import Builder

_TEXT = ("site", "source", "post_id", "kind", "question_id", "title", "body", "tags", "accepted_answer_id",
         "author", "license", "created_at", "source_file")
_INTS = ("score", "line", "up", "down", "acc", "has_votes")


COLUMNAR_SOURCES = ("stackexchange", "reddit")


def chunk_source(chunk: pa.Table) -> str | None:
    """The source every post of the chunk comes from, if one (``stackexchange``, ``reddit``), else None."""
    source = chunk.column("source")
    first = source[0].as_py() if len(source) else None
    return first if first is not None and pc.all(pc.equal(source, first)).as_py() else None


def render_prompts(template: str, fields: dict[str, pa.Array], n: int) -> pa.Array:
    """``template.format(**row)`` for ``n`` rows of string columns, in Arrow: the template's literal text and
    its fields joined (:func:`.scoring.check_template` has made sure fields carry no format spec)."""
    parts: list[pa.Array | str] = []
    for literal, name, _spec, _conversion in Formatter().parse(template):
        if literal:
            parts.append(literal)
        if name is not None:
            parts.append(fields[name])
    if not any(isinstance(p, (pa.Array, pa.ChunkedArray)) for p in parts):
        return pa.array(["".join(parts)] * n, pa.string())  # type: ignore[arg-type]
    return pc.binary_join_element_wise(*parts, "")


def pm_scores(up: np.ndarray, vote_score: np.ndarray, accepted: np.ndarray) -> np.ndarray:
    """:func:`.scoring.pm_score` over arrays: ``round(log2(1 + up))`` (+1 accepted), -1 for a negative net score.
    (``log2`` of an integer is never halfway between two integers, so NumPy's rounding is Python's.)"""
    score = np.rint(np.log2(1 + np.maximum(up, 0))).astype(np.int64) + accepted
    return np.where(vote_score < 0, -1, score)


def _questions(builder: Builder, chunk: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The chunk without its orphan answers (quarantined), and the row where each question starts."""
    n = chunk.num_rows
    site, qkey = chunk.column("site"), chunk.column("qkey")
    # the first row of each group (the rows of one question share site and qkey)
    new = np.ones(n, dtype=bool)
    new[1:] = ~pc.and_(pc.equal(site[1:], site[:-1]), pc.equal(qkey[1:], qkey[:-1])).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(new)
    first_is_question = pc.equal(chunk.column("kind").take(starts), "question").to_numpy(zero_copy_only=False)
    if first_is_question.all():
        return chunk, starts
    # answers whose question is not in the input
    keep = np.repeat(first_is_question, np.diff(np.append(starts, n)))
    orphans = chunk.filter(pa.array(~keep)).select(["source_file", "line", "post_id", "site", "question_id"])
    for row in orphans.to_pylist():
        builder.store.quarantine(
            source_file=row["source_file"], reason="orphan_answer", line=row["line"], row_id=row["post_id"],
            site=row["site"], detail=f"question {row['question_id']} is not in the input (deleted, or in another file)",
        )
    return chunk.filter(pa.array(keep)), np.flatnonzero(new[keep])


def add_questions(builder: Builder, chunk: pa.Table, source: str = "stackexchange") -> None:
    """Build the rows of a chunk of whole questions of one ``source`` into the builder's dataset writers: Stack
    Exchange questions, or Reddit submissions with their top-level comments (paired by the SHP rules of
    :func:`.reddit.shp_pairs`, one submission at a time; no demonstrations, as :meth:`.build.Builder.add_question`)."""
    reddit = source == "reddit"
    if reddit and builder.shp_pairs is None:
        raise RuntimeError("Reddit input needs the SHP pairing rules")
    chunk, qstarts = _questions(builder, chunk.combine_chunks())
    n = chunk.num_rows
    if not n:
        return
    text = {name: chunk.column(name) for name in _TEXT}
    ints = {name: chunk.column(name).fill_null(0).to_numpy() for name in _INTS}
    line = chunk.column("line")

    nq = len(qstarts)
    qends = np.append(qstarts[1:], n)
    group = np.repeat(np.arange(nq), qends - qstarts)  # the question of each row
    is_answer = np.ones(n, dtype=bool)
    is_answer[qstarts] = False

    # per question: split, prompt id, score source
    q = {name: text[name].take(qstarts) for name in ("site", "question_id", "source", "source_file")}
    q_site: list[str] = q["site"].to_pylist()
    q_id: list[str] = q["question_id"].to_pylist()
    split_q = builder.splits_of(q["site"], q["question_id"])
    votes_sites = set() if reddit else {s for s in set(q_site) if builder.score_source_for(s) == "votes"}
    q_by_votes = np.array([s in votes_sites for s in q_site], dtype=bool)
    prompts = render_prompts(builder.cfg.prompt_template, {
        "title": text["title"].take(qstarts), "body": text["body"].take(qstarts),
        "site": q["site"], "tags": text["tags"].take(qstarts)}, nq)

    # per row: the question's title and split, acceptance, scores
    qrow = qstarts[group]  # each row's question row
    title = text["title"].take(qrow)
    split = split_q.take(group)
    accepted_id = pc.fill_null(text["accepted_answer_id"], "").take(qrow)
    accepted = is_answer & (pc.fill_null(pc.equal(text["post_id"], accepted_id), False).to_numpy(zero_copy_only=False)
                            | (ints["acc"] > 0))
    has_votes = ints["has_votes"].astype(bool)
    by_votes = has_votes & q_by_votes[group]  # scored from Votes.xml (else from Score)
    score = ints["score"]
    up = np.where(by_votes, ints["up"], np.maximum(score, 0))
    pm = pm_scores(up, np.where(by_votes, ints["up"] - ints["down"], score), accepted.astype(np.int64))
    upvotes = pa.array(ints["up"], pa.int64(), mask=~(has_votes & is_answer))
    pm_col = pa.array(pm, pa.int64(), mask=~is_answer)

    kept = builder.summary.kept_by_file
    for source_file, count in Counter(q["source_file"].to_pylist()).items():
        kept[(source_file, "kept:question")] += count
    for source_file, count in Counter(text["source_file"].filter(pa.array(is_answer)).to_pylist()).items():
        kept[(source_file, "kept:answer")] += count

    writers = builder.writers
    writers["posts"].add_table(pa.Table.from_arrays([
        text["site"], text["source"], text["post_id"], text["kind"], text["question_id"], title, text["body"],
        text["tags"], pa.array(score), upvotes, pa.array(accepted), pm_col, text["author"], text["license"],
        text["created_at"], split, text["source_file"], line], schema=writers["posts"].batch_schema), qends)

    qline = line.take(qstarts)
    writers["prompts"].add_table(pa.Table.from_arrays([
        short_ids(q["site"], q["question_id"]), prompts, q["question_id"], q["site"],
        q["source"], split_q, q["source_file"], qline], schema=writers["prompts"].batch_schema),
        np.arange(1, nq + 1))

    # pairs and demonstrations: over (position, pm_score, accepted) only; Reddit's pairs by the SHP rules
    if reddit:
        c, r, pq, pair_ends = _shp_pairs(builder, chunk, qstarts, qends)
        d = dq = demo_ends = np.zeros(0, np.int64)
        pair_scores = score.astype(np.float64)
    else:
        c, r, pq, pair_ends = _pairs(builder, qstarts, qends, q_site, q_id, text["post_id"], pm)
        d, dq, demo_ends = _demos(builder.cfg.min_demo_pm_score, qstarts, group, is_answer, accepted, pm)
        pair_scores = pm.astype(np.float64)
    if len(c):
        chosen_ids, rejected_ids = text["post_id"].take(c), text["post_id"].take(r)
        pair_ids = short_ids(q["site"].take(pq), q["question_id"].take(pq), chosen_ids, rejected_ids)
        cs, rs = pair_scores[c], pair_scores[r]
        lc, lr = text["license"].take(c), text["license"].take(r)
        if not pc.all(pc.fill_null(pc.equal(lc, lr), False)).as_py():  # answers under different licences
            lc = pa.array([combined_license(a, b) for a, b in zip(lc.to_pylist(), lr.to_pylist())], pa.string())
        qr = qstarts[pq]
        writers["pairs"].add_table(pa.Table.from_arrays([
            pair_ids, prompts.take(pq), text["body"].take(c), text["body"].take(r),
            pa.array(cs), pa.array(rs), pa.array(cs - rs), q["question_id"].take(pq), q["site"].take(pq),
            q["source"].take(pq), split_q.take(pq), chosen_ids, rejected_ids,
            text["author"].take(c), text["author"].take(r), lc, q["source_file"].take(pq),
            line.take(qr)], schema=writers["pairs"].batch_schema), pair_ends)
    if len(d):
        writers["demos"].add_table(pa.Table.from_arrays([
            short_ids(q["site"].take(dq), q["question_id"].take(dq), text["post_id"].take(d)),
            prompts.take(dq), text["body"].take(d), q["question_id"].take(dq), text["post_id"].take(d),
            q["site"].take(dq), q["source"].take(dq), split_q.take(dq), pa.array(pm[d]), text["author"].take(d),
            text["license"].take(d), text["source_file"].take(d), line.take(d)],
            schema=writers["demos"].batch_schema), demo_ends)


def _pairs(builder: Builder, qstarts: np.ndarray, qends: np.ndarray, q_site: list[str], q_id: list[str],
           post_ids: pa.ChunkedArray, pm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`.scoring.rank_pairs` for every question of the chunk: (chosen row, rejected row, question, ends),
    in walk order; ``ends[g]``: the pairs up to question ``g`` included.

    Every two answers with different scores make a pair, so the questions with k answers are done at once
    as k*(k-1)/2 pairs of positions. A question's answers come by id in the walk, so ordering its pairs by
    (chosen, rejected) position is ``rank_pairs``' order. A question with more pairs than the cap goes through
    ``rank_pairs`` itself (its seeded choice of the pairs kept).
    """
    cfg = builder.cfg
    stats = builder.summary.pair_stats
    nq = len(qstarts)
    answers = qends - qstarts - 1
    eligible = np.flatnonzero(answers >= max(cfg.min_answers, 2))  # fewer than 2 answers make no pair
    chosen, rejected, question = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    candidates = ties = capped = 0
    for k in np.unique(answers[eligible]).tolist():
        qs = eligible[answers[eligible] == k]
        i, j = np.triu_indices(k, 1)
        first = (qstarts[qs] + 1)[:, None]
        a, b = first + i, first + j  # one row per question, one column per pair of its answers
        differ = pm[a] != pm[b]
        over = differ.sum(axis=1) > cfg.max_pairs_per_question
        for g in qs[over].tolist():  # more pairs than the cap: the seeded choice of rank_pairs
            a0 = int(qstarts[g]) + 1
            ids = post_ids.slice(a0, int(qends[g]) - a0).to_pylist()
            pairs, ps = rank_pairs([Candidate(i, int(x)) for i, x in zip(ids, pm[a0:int(qends[g])].tolist())],
                                   max_pairs=cfg.max_pairs_per_question, seed=cfg.pair_seed,
                                   key=f"{q_site[g]}:{q_id[g]}")
            candidates, ties, capped = candidates + ps.candidates, ties + ps.ties, capped + ps.capped
            chosen.append(np.array([a0 + x for x, _ in pairs], np.int64))
            rejected.append(np.array([a0 + y for _, y in pairs], np.int64))
            question.append(np.full(len(pairs), g, np.int64))
        a, b, differ = a[~over], b[~over], differ[~over]
        candidates += a.size
        ties += int((~differ).sum())
        higher = pm[a] > pm[b]
        chosen.append(np.where(higher, a, b)[differ])
        rejected.append(np.where(higher, b, a)[differ])
        question.append(np.broadcast_to(qs[~over][:, None], a.shape)[differ])
    c, r, q = np.concatenate(chosen), np.concatenate(rejected), np.concatenate(question)
    order = np.lexsort((r, c, q))
    c, r, q = c[order], r[order], q[order]
    if len(eligible):
        stats["candidates"] += candidates
        stats["dropped:tie"] += ties
        stats["dropped:capped"] += capped
    stats["kept"] += len(c)
    return c, r, q, np.searchsorted(q, np.arange(nq), side="right")


class _ShpPost:
    """What :func:`.reddit.shp_pairs` reads of a post, and the post's row in the chunk."""

    __slots__ = ("post_id", "question_id", "author", "distinguished", "score", "created_ts", "row")

    def __init__(self, post_id, question_id, author, distinguished, score, created_ts, row):
        self.post_id, self.question_id, self.author = post_id, question_id, author
        self.distinguished, self.score, self.created_ts, self.row = distinguished, score, created_ts, row


def _shp_pairs(builder: Builder, chunk: pa.Table, qstarts: np.ndarray, qends: np.ndarray,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`.reddit.shp_pairs` for every submission of the chunk: (chosen row, rejected row, question, ends), in
    the order it returns them, with the counts :meth:`.build.Builder.add_question` keeps."""
    cfg = builder.cfg
    stats = builder.summary.pair_stats
    columns = [chunk.column(name).to_pylist()
               for name in ("post_id", "question_id", "author", "distinguished", "score", "created_ts")]
    posts = [_ShpPost(*fields, row) for row, fields in enumerate(zip(*columns))]
    chosen: list[int] = []
    rejected: list[int] = []
    question: list[int] = []
    drops: Counter = Counter()
    candidates = 0
    for g, (start, end) in enumerate(zip(qstarts.tolist(), qends.tolist())):
        answers = posts[start + 1:end]
        pairs, dropped = builder.shp_pairs(posts[start], answers, cfg.reddit, seed=cfg.pair_seed)
        drops.update(dropped)
        candidates += len(answers) * (len(answers) - 1) // 2
        for a, b in pairs:
            chosen.append(a.row)
            rejected.append(b.row)
            question.append(g)
    stats.update({f"dropped:{k}": v for k, v in drops.items()})
    stats["candidates"] += candidates
    stats["kept"] += len(chosen)
    q = np.array(question, np.int64)
    return (np.array(chosen, np.int64), np.array(rejected, np.int64), q,
            np.searchsorted(q, np.arange(len(qstarts)), side="right"))


def _demos(min_pm_score: int, qstarts: np.ndarray, group: np.ndarray, is_answer: np.ndarray, accepted: np.ndarray,
           pm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`.scoring.best_answer` for every question of the chunk: (answer row, question, ends). The best
    answer has the highest score, then is the accepted one, then comes first (the lowest id)."""
    rows = np.flatnonzero(is_answer)
    order = np.lexsort((rows, ~accepted[rows], -pm[rows], group[rows]))
    by_question = group[rows][order]
    first = np.flatnonzero(np.r_[True, by_question[1:] != by_question[:-1]]) if len(order) else order
    best, question = rows[order[first]], by_question[first]
    keep = pm[best] >= min_pm_score
    best, question = best[keep], question[keep]
    return best, question, np.searchsorted(question, np.arange(len(qstarts)), side="right")
