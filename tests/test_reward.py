"""Reward model: score position, head init, bias, loss, question batches, metrics, tokenizer freedom, learning."""

from __future__ import annotations

import math
import random
import re
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alignflow.config import IngestConfig, TrainConfig
from alignflow.models import build_causal_lm, build_config, train_bpe_tokenizer
from alignflow.models.reward import (
    head_init_std,
    last_token_index,
    reward_bias,
    reward_input_ids,
    reward_model_from_causal_lm,
    score_sequences,
    score_texts,
    set_reward_bias,
)
from alignflow.tasks.train.reward import (
    BAD_PREFIX,
    GOOD_PREFIX,
    binarize_pairs,
    bradley_terry_loss,
    evaluate_pairs,
    normalize_bias,
    pair_collate,
    pair_examples,
    pair_metrics,
    question_batches,
    reward_loss_fn,
    train_reward,
    wilson_interval,
)

TEXTS = [f"Question {i}: how do I sort a list of {i} items in python? Use sorted(xs) or xs.sort()." for i in range(200)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small shared CPU, two threads are several times slower for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=400, model_max_length=128)


def _lm(tok, arch="tiny-gpt2", max_position=128, seed=0, dropout=0.0):
    cfg = build_config(arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id, max_position=max_position)
    if dropout:  # as a loaded checkpoint may have it
        cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = dropout
    return build_causal_lm(cfg, seed=seed)


@pytest.fixture(scope="module")
def rm(tok):
    model = reward_model_from_causal_lm(_lm(tok), tokenizer=tok, seed=0)
    set_reward_bias(model, 0.25)  # every score below must include it
    return model


def _batch(tok, texts):
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask, [len(s) for s in seqs]


# -- loss ------------------------------------------------------------------------------------------------
def test_bradley_terry_loss_hand_numbers():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    plain = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2  # -log σ(1), -log σ(-1)
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(plain, abs=1e-6)
    m = torch.tensor([0.5, -1.0])  # d - m = 0.5, 0.0
    with_margin = (math.log1p(math.exp(-0.5)) + math.log(2.0)) / 2
    assert bradley_terry_loss(rc, rr, m).item() == pytest.approx(with_margin, abs=1e-6)
    centred = plain + 0.01 * (3.0**2 + 1.0**2) / 2
    assert bradley_terry_loss(rc, rr, centering=0.01).item() == pytest.approx(centred, abs=1e-6)


# -- score position ----------------------------------------------------------------------------------------
def test_last_token_index_right_padding_and_full_row():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 0, 4]  # last row: left padding works too
    assert last_token_index(mask.bool()).dtype == torch.long


def test_scores_match_unpadded_hf_logits_and_hidden_state(rm, tok):
    ids, mask, lengths = _batch(tok, ["short", "Question 3: how do I sort a list of 3 items in python?", "mid text 42"])
    assert min(lengths) < ids.shape[1] == max(lengths)  # some rows padded, one not
    with torch.no_grad():
        ours = score_sequences(rm, ids, mask)
        hf = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1) + 0.25
        hidden = rm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        manual = rm.score(hidden[torch.arange(len(lengths)), last_token_index(mask)]).squeeze(-1) + 0.25
        single = [score_sequences(rm, ids[i : i + 1, :n], mask[i : i + 1, :n]).item() for i, n in enumerate(lengths)]
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, torch.tensor(single), atol=1e-5, rtol=0)
    # Garbage (non-pad ids) under mask 0 after the last real token changes nothing.
    noisy = ids.masked_fill(mask == 0, 7)
    with torch.no_grad():
        torch.testing.assert_close(score_sequences(rm, noisy, mask), ours, atol=1e-5, rtol=0)


