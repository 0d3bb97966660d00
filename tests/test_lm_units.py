"""Pure pieces of the causal-LM stages: masking, windows, evaluation, batched greedy generation."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.models import build_causal_lm, build_config, train_bpe_tokenizer
from alignflow.tasks.train.lm import IGNORE, document_examples, evaluate_lm, generate_greedy, sft_example

TEXTS = [f"Question {i}: how do I sort a list of {i} items in python? Use sorted(xs) or xs.sort()." for i in range(200)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=400, model_max_length=128)


@pytest.fixture(scope="module")
def model(tok):
    cfg = build_config("tiny-gpt2", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id, max_position=128)
    return build_causal_lm(cfg, seed=0).eval()


def test_sft_example_masks_the_prompt_and_ends_with_eos(tok):
    ex = sft_example(tok, "Question: why?\n\nAnswer: ", "Because sorted(xs) works.", 128)
    p = tok("Question: why?\n\nAnswer: ", add_special_tokens=False)["input_ids"]
    assert ex["labels"][: len(p)] == [IGNORE] * len(p)
    assert ex["labels"][len(p):] == ex["input_ids"][len(p):]
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id


def test_sft_example_truncation_keeps_prompt_end_and_response_start(tok):
    prompt = " ".join(["long prompt words"] * 80)
    response = " ".join(["response words"] * 80)
    ex = sft_example(tok, prompt, response, 64)
    assert len(ex["input_ids"]) == 64
    n_prompt = sum(1 for x in ex["labels"] if x == IGNORE)
    assert 0 < n_prompt <= 32
    r = tok(response, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][n_prompt:] == r[: 64 - n_prompt]


def test_document_windows_never_span_two_documents(tok):
    docs = ["a " * 300, "short doc"]
    exs = document_examples(tok, docs, 50)
    assert all(2 <= len(e["input_ids"]) <= 50 for e in exs)
    ends = [e for e in exs if e["input_ids"][-1] == tok.eos_token_id]
    assert len(ends) == 2  # one EOS per document, at its end
    assert sum(len(e["input_ids"]) for e in exs) == sum(
        len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)


def test_evaluate_lm_is_token_weighted(model, tok):
    exs = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}, {"input_ids": [9, 10], "labels": [IGNORE, 10]}]
    m = evaluate_lm(model, exs, tok.pad_token_id, batch_size=2, max_batches=1)
    # reference: sum of per-token CE over predicted labelled tokens, one example at a time
    total, count = 0.0, 0
    for e in exs:
        ids = torch.tensor([e["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        labels = torch.tensor(e["labels"][1:])
        keep = labels != IGNORE
        total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    assert m["eval/tokens"] == count == 4
    assert m["eval/loss"] == pytest.approx(total / count, rel=1e-5)
    assert m["eval/perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_batched_greedy_equals_one_at_a_time(model, tok):
    prompts = ["Question 3: how", "Question 12: how do I sort a list"]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=8, max_prompt_tokens=64)
    single = [generate_greedy(model, tok, [p], max_new_tokens=8, max_prompt_tokens=64)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # restored after left-padded generation


def test_post_texts_questions_answers_and_threads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignflow.tasks.train.lm import iter_post_texts

    rows = {"kind": ["question", "answer", "answer", "question", "answer"],
            "title": ["T1", "T1", "T1", "T2", "T2"], "body": ["Q1", "A1", "A2", "Q2", "A3"],
            "split": ["train", "train", "train", "validation", "validation"],
            "site": ["s"] * 5, "question_id": [1, 1, 1, 2, 2]}
    path = tmp_path / "posts.parquet"
    pq.write_table(pa.table(rows), path)
    assert list(iter_post_texts(path, kinds=["questions", "answers"], split="train")) == ["T1\n\nQ1", "A1", "A2"]
    assert list(iter_post_texts(path, kinds=["threads"], split="train")) == ["T1\n\nQ1\n\nA1", "T1\n\nQ1\n\nA2"]
    assert list(iter_post_texts(path, kinds=["answers", "threads"], split="validation", limit=2)) == [
        "A3", "T2\n\nQ2\n\nA3"]
