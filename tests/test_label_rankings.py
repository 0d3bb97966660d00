"""Rankings -> pairs (InstructGPT weighting, ties dropped) and -> comparisons; labeler agreement; alpha."""

from __future__ import annotations

import math
from itertools import combinations

import pandas as pd
import pytest

from alignflow.tasks.label.agreement import (
    agreement_over_time,
    gold_agreement,
    krippendorff_alpha,
    model_agreement,
    pairwise_agreement,
    preference_signs,
    rankings_alpha,
    submission_agreement,
)
from alignflow.tasks.label.rankings import (
    RankingError,
    ab_ranking,
    ranking_comparisons,
    ranking_pairs,
    rankings_to_pairs,
    ranks,
    validate_ranking,
)

IDS = ["r0", "r1", "r2", "r3"]


@pytest.mark.parametrize("groups,reason", [
    ([["r0"], ["r1"], ["r2"], ["rX"]], "'rX' is not one of this item's responses"),
    ([["r0"], ["r1", "r0"], ["r2"], ["r3"]], "'r0' is ranked more than once"),
    ([["r0"], ["r1"], ["r2"]], "'r3' not ranked"),
    ([], "non-empty list"),
    ([["r0"], [], ["r1", "r2", "r3"]], "group 2"),
    ("r0>r1", "non-empty list"),
])
def test_invalid_rankings_say_why(groups, reason):
    with pytest.raises(RankingError, match=reason.replace("(", r"\(")):
        validate_ranking(groups, IDS)


def test_valid_ranking_and_ranks_share_ties():
    g = validate_ranking([["r2"], ["r0", "r3"], "r1"], IDS)
    assert g == [["r2"], ["r0", "r3"], ["r1"]]
    assert ranks(g) == {"r2": 1, "r0": 2, "r3": 2, "r1": 3}


def test_ab_scale():
    assert ab_ranking(-3, "A", "B") == ([["A"], ["B"]], 3)
    assert ab_ranking(1, "A", "B") == ([["B"], ["A"]], 1)
    assert ab_ranking(0, "A", "B") == ([["A", "B"]], 0)
    for bad in (4, -4, 1.5, True, "1"):
        with pytest.raises(RankingError, match="A/B choice"):
            ab_ranking(bad, "A", "B")


def test_k_choose_2_pairs_weighted_so_each_ranking_counts_once():
    for k in (2, 4, 9):
        groups = [[f"r{i}"] for i in range(k)]
        pairs = ranking_pairs(groups)
        assert len(pairs) == math.comb(k, 2)
        assert all(w == pytest.approx(1 / math.comb(k, 2)) for _, _, w, _ in pairs)
        assert {(b, r) for b, r, _, _ in pairs} == {(f"r{i}", f"r{j}") for i, j in combinations(range(k), 2)}


def test_ties_are_dropped_and_the_ranking_still_counts_once():
    pairs = ranking_pairs([["r2"], ["r0", "r3"], ["r1"]])
    assert {(b, r) for b, r, _, _ in pairs} == {("r2", "r0"), ("r2", "r3"), ("r2", "r1"), ("r0", "r1"), ("r3", "r1")}
    assert sum(w for _, _, w, _ in pairs) == pytest.approx(1.0)
    assert ranking_pairs([["r0", "r1"]]) == []


def _ranking(rid, groups, labeler, prompt_id="p1", agreement=None, strength=None):
    return {"ranking_id": rid, "prompt_id": prompt_id, "prompt": f"prompt {prompt_id}", "groups": groups,
            "responses": {r: f"text of {r}" for g in groups for r in g}, "labeler": labeler,
            "policies": {r: "alignflow-policy/2" for g in groups for r in g}, "agreement": agreement,
            "strength": strength}


def test_rankings_to_pairs_rows_pass_the_pairs_contract():
    from alignflow.data_contracts import validate

    rows = rankings_to_pairs([
        _ranking("s1", [["r2"], ["r0", "r3"], ["r1"]], "ann", agreement=0.8),
        _ranking("s2", [["r0"], ["r1"]], "bob", prompt_id="p2", strength=2),
        _ranking("s3", [["r0", "r1"]], "bob", prompt_id="p3", strength=0),
    ], site="human/b1", validation_fraction=0.0)
    df = pd.DataFrame(rows)
    assert len(df) == 6  # 5 from s1, 1 from s2, none from the tie
    assert df.groupby("ranking_id")["weight"].sum().to_dict() == pytest.approx({"s1": 1.0, "s2": 1.0})
    first = df[df.pair_id == "s1:r2>r1"].iloc[0]
    assert (first.chosen, first.rejected, first.chosen_score, first.rejected_score, first.margin) == (
        "text of r2", "text of r1", 3, 1, 2.0)
    assert first.labeler == "ann" and first.agreement == 0.8 and math.isnan(first.strength)
    assert df[df.ranking_id == "s2"].iloc[0].strength == 2.0
    assert set(df.split) == {"train"} and set(df.source) == {"human"}
    res = validate(df, "pairs")
    assert res.passed and len(res.rejected) == 0, res.failure_message()


