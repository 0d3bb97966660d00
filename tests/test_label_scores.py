"""Bradley-Terry / Elo scores: the fit, the bootstrap intervals against a simulated truth, the leaderboard."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignflow.tasks.label.rankings import ranking_comparisons
from alignflow.tasks.label.scores import (
    ELO_SCALE,
    Comparisons,
    bootstrap_scores,
    compare,
    fit_bradley_terry,
    leaderboard,
    online_elo,
    prob_better,
)


def _simulate(strengths_elo: dict[str, float], n: int, rng: np.random.Generator) -> list[tuple]:
    names = list(strengths_elo)
    recs = []
    for g in range(n):
        a, b = rng.choice(len(names), size=2, replace=False)
        p = float(prob_better(strengths_elo[names[a]] - strengths_elo[names[b]]))
        recs.append((names[a], names[b], 1.0 if rng.random() < p else 0.0, 1.0, g))
    return recs


def test_prob_better_on_the_elo_scale():
    assert prob_better(0.0) == pytest.approx(0.5)
    assert prob_better(400.0) == pytest.approx(10 / 11)
    assert prob_better(-400.0) == pytest.approx(1 / 11)
    assert ELO_SCALE == pytest.approx(400 / math.log(10))


def test_fit_recovers_a_known_win_rate_exactly():
    # a beats b 3 times out of 4: the MLE difference is 400·log10(3).
    c = Comparisons.from_records([("a", "b", 1), ("a", "b", 1), ("b", "a", 0), ("b", "a", 1)])
    s = fit_bradley_terry(c, prior=0.0)
    assert s["a"] - s["b"] == pytest.approx(400 * math.log10(3), abs=1e-3)
    assert (s["a"] + s["b"]) / 2 == pytest.approx(1000.0)
    anchored = fit_bradley_terry(c, prior=0.0, anchor="b", base=1500)
    assert anchored["b"] == pytest.approx(1500) and anchored["a"] - anchored["b"] == pytest.approx(s["a"] - s["b"])


def test_ties_count_half_and_weights_scale_counts():
    tie = Comparisons.from_records([("a", "b", 0.5)] * 4)
    s = fit_bradley_terry(tie, prior=0.0)
    assert s["a"] == pytest.approx(s["b"], abs=1e-6)
    heavy = Comparisons.from_records([("a", "b", 1, 3.0), ("b", "a", 1, 1.0)])
    assert fit_bradley_terry(heavy, prior=0.0)["a"] - fit_bradley_terry(heavy, prior=0.0)["b"] == pytest.approx(
        400 * math.log10(3), abs=1e-3)


def test_a_clean_sweep_stays_finite_thanks_to_the_prior():
    c = Comparisons.from_records([("a", "b", 1)] * 20)
    s = fit_bradley_terry(c)
    assert math.isfinite(s["a"]) and s["a"] > s["b"] + 400


def test_bad_records_say_which_and_why():
    with pytest.raises(ValueError, match="comparison 1: outcome"):
        Comparisons.from_records([("a", "b", 1), ("a", "b", 2)])
    with pytest.raises(ValueError, match="compared with itself"):
        Comparisons.from_records([("a", "a", 1)])
    with pytest.raises(ValueError, match="no comparisons"):
        fit_bradley_terry(Comparisons.from_records([]))


def test_fit_recovers_simulated_strengths():
    truth = {"a": 200.0, "b": 100.0, "c": 0.0, "d": -300.0}
    rng = np.random.default_rng(1)
    s = fit_bradley_terry(Comparisons.from_records(_simulate(truth, 8000, rng)), anchor="c", base=0.0)
    for k, v in truth.items():
        assert s[k] == pytest.approx(v, abs=30)


def test_bootstrap_intervals_cover_the_true_differences_near_95_percent():
    """Over repeated draws from a known truth, the 95% difference intervals hold the true difference ~95% of the
    time. 60 draws x 3 differences (correlated within a draw) with 200 rounds: the binomial noise alone is a few
    points, so the band is [0.85, 0.995]; a biased fit or a per-comparison (not per-group) bootstrap of grouped
    data falls outside it."""
    truth = {"a": 120.0, "b": 60.0, "c": 0.0, "d": -80.0}
    rng = np.random.default_rng(7)
    hits = total = 0
    for draw in range(60):
        c = Comparisons.from_records(_simulate(truth, 300, rng))
        res = bootstrap_scores(c, rounds=200, seed=draw)
        for other in ("b", "c", "d"):
            lo, hi = res.diff_interval("a", other)
            hits += lo <= truth["a"] - truth[other] <= hi
            total += 1
    coverage = hits / total
    assert 0.85 <= coverage <= 0.995, coverage


def test_bootstrap_resamples_whole_rankings():
    """Two labelers' rankings of 4 responses: the bootstrap resamples rankings, so with only 2 groups the
    interval is wide; the same comparisons each in their own group give a much narrower interval."""
    rk = [{"ranking_id": g, "groups": [["a"], ["b"], ["c"], ["d"]]} for g in range(2)]
    grouped = Comparisons.from_records(ranking_comparisons(rk))
    assert grouped.n_groups == 2
    loose = Comparisons.from_records([(a, b, y, w, i) for i, (a, b, y, w, _) in enumerate(ranking_comparisons(rk))])
    wide = bootstrap_scores(grouped, rounds=200, seed=0)
    narrow = bootstrap_scores(loose, rounds=200, seed=0)
    w_g = np.subtract(*reversed(wide.diff_interval("a", "b")))
    w_l = np.subtract(*reversed(narrow.diff_interval("a", "b")))
    assert w_g == pytest.approx(0.0, abs=1e-6)  # both rankings agree: every resample gives the same fit
    assert w_l > 10


def test_compare_and_leaderboard_order_policies_10_points_apart():
    """Policies whose true win rate against the middle one differs by >= 10 points come out in the right order,
    distinguishable, in 20 of 20 draws."""
    # Win rates vs the middle policy: 0.60 and 0.40 -> Elo ±70.4.
    d = 400 * math.log10(0.6 / 0.4)
    truth = {"ppo": d, "sft": 0.0, "base": -d}
    for draw in range(20):
        rng = np.random.default_rng(100 + draw)
        res = bootstrap_scores(Comparisons.from_records(_simulate(truth, 1500, rng)), rounds=100, seed=draw)
        board = leaderboard(res)
        assert [r["item"] for r in board] == ["ppo", "sft", "base"], board
        assert board[0]["low"] <= board[0]["score"] <= board[0]["high"]
        cmp = compare(res, "ppo", "base")
        assert cmp["distinguishable"] and cmp["p_first_better"] > 0.6


def test_indistinguishable_when_truth_is_equal():
    rng = np.random.default_rng(3)
    res = bootstrap_scores(Comparisons.from_records(_simulate({"x": 0.0, "y": 0.0}, 200, rng)), rounds=200)
    cmp = compare(res, "x", "y")
    assert cmp["diff_low"] < 0 < cmp["diff_high"] and not cmp["distinguishable"]


def test_online_elo_moves_toward_the_winner_and_depends_on_order():
    recs = [("a", "b", 1), ("a", "b", 1), ("b", "a", 1)]
    s = online_elo(Comparisons.from_records(recs), k_factor=32)
    assert s["a"] > 1000 > s["b"] and s["a"] + s["b"] == pytest.approx(2000)
    # One win then one loss: +16, then -32·P(a beats b at +32 Elo) -> below 1000.
    first = online_elo(Comparisons.from_records([("a", "b", 1), ("a", "b", 0)]))
    assert first["a"] == pytest.approx(1016 - 32 * float(prob_better(32.0)))
    swapped = online_elo(Comparisons.from_records([("a", "b", 0), ("a", "b", 1)]))
    assert first["a"] != pytest.approx(swapped["a"])