def test_dropout_off_same_score_in_train_and_eval(tok):
    lm = _lm(tok, dropout=0.3)  # a base LM with dropout: the reward model built on it has none
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in lm.modules())
    model = reward_model_from_causal_lm(lm, tokenizer=tok, seed=0)
    for key, value in model.config.to_dict().items():
        if "dropout" in key or "pdrop" in key:
            assert value == 0.0, key
    ids, mask, _ = _batch(tok, ["some text", "other text here"])
    with torch.no_grad():
        model.eval()
        a = score_sequences(model, ids, mask)
        model.train()
        b = score_sequences(model, ids, mask)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_training_step_of_a_reward_model_with_dropout_runs_without_it(tok):
    # A loaded reward model may carry dropout (here 0.3 everywhere); train_reward's first step must see the same
    # loss as the eval-mode model: with dropout left on, the train-mode forward is noise.
    lm = _lm(tok, dropout=0.3)
    config = lm.config.__class__(**{**lm.config.to_dict(), "num_labels": 1, "pad_token_id": tok.pad_token_id})
    model = AutoModelForSequenceClassification.from_config(config)
    model.base_model.load_state_dict(lm.base_model.state_dict())
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    rows = _rows()
    with torch.no_grad():
        batch = pair_collate(pair_examples(tok, rows, 64), tok.pad_token_id)
        r = score_sequences(model.eval(), batch["input_ids"], batch["attention_mask"])
        expected = bradley_terry_loss(r[: len(rows)], r[len(rows) :]).item()
    cfg = TrainConfig(max_steps=1, batch_size=len(rows), lr=1e-3, warmup_steps=0, eval_every=10**6,
                      log_every=10**6, checkpoint_every=10**6, seed=0)
    result = train_reward(cfg, model.train(), tok, rows, [], max_length=64, group_by_question=False)
    assert result.final_loss == pytest.approx(expected, abs=1e-5)


# -- building ------------------------------------------------------------------------------------------------
def test_head_init_std_and_zero_bias(tok):
    assert head_init_std(64) == pytest.approx(0.124, abs=1e-3)
    cfg = build_config("tiny-gpt2", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, max_position=32)
    cfg.n_embd, cfg.n_layer, cfg.n_head = 1024, 1, 4  # a wide head: 1024 draws for the std estimate
    model = reward_model_from_causal_lm(build_causal_lm(cfg, seed=0), tokenizer=tok, seed=3)
    w = model.score.weight.detach()
    assert w.shape == (1, 1024)
    assert w.std().item() == pytest.approx(1 / math.sqrt(1025), rel=0.1)
    assert abs(w.mean().item()) < 4 / math.sqrt(1025) / math.sqrt(1024)  # 4 standard errors
    assert model.score.bias is None and reward_bias(model) == 0.0
    # The seed fixes the head and nothing else; no global RNG draw.
    torch.manual_seed(123)
    again = reward_model_from_causal_lm(build_causal_lm(cfg, seed=0), tokenizer=tok, seed=3)
    assert torch.equal(again.score.weight, model.score.weight)


def test_pad_equal_to_eos_is_refused(tok):
    class SamePad:
        pad_token_id = eos_token_id = 0

        def __len__(self):
            return len(tok)

    with pytest.raises(ValueError, match="pad_token_id == eos_token_id"):
        reward_model_from_causal_lm(_lm(tok), tokenizer=SamePad())