def test_splits_keep_a_prompt_whole():
    rows = rankings_to_pairs([_ranking(f"s{i}", [["r0"], ["r1"]], "ann", prompt_id=f"p{i % 30}")
                              for i in range(120)], site="h", validation_fraction=0.3)
    by_prompt = pd.DataFrame(rows).groupby("question_id")["split"].nunique()
    assert (by_prompt == 1).all()
    assert {r["split"] for r in rows} == {"train", "validation"}


def test_comparisons_for_policies_skip_same_policy_pairs():
    rk = [{"ranking_id": "s1", "groups": [["a1"], ["b1", "a2"], ["b2"]]}]
    policy = {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}.__getitem__
    recs = ranking_comparisons(rk, key=policy)
    # a1>b1, a1>b2, b1~a2 (tie), a2>b2 ; a1-a2 and b1-b2 skipped
    assert sorted((a, b, y) for a, b, y, _, _ in recs) == [("A", "B", 1.0), ("A", "B", 1.0), ("A", "B", 1.0),
                                                           ("B", "A", 0.5)]
    assert sum(w for *_, w, _ in recs) == pytest.approx(1.0)


def test_pairwise_agreement_and_per_submission_agreement():
    data = {
        "i1": {"ann": ranks([["a"], ["b"], ["c"]]), "bob": ranks([["a"], ["c"], ["b"]]),
               "cy": ranks([["a"], ["b"], ["c"]])},
        "i2": {"ann": ranks([["x"], ["y"]]), "bob": ranks([["y"], ["x"]])},
    }
    out = pairwise_agreement(data)
    # i1: ann-bob 2/3, ann-cy 3/3, bob-cy 2/3 ; i2: ann-bob 0/1 -> 7/10
    assert out["overall"] == pytest.approx(7 / 10) and out["judgements"] == 10
    assert out["per_labeler"]["cy"] == pytest.approx(5 / 6)
    sub = submission_agreement(data)
    assert sub[("i1", "ann")] == pytest.approx(5 / 6) and sub[("i2", "bob")] == 0.0
    assert math.isnan(submission_agreement({"i": {"solo": ranks([["a"], ["b"]])}})[("i", "solo")])
    assert preference_signs({"a": 1, "b": 1, "c": 2}) == {("a", "b"): 0, ("a", "c"): 1, ("b", "c"): 1}


# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4-coder x 12-unit example.
RELIABILITY = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


@pytest.mark.parametrize("metric,expected", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_alpha_matches_the_published_example(metric, expected):
    units = {u: {c: row[u] for c, row in enumerate(RELIABILITY) if row[u] is not None} for u in range(12)}
    assert krippendorff_alpha(units, metric) == pytest.approx(expected, abs=1e-3)


def test_alpha_of_rankings_is_one_for_identical_labelers_and_low_for_random():
    import random

    same = {f"i{k}": {lab: ranks([["a"], ["b"], ["c"]] if k % 2 else [["c"], ["a"], ["b"]]) for lab in "xyz"}
            for k in range(10)}
    assert rankings_alpha(same) == pytest.approx(1.0)
    rnd = random.Random(0)
    noisy = {f"i{k}": {lab: ranks([[r] for r in rnd.sample("abc", 3)]) for lab in "xyz"} for k in range(200)}
    assert abs(rankings_alpha(noisy)) < 0.1


def test_gold_agreement_and_over_time():
    data = {"g1": {"ann": ranks([["a"], ["b"], ["c"]]), "bob": ranks([["c"], ["b"], ["a"]])}}
    gold = {"g1": ranks([["a"], ["b", "c"]])}  # gold orders a>b, a>c; b~c is not scored
    out = gold_agreement(data, gold)
    assert out["ann"]["accuracy"] == 1.0 and out["bob"]["accuracy"] == 0.0 and out["ann"]["pairs"] == 2
    hist = [("ann", t, a) for t, a in enumerate([1.0, 0.0, 1.0, 1.0, float("nan"), 0.5])]
    windows = agreement_over_time(hist, window=2)["ann"]
    assert [w["agreement"] for w in windows] == [0.5, 1.0, 0.5] and windows[-1]["n"] == 1


def test_model_agreement_pairwise_accuracy_and_tau():
    human = [ranks([["a"], ["b"], ["c"]]), ranks([["x"], ["y"]])]
    perfect = model_agreement(human, [{"a": 3.0, "b": 2.0, "c": 1.0}, {"x": 1.0, "y": 0.0}])
    assert perfect["pairwise_accuracy"] == 1.0 and perfect["kendall_tau"] == pytest.approx(1.0)
    reversed_ = model_agreement(human, [{"a": 1.0, "b": 2.0, "c": 3.0}, {"x": 0.0, "y": 1.0}])
    assert reversed_["pairwise_accuracy"] == 0.0 and reversed_["kendall_tau"] == pytest.approx(-1.0)


def test_response_scores_order_responses_within_their_item():
    from alignflow.tasks.label.report import response_scores

    rows = [{"item_id": "i1", "ranking_id": f"i1#{lab}", "labeler": lab, "gold": None, "groups": [["a"], ["b"], ["c"]],
             "policies": {"a": "P", "b": "Q", "c": "Q"}} for lab in ("x", "y")]
    out = response_scores(rows)
    assert [r["response"] for r in out] == ["a", "b", "c"] and out[0]["policy"] == "P"
    assert out[0]["score"] > out[1]["score"] > out[2]["score"]
