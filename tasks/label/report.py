"""A batch's submissions -> leaderboards, labeler quality and pairs (what the app's report and the flows show).

Input is :meth:`tasks.label.store.LabelStore.export`'s list (or the same rows
read back from an export file); everything here is computed from it.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence

from .agreement import (
    agreement_over_time,
    gold_agreement,
    pairwise_agreement,
    rankings_alpha,
    submission_agreement,
)
from .rankings import ranking_comparisons, rankings_to_pairs, ranks
from .scores import Comparisons, bootstrap_scores, compare, fit_bradley_terry, leaderboard

__all__ = ["json_safe", "response_scores", "batch_report", "item_rankings", "policy_of", "human_pairs", "policy_leaderboard"]


def json_safe(value):  # noqa: ANN001, ANN201
    """JSON-safe copy: NaN/inf -> None (JSON has no NaN), tuples -> lists, keys -> str."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def item_rankings(rows: Sequence[Mapping], *, gold: bool = False) -> dict:
    """``{item: {labeler: ranks}}`` over regular items (or gold items only)."""
    out: dict = {}
    for r in rows:
        if (r.get("gold") is not None) == gold:
            out.setdefault(r["item_id"], {})[r["labeler"]] = ranks(r["groups"])
    return out


def policy_of(rows: Sequence[Mapping]) -> dict[str, str]:
    """``{item/response: policy}`` over all items of the rows."""
    return {f"{r['item_id']}|{rid}": (p or "unknown") for r in rows for rid, p in (r.get("policies") or {}).items()}


def _regular(rows: Sequence[Mapping]) -> list[Mapping]:
    return [r for r in rows if r.get("gold") is None]


def policy_leaderboard(rows: Sequence[Mapping], *, rounds: int = 1000, seed: int = 0) -> dict:
    """Bradley-Terry leaderboard of the policies that wrote the responses, with bootstrap intervals.

    Each ranking is a group (resampled whole); responses of the same policy
    are not compared with each other. Empty when fewer than two policies met.
    """
    rows = _regular(rows)
    policy = policy_of(rows)
    recs = []
    for r in rows:
        keyed = {**r, "groups": [[f"{r['item_id']}|{x}" for x in g] for g in r["groups"]]}
        recs += ranking_comparisons([keyed], key=policy.__getitem__)
    if not recs:
        return {"rows": [], "pairs": []}
    result = bootstrap_scores(Comparisons.from_records(recs), rounds=rounds, seed=seed)
    board = leaderboard(result)
    names = [b["item"] for b in board]
    pairs = [{"first": a, "second": b, **compare(result, a, b)} for i, a in enumerate(names) for b in names[i + 1:]]
    return {"rows": board, "pairs": pairs, "comparisons": len(recs)}


def response_scores(rows: Sequence[Mapping]) -> list[dict]:
    """Bradley-Terry scores of every response (Elo scale, point estimates), one row per response.

    Responses are only compared within their item, so only differences inside
    one item mean anything; rows are sorted by item, best first.
    """
    rows = _regular(rows)
    policy = policy_of(rows)
    recs = []
    for r in rows:
        keyed = {**r, "groups": [[f"{r['item_id']}|{x}" for x in g] for g in r["groups"]]}
        recs += ranking_comparisons([keyed])
    if not recs:
        return []
    fit = fit_bradley_terry(Comparisons.from_records(recs))
    out = [{"item_id": k.split("|", 1)[0], "response": k.split("|", 1)[1], "policy": policy.get(k, ""),
            "score": v} for k, v in fit.items()]
    return sorted(out, key=lambda r: (r["item_id"], -r["score"]))


def human_pairs(rows: Sequence[Mapping], *, site: str, validation_fraction: float = 0.1, seed: int = 0) -> list[dict]:
    """Rows of the ``pairs`` dataset from the batch's regular items, with each labeler's agreement kept."""
    rows = _regular(rows)
    agree = submission_agreement(item_rankings(rows))
    enriched = [{**r, "agreement": agree.get((r["item_id"], r["labeler"]))} for r in rows]
    return rankings_to_pairs(enriched, site=site, validation_fraction=validation_fraction, seed=seed)


def batch_report(rows: Sequence[Mapping], *, rounds: int = 1000, seed: int = 0, window: int = 10) -> dict:
    """Leaderboard of policies, agreement (pairwise, alpha, per labeler, gold, over time), counts."""
    regular = item_rankings(rows)
    agreement = pairwise_agreement(regular)
    per_sub = submission_agreement(regular)
    history = []
    for r in _regular(rows):
        t = _dt.datetime.fromisoformat(r["submitted_at"]).timestamp()
        history.append((r["labeler"], t, per_sub.get((r["item_id"], r["labeler"]), float("nan"))))
    gold_items = {r["item_id"]: ranks(r["gold"]) for r in rows if r.get("gold") is not None}
    labelers = sorted({r["labeler"] for r in rows})
    gold = gold_agreement(item_rankings(rows, gold=True), gold_items)
    quality = [{"labeler": name, "submissions": sum(1 for r in rows if r["labeler"] == name),
                "agreement_with_others": agreement["per_labeler"].get(name, float("nan")),
                "gold_accuracy": gold.get(name, {}).get("accuracy", float("nan")),
                "gold_items": gold.get(name, {}).get("items", 0)} for name in labelers]
    return {
        "submissions": len(rows),
        "labelers": len(labelers),
        "leaderboard": policy_leaderboard(rows, rounds=rounds, seed=seed),
        "agreement": {"pairwise": agreement["overall"], "judgements": agreement["judgements"],
                      "krippendorff_alpha": rankings_alpha(regular)},
        "labeler_quality": quality,
        "agreement_over_time": agreement_over_time(history, window),
    }
