"""Rankings as labelers give them, and the pairs and comparisons they turn into.

A ranking of the K responses of an item is a list of tie groups, best first:
``[["r2"], ["r0", "r3"], ["r1"]]`` says r2 is best, r0 and r3 tie, r1 is worst.
For K = 2 the labeler may instead pick on a strength scale from -3 (A much
better) through 0 (about the same) to +3 (B much better); :func:`ab_ranking`
turns that into the same form, keeping the strength.

* :func:`validate_ranking`: every response exactly once; the reason otherwise.
* :func:`ranks`: ``{response: rank}`` (1 = best, tied responses share a rank).
* :func:`ranking_pairs`: the ordered (better, worse) pairs of one ranking,
  ties dropped, each weighted so the ranking counts once (InstructGPT).
* :func:`rankings_to_pairs`: rows of the ``pairs`` dataset (contract columns
  plus ``weight``, ``labeler``, ``agreement``, ``strength``, ``ranking_id``).
* :func:`ranking_comparisons`: ``(a, b, outcome, weight, group)`` records for
  :mod:`tasks.label.scores` (ties kept as 1/2), for responses or for the
  policies that wrote them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence

__all__ = [
    "HUMAN_SOURCE",
    "RankingError",
    "ab_ranking",
    "ranking_comparisons",
    "ranking_pairs",
    "rankings_to_pairs",
    "ranks",
    "split_of",
    "validate_ranking",
]

#: ``source`` of the pairs made from human rankings (the pairs contract accepts it).
HUMAN_SOURCE = "human"
MAX_STRENGTH = 3


class RankingError(ValueError):
    """A submitted ranking does not rank the item's responses exactly once each."""


def validate_ranking(groups: object, response_ids: Sequence[str]) -> list[list[str]]:
    """The ranking as a list of non-empty tie groups of ids, or :class:`RankingError` with the reason."""
    if not isinstance(groups, list) or not groups:
        raise RankingError("ranking must be a non-empty list of groups of response ids, best first")
    expected = set(response_ids)
    seen: set[str] = set()
    out: list[list[str]] = []
    for pos, group in enumerate(groups):
        if isinstance(group, str):
            group = [group]
        if not isinstance(group, list) or not group:
            raise RankingError(f"ranking group {pos + 1} must be a non-empty list of response ids")
        for rid in group:
            if not isinstance(rid, str):
                raise RankingError(f"ranking group {pos + 1}: response ids are strings, not {type(rid).__name__}")
            if rid not in expected:
                raise RankingError(f"response {rid!r} is not one of this item's responses")
            if rid in seen:
                raise RankingError(f"response {rid!r} is ranked more than once")
            seen.add(rid)
        out.append(list(group))
    missing = [r for r in response_ids if r not in seen]
    if missing:
        raise RankingError(f"response(s) {', '.join(map(repr, missing))} not ranked: rank every response")
    return out  # one group holding everything (all tied) is valid: "about the same", it gives no pairs


def ab_ranking(value: int, first: str, second: str) -> tuple[list[list[str]], int]:
    """``(ranking, strength)`` of an A/B choice on the scale -3 (A much better) .. 0 (same) .. +3 (B much better)."""
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_STRENGTH:
        raise RankingError(f"A/B choice must be an integer from -{MAX_STRENGTH} to {MAX_STRENGTH}, not {value!r}")
    if value == 0:
        return [[first, second]], 0
    return ([[first], [second]] if value < 0 else [[second], [first]]), abs(value)


def ranks(groups: Sequence[Sequence[str]]) -> dict[str, int]:
    """``{response: rank}``, 1 = best; tied responses share their group's rank."""
    return {rid: pos + 1 for pos, group in enumerate(groups) for rid in group}


def ranking_pairs(groups: Sequence[Sequence[str]]) -> list[tuple[str, str, float, int]]:
    """``(better, worse, weight, rank_gap)`` for every untied pair; the weights of one ranking sum to 1.

    With no ties there are C(K, 2) pairs of weight 1/C(K, 2). Tied pairs are
    dropped and the rest share the ranking's unit weight, so every ranking that
    orders anything counts once; an all-tied ranking gives no pairs.
    """
    out = []
    for hi, better_group in enumerate(groups):
        for lo in range(hi + 1, len(groups)):
            for better in better_group:
                for worse in groups[lo]:
                    out.append((better, worse, lo - hi))
    if not out:
        return []
    w = 1.0 / len(out)
    return [(b, r, w, gap) for b, r, gap in out]


