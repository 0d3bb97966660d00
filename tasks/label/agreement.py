"""Labeler quality: agreement between labelers, Krippendorff's alpha, gold items, a model against humans.

Rankings are ``{response: rank}`` maps (1 = best, ties share a rank, see
:func:`tasks.label.rankings.ranks`). Two rankings of the same item agree on a
pair of responses when they order it the same way (a tie is its own answer).

* :func:`preference_signs`: +1 / 0 / -1 per pair of responses of one ranking.
* :func:`pairwise_agreement`: the share of pair judgements two labelers of the
  same item agree on, overall and per labeler (with all others).
* :func:`submission_agreement`: per (item, labeler), the agreement with the
  other labelers of that item (the ``agreement`` column of human pairs).
* :func:`krippendorff_alpha`: alpha for nominal, ordinal or interval data from
  a ``{unit: {coder: value}}`` table; :func:`rankings_alpha` applies it to the
  preference signs of every (item, pair of responses).
* :func:`gold_agreement`: each labeler's accuracy on gold items' ordered pairs.
* :func:`agreement_over_time`: a labeler's agreement in consecutive windows.
* :func:`model_agreement`: a model's scores against human rankings (pairwise
  accuracy and Kendall tau), the way the reward model is judged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations

import numpy as np

__all__ = [
    "agreement_over_time",
    "gold_agreement",
    "krippendorff_alpha",
    "model_agreement",
    "pairwise_agreement",
    "preference_signs",
    "rankings_alpha",
    "submission_agreement",
]

Ranks = Mapping[str, int]
ItemRankings = Mapping[Hashable, Mapping[Hashable, Ranks]]  # item -> labeler -> ranks


def preference_signs(rank_of: Ranks) -> dict[tuple[str, str], int]:
    """For each pair ``(x, y)`` with ``x < y``: +1 when x ranks better, -1 when y does, 0 for a tie."""
    ids = sorted(rank_of)
    return {(x, y): int(np.sign(rank_of[y] - rank_of[x])) for x, y in combinations(ids, 2)}


def _agree_counts(a: Ranks, b: Ranks) -> tuple[int, int]:
    sa, sb = preference_signs(a), preference_signs(b)
    shared = sa.keys() & sb.keys()
    return sum(sa[p] == sb[p] for p in shared), len(shared)


def pairwise_agreement(data: ItemRankings) -> dict:
    """``{"overall", "per_labeler": {labeler: share}, "judgements"}`` over all pairs of labelers of an item."""
    agree = total = 0
    per: dict[Hashable, list[int]] = defaultdict(lambda: [0, 0])
    for by_labeler in data.values():
        for la, lb in combinations(sorted(by_labeler, key=str), 2):
            ag, n = _agree_counts(by_labeler[la], by_labeler[lb])
            agree += ag
            total += n
            for who in (la, lb):
                per[who][0] += ag
                per[who][1] += n
    return {"overall": agree / total if total else float("nan"),
            "per_labeler": {k: (v[0] / v[1] if v[1] else float("nan")) for k, v in per.items()},
            "judgements": total}


def submission_agreement(data: ItemRankings) -> dict[tuple[Hashable, Hashable], float]:
    """``{(item, labeler): share of pair judgements agreeing with the item's other labelers}`` (NaN if alone)."""
    out: dict[tuple[Hashable, Hashable], float] = {}
    for item, by_labeler in data.items():
        for la in by_labeler:
            agree = total = 0
            for lb in by_labeler:
                if lb != la:
                    ag, n = _agree_counts(by_labeler[la], by_labeler[lb])
                    agree, total = agree + ag, total + n
            out[(item, la)] = agree / total if total else float("nan")
    return out


def krippendorff_alpha(units: Mapping[Hashable, Mapping[Hashable, float]], metric: str = "nominal") -> float:
    """Krippendorff's alpha of ``{unit: {coder: value}}`` (missing values simply absent).

    ``metric``: ``nominal``, ``ordinal`` or ``interval``. Units with fewer than
    two values are not pairable and are ignored. NaN when there is no
    disagreement to expect (a single value overall) or nothing pairable.
    """
    if metric not in ("nominal", "ordinal", "interval"):
        raise ValueError(f"metric must be nominal, ordinal or interval, not {metric!r}")
    values = sorted({v for u in units.values() for v in u.values()})
    index = {v: i for i, v in enumerate(values)}
    n_v = len(values)
    o = np.zeros((n_v, n_v))  # coincidence matrix
    for u in units.values():
        vals = [index[v] for v in u.values()]
        m_u = len(vals)
        if m_u < 2:
            continue
        counts = np.bincount(vals, minlength=n_v).astype(float)
        o += (np.outer(counts, counts) - np.diag(counts)) / (m_u - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if n <= 1 or n_v < 2:
        return float("nan")
    if metric == "nominal":
        delta = 1.0 - np.eye(n_v)
    elif metric == "interval":
        v = np.asarray(values, dtype=float)
        delta = (v[:, None] - v[None, :]) ** 2
    else:  # ordinal: squared sum of the marginals between c and k, minus half of the two ends
        cum = np.concatenate([[0.0], np.cumsum(n_c)])
        delta = np.zeros((n_v, n_v))
        for c in range(n_v):
            for k in range(n_v):
                lo, hi = min(c, k), max(c, k)
                delta[c, k] = (cum[hi + 1] - cum[lo] - (n_c[c] + n_c[k]) / 2.0) ** 2
    observed = float((o * delta).sum())
    expected = float((np.outer(n_c, n_c) * delta).sum()) / (n - 1)
    return 1.0 - observed / expected if expected > 0 else float("nan")


def rankings_alpha(data: ItemRankings, metric: str = "ordinal") -> float:
    """Krippendorff's alpha over units (item, pair of responses), values the preference sign (-1, 0, +1)."""
    units: dict[Hashable, dict[Hashable, float]] = defaultdict(dict)
    for item, by_labeler in data.items():
        for labeler, rank_of in by_labeler.items():
            for pair, sign in preference_signs(rank_of).items():
                units[(item, pair)][labeler] = sign
    return krippendorff_alpha(units, metric)


def gold_agreement(data: ItemRankings, gold: Mapping[Hashable, Ranks]) -> dict[Hashable, dict[str, float]]:
    """Per labeler, on gold items: ``{"accuracy", "pairs", "items"}`` over the gold order's untied pairs."""
    per: dict[Hashable, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for item, truth in gold.items():
        truth_signs = {p: s for p, s in preference_signs(truth).items() if s}
        for labeler, rank_of in data.get(item, {}).items():
            signs = preference_signs(rank_of)
            acc = per[labeler]
            acc[0] += sum(signs.get(p) == s for p, s in truth_signs.items())
            acc[1] += len(truth_signs)
            acc[2] += 1
    return {k: {"accuracy": v[0] / v[1] if v[1] else float("nan"), "pairs": v[1], "items": v[2]}
            for k, v in per.items()}


def agreement_over_time(history: Sequence[tuple[Hashable, float, float]], window: int) -> dict[Hashable, list[dict]]:
    """Per labeler, the mean agreement of consecutive windows of ``window`` submissions.

    ``history``: ``(labeler, time, agreement)`` per submission (NaN agreements
    are skipped). Returns ``{labeler: [{"until": time, "agreement": mean, "n": count}, ...]}``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, not {window}")
    by: dict[Hashable, list[tuple[float, float]]] = defaultdict(list)
    for labeler, t, a in history:
        if a is not None and not math.isnan(a):
            by[labeler].append((t, a))
    out: dict[Hashable, list[dict]] = {}
    for labeler, seq in by.items():
        seq.sort()
        out[labeler] = [{"until": chunk[-1][0], "agreement": sum(a for _, a in chunk) / len(chunk), "n": len(chunk)}
                        for chunk in (seq[i : i + window] for i in range(0, len(seq), window))]
    return out


def model_agreement(rankings: Sequence[Ranks], scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """A model's scores of the same responses against human rankings.

    ``pairwise_accuracy``: over the humans' untied pairs, the share the model
    orders the same way (equal scores count 1/2). ``kendall_tau``: the mean
    per-ranking Kendall tau-b between ``-rank`` and the model's scores.
    """
    from .rankings import kendall_tau_b

    hits = total = 0.0
    taus = []
    for rank_of, score in zip(rankings, scores):
        for (x, y), s in preference_signs(rank_of).items():
            if s == 0:
                continue
            d = np.sign(score[x] - score[y])
            hits += 0.5 if d == 0 else float(d == s)
            total += 1
        ids = sorted(rank_of)
        tau = kendall_tau_b([-rank_of[i] for i in ids], [score[i] for i in ids])
        if not math.isnan(tau):
            taus.append(tau)
    return {"pairwise_accuracy": hits / total if total else float("nan"), "pairs": total,
            "kendall_tau": float(np.mean(taus)) if taus else float("nan"), "rankings": float(len(taus))}