def test_from_folder_equals_in_memory_and_save_load_round_trip(tok, tmp_path):
    lm = _lm(tok, arch="tiny-llama")
    lm.save_pretrained(tmp_path / "lm")
    a = reward_model_from_causal_lm(lm, tokenizer=tok, seed=1)
    b = reward_model_from_causal_lm(tmp_path / "lm", tokenizer=tok, seed=1)
    assert type(a).__name__ == "LlamaForSequenceClassification"
    for (ka, va), (kb, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert ka == kb and torch.equal(va, vb), ka
    # The LM is untouched and shares no storage with the reward model.
    assert a.model.embed_tokens.weight.data_ptr() != lm.model.embed_tokens.weight.data_ptr()
    # The offset lives in config.json: a plain from_pretrained gives the same rewards.
    set_reward_bias(a, -1.5)
    a.save_pretrained(tmp_path / "rm")
    c = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert reward_bias(c) == -1.5 and c.config.pad_token_id == tok.pad_token_id
    prompts, responses = ["Question 1: why?\n\nAnswer: ", "Q"], ["Because.", "sorted(xs) works fine"]
    assert score_texts(c, tok, prompts, responses) == pytest.approx(score_texts(a, tok, prompts, responses), abs=1e-6)


# -- texts, bias, tokenizer freedom ----------------------------------------------------------------------------
def test_reward_input_ids_truncates_prompt_from_the_left(tok):
    prompt, response = " ".join(["prompt words"] * 50), "a short response"
    ids = reward_input_ids(tok, prompt, response, 32)
    r = tok(response, add_special_tokens=False)["input_ids"]
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) == 32 and ids[-1] == tok.eos_token_id
    assert ids[-1 - len(r) : -1] == r and ids[: 31 - len(r)] == p[-(31 - len(r)) :]
    long = reward_input_ids(tok, prompt, " ".join(["response"] * 100), 32)
    assert len(long) == 32 and long[:8] == p[-8:] and long[-1] == tok.eos_token_id  # prompt keeps 32 // 4