def split_of(key: str, validation_fraction: float, seed: int = 0) -> str:
    """``train`` or ``validation`` for a prompt, by a stable hash (all pairs of a prompt in one split)."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), not {validation_fraction}")
    h = int.from_bytes(hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()[:8], "big") / 2**64
    return "validation" if h < validation_fraction else "train"


def rankings_to_pairs(rankings: Iterable[Mapping], *, site: str, validation_fraction: float = 0.1,
                      seed: int = 0, license: str = "") -> list[dict]:
    """Rows of a ``pairs`` dataset from submitted rankings.

    Each ranking is a mapping with ``ranking_id``, ``prompt_id``, ``prompt``,
    ``groups`` (validated tie groups), ``responses`` (``{id: text}``),
    ``labeler``, and optionally ``policies`` (``{id: "model/version"}``),
    ``strength`` (A/B scale, else absent) and ``agreement`` (the labeler's
    agreement with the others on this item, else NaN). Scores are
    ``K - rank`` (higher is better), ``margin`` the rank gap.
    """
    rows: list[dict] = []
    for rk in rankings:
        groups = rk["groups"]
        k = sum(len(g) for g in groups)
        rank_of = ranks(groups)
        policies = rk.get("policies") or {}
        split = split_of(str(rk["prompt_id"]), validation_fraction, seed)
        strength = rk.get("strength")
        agreement = rk.get("agreement")
        for better, worse, weight, gap in ranking_pairs(groups):
            rows.append({
                "pair_id": f"{rk['ranking_id']}:{better}>{worse}",
                "prompt": rk["prompt"],
                "chosen": rk["responses"][better],
                "rejected": rk["responses"][worse],
                "chosen_score": k - rank_of[better],
                "rejected_score": k - rank_of[worse],
                "margin": float(gap),
                "question_id": str(rk["prompt_id"]),
                "site": site,
                "source": HUMAN_SOURCE,
                "split": split,
                "chosen_id": better,
                "rejected_id": worse,
                "chosen_author": policies.get(better, ""),
                "rejected_author": policies.get(worse, ""),
                "license": license,
                "weight": weight,
                "labeler": rk["labeler"],
                "agreement": float("nan") if agreement is None else float(agreement),
                "strength": float("nan") if strength is None else float(strength),
                "ranking_id": str(rk["ranking_id"]),
            })
    return rows


def ranking_comparisons(rankings: Iterable[Mapping], *, key: Callable[[str], Hashable] | None = None,
                        group_key: str = "ranking_id") -> list[tuple]:
    """``(a, b, outcome, weight, group)`` records of every pair of alternatives in each ranking.

    ``key`` maps a response id to what is scored (default the response itself;
    e.g. its policy for a policy leaderboard); pairs whose two responses map
    to the same key are skipped. Ties are kept (outcome 1/2). The weights of a
    ranking sum to 1 over the pairs kept, so each ranking counts once.
    """
    out: list[tuple] = []
    for rk in rankings:
        groups = rk["groups"]
        flat = [(pos, rid) for pos, g in enumerate(groups) for rid in g]
        recs = []
        for x in range(len(flat)):
            for y in range(x + 1, len(flat)):
                (pa, ra), (pb, rb) = flat[x], flat[y]
                ka, kb = (ra, rb) if key is None else (key(ra), key(rb))
                if ka == kb:
                    continue
                recs.append((ka, kb, 0.5 if pa == pb else (1.0 if pa < pb else 0.0)))
        if recs:
            w = 1.0 / len(recs)
            out += [(a, b, y, w, rk[group_key]) for a, b, y in recs]
    return out


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two score lists (NaN when either is constant)."""
    from scipy.stats import kendalltau

    if len(x) < 2:
        return float("nan")
    tau = kendalltau(x, y).statistic
    return float(tau) if tau is not None and not math.isnan(tau) else float("nan")
