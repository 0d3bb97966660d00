"""Which pairs a preference model trains and is evaluated on: mixtures, task subsets, split hygiene.

Pure functions over pair rows (dicts with the ``pairs`` dataset columns:
``prompt``, ``chosen``, ``rejected``, ``site``, ``question_id``, ``split``, ...).
The flows ``pmp``, ``pm`` and ``pmp-transfer`` read Parquet, call these, and log
what they return; nothing here touches MLflow or Prefect.

Every draw works on whole questions: the pairs of one question are either all
in a draw or all out of it, so the question-grouped batches of
``tasks.train.reward`` stay whole and a held-out question never leaks into
training through a sibling pair.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from .reward import question_key

__all__ = [
    "MixtureSource",
    "MixtureReport",
    "PairSelectionError",
    "SplitLeakError",
    "check_split_hygiene",
    "draw_mixture",
    "draw_questions",
    "mismatched_pairs",
    "read_pairs",
    "rows_of_split",
]

PAIR_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "margin",
                "question_id", "site", "source", "split", "weight")  # weight: human pairs (1/C(K,2) per ranking)
ANY_SITE = "*"


class PairSelectionError(ValueError):
    """The configured pairs cannot be assembled (a source with no pairs, an unknown site, ...)."""


class SplitLeakError(PairSelectionError):
    """Evaluation pairs share a question with training pairs."""


def read_pairs(path: Path, columns: Sequence[str] = PAIR_COLUMNS) -> list[dict]:
    """The rows of a ``pairs.parquet`` written by the ingest (only ``columns`` that exist)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pairs dataset at {path}")
    schema = pq.read_schema(path)
    missing = [c for c in ("prompt", "chosen", "rejected", "split") if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: not a pairs dataset, missing column(s) {', '.join(missing)}")
    return pq.read_table(path, columns=[c for c in columns if c in schema.names]).to_pylist()


def rows_of_split(rows: Iterable[dict], split: str, site: str | None = None) -> list[dict]:
    """Rows of one split (and one site when ``site`` is given and not ``*``)."""
    return [r for r in rows if r.get("split") == split and (site in (None, ANY_SITE) or r.get("site") == site)]


def _stable_order(keys: Iterable[str], seed: int) -> list[str]:
    """Questions in a seeded order that does not depend on input order or Python's hash seed."""
    return sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}\x1f{k}".encode()).digest())


def draw_questions(rows: Sequence[dict], n_pairs: int | None, seed: int) -> list[dict]:
    """At most ``n_pairs`` rows made of whole questions, taken in a seeded order (None or 0 = all rows).

    The result lists questions in that seeded order, the pairs of a question
    adjacent and in input order.

    Questions are added while the total stays within ``n_pairs``; a question
    that would overflow is skipped and smaller ones after it may still fit, so
    the result has at most ``n_pairs`` rows and at least one question when any
    question fits. A draw with a larger ``n_pairs`` (same seed) contains every
    question of a smaller one: the learning-curve sizes are nested.
    """
    by_q: dict[str, list[dict]] = {}
    for r in rows:
        by_q.setdefault(question_key(r), []).append(r)
    out: list[dict] = []
    for key in _stable_order(by_q, seed):
        group = by_q[key]
        if not n_pairs or len(out) + len(group) <= n_pairs:
            out.extend(group)
        if n_pairs and len(out) == n_pairs:
            break
    return out