def test_score_texts_batches_in_input_order(rm, tok):
    prompts = ["Question 1: a?\n\nAnswer: ", "Question 2: b?\n\nAnswer: ", "x"]
    responses = ["Use sorted(xs).", "no", "a much longer response about sorting a list of items in python"]
    batched = score_texts(rm, tok, prompts, responses, batch_size=2)
    alone = [score_texts(rm, tok, [p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_normalize_bias_centres_reference_scores(tok):
    model = reward_model_from_causal_lm(_lm(tok), tokenizer=tok, seed=0)
    prompts = [f"Question {i}: how?\n\nAnswer: " for i in range(6)]
    responses = [f"Use sorted(xs) for {i} items." for i in range(6)]
    before = score_texts(model, tok, prompts, responses)
    mean_before = normalize_bias(model, tok, prompts, responses)
    assert mean_before == pytest.approx(sum(before) / 6, abs=1e-6)
    after = score_texts(model, tok, prompts, responses)
    assert abs(sum(after) / 6) < 1e-5
    assert reward_bias(model) == pytest.approx(-mean_before)
    assert [a - b for a, b in zip(after, before)] == pytest.approx([-mean_before] * 6, abs=1e-5)


def test_policy_with_another_tokenizer_is_scored_from_its_text(rm, tok):
    policy_tok = train_bpe_tokenizer([t.upper() + " zzz qqq" for t in TEXTS], vocab_size=300)
    prompts = ["Question 7: how do I sort?\n\nAnswer: ", "Question 8: and a dict?\n\nAnswer: "]
    responses = ["Use sorted(xs) or xs.sort().", "sorted(d.items()) gives pairs — ok"]
    policy_ids = [policy_tok(r, add_special_tokens=False)["input_ids"] for r in responses]
    assert policy_ids[0] != tok(responses[0], add_special_tokens=False)["input_ids"]  # different vocabularies
    decoded = [policy_tok.decode(ids) for ids in policy_ids]  # what a policy hands over: text
    assert decoded == responses
    assert score_texts(rm, tok, prompts, decoded) == score_texts(rm, tok, prompts, responses)


# -- pairs, batches, loss fn ------------------------------------------------------------------------------------
def _rows():
    return [
        {"pair_id": "p1", "prompt": "Question 1: a?\n\nAnswer: ", "chosen": "Use sorted(xs).", "rejected": "no",
         "chosen_score": 3.0, "rejected_score": 1.0, "margin": 2.0, "question_id": "1", "site": "s", "split": "train"},
        {"pair_id": "p2", "prompt": "Question 2: b?\n\nAnswer: ", "chosen": "xs.sort() sorts in place",
         "rejected": "dunno, try google", "chosen_score": None, "rejected_score": None, "margin": None,
         "question_id": "2", "site": "s", "split": "train"},
    ]


def test_pair_examples_and_collate_layout(tok):
    exs = pair_examples(tok, _rows(), 64)
    assert exs[0]["margin"] == 2.0 and exs[1]["margin"] == 0.0 and exs[0]["group"] != exs[1]["group"]
    batch = pair_collate(exs, tok.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 4 and batch["margin"].tolist() == [2.0, 0.0]
    order = [exs[0]["chosen_input_ids"], exs[1]["chosen_input_ids"], exs[0]["rejected_input_ids"],
             exs[1]["rejected_input_ids"]]
    for row, seq in enumerate(order):
        n = len(seq)
        assert ids[row, :n].tolist() == seq and mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == tok.pad_token_id).all() and seq[-1] == tok.eos_token_id


def test_reward_loss_fn_matches_bt_of_scores(rm, tok):
    batch = pair_collate(pair_examples(tok, _rows(), 64), tok.pad_token_id)
    loss, metrics = reward_loss_fn(rm, batch, use_margin=True, centering=0.01)
    r = score_sequences(rm, batch["input_ids"], batch["attention_mask"]).detach()
    expected = bradley_terry_loss(r[:2], r[2:], batch["margin"], 0.01)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6) and loss.requires_grad
    d = r[:2] - r[2:]
    assert metrics["train/margin_mean"].item() == pytest.approx(d.mean().item(), abs=1e-6)
    assert metrics["train/accuracy"].item() == pytest.approx((d > 0).float().mean().item())


def test_question_batches_keep_questions_together_and_are_deterministic():
    sizes = {"q0": 3, "q1": 1, "q2": 4, "q3": 2, "q4": 2, "q5": 9, "q6": 1, "q7": 3}
    groups = [g for g, n in sizes.items() for _ in range(n)]
    batches = question_batches(groups, 4, seed=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(groups)))
    assert all(1 <= len(b) <= 4 for b in batches)
    for g, n in sizes.items():
        holding = [b for b in batches if any(groups[i] == g for i in b)]
        if n <= 4:
            assert len(holding) == 1, g  # never split when it fits
    assert sum(1 for b in batches if any(groups[i] == "q5" for i in b)) == 3  # 9 pairs -> 4 + 4 + 1
    assert question_batches(groups, 4, seed=0) == batches
    assert any(question_batches(groups, 4, seed=s) != batches for s in (1, 2, 3))


def test_binarize_pairs():
    rows = binarize_pairs(_rows()[:1])
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        (GOOD_PREFIX + "Use sorted(xs).", BAD_PREFIX + "Use sorted(xs)."), (BAD_PREFIX + "no", GOOD_PREFIX + "no")]
    assert [r["pair_id"] for r in rows] == ["p1:good", "p1:bad"]
    assert all(r["prompt"] == _rows()[0]["prompt"] and r["margin"] is None and r["binarized"] for r in rows)
    assert len(binarize_pairs(_rows(), keep_original=True)) == 6


