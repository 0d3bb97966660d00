"""The pipeline report's pieces: alignment figures on the same prompts, figures, and the self-contained page."""

from __future__ import annotations

import copy

import pytest
import torch

import _ppo_models as M
from alignflow.tasks import report as rep


def test_alignment_figures_measure_every_policy_on_the_same_prompts():
    tok = M.tokenizer()
    sft = M.policy(seed=0)
    base = M.policy(seed=1)
    ppo = copy.deepcopy(sft)
    questions = [{"prompt": p} for p in M.prompts(6)]
    seen = []

    def score(prompts, answers):
        seen.append(list(prompts))
        return [float(len(a)) for a in answers]

    figures, answers = rep.alignment_figures({"base": (base, tok), "sft": (sft, tok), "ppo": (ppo, tok)}, (sft, tok),
                                             score, questions, lambda q, a: "a" in a, max_new_tokens=6,
                                             max_length=64)
    assert seen[0] == seen[1] == seen[2] == [q["prompt"] for q in questions]  # the same prompts for every policy
    assert answers["ppo"] == answers["sft"]  # same weights, greedy: same answers
    assert figures["sft"]["kl_to_sft"] == 0.0 and figures["ppo"]["kl_to_sft"] < 1e-6
    assert figures["base"]["kl_to_sft"] > 0.0
    for label in ("base", "sft", "ppo"):
        expected = sum("a" in a for a in answers[label]) / len(questions)
        assert figures[label]["planted_rate"] == expected and figures[label]["prompts"] == 6.0
        assert figures[label]["reward_mean"] == sum(len(a) for a in answers[label]) / 6


def test_sampled_planted_rate_is_seeded_counts_every_sample_and_leaves_the_generators_alone():
    tok = M.tokenizer()
    sft, base = M.policy(seed=0), M.policy(seed=1)
    questions = [{"prompt": p} for p in M.prompts(5)]
    drawn = []

    def judge(q, a):
        drawn.append(a)
        return len(a) % 2 == 0

    def measure(seed):
        drawn.clear()
        torch.manual_seed(123)
        figures, _ = rep.alignment_figures({"base": (base, tok), "sft": (sft, tok)}, (sft, tok), None, questions,
                                           judge, max_new_tokens=6, max_length=64, samples_per_prompt=3, seed=seed)
        return figures, list(drawn), torch.rand(1).item()

    first, answers, after = measure(0)
    torch.manual_seed(123)
    assert after == torch.rand(1).item()  # the caller's generator is where it was
    again, answers_again, _ = measure(0)
    assert again == first and answers_again == answers  # same seed: same samples, same figures
    for label in ("base", "sft"):
        f = first[label]
        assert f["samples"] == 15.0 and f["prompts"] == 5.0
        assert f["sampled_ci_low"] <= f["sampled_planted_rate"] <= f["sampled_ci_high"]
    # per policy: 5 greedy answers, then 3 x 5 samples; the rate is the share of the 15 samples the judge passed
    sft_samples = answers[20 + 5:20 + 20]
    assert first["sft"]["sampled_planted_rate"] == sum(len(a) % 2 == 0 for a in sft_samples) / 15
    assert len(set(sft_samples)) > 1  # sampled, not greedy
    other, _, _ = measure(1)
    assert other != first  # another seed draws other samples