def mismatched_pairs(rows: Sequence[dict], ratio: float, seed: int, donors: str = "random") -> list[dict]:
    """Extra pairs that teach a reward model that an answer must fit its prompt: about ``ratio`` per row.

    Each extra pair takes a question's best answer (the ``chosen`` with the highest ``chosen_score`` among its
    pairs; the first on ties or without scores) as ``chosen`` and the best answer of another question of
    ``rows`` as ``rejected``, under the first question's prompt. Well-voted answers to other questions are
    the hard negatives that ranked pairs rarely hold: fluent, on the site's topics, often of the same form,
    wrong only in what they refer to. The donors follow a seeded order that does not depend on input order;
    a donor answer equal to the question's own is skipped. The result does not depend on the order of ``rows``
    when a question's highest-scored chosen answer is unique. The rows carry the question's ``site``,
    ``question_id``, ``split`` and ``source``, so question-grouped batches keep them with the question's
    real pairs; ``pair_id`` starts with ``mismatch:``, scores and margin are None and ``mismatched`` is True.

    ``donors="random"`` takes the donors at fixed offsets in the seeded order; ``donors="nearest"`` takes the
    other questions' best answers most similar to the question's own (Jaccard similarity of their lowercased
    word sets, :func:`nearest_answers`): near-duplicates that differ in a few words, so the pair asks about
    those words and the prompt they must fit, not about length, form or topic.
    """
    if ratio < 0:
        raise ValueError(f"mismatched pairs ratio must be >= 0, got {ratio}")
    if donors not in ("random", "nearest"):
        raise ValueError(f"mismatched pairs donors must be random or nearest, got {donors!r}")
    best: dict[str, dict] = {}
    for r in rows:
        key = question_key(r)
        cur = best.get(key)
        score = r.get("chosen_score")
        if cur is None or (score is not None and (cur.get("chosen_score") is None or score > cur["chosen_score"])):
            best[key] = r
    order = _stable_order(best, seed)
    want = round(ratio * len(rows))
    if want == 0 or len(order) < 2:
        return []
    per_question, extra = divmod(want, len(order))
    counts = [per_question + (1 if i < extra else 0) for i in range(len(order))]
    if donors == "nearest":
        near = nearest_answers([best[k]["chosen"] for k in order], max(counts))
    out: list[dict] = []
    for i, key in enumerate(order):
        own = best[key]
        for j in range(counts[i]):
            if donors == "nearest":
                if j >= len(near[i]):
                    break
                donor_key = order[near[i][j]]
            else:
                # the j-th donor of question i: a fixed non-zero offset in the seeded order, never the question
                offset = 1 + (j * 7919 + seed) % (len(order) - 1)
                donor_key = order[(i + offset) % len(order)]
            donor = best[donor_key]
            if donor["chosen"] == own["chosen"]:
                continue
            out.append({
                **{c: own.get(c) for c in ("prompt", "question_id", "site", "source", "split")},
                "pair_id": "mismatch:" + hashlib.sha256(f"{key}\x1e{donor_key}".encode()).hexdigest()[:16],
                "chosen": own["chosen"], "rejected": donor["chosen"],
                "chosen_score": None, "rejected_score": None, "margin": None,
                **({"weight": own["weight"]} if "weight" in own else {}),
                "mismatched": True,
            })
    return out


_WORD = re.compile(r"\w+")


def nearest_answers(texts: Sequence[str], k: int, *, block: int = 512) -> list[list[int]]:
    """For each text, the indices of the ``k`` other texts with the highest Jaccard similarity of word sets.

    Words are ``\\w+`` runs, lowercased. Ties go to the lower index; a text never lists itself, nor a text
    equal to it. Exact and deterministic: a sparse word-incidence matrix multiplied by its transpose, ``block``
    rows at a time (memory ``block x len(texts)``; time grows with the square of ``len(texts)``, which suits
    task-sized pair sets of thousands to tens of thousands of questions).
    """
    import numpy as np
    from scipy import sparse

    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n = len(texts)
    if n == 0 or k == 0:
        return [[] for _ in range(n)]
    vocab: dict[str, int] = {}
    indptr, indices = [0], []
    for t in texts:
        ids = sorted({vocab.setdefault(w, len(vocab)) for w in _WORD.findall(t.lower())})
        indices += ids
        indptr.append(len(indices))
    x = sparse.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(n, max(len(vocab), 1)))
    sizes = np.diff(x.indptr).astype(np.float64)
    xt = x.T.tocsc()
    out: list[list[int]] = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        inter = np.asarray((x[start:stop] @ xt).todense(), dtype=np.float64)
        union = sizes[start:stop, None] + sizes[None, :] - inter
        sim = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        for row in range(stop - start):
            i = start + row
            sim[row, i] = -1.0
            # stable sort on -similarity: ties keep the lower index first
            ranked = np.argsort(-sim[row], kind="stable")
            picked: list[int] = []
            for j in ranked:
                if len(picked) == k or sim[row, j] < 0:
                    break
                if texts[j] != texts[i]:
                    picked.append(int(j))
            out.append(picked)
    return out