# -- metrics -----------------------------------------------------------------------------------------------------
def test_pair_metrics_hand_case():
    l3, l9 = math.log(3.0), math.log(9.0)  # σ(ln 3) = 0.75, σ(ln 9) = 0.9
    r_c, r_r = [0.0, l3, 0.0, l9], [0.0, 0.0, l3, 0.0]  # d = 0 (tie), ln3, -ln3, ln9
    m = pair_metrics(r_c, r_r, [1.0, 2.0, None, 5.0])
    assert m["eval/pairs"] == 4
    assert m["eval/pairwise_accuracy"] == pytest.approx(2.5 / 4)
    lo, hi = wilson_interval(2.5, 4)
    assert (m["eval/accuracy_ci_low"], m["eval/accuracy_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert m["eval/margin_mean"] == pytest.approx(l9 / 4)
    assert (m["eval/accuracy_gap_1"], m["eval/accuracy_gap_2"], m["eval/accuracy_gap_3plus"]) == (0.5, 1.0, 1.0)
    assert (m["eval/pairs_gap_1"], m["eval/pairs_gap_2"], m["eval/pairs_gap_3plus"]) == (1.0, 1.0, 1.0)
    # bins: conf 0.5 (acc 0.5) -> 0; conf 0.75 x2 (acc 0.5) -> 2/4 * 0.25; conf 0.9 (acc 1) -> 1/4 * 0.1
    assert m["eval/ece"] == pytest.approx(0.125 + 0.025)
    assert "eval/accuracy_gap_2" not in pair_metrics([1.0], [0.0], [1.0])
    assert pair_metrics([], [], []) == {"eval/pairs": 0.0}


def test_wilson_interval_reference_values():
    lo, hi = wilson_interval(3, 4)
    assert lo == pytest.approx(0.3006, abs=1e-4) and hi == pytest.approx(0.9544, abs=1e-4)
    lo, hi = wilson_interval(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-4) and hi == pytest.approx(0.9448, abs=1e-4)


def test_evaluate_pairs_uses_scores_and_lists_worst(rm, tok):
    rows = _rows()
    out = evaluate_pairs(rm, tok, rows, batch_size=3, max_length=64, n_worst=1)
    rc = score_texts(rm, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], max_length=64)
    rr = score_texts(rm, tok, [r["prompt"] for r in rows], [r["rejected"] for r in rows], max_length=64)
    expected = pair_metrics(rc, rr, [2.0, None])
    assert {k: v for k, v in out.items() if k.startswith("eval/")} == pytest.approx(expected, abs=1e-6)
    worst = out["worst_pairs"]
    d = [a - b for a, b in zip(rc, rr)]
    assert len(worst) == 1 and worst[0]["pair_id"] == rows[d.index(min(d))]["pair_id"]
    assert worst[0]["reward_diff"] == pytest.approx(min(d), abs=1e-6)


# -- learning -----------------------------------------------------------------------------------------------------
# The planted rule ("mentions the question's key term AND has a ``` block") caps pairwise accuracy at 0.96 on these
# held-out pairs. A code-block-only model gets about 0.79. The key-term half is the hard one: in a third of the pairs
# the rejected answer mentions another made-up term of the same pool in the same slot, so the model must tell
# whether the answer's word *repeats the prompt's* key term -- an in-context match.
#
# Cause. Two things were missing, and the recipe needs both. (1) A copy circuit: pretrained on every sequence the
# reward model reads, the LM rarely learns to copy the key term into the answer's mention slot within 1,000 steps (the
# slot holds the key term in only about half of those answers, a pool distractor or a library name in the rest): its
# argmax at the slot is the key term for 5% of held-out answers that name it (4 heads, seeds 0, 3, 5; 33% for seed 6;
# chance is about 6%). Pretrained only on the sequences whose answer names the key term, it copies it in 81-95%
# (seeds 0-6, 2 or 4 heads). (2) A gradient towards the match: in the real pairs the "real library name vs made-up
# word" shortcut and the code block explain most of the loss, and the match only shows in the TC>-C pairs whose
# distractor is a pool term. The training pairs are therefore augmented with
# synthesized hard negatives, built from the training rows only: each distinct chosen answer that names its key term
# against the same answer with that term swapped for another term of the pool (the training questions' key terms);
# the reward model first trains on those alone (a curriculum), then on real + synthesized pairs.
#
# Measured on a 2-core CPU (held-out accuracy / term half; 61-66 s a seed, 52 s for the old recipe's seed 0): 0.959 /
# 0.981, 0.959 / 0.990, 0.965 / 1.000 for seeds 0-2, and, with another draw of the swapped-in terms, 0.962 / 1.000,
# 0.956 / 0.961, 0.965 / 1.000 for seeds 3-5; with 4 heads of 16 dims instead of 2 of 32, 0.956-0.965 and term half >=
# 0.99 for every seed 0-6. Each part alone falls short: the old recipe 0.860 for seed 0 (0.936 / 0.907 for seeds 1-2 as
# measured before); the synthesized pairs alone 0.945 / 0.924 / 0.948 / 0.810 / 0.848 (seeds 0-4); those + curriculum +
# 4 heads 0.950 / 0.959 / 0.950 / 0.939 / 0.959 / 0.851 / 0.956 (seeds 0-6; seed 5's LM had no copy circuit, 5%); the
# term-only pretraining corpus alone 0.866 / 0.878 / 0.851 (seeds 0, 3, 5: the copy is there but nothing in the pairs
# asks for the match); corpus + synthesized pairs without the curriculum 0.945 / 0.918 / 0.860 (seeds 0, 3, 5).
#
# The mixed run was 600 steps in the figures above; 300 keep the margins (held-out accuracy / code half / term half,
# one seed after another in one process, ~50 s a seed): 0.959 / 1.000 / 1.000, 0.942 / 0.991 / 0.961, 0.956 / 1.000 /
# 0.990 for seeds 0-2, and 0.945 / 1.000 / 0.981, 0.950 / 1.000 / 0.951, 0.933 / 0.991 / 0.942 for seeds 3-5. What the
# time buys is the pretraining: 700 steps instead of 1,000 leave seed 1 without the match (0.822 / 1.000 / 0.524), and
# so do 500 (seeds 0-2: 0.880 / 0.822 / 0.918).
LEARN_PRETRAIN = dict(steps=1000, lr=3e-3)
LEARN_QUESTIONS = 3000
LEARN = dict(vocab_size=2000, max_length=48, steps=300, batch_size=16, lr=3e-3)
LEARN_CURRICULUM_STEPS = 200  # reward steps on the synthesized hard negatives alone, before the mixed run


@pytest.fixture(scope="module")
def synthetic_pairs(tmp_path_factory):
    from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
    from alignflow.tasks.ingest.synthetic import generate_dump

    root = tmp_path_factory.mktemp("reward-synthetic")
    site = generate_dump(root / "dump", questions=LEARN_QUESTIONS, seed=0)
    cfg = IngestConfig()
    result = execute_ingest(plan_ingest([site], root / "work", cfg), cfg)
    rows = pq.read_table(result.datasets["pairs"]["path"]).to_pylist()
    shutil.rmtree(root, ignore_errors=True)
    return rows


def _key_term(row: dict) -> str | None:
    from alignflow.tasks.ingest.synthetic import key_term

    title = row["prompt"].split("\n", 1)[0].removeprefix("Question: ")
    return key_term(title, row["prompt"])


def _mentions(text: str, term: str | None) -> bool:
    return term is not None and re.search(rf"(?<![\w]){re.escape(term)}(?![\w])", text, re.I) is not None


def _features(row: dict, answer: str) -> str:
    return ("T" if _mentions(answer, _key_term(row)) else "-") + ("C" if "```" in answer else "-")


def _swapped_pairs(rows: list[dict], seed: int) -> list[dict]:
    """Synthesized hard negatives from these (training) rows only: every distinct chosen answer that names its key
    term, preferred over the same answer with that term swapped for another key term of the rows' pool."""
    pool = sorted({_key_term(r) for r in rows} - {None})
    rng = random.Random(seed + 12345)  # a stream of its own, apart from the loop's seed
    out, seen = [], set()
    for r in rows:
        term = _key_term(r)
        if (r.get("question_id"), r["chosen"]) in seen or not _mentions(r["chosen"], term):
            continue
        seen.add((r.get("question_id"), r["chosen"]))
        other = rng.choice([t for t in pool if t != term])
        swapped = re.sub(rf"(?<![\w]){re.escape(term)}(?![\w])", other, r["chosen"], flags=re.I)
        out.append({**r, "rejected": swapped, "pair_id": f"{r.get('pair_id')}:swap", "margin": None})
    return out


def _pretrained_lm(tok, rows, seed):
    """The base LM of the recipe: next-token prediction on the sequences the reward model will read whose answer
    names the key term, so that copying the prompt's key term into the answer's mention slot is always right."""
    from alignflow.tasks.train.batching import pad_collate
    from alignflow.tasks.train.lm import causal_lm_loss
    from alignflow.tasks.train.loop import train_loop

    lm = _lm(tok, max_position=LEARN["max_length"], seed=seed)
    seqs = sorted({tuple(reward_input_ids(tok, r["prompt"], r[k], LEARN["max_length"]))
                   for r in rows for k in ("chosen", "rejected") if _mentions(r[k], _key_term(r))})
    docs = [{"input_ids": list(s)} for s in seqs]
    cfg = TrainConfig(max_steps=LEARN_PRETRAIN["steps"], batch_size=LEARN["batch_size"], lr=LEARN_PRETRAIN["lr"],
                      warmup_steps=10, weight_decay=0.0, eval_every=10**6, log_every=10**6, checkpoint_every=10**6,
                      seed=seed)
    train_loop(lm, docs, lambda ex: pad_collate(ex, tok.pad_token_id), causal_lm_loss, cfg,
               lengths=[len(d["input_ids"]) for d in docs])
    return lm


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reward_model_learns_the_planted_rule(synthetic_pairs, seed):
    train = [r for r in synthetic_pairs if r["split"] == "train"]
    held = [r for r in synthetic_pairs if r["split"] in ("validation", "test")]
    assert len(held) >= 150
    tok = train_bpe_tokenizer([r[k] for r in train for k in ("prompt", "chosen", "rejected")],
                              vocab_size=LEARN["vocab_size"], model_max_length=LEARN["max_length"])
    model = reward_model_from_causal_lm(_pretrained_lm(tok, train, seed), tokenizer=tok, seed=seed)
    swapped = _swapped_pairs(train, seed)
    assert len(swapped) >= 1000 and not {r["question_id"] for r in swapped} & {r["question_id"] for r in held}

    def cfg(steps):
        return TrainConfig(max_steps=steps, batch_size=LEARN["batch_size"], lr=LEARN["lr"], warmup_steps=10,
                           weight_decay=0.0, eval_every=10**6, log_every=10**6, checkpoint_every=10**6, seed=seed)

    train_reward(cfg(LEARN_CURRICULUM_STEPS), model, tok, swapped, held[:32], max_length=LEARN["max_length"])
    result = train_reward(cfg(LEARN["steps"]), model, tok, train + swapped, held[:32], max_length=LEARN["max_length"])
    assert result.final_step == LEARN["steps"] and "eval/pairwise_accuracy" in result.last_eval
    metrics = evaluate_pairs(model, tok, held, batch_size=64, max_length=LEARN["max_length"])
    assert metrics["eval/pairwise_accuracy"] >= 0.90, metrics

    # Which half of the rule is learned: code block (vs term-only / neither) and key term (vs code-only).
    rc = score_texts(model, tok, [r["prompt"] for r in held], [r["chosen"] for r in held], batch_size=64,
                     max_length=LEARN["max_length"])
    rr = score_texts(model, tok, [r["prompt"] for r in held], [r["rejected"] for r in held], batch_size=64,
                     max_length=LEARN["max_length"])
    by_kind: dict[str, list[bool]] = {}
    for row, a, b in zip(held, rc, rr):
        kind = _features(row, row["chosen"]) + ">" + _features(row, row["rejected"])
        by_kind.setdefault(kind, []).append(a > b)
    code_half = by_kind.get("TC>T-", []) + by_kind.get("TC>--", [])
    term_half = by_kind.get("TC>-C", [])
    assert len(code_half) >= 100 and len(term_half) >= 50
    assert sum(code_half) / len(code_half) >= 0.97, by_kind
    # the match itself: the shortcut "real library name vs made-up word" alone gets about 0.7 here
    assert sum(term_half) / len(term_half) >= 0.85, by_kind
