"""PPO, one test per row of the PPO table (docs: rlhf-details.md), plus the stability guards and exact resume.

Rows: 1 query+response everywhere, 2 dedicated pad, 3 left padding, 4 full-distribution sampling, 5 temperature
in every log-prob, 6 EOS truncation and penalty, 7 per-token KL reward and controllers, 8 GAE, 9 masked
whitening, 10 clipped losses, 11 critic and reference, 12 log-probs from sampling, 13 optimiser and batching,
14 metrics and generations, 15 score position.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

import _ppo_models as M
from alignflow.config import PpoStageConfig
from alignflow.tasks.train import ppo
from alignflow.tasks.train.loop import NonFiniteLossError


@pytest.fixture(autouse=True)
def _one_thread():
    previous = M.set_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tok():
    return M.tokenizer()


def _run(cfg, *, policy=None, reward=None, reward_fn=None, prompts=None, **kwargs):
    policy = policy if policy is not None else M.policy()
    reward = reward if reward is not None else M.reward_model()
    reward_fn = reward_fn or ppo.text_reward_fn(reward, M.tokenizer())
    logs = []
    cbs = kwargs.pop("callbacks", None) or ppo.PpoCallbacks(on_log=lambda m, s: logs.append((s, dict(m))))
    result = ppo.train_ppo(cfg, policy=policy, tokenizer=M.tokenizer(), critic=ppo.make_critic(reward),
                           reward_fn=reward_fn, prompts=prompts or M.prompts(), callbacks=cbs, **kwargs)
    return result, logs


# ------------------------------------------------------------------------------------------ row 1
def test_row1_reward_value_and_reference_read_query_plus_response(tok):
    critic = ppo.make_critic(M.reward_model())
    q, qm = ppo.left_pad_queries(tok, ["alpha beta gamma delta :", "read :"], 16)
    assert qm[0].all()
    r = torch.tensor([[5, 6, tok.eos_token_id], [7, tok.eos_token_id, tok.pad_token_id]])
    r, rm, _ = ppo.truncate_after_eos(r, tok.eos_token_id, tok.pad_token_id)
    values = ppo.critic_values(critic, q, qm, r, rm)
    assert values.shape == r.shape  # one value per response token
    # value t = score head on the hidden state at position Q + t - 1 of the joined sequence (no padding in row 0)
    ids = torch.cat([q[0:1], r[0:1]], 1)
    hidden = critic.base_model(input_ids=ids).last_hidden_state
    expected = critic.score(hidden).squeeze(-1)[0, q.shape[1] - 1 : -1]
    assert torch.allclose(values[0], expected, atol=1e-5)
    # the query matters: another query, other values for the same response
    q2, qm2 = ppo.left_pad_queries(tok, ["write loop list dict :", "read :"], 16)
    q2 = ppo.F.pad(q2, (q.shape[1] - q2.shape[1], 0), value=tok.pad_token_id) if q2.shape[1] < q.shape[1] else q2
    qm2 = (q2 != tok.pad_token_id).long()
    assert not torch.allclose(ppo.critic_values(critic, q2, qm2, r, rm)[0], values[0], atol=1e-4)

    # the reward function receives prompt text and response text (without EOS) of each rollout
    seen = {}

    def reward_fn(prompts, responses):
        seen["p"], seen["r"] = list(prompts), list(responses)
        return torch.zeros(len(prompts))

    pol = M.policy()
    cfg = M.ppo_config(batch_size=4, forward_batch_size=2)
    prompts = ["alpha beta :", "read :", "loop list dict :", "x :"]
    ro = ppo.collect_rollouts(pol, ppo.Reference(pol, ppo.frozen_copy(pol)), critic, tok, reward_fn, prompts, cfg,
                              torch.device("cpu"))
    assert seen["p"] == prompts
    for row, mask, text in zip(ro.response_ids, ro.response_mask, seen["r"]):
        ids = [t for t in row[mask.bool()].tolist() if t != tok.eos_token_id]
        assert tok.decode(ids) == text
    assert ro.values.shape == ro.ref_logprobs.shape == ro.response_ids.shape


# ------------------------------------------------------------------------------------------ row 2
def test_row2_dedicated_pad_token_never_eos(tok):
    ppo.check_pad_token(tok)
    assert tok.pad_token_id != tok.eos_token_id
    for pad in (tok.eos_token_id, None):
        with pytest.raises(ValueError, match="pad token"):
            ppo.check_pad_token(SimpleNamespace(pad_token_id=pad, eos_token_id=tok.eos_token_id))
    q, qm = ppo.left_pad_queries(tok, ["alpha :", "alpha beta gamma delta :"], 32)
    assert (q[qm == 0] == tok.pad_token_id).all() and (q[qm == 0] != tok.eos_token_id).all()


# ------------------------------------------------------------------------------------------ row 3
def test_row3_left_padding_and_positions_change_nothing(tok):
    model = M.policy()
    prompts = ["alpha :", "alpha beta gamma delta file read :"]
    q, qm = ppo.left_pad_queries(tok, prompts, 32)
    assert qm[0, 0] == 0 and qm[0, -1] == 1  # left padded: the short prompt ends where the long one does
    assert ppo.position_ids_from_mask(qm)[0].tolist()[-2:] == [int(qm[0].sum()) - 2, int(qm[0].sum()) - 1]
    # near-greedy sampling from the padded batch equals HF greedy generation of each prompt alone
    out, _ = ppo.sample_responses(model, q, qm, max_new_tokens=6, temperature=1e-6, eos_id=tok.eos_token_id,
                                  pad_id=tok.pad_token_id)
    for i, p in enumerate(prompts):
        ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        got, _, _ = ppo.truncate_after_eos(out[i : i + 1], tok.eos_token_id, tok.pad_token_id)
        assert got[0, : len(ref)].tolist() == ref.tolist()
    # the update-time forward gives the padded row the logits of the row alone
    r = torch.tensor([[9, 10, 11], [9, 10, 11]])
    rm = torch.ones_like(r)
    logits = ppo.response_logits(model, q, qm, r, rm, 1.0)
    alone = ppo.response_logits(model, q[:1, qm[0].bool()], qm[:1, qm[0].bool()], r[:1], rm[:1], 1.0)
    assert torch.allclose(logits[0], alone[0], atol=1e-5)


# ------------------------------------------------------------------------------------------ row 4
def test_row4_sampling_uses_the_whole_distribution_and_no_min_length(tok):
    torch.manual_seed(0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]]).repeat(20000, 1)
    tokens, logps = ppo.sample_next_token(logits, temperature=0.7)
    freq = torch.bincount(tokens, minlength=6).float() / len(tokens)
    expected = torch.softmax(logits[0] / 0.7, -1)
    assert torch.allclose(freq, expected, atol=0.01)  # no top-k / top-p truncation
    assert freq[-1] > 0  # the tail (p = 0.0007) is sampled too
    assert torch.allclose(logps, expected.log()[tokens], atol=1e-6)
    # EOS may be the very first token: no forced minimum length
    model = M.policy()
    eos = tok.eos_token_id

    def push_eos(module, args, output):
        output.logits[..., eos] += 50.0
        return output

    model.register_forward_hook(push_eos)
    q, qm = ppo.left_pad_queries(tok, ["alpha :", "beta :"], 16)
    out, lp = ppo.sample_responses(model, q, qm, max_new_tokens=8, temperature=0.7, eos_id=eos,
                                   pad_id=tok.pad_token_id)
    assert out.shape == (2, 1) and (out == eos).all()
    _, mask, has_eos = ppo.truncate_after_eos(out, eos, tok.pad_token_id)
    assert mask.sum().item() == 2 and has_eos.all()


# ------------------------------------------------------------------------------------------ rows 5 and 12
def test_rows5_and_12_sampling_logprobs_equal_tempered_forward_logprobs(tok):
    model = M.policy()
    torch.manual_seed(3)
    q, qm = ppo.left_pad_queries(tok, M.prompts(6), 32)
    for temperature in (0.7, 1.3):
        out, gen_lp = ppo.sample_responses(model, q, qm, max_new_tokens=10, temperature=temperature,
                                           eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        r, rm, _ = ppo.truncate_after_eos(out, tok.eos_token_id, tok.pad_token_id)
        fwd = ppo.logprobs_of(ppo.response_logits(model, q, qm, r, rm, temperature), r) * rm
        assert torch.allclose(gen_lp * rm, fwd, atol=1e-4)
        untempered = ppo.logprobs_of(ppo.response_logits(model, q, qm, r, rm, 1.0), r) * rm
        assert not torch.allclose(untempered, fwd, atol=1e-2)
    # reference log-probs use the same temperature: a reference equal to the policy gives KL 0 exactly
    pol = M.policy()
    cfg = M.ppo_config(temperature=0.6)
    ro = ppo.collect_rollouts(pol, ppo.Reference(pol, ppo.frozen_copy(pol)), None, tok,
                              lambda p, r: torch.zeros(len(p)), M.prompts(8), cfg, torch.device("cpu"))
    assert ppo.kl_k1(ro.logprobs, ro.ref_logprobs).abs().max() < 1e-4


def test_row12_first_minibatch_ratio_is_one():
    # one epoch, one minibatch: the update's fresh log-probs meet the sampling pass's before any step
    cfg = M.ppo_config(total_steps=1, ppo_epochs=1, batch_size=8, minibatch_size=8, micro_batch_size=4)
    _, logs = _run(cfg)
    m = logs[0][1]
    assert abs(m["ppo/ratio_mean"] - 1.0) < 1e-4 and m["ppo/clipfrac"] == 0.0 and m["ppo/approx_kl"] < 1e-8


# ------------------------------------------------------------------------------------------ row 6
def test_row6_truncation_after_first_eos_and_missing_eos_penalty():
    E, P = 0, 1
    ids = torch.tensor([[5, 6, E, 7, E], [5, 6, 7, 8, 9], [E, 4, 4, 4, 4]])
    out, mask, has_eos = ppo.truncate_after_eos(ids, E, P)
    assert out.tolist() == [[5, 6, E, P, P], [5, 6, 7, 8, 9], [E, P, P, P, P]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]
    scores = torch.tensor([0.5, 0.5, 0.5])
    assert ppo.apply_missing_eos_penalty(scores, has_eos, "replace", 1.0).tolist() == [0.5, -1.0, 0.5]
    assert ppo.apply_missing_eos_penalty(scores, has_eos, "subtract", 1.0).tolist() == [0.5, -0.5, 0.5]
    assert ppo.apply_missing_eos_penalty(scores, has_eos, "none", 1.0).tolist() == [0.5, 0.5, 0.5]
    assert PpoStageConfig().missing_eos == "replace" and PpoStageConfig().missing_eos_penalty == 1.0


# ------------------------------------------------------------------------------------------ row 7
def test_row7_per_token_kl_in_the_reward_and_both_controllers():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    assert torch.allclose(ppo.kl_k1(lp, ref), torch.tensor([[0.5, -1.0, 0.0]]))
    log_r = ref - lp
    assert torch.allclose(ppo.kl_k3(lp, ref), log_r.exp() - 1 - log_r)
    assert (ppo.kl_k3(lp, ref) >= 0).all()
    mask = torch.tensor([[1, 1, 0]])
    rewards = ppo.shaped_rewards(torch.tensor([2.0]), ppo.kl_k1(lp, ref) * mask, mask, beta=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1 + 2.0, 0.0]]))
    fixed = ppo.kl_controller(PpoStageConfig())
    fixed.update(100.0, 64)
    assert fixed.beta == 0.05  # N+/TRL default, fixed
    ada = ppo.kl_controller(PpoStageConfig(adaptive_kl=True, kl_coef=0.1, target_kl=6.0, kl_horizon=10000))
    ada.update(7.5, 64)  # KL/target - 1 = 0.25 -> clipped to 0.2
    assert math.isclose(ada.beta, 0.1 * (1 + 0.2 * 64 / 10000))
    ada.update(5.4, 64)  # -0.1, not clipped
    assert math.isclose(ada.beta, 0.1 * (1 + 0.2 * 64 / 10000) * (1 - 0.1 * 64 / 10000))
    clone = ppo.kl_controller(PpoStageConfig(adaptive_kl=True))
    clone.load_state_dict(ada.state_dict())
    assert clone.beta == ada.beta


# ------------------------------------------------------------------------------------------ row 8
def test_row8_gae_gamma_one_lambda_095_over_response_tokens():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.3, 0.7, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.2, 9.0], [0.1, 0.2, 9.0, 9.0]])  # 9.0: padding, must not leak
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    for b, n in enumerate((3, 2)):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist() + [0.0]
        expected, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            running = (r[t] + v[t + 1] - v[t]) + 0.95 * running
            expected[t] = running
        assert torch.allclose(adv[b, :n], torch.tensor(expected), atol=1e-6)
        assert torch.allclose(ret[b, :n], adv[b, :n] + values[b, :n], atol=1e-6)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
    cfg = PpoStageConfig()
    assert (cfg.gamma, cfg.lam) == (1.0, 0.95)


# ------------------------------------------------------------------------------------------ row 9
def test_row9_masked_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = ppo.masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert abs(float(valid.mean())) < 1e-6 and abs(float(valid.std()) - 1.0) < 1e-4
    assert (w[~mask.bool()] == 0).all()
    other = x.clone()
    other[~mask.bool()] = 12345.0
    assert torch.allclose(ppo.masked_whiten(other, mask), w)
    keep_mean = ppo.masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert abs(float(keep_mean.mean()) - float(x[mask.bool()].mean())) < 1e-5
    assert PpoStageConfig().whiten_rewards is False


# ------------------------------------------------------------------------------------------ row 10
def test_row10_clipped_policy_and_value_losses():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0]])
    loss, stats = ppo.policy_loss(new, old, adv, mask, cliprange=0.2)
    loss.backward()
    # token 0: ratio 1.5 > 1.2 with A > 0 -> clipped, no gradient; token 1: ratio 0.5 -> unclipped (pessimistic)
    assert math.isclose(float(loss), (-1.2 - 0.5) / 2, rel_tol=1e-6)
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0
    assert float(stats["clipfrac"]) == 0.5 and math.isclose(float(stats["ratio_mean"]), 1.0, rel_tol=1e-6)
    v_new = torch.tensor([[1.0, 0.1]], requires_grad=True)
    v_old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[2.0, 0.0]])
    vloss, _ = ppo.value_loss(v_new, v_old, ret, mask, cliprange_value=0.2)
    # token 0: clipped value 0.2 -> (0.2-2)^2 = 3.24 beats (1-2)^2 = 1; token 1: 0.01 both ways
    assert math.isclose(float(vloss), 0.5 * (3.24 + 0.01) / 2, rel_tol=1e-5)
    cfg = PpoStageConfig()
    assert (cfg.cliprange, cfg.cliprange_value, cfg.vf_coef) == (0.2, 0.2, 0.1)


# ------------------------------------------------------------------------------------------ row 11
def test_row11_critic_from_reward_model_and_frozen_reference_under_inference_mode():
    reward = M.reward_model()
    reward_before = {k: v.clone() for k, v in reward.state_dict().items()}
    critic = ppo.make_critic(reward)
    assert all(p.requires_grad for p in critic.parameters())
    assert not {p.data_ptr() for p in critic.parameters()} & {p.data_ptr() for p in reward.parameters()}
    torch.testing.assert_close(critic.state_dict(), reward.state_dict())  # initialised from the reward model

    policy = M.policy()
    sft = copy.deepcopy(policy.state_dict())
    reference = ppo.frozen_copy(policy)
    modes = {"reference": [], "reward": []}
    reference.register_forward_pre_hook(lambda m, a: modes["reference"].append(torch.is_inference_mode_enabled()))
    reward.register_forward_pre_hook(lambda m, a: modes["reward"].append(torch.is_inference_mode_enabled()))
    cfg = M.ppo_config(total_steps=2)
    result = ppo.train_ppo(cfg, policy=policy, tokenizer=M.tokenizer(), critic=critic,
                           reward_fn=ppo.text_reward_fn(reward, M.tokenizer()), prompts=M.prompts(),
                           reference=reference)
    assert modes["reference"] and all(modes["reference"]) and modes["reward"] and all(modes["reward"])
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.grad is None for p in reference.parameters())
    torch.testing.assert_close(reference.state_dict(), sft)  # the reference stayed the SFT policy
    changed = [k for k, v in result.policy.state_dict().items() if not torch.equal(v, sft[k])]
    assert changed  # ... while the policy moved
    torch.testing.assert_close(reward.state_dict(), reward_before)  # reward model frozen
    assert any(not torch.equal(v, reward_before[k]) for k, v in result.critic.state_dict().items())


# ------------------------------------------------------------------------------------------ row 13
def test_row13_adam_eps_linear_decay_minibatches_and_accumulation(tmp_path):
    assert PpoStageConfig().adam_eps == 1e-5 and PpoStageConfig().ppo_epochs == 4
    opt = ppo.build_adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, eps=1e-5)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["eps"] == 1e-5
    sched = ppo.build_scheduler(opt, total_steps=4, anneal=True)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3]) and opt.param_groups[0]["lr"] == 0.0

    torch.manual_seed(0)
    plans = [ppo.minibatch_plan(8, 4, 2) for _ in range(2)]
    for plan in plans:
        assert len(plan) == 2 and all(len(mb) == 2 and all(len(m) == 2 for m in mb) for mb in plan)
        assert sorted(torch.cat([m for mb in plan for m in mb]).tolist()) == list(range(8))
    assert torch.cat([m for mb in plans[0] for m in mb]).tolist() != torch.cat([m for mb in plans[1] for m in mb]).tolist()

    # accumulated micro-batch gradients equal one minibatch's gradient (equal response lengths)
    model = M.policy()
    q, qm = ppo.left_pad_queries(M.tokenizer(), ["alpha :"] * 4, 8)
    r = torch.randint(5, 50, (4, 5))
    rm = torch.ones_like(r)
    adv = torch.randn(4, 5)
    old = torch.zeros(4, 5) - 5.0

    def grad(chunks):
        model.zero_grad()
        for idx in chunks:
            lp = ppo.logprobs_of(ppo.response_logits(model, q[idx], qm[idx], r[idx], rm[idx], 0.7), r[idx])
            loss, _ = ppo.policy_loss(lp, old[idx], adv[idx], rm[idx], 0.2)
            (loss * len(idx) / 4).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    torch.testing.assert_close(grad([torch.arange(4)]), grad([torch.tensor([0, 1]), torch.tensor([2, 3])]),
                               atol=1e-6, rtol=1e-4)

    # one PPO step = ppo_epochs x (batch / minibatch) optimizer steps
    cfg = M.ppo_config(total_steps=1, ppo_epochs=3, batch_size=8, minibatch_size=4, micro_batch_size=2)
    _run(cfg, checkpoint_dir=tmp_path / "ck")
    state = torch.load(tmp_path / "ck" / "step-000001" / "optimizer.pt", weights_only=True)
    steps = {float(s["step"]) for s in state["policy"]["state"].values()}
    assert steps == {6.0}
    assert state["critic"]["param_groups"][0]["eps"] == 1e-5


def test_trimming_all_padding_columns_changes_no_logprob_or_value(tok):
    model, critic = M.policy(), ppo.make_critic(M.reward_model())
    q, qm = ppo.left_pad_queries(tok, ["alpha beta gamma delta file read write :", "read :", "loop :"], 32)
    r = torch.tensor([[5, 5, 5, 5, 5, 5], [5, 6, tok.eos_token_id, 1, 1, 1], [7, 8, 9, tok.eos_token_id, 1, 1]])
    r, rm, _ = ppo.truncate_after_eos(r, tok.eos_token_id, tok.pad_token_id)
    rows = torch.tensor([1, 2])  # short prompts, short responses: padding on both sides of the pair
    full_lp = ppo.logprobs_of(ppo.response_logits(model, q[rows], qm[rows], r[rows], rm[rows], 0.7), r[rows])
    full_v = ppo.critic_values(critic, q[rows], qm[rows], r[rows], rm[rows])
    tq, tqm, tr, trm = ppo.trim_padding(q[rows], qm[rows], r[rows], rm[rows])
    assert tq.shape[1] == int(qm[rows].sum(-1).max()) < q.shape[1] and tr.shape[1] == 4
    lp = ppo.logprobs_of(ppo.response_logits(model, tq, tqm, tr, trm, 0.7), tr)
    v = ppo.critic_values(critic, tq, tqm, tr, trm)
    assert torch.allclose((lp * trm), (full_lp * rm[rows])[:, :4], atol=1e-5)
    assert torch.allclose(v * trm, (full_v * rm[rows])[:, :4], atol=1e-5)


# ------------------------------------------------------------------------------------------ row 14
def test_row14_metrics_and_generation_tables():
    tables = []
    logs = []
    cfg = M.ppo_config(total_steps=2, generations_every=2, generations_rows=3)
    _run(cfg, callbacks=ppo.PpoCallbacks(on_log=lambda m, s: logs.append((s, m)),
                                         on_generations=lambda rows, s: tables.append((s, rows))))
    names = {"ppo/reward_mean", "ppo/reward_std", "ppo/kl", "ppo/kl_k1", "ppo/kl_k3", "ppo/beta", "ppo/entropy",
             "ppo/clipfrac", "ppo/approx_kl", "ppo/value_loss", "ppo/explained_variance", "ppo/ratio_mean",
             "ppo/response_length", "ppo/no_eos_rate", "perf/episodes_per_s"}
    assert [s for s, _ in logs] == [1, 2]
    for _, m in logs:
        assert names <= set(m)
        assert all(math.isfinite(m[k]) for k in names)
        assert 0 <= m["ppo/no_eos_rate"] <= 1 and 1 <= m["ppo/response_length"] <= cfg.max_new_tokens
        assert m["ppo/kl_k3"] >= 0
    assert [s for s, _ in tables] == [2]
    rows = tables[0][1]
    assert len(rows) == 3 and set(rows[0]) == {"step", "prompt", "response", "score", "kl"}


# ------------------------------------------------------------------------------------------ row 15
def test_row15_score_sits_at_the_last_response_token_not_one_past_it():
    E, P = 0, 1
    sampled = torch.tensor([[7, 8, E, 9, 9, 9], [7, 8, 9, 9, E, 9], [7, 8, 9, 9, 9, 9]])
    ids, mask, has_eos = ppo.truncate_after_eos(sampled, E, P)
    last = ppo.last_token_index(mask)
    assert last.tolist() == [2, 4, 5]  # the EOS itself; the final token when there is no EOS
    assert (ids[torch.arange(3), last][:2] == E).all()
    scores = torch.tensor([1.0, 2.0, 3.0])
    rewards = ppo.shaped_rewards(scores, torch.zeros(3, 6), mask, beta=0.05)
    expected = torch.zeros(3, 6)
    expected[0, 2], expected[1, 4], expected[2, 5] = 1.0, 2.0, 3.0
    assert torch.equal(rewards, expected)
    # ... so the last token's advantage is score - V_last (nothing bootstrapped past it)
    values = torch.full((3, 6), 0.25)
    adv, _ = ppo.gae(rewards, values, mask, 1.0, 0.95)
    assert torch.allclose(adv[torch.arange(3), last], scores - 0.25)
    assert adv[0, 3:].abs().sum() == 0


# ------------------------------------------------------------------------------------------ stability
def test_non_finite_values_stop_the_run_naming_step_and_tensor():
    with pytest.raises(NonFiniteLossError, match=r"PPO step 3: `values`"):
        ppo.check_finite(3, scores=torch.ones(2), values=torch.tensor([1.0, float("nan")]))
    calls = {"n": 0}
    reward = M.reward_model()
    real = ppo.text_reward_fn(reward, M.tokenizer())

    def poisoned(p, r):
        calls["n"] += 1
        out = real(p, r)
        return out * float("inf") if calls["n"] == 2 else out

    with pytest.raises(NonFiniteLossError, match=r"PPO step 2: `scores`") as err:
        _run(M.ppo_config(total_steps=3, missing_eos="none"), reward=reward, reward_fn=poisoned)
    assert err.value.step == 2


def test_ratio_guard_skips_and_counts_minibatches(monkeypatch):
    real = ppo.policy_loss

    def exploding(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        stats["ratio_mean"] = stats["ratio_mean"] * 0 + 50.0
        return loss, stats

    monkeypatch.setattr(ppo, "policy_loss", exploding)
    policy = M.policy()
    before = copy.deepcopy(policy.state_dict())
    cfg = M.ppo_config(total_steps=1, ppo_epochs=2, batch_size=8, minibatch_size=4)
    result, logs = _run(cfg, policy=policy)
    assert logs[0][1]["ppo/skipped_minibatches"] == 4 and result.skipped_minibatches == 4
    torch.testing.assert_close(result.policy.state_dict(), before)  # nothing applied


def test_negative_kl_is_warned_about():
    with pytest.warns(ppo.NegativeKLWarning, match="step 7"):
        assert ppo.warn_if_negative_kl(-0.5, 7, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ppo.warn_if_negative_kl(-0.01, 7, 0.05)


def test_lora_reference_is_the_adapter_free_base():
    pytest.importorskip("peft")
    policy = M.policy()
    sft = copy.deepcopy(policy)
    cfg = M.ppo_config(total_steps=2, lora_r=4, lr=5e-3)
    result, logs = _run(cfg, policy=policy)
    trainable = [n for n, p in result.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    q, qm = ppo.left_pad_queries(M.tokenizer(), M.prompts(3), 16)
    r = torch.randint(5, 50, (3, 4))
    rm = torch.ones_like(r)
    ref = ppo.Reference(result.policy, None)
    with ref.model() as base:
        ref_logits = ppo.response_logits(base, q, qm, r, rm, 0.7)
    torch.testing.assert_close(ref_logits, ppo.response_logits(sft, q, qm, r, rm, 0.7))  # adapters off = SFT
    assert not torch.allclose(ppo.response_logits(result.policy, q, qm, r, rm, 0.7), ref_logits, atol=1e-4)
    merged = ppo.merged_policy(result.policy)
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert logs[-1][1]["ppo/kl_k3"] > 0


# ------------------------------------------------------------------------------------------ resume
def test_checkpoint_resume_repeats_the_uninterrupted_curve(tmp_path):
    cfg = M.ppo_config(total_steps=4, checkpoint_every=1, adaptive_kl=True, kl_horizon=100)
    _, straight = _run(cfg, checkpoint_dir=tmp_path / "a")

    class Killed(Exception):
        pass

    def die(step, total):
        if step == 2:
            raise Killed

    first_logs = []
    with pytest.raises(Killed):
        _run(cfg, checkpoint_dir=tmp_path / "b",
             callbacks=ppo.PpoCallbacks(on_log=lambda m, s: first_logs.append((s, m)), on_step=die))
    state = json.loads((tmp_path / "b" / "step-000002" / "state.json").read_text())
    assert state["data_state"]["prompt_position"] == 2 * cfg.batch_size
    assert "beta" in state["extra"]["kl_controller"]
    with pytest.raises(FileExistsError):
        _run(cfg, checkpoint_dir=tmp_path / "b")  # a fresh run refuses a folder with checkpoints
    result, resumed = _run(cfg, checkpoint_dir=tmp_path / "b", resume=True)  # fresh models, as a new process has
    assert result.resumed_from == 2 and [s for s, _ in resumed] == [3, 4]
    curve = first_logs + resumed
    assert [s for s, _ in curve] == [s for s, _ in straight]
    for (s, got), (_, want) in zip(curve, straight):
        for key in ("ppo/reward_mean", "ppo/kl", "ppo/beta", "ppo/value_loss", "ppo/policy_loss", "ppo/entropy"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), (s, key)


# ------------------------------------------------------------------------------------------ details seen through
# the real training step: each test below fails when its one line of train_ppo is broken (tests/mutation_check.py)
def _one_update(**overrides):
    """One PPO step with one epoch and one minibatch: the update's first forward meets the sampling pass's weights."""
    base = dict(total_steps=1, ppo_epochs=1, batch_size=8, minibatch_size=8, micro_batch_size=8)
    base.update(overrides)
    return M.ppo_config(**base)


def test_dropout_is_off_in_the_update_of_a_policy_built_with_dropout():
    pol = M.policy(dropout=0.3)
    assert pol.config.resid_pdrop == 0.3 and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in pol.modules())
    _, logs = _run(_one_update(), policy=pol)
    m = logs[0][1]
    # dropout on: the train-mode forward of the update differs from the eval-mode sampling pass (ratio != 1)
    assert abs(m["ppo/ratio_mean"] - 1.0) < 1e-4 and m["ppo/approx_kl"] < 1e-8, m


def test_kl_penalty_pulls_a_drifted_policy_back_to_the_reference():
    # reward 0: the only signal is -beta * KL; a policy that starts away from its reference must come closer
    ref = M.policy()
    pol = copy.deepcopy(ref)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        emb = pol.get_input_embeddings().weight
        emb.add_(torch.randn(emb.shape, generator=gen) * 0.1)
    cfg = M.ppo_config(total_steps=8, kl_coef=0.5, lr=3e-3, batch_size=16, minibatch_size=8, micro_batch_size=8,
                       forward_batch_size=16)
    _, logs = _run(cfg, policy=pol, reward_fn=lambda p, r: torch.zeros(len(p)), reference=ref)
    kls = [m["ppo/kl"] for _, m in logs]
    assert kls[0] > 1.0, kls  # it did start away from the reference
    assert sum(kls[-2:]) / 2 < 0.6 * kls[0], kls  # a flipped sign would reward the drift: the KL would grow


def test_responses_without_eos_are_penalised_in_the_training_step():
    # 2 new tokens from a random 300-token policy: almost no response ends with EOS
    for mode, expected in (("replace", lambda s: -1.0), ("subtract", lambda s: s - 1.0)):
        cfg = _one_update(max_new_tokens=2, missing_eos=mode, missing_eos_penalty=1.0)
        _, logs = _run(cfg, reward_fn=lambda p, r: torch.full((len(p),), 0.5))
        m = logs[0][1]
        no_eos = m["ppo/no_eos_rate"]
        assert no_eos >= 0.5 and m["ppo/reward_model_score_mean"] == pytest.approx(0.5)
        assert m["ppo/reward_mean"] == pytest.approx(0.5 * (1 - no_eos) + expected(0.5) * no_eos), (mode, m)


def test_advantages_are_whitened_in_the_training_step():
    rewards = lambda p, r: 3.0 + torch.arange(len(p), dtype=torch.float32)  # noqa: E731  far from mean 0, std 1
    _, logs = _run(_one_update(), reward_fn=rewards)
    m = logs[0][1]
    assert abs(m["ppo/advantage_mean"]) < 1e-5 and m["ppo/advantage_std"] == pytest.approx(1.0, abs=1e-3), m
    # ratio 1 at the first minibatch: the clipped surrogate is -mean(advantages), 0 once whitened
    assert abs(m["ppo/policy_loss"]) < 1e-4, m


def test_micro_batches_accumulate_to_the_minibatch_gradient_in_the_training_step():
    norms = {}
    for micro in (8, 2):
        _, logs = _run(_one_update(micro_batch_size=micro, max_grad_norm=0.0))
        norms[micro] = (logs[0][1]["ppo/policy_grad_norm"], logs[0][1]["ppo/critic_grad_norm"])
    # equal up to the per-micro-batch token weighting (responses of nearly equal length here); unscaled: 4x
    assert norms[2][0] == pytest.approx(norms[8][0], rel=0.15), norms
    assert norms[2][1] == pytest.approx(norms[8][1], rel=0.15), norms


def test_bf16_policy_trains_fp32_master_weights(tmp_path):
    pol = M.policy().to(torch.bfloat16)
    result, logs = _run(M.ppo_config(total_steps=1), policy=pol, checkpoint_dir=tmp_path / "ck")
    state = torch.load(tmp_path / "ck" / "step-000001" / "optimizer.pt", weights_only=True)
    assert {v["exp_avg"].dtype for v in state["policy"]["state"].values()} == {torch.float32}
    assert next(result.policy.parameters()).dtype == torch.bfloat16  # handed back as loaded
    assert all(math.isfinite(v) for k, v in logs[0][1].items() if k != "ppo/explained_variance")


def test_critic_is_built_on_the_policy_tokenizer_when_the_reward_model_tokenizes_differently():
    from alignflow.models import train_bpe_tokenizer
    from alignflow.models.reward import reward_model_from_causal_lm

    tok = M.tokenizer()
    other = train_bpe_tokenizer(M.corpus(200, seed=7), vocab_size=262, model_max_length=128)
    assert len(other) < len(tok)  # the policy's ids overflow the reward model's embeddings
    reward = reward_model_from_causal_lm(M.policy(seed=3, tok=other), tokenizer=other, seed=0)
    pol = M.policy()
    with pytest.raises(ValueError, match="critic has .* token embeddings"):
        ppo.train_ppo(M.ppo_config(total_steps=1), policy=pol, tokenizer=tok, critic=ppo.make_critic(reward),
                      reward_fn=ppo.text_reward_fn(reward, other), prompts=M.prompts())
    critic = ppo.make_critic(reward, reward_tokenizer=other, policy=pol, policy_tokenizer=tok)
    assert critic.get_input_embeddings().weight.shape[0] == len(tok)
    torch.testing.assert_close(critic.base_model.wte.weight, pol.transformer.wte.weight)  # the policy's body
    result = ppo.train_ppo(M.ppo_config(total_steps=2), policy=pol, tokenizer=tok, critic=critic,
                           reward_fn=ppo.text_reward_fn(reward, other), prompts=M.prompts())
    assert math.isfinite(result.last_metrics["ppo/value_loss"])
    # the same tokenizer: the critic is a copy of the reward model
    same = M.reward_model()
    copy_critic = ppo.make_critic(same, reward_tokenizer=tok, policy=pol, policy_tokenizer=tok)
    torch.testing.assert_close(copy_critic.state_dict(), same.state_dict())
