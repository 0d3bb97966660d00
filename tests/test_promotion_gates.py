"""Promotion gates as pure logic: figures in, decisions out."""

from __future__ import annotations

import math

import pytest

from alignflow.config import AlignflowConfig
from alignflow.tasks.promotion import (
    RollbackError,
    Thresholds,
    decide,
    dump_history,
    gate_kind,
    parse_history,
    push_champion,
    rollback_target,
)

T = Thresholds.from_config(AlignflowConfig().promote)


def test_thresholds_come_from_the_config_section():
    cfg = AlignflowConfig.model_validate({"promote": {"min_win_rate": 0.6, "max_kl": 3}})
    t = Thresholds.from_config(cfg.promote)
    assert t.min_win_rate == 0.6 and t.max_kl == 3.0 and t.min_pairwise_accuracy == 0.5


def test_gate_kinds_cover_the_five_registered_models():
    assert gate_kind("alignflow-reward") == gate_kind("alignflow-pmp") == "preference"
    assert gate_kind("alignflow-policy") == "policy"
    assert gate_kind("alignflow-base") == gate_kind("alignflow-policy-sft") == "lm"
    with pytest.raises(ValueError, match="no promotion gate"):
        gate_kind("something-else")


def test_preference_gate_pass_and_fail():
    ok = decide("preference", {"pairwise_accuracy": 0.71}, {"pairwise_accuracy": 0.70}, T)
    assert ok.action == "promoted" and ok.passed and ok.move_champion
    worse = decide("preference", {"pairwise_accuracy": 0.69}, {"pairwise_accuracy": 0.70}, T)
    assert worse.action == "rejected" and not worse.passed and not worse.move_champion
    assert "pairwise_accuracy vs champion" in worse.reason
    strict = Thresholds(min_accuracy_gain=0.02)
    assert decide("preference", {"pairwise_accuracy": 0.71}, {"pairwise_accuracy": 0.70}, strict).action == "rejected"


def test_first_champion_needs_only_the_absolute_bounds():
    first = decide("preference", {"pairwise_accuracy": 0.6}, None, T)
    assert first.action == "first_champion" and first.move_champion
    below = decide("preference", {"pairwise_accuracy": 0.4}, None, T)
    assert below.action == "rejected" and not below.move_champion
    assert decide("policy", {"kl_to_reference": 50.0, "reward_mean": 9.0}, None, T).action == "rejected"
    assert decide("policy", {"kl_to_reference": 2.0, "reward_mean": -1.0}, None, T).action == "first_champion"
    assert decide("lm", {"loss": 4.0}, None, T).action == "first_champion"
    assert decide("lm", {"loss": math.nan}, None, T).action == "rejected"


def test_policy_gate_checks_reward_kl_and_win_rate():
    champ = {"reward_mean": 0.2, "kl_to_reference": 1.0}
    good = {"reward_mean": 0.5, "kl_to_reference": 2.0, "win_rate": 0.7}
    assert decide("policy", good, champ, T).action == "promoted"
    for bad, name in (({**good, "kl_to_reference": 12.0}, "kl_to_reference"),
                      ({**good, "reward_mean": 0.1}, "reward_mean vs champion"),
                      ({**good, "win_rate": 0.4}, "win_rate vs champion")):
        d = decide("policy", bad, champ, T)
        assert d.action == "rejected" and name in d.reason, (bad, d.reason)
        assert [c.name for c in d.checks if not c.passed] == [name]


def test_policy_gate_checks_the_judge_against_the_reference_where_the_data_has_one():
    figs = {"reward_mean": 0.5, "kl_to_reference": 2.0}
    assert [c.name for c in decide("policy", figs, None, T).checks] == ["kl_to_reference"]  # no judge, no check
    kept = {**figs, "judged_rate": 0.95, "judged_rate_reference": 1.0}
    d = decide("policy", kept, None, T)
    assert d.action == "first_champion" and "judged_rate vs reference" in [c.name for c in d.checks]
    # a policy the reward model likes that lost what the judge checks (reward hacking inside the KL limit)
    hacked = {**figs, "judged_rate": 0.34, "judged_rate_reference": 1.0}
    d = decide("policy", hacked, None, T)
    assert d.action == "rejected" and [c.name for c in d.checks if not c.passed] == ["judged_rate vs reference"]
    assert "judged_rate vs reference = 0.34 FAILS (>= 0.9)" in d.reason
    assert decide("policy", hacked, None, Thresholds(max_judged_drop=0.7)).passed  # the tolerance is config


def test_missing_figure_fails_the_gate():
    d = decide("policy", {"reward_mean": 0.5, "kl_to_reference": 1.0}, {"reward_mean": 0.1}, T)
    assert d.action == "rejected" and "win_rate vs champion = missing" in d.reason


def test_lm_gate_compares_held_out_loss():
    assert decide("lm", {"loss": 3.0}, {"loss": 3.1}, T).action == "promoted"
    assert decide("lm", {"loss": 3.2}, {"loss": 3.1}, T).action == "rejected"
    assert decide("lm", {"loss": 3.2}, {"loss": 3.1}, Thresholds(max_loss_increase=0.2)).action == "promoted"


def test_override_moves_champion_but_is_recorded_as_a_failed_gate():
    d = decide("preference", {"pairwise_accuracy": 0.3}, {"pairwise_accuracy": 0.7}, T, override=True)
    assert d.action == "overridden" and d.move_champion and not d.passed and "overridden" in d.reason
    # override of a passing gate is just a promotion
    assert decide("preference", {"pairwise_accuracy": 0.8}, {"pairwise_accuracy": 0.7}, T,
                  override=True).action == "promoted"


def test_same_version_is_a_no_op():
    d = decide("lm", {"loss": 9.0}, {"loss": 1.0}, T, same_version=True)
    assert d.action == "already_champion" and not d.move_champion


def test_decision_serialises():
    d = decide("preference", {"pairwise_accuracy": 0.8}, {"pairwise_accuracy": 0.7}, T).as_dict()
    assert d["action"] == "promoted" and d["checks"][0]["name"] == "pairwise_accuracy"


def test_champion_stack_and_rollback_target():
    h: list = []
    for v in ("1", "2", "2", "4"):
        h = push_champion(h, v, action="promoted")
    assert [e["version"] for e in h] == ["1", "2", "4"]
    target, after = rollback_target(h, "4")
    assert target == "2" and [e["version"] for e in after] == ["1", "2"]
    target, after = rollback_target(after, "2")
    assert target == "1" and [e["version"] for e in after] == ["1"]
    with pytest.raises(RollbackError):
        rollback_target(after, "1")
    # champion moved by hand to a version not on the stack: back to the stack's top
    assert rollback_target(h, "9")[0] == "4"
    with pytest.raises(RollbackError):
        rollback_target([], None)


def test_history_round_trips_through_a_tag_value_and_is_bounded():
    h: list = []
    for v in range(100):
        h = push_champion(h, str(v), at="2026-01-01T00:00:00Z", run_id="x" * 32)
    text = dump_history(h)
    assert len(text) < 5000
    assert parse_history(text)[-1]["version"] == "99"
    assert parse_history("not json") == [] and parse_history(None) == []
