"""The policy gate as a real decision: PPO runs measured the way the gate measures them, then judged by it.

Two PPO runs from the same SFT policy, on the same reward (the share of vowels in the response, which pays for
drifting away from the policy's habits) and the same prompts: one with the KL penalty, one without
(``kl_coef=0``). Both are measured on the same held-out prompts with greedy answers, the KL summed over the
answer tokens against the SFT policy (``tasks/promotion_eval.py``), and judged with the gate's limit. The
penalised run passes; the drifting one is rejected for its KL.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

import _ppo_models as M
from alignflow.tasks.promotion import Thresholds, decide
from alignflow.tasks.promotion_eval import kl_per_answer, policy_answers
from alignflow.tasks.train import ppo

MAX_KL = 8.0  # the gate's limit in this test (config: promote.max_kl)


def vowel_share(prompts, responses):
    return torch.tensor([sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses])


def _gate_figures(policy, sft, held_out):
    tok = M.tokenizer()
    answers = policy_answers(policy, tok, held_out, max_new_tokens=8, max_length=64, batch_size=16)
    kl = kl_per_answer(policy, sft, tok, held_out, answers, max_length=64)
    return {"kl_to_reference": statistics.mean(kl), "reward_mean": float(vowel_share(held_out, answers).mean())}


@pytest.fixture(scope="module")
def runs():
    previous = M.set_threads()
    try:
        sft = M.policy()
        held_out = M.prompts(24, seed=9)
        out = {}
        for kl_coef in (0.2, 0.0):
            cfg = M.ppo_config(total_steps=25, batch_size=32, minibatch_size=16, micro_batch_size=16,
                               forward_batch_size=32, ppo_epochs=4, max_new_tokens=8, lr=3e-3, anneal_lr=False,
                               missing_eos="none", kl_coef=kl_coef, checkpoint_every=1000, generations_rows=0)
            result = ppo.train_ppo(cfg, policy=copy.deepcopy(sft), tokenizer=M.tokenizer(),
                                   critic=ppo.make_critic(M.reward_model()), reward_fn=vowel_share,
                                   prompts=M.prompts(64))
            out[kl_coef] = _gate_figures(result.policy.eval(), sft, held_out)
        out["sft"] = _gate_figures(sft, sft, held_out)
    finally:
        torch.set_num_threads(previous)
    print({k: {n: round(v, 3) for n, v in f.items()} for k, f in out.items()})
    return out


def test_penalised_ppo_run_passes_the_policy_gate(runs):
    decision = decide("policy", runs[0.2], None, Thresholds(max_kl=MAX_KL))
    assert decision.passed and decision.action == "first_champion", decision.reason
    assert runs[0.2]["reward_mean"] > runs["sft"]["reward_mean"]  # it did learn something


def test_drifting_ppo_run_without_kl_penalty_is_rejected_by_the_policy_gate(runs):
    decision = decide("policy", runs[0.0], None, Thresholds(max_kl=MAX_KL))
    assert not decision.passed and decision.action == "rejected"
    assert [c.name for c in decision.checks if not c.passed] == ["kl_to_reference"], decision.reason
    assert runs[0.0]["kl_to_reference"] > runs[0.2]["kl_to_reference"]