def test_report_page_inlines_its_figures_and_shows_answers_side_by_side(tmp_path):
    curves = {("base", "train/loss"): [(1, 3.0), (2, 2.5)], ("ppo", "ppo/reward_mean"): [(1, 0.1), (2, 0.3)],
              ("ppo", "ppo/kl"): [(1, 0.5), (2, 1.5)]}
    figures = {"base": {"planted_rate": 0.1, "reward_mean": -1.0, "kl_to_sft": 9.0, "prompts": 3.0},
               "sft": {"planted_rate": 0.6, "reward_mean": 0.0, "kl_to_sft": 0.0, "prompts": 3.0},
               "ppo": {"planted_rate": 0.8, "reward_mean": 1.0, "kl_to_sft": 2.0, "prompts": 3.0}}
    for label, rate in (("base", 0.05), ("sft", 0.5), ("ppo", 0.75)):
        figures[label].update(sampled_planted_rate=rate, sampled_ci_low=rate - 0.05, sampled_ci_high=rate + 0.05,
                              samples=12.0)
    from alignflow.tasks.train.reward import wilson_interval

    for hits in (0, 12):  # the interval's ends at 0 and 1 are the rate itself, not a float rounding away from it
        low, high = wilson_interval(hits, 12)
        assert low <= hits / 12 <= high
    low, high = wilson_interval(0, 256)
    zero = {"sampled_planted_rate": 0.0, "sampled_ci_low": low, "sampled_ci_high": high}
    assert rep.plot_planted_rates({"base": {**figures["base"], **zero}}, tmp_path / "p0.png").stat().st_size > 1000
    images = {"curves": rep.plot_learning_curves(curves, tmp_path / "c.png"),
              "reward_kl": rep.plot_reward_vs_kl(curves[("ppo", "ppo/reward_mean")], curves[("ppo", "ppo/kl")],
                                                 tmp_path / "rk.png"),
              "planted": rep.plot_planted_rates(figures, tmp_path / "p.png"), "calibration": None}
    assert all(images[k].stat().st_size > 1000 for k in ("curves", "reward_kl", "planted"))
    questions = [{"prompt": f"question {i}"} for i in range(4)]
    answers = {p: [f"{p} answer {i}" for i in range(4)] for p in ("base", "sft", "ppo")}
    samples = rep.samples_table(questions, answers)
    assert [list(r) for r in samples] == [["prompt", "base LM", "SFT", "PPO"]] * 3  # three prompts
    page = rep.render_html(title="t", summary_rows=[{"stage": "ppo", "status": "ran"}], figures=figures,
                           images=images, samples=samples)
    assert page.count("data:image/png;base64,") == 3 and "not available in this run" in page  # calibration
    assert "ppo answer 2" in page and "sft answer 2" in page and "base answer 2" in page
    assert rep.alignment_rows(figures)[2] == {"policy": "PPO", "planted_rate": "0.800",
                                              "sampled_planted_rate": "0.750 (0.700-0.800)", "reward_mean": "1.000",
                                              "kl_to_sft": "2.00"}
    from alignflow.flows.report import alignment_text

    text = alignment_text(figures)
    assert "planted-property rate  base LM 0.100 -> SFT 0.600 -> PPO 0.800" in text
    assert ("same, sampled (T=1, 4 per prompt, 95% CI)  base LM 0.050 (0.00-0.10) -> SFT 0.500 (0.45-0.55) -> "
            "PPO 0.750 (0.70-0.80)") in text


def test_preference_lines_show_the_reward_model_interval_and_pmp_head_start():
    from alignflow.flows.pmp_transfer import head_start
    from alignflow.flows.report import preference_text

    results = [{"start": "pmp", "n_pairs": 64, "accuracy": 0.80}, {"start": "base", "n_pairs": 64, "accuracy": 0.70},
               {"start": "pmp", "n_pairs": 64, "accuracy": 0.84}, {"start": "base", "n_pairs": 64, "accuracy": 0.72},
               {"start": "pmp", "n_pairs": 900, "accuracy": 0.95}, {"start": "base", "n_pairs": 900, "accuracy": 0.93}]
    first = head_start(results)
    assert first["n_pairs"] == 64
    assert first["pmp_accuracy"] == pytest.approx(0.82) and first["base_accuracy"] == pytest.approx(0.71)
    assert first["head_start"] == pytest.approx(0.11)
    assert head_start([r for r in results if r["start"] == "pmp"]) == {}
    text = preference_text({"pm": {"eval/pairwise_accuracy": 0.912, "eval/accuracy_ci_low": 0.85,
                                   "eval/accuracy_ci_high": 0.95, "eval/pairs": 121.0}, "pmp-transfer": first})
    assert "pairwise accuracy 0.912 (95% CI 0.850-0.950) on 121 held-out task pairs" in text
    assert "64 task pairs: from PMP 0.820, from the base LM 0.710 (+0.110)" in text
    assert preference_text({"sft": {"planted_rate": 0.5}}) == ""


def test_stage_summaries_keep_promotion_decisions_and_other_stages_lists_apart():
    from alignflow.tasks.stage_cache import plain

    transfer = plain({"stage": "pmp-transfer", "head_start": 0.1, "transfer": [{"start": "pmp"}],
                      "results": [{"start": "pmp"}]})
    assert transfer == {"stage": "pmp-transfer", "head_start": 0.1}
    promote = plain({"stage": "promote", "results": [{"model": "alignflow-base", "decision": "promoted"}]})
    assert promote["decisions"] == {"alignflow-base": "promoted"}


def test_summary_table_widens_the_stage_column_for_long_names():
    from alignflow.tasks.stage_cache import summary_table

    rows = [{"stage": "pm", "status": "ran", "run_id": "a"}, {"stage": "pmp-transfer", "status": "cache hit", "run_id": "b"}]
    lines = summary_table(rows, {}).splitlines()
    assert lines[2].startswith("pmp-transfer cache hit")
    assert lines[0].index("status") == lines[1].index("ran") == lines[2].index("cache hit")
    assert summary_table(rows[:1], {}).startswith("stage    status")