@dataclass(frozen=True)
class MixtureSource:
    """One weighted source of the mixture: a site (``*`` = every site no other source names)."""

    site: str
    weight: float


@dataclass
class MixtureReport:
    """What a mixture draw took from each source (logged by the ``pmp`` flow)."""

    total: int
    per_source: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        out = {"data/mixture_pairs": float(self.total)}
        for site, info in self.per_source.items():
            name = site.replace("*", "any").replace("/", "_")
            out[f"data/mixture_{name}_available"] = info["available"]
            out[f"data/mixture_{name}_drawn"] = info["drawn"]
        return out


def draw_mixture(
    rows: Sequence[dict], sources: Sequence[MixtureSource], total: int | None, seed: int
) -> tuple[list[dict], MixtureReport]:
    """A weighted mixture of pairs from several sources (sites), by whole questions.

    Source *i* gets ``round(total · w_i / Σw)`` pairs (the last source takes the
    rounding remainder), where ``total`` defaults to the number of pairs the
    sources hold together. A source holding fewer pairs than its share is
    repeated whole (each repetition a fresh seeded question order) and then
    topped up by a partial draw, so its weight is honoured by upsampling; the
    report says how many pairs each source had and how many were drawn. A
    named source with no pairs is an error that lists the sites present.
    The result is in a seeded order of questions (pairs of one question stay
    adjacent).
    """
    if not sources:
        raise ValueError("the mixture has no sources")
    names = [s.site for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"mixture sources name a site twice: {names}")
    named = {s.site for s in sources if s.site != ANY_SITE}
    pools: dict[str, list[dict]] = {s.site: [] for s in sources}
    for r in rows:
        site = r.get("site") or ""
        if site in named:
            pools[site].append(r)
        elif ANY_SITE in pools:
            pools[ANY_SITE].append(r)
    present = sorted({r.get("site") or "" for r in rows})
    for s in sources:
        if not pools[s.site]:
            raise PairSelectionError(f"mixture source site {s.site!r} has no training pairs; sites present: "
                             f"{', '.join(present) or '(none)'}")
    available = sum(len(p) for p in pools.values())
    total = available if not total else int(total)
    weight_sum = sum(s.weight for s in sources)
    targets, given = [], 0
    for i, s in enumerate(sources):
        t = total - given if i == len(sources) - 1 else round(total * s.weight / weight_sum)
        targets.append(max(t, 0))
        given += targets[-1]
    drawn: list[list[dict]] = []
    report = MixtureReport(total=0)
    for i, (s, target) in enumerate(zip(sources, targets)):
        pool = pools[s.site]
        taken: list[dict] = []
        rep = 0
        while len(taken) + len(pool) <= target:
            taken.extend(draw_questions(pool, None, seed + 7919 * rep))
            rep += 1
        if len(taken) < target:
            taken.extend(draw_questions(pool, target - len(taken), seed + 7919 * rep + i))
        drawn.append(taken)
        report.per_source[s.site] = {"available": float(len(pool)), "drawn": float(len(taken)),
                                     "weight": s.weight / weight_sum}
    # Interleave questions of all sources in one seeded order.
    chunks: list[list[dict]] = []
    for part in drawn:
        cur: list[dict] = []
        for r in part:
            if cur and question_key(cur[-1]) != question_key(r):
                chunks.append(cur)
                cur = []
            cur.append(r)
        if cur:
            chunks.append(cur)
    random.Random(seed).shuffle(chunks)
    out = [r for c in chunks for r in c]
    report.total = len(out)
    return out, report


def check_split_hygiene(train: Iterable[dict], held_out: Iterable[dict]) -> int:
    """Raise :class:`SplitLeakError` when a held-out pair's question is also a training question.

    Returns the number of distinct held-out questions checked.
    """
    seen = {question_key(r) for r in train}
    held = {question_key(r) for r in held_out}
    leaked = sorted(seen & held)
    if leaked:
        shown = ", ".join(k.replace("\x1f", ":") for k in leaked[:5])
        raise SplitLeakError(f"{len(leaked)} held-out question(s) also appear in training pairs, e.g. {shown}")
    return len(held)
