"""Causal-LM stages as plain functions: `base` (pretrain or adopt a model) and `sft`.

Both run on the one training loop (``tasks.train.loop``); this module only
turns datasets into token examples, defines the objective and the evaluation,
and saves the result. No MLflow or Prefect here: metrics leave through the
loop's callbacks, which the flows connect to tracking.

Base pretraining does not pack documents into shared sequences: each document
(question or answer text + EOS) is cut into windows of at most
``model.max_length`` tokens and batched with others of similar length, so
attention never crosses documents and little compute goes to padding.
SFT masks the prompt: the loss is on response tokens (and the closing EOS) only.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignflow.config import BaseStageConfig, SftStageConfig, TrainConfig

from .batching import pad_collate
from .loop import LoopCallbacks, LoopResult, train_loop

IGNORE = -100


# -- data ------------------------------------------------------------------------------
def iter_post_texts(posts_path: Path, *, kinds: Sequence[str], split: str, limit: int | None = None) -> Iterator[str]:
    """Texts of one split, streamed from posts.parquet: question texts (title + body) with ``questions``, answer
    bodies with ``answers``, and with ``threads`` each answer after its question's text as one document (so the LM
    sees answers refer back to their question; an answer read before its question has no thread)."""
    import pyarrow.parquet as pq  # here, not at the top: the training core imports without pyarrow

    n = 0
    questions: dict[tuple, str] = {}
    pf = pq.ParquetFile(posts_path)
    columns = ["kind", "title", "body", "split"] + (["site", "question_id"] if "threads" in kinds else [])
    for batch in pf.iter_batches(batch_size=2048, columns=columns):
        cols = batch.to_pydict()
        keys = zip(cols["site"], cols["question_id"]) if "threads" in kinds else itertools.repeat(None)
        for kind, title, body, sp, key in zip(cols["kind"], cols["title"], cols["body"], cols["split"], keys):
            if sp != split:
                continue
            texts = []
            if kind == "question":
                text = f"{title}\n\n{body}".strip()
                if "threads" in kinds:
                    questions[key] = text
                if "questions" in kinds:
                    texts.append(text)
            elif kind == "answer":
                if "answers" in kinds:
                    texts.append(body)
                if "threads" in kinds and key in questions:
                    texts.append(f"{questions[key]}\n\n{body}")
            for text in texts:
                yield text
                n += 1
                if limit is not None and n >= limit:
                    return


def document_examples(tokenizer: Any, texts: Iterable[str], max_length: int) -> list[dict]:
    """Each text + EOS, cut into windows of at most ``max_length`` tokens (no window spans two texts)."""
    eos = tokenizer.eos_token_id
    out: list[dict] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [eos]
        for start in range(0, len(ids), max_length):
            window = ids[start : start + max_length]
            if len(window) >= 2:
                out.append({"input_ids": window})
    return out


def sft_example(tokenizer: Any, prompt: str, response: str, max_length: int) -> dict | None:
    """Token ids of prompt + response + EOS with labels on the response (and EOS) only.

    Over-long examples keep the end of the prompt (at most half the budget) and
    the start of the response; an example with no response token left is dropped.
    """
    p = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) + len(r) > max_length:
        p = p[-min(len(p), max(max_length // 2, max_length - len(r))) :]
        r = r[: max_length - len(p)]
    if not r:
        return None
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r}


def read_demos(demos_path: Path, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(demos_path, columns=["demo_id", "prompt", "response", "question_id", "site", "split"])
    rows = table.to_pylist()
    return [r for r in rows if r["split"] == split]


# -- objective and evaluation ------------------------------------------------------------------
# Model types whose LM head is one linear layer on the body's last hidden state (no logit soft-capping or scaling),
# so that projecting only the labelled positions gives the same loss as the model's own `labels=` path.
PLAIN_HEAD_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})


def _plain_head(model: Any) -> bool:
    from transformers import PreTrainedModel

    config = getattr(model, "config", None)
    return (isinstance(model, PreTrainedModel)  # not DDP / torch.compile wrapped: those must run their own forward
            and getattr(config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
            and not getattr(config, "final_logit_softcapping", None)
            and model.get_output_embeddings() is not None)


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over labelled tokens (labels = -100 are ignored).

    No KV cache is built (``use_cache=False``). For plain-head models (GPT-2,
    Llama, Mistral, Qwen2/3, unwrapped) the body runs once and the LM head is
    applied only at positions whose next token carries a label, which is the
    same loss as the model's ``labels=`` path with less head and softmax work
    (SFT masks the prompt). Other models and wrapped ones (DDP,
    ``torch.compile``) use ``model(..., labels=...)``.
    """
    labels = batch["labels"]
    if not _plain_head(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    use_cache=False)
        return out.loss, {}
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep]), {}


def global_token_mean(loss_fn: Any) -> Any:
    """``loss_fn`` (a mean over a micro-batch's labelled tokens) weighted so that, after DDP averages the
    processes' gradients, a step is the mean over the labelled tokens of the whole global batch, as on one
    process with that batch (unweighted, processes with fewer tokens would count for more)."""
    import torch.distributed as dist

    def weighted(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = loss_fn(model, batch)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return loss, metrics
        local = (batch["labels"][:, 1:] != IGNORE).sum().to(torch.float32)
        total = local.clone()
        dist.all_reduce(total)
        return loss * (local * dist.get_world_size() / total.clamp(min=1.0)), metrics

    return weighted


@torch.no_grad()
def evaluate_lm(model: Any, examples: Sequence[dict], pad_token_id: int, *, batch_size: int,
                max_batches: int) -> dict[str, float]:
    """Token-weighted mean loss and perplexity on labelled tokens."""
    if not examples:
        return {}
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, min(len(examples), batch_size * max_batches), batch_size):
        batch = pad_collate(list(examples[b : b + batch_size]), pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        logp = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
            reduction="sum",
        )
        total += float(logp)
        count += int((labels != IGNORE).sum())
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": float(count)}


@torch.no_grad()
def generate_greedy(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                    max_prompt_tokens: int, sampling: dict[str, Any] | None = None) -> list[str]:
    """Greedy continuations of prompts (left-padded batch, KV cache), cut at the first EOS.

    ``sampling`` (e.g. ``{"do_sample": True, "temperature": 0.7, "top_k": 0}``) samples instead of greedy."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions:  # prompt + answer must fit the position table
        max_prompt_tokens = min(max_prompt_tokens, positions - max_new_tokens)
    if max_prompt_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {positions} positions")
    side, trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"  # keep the prompt's end ("Answer: ")
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_tokens, add_special_tokens=False)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, trunc
    enc = {k: v.to(device) for k, v in enc.items()}
    was_training = model.training
    model.eval()
    out = model.generate(**enc, max_new_tokens=max_new_tokens, **(sampling or {"do_sample": False}),
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if was_training:
        model.train()
    new = out[:, enc["input_ids"].shape[1] :]
    texts = []
    for row in new.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


# -- stages ------------------------------------------------------------------------------
@dataclass
class StageOutput:
    model: Any
    tokenizer: Any
    loop: LoopResult | None
    metrics: dict[str, float] = field(default_factory=dict)
    trained: bool = True


def train_base(cfg: BaseStageConfig, posts_path: Path, *, checkpoint_dir: Path | None, resume: bool,
               callbacks: LoopCallbacks | None = None) -> StageOutput:
    """Pretrain the small default LM on the ingested text (train split), with a tokenizer trained on it."""
    from alignflow.models import build_causal_lm, build_config, train_bpe_tokenizer

    m = cfg.model
    started = time.perf_counter()
    texts = list(iter_post_texts(posts_path, kinds=cfg.text_sources, split="train", limit=cfg.max_documents))
    if not texts:
        raise ValueError(f"{posts_path}: no train-split text to pretrain on")
    tokenizer = train_bpe_tokenizer(texts, vocab_size=m.vocab_size, model_max_length=m.max_length)
    config = build_config(m.arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                          max_position=m.max_length)
    model = build_causal_lm(config, seed=cfg.train.seed)
    train = document_examples(tokenizer, texts, m.max_length)
    valid = document_examples(
        tokenizer, iter_post_texts(posts_path, kinds=cfg.text_sources, split="validation", limit=2000), m.max_length
    )
    for ex in train:
        ex["labels"] = ex["input_ids"]
    for ex in valid:
        ex["labels"] = ex["input_ids"]
    metrics = {"data/documents": float(len(texts)), "data/train_sequences": float(len(train)),
               "data/eval_sequences": float(len(valid)), "data/vocab_size": float(len(tokenizer)),
               "perf/tokenizer_s": time.perf_counter() - started}
    result = _run_loop(model, tokenizer, train, valid, cfg.train, checkpoint_dir, resume, callbacks)
    return StageOutput(model, tokenizer, result, metrics)


def train_sft(cfg: SftStageConfig, model: Any, tokenizer: Any, demos_path: Path, *, checkpoint_dir: Path | None,
              resume: bool, callbacks: LoopCallbacks | None = None) -> StageOutput:
    """Fine-tune on demos (train split), loss on response tokens only; evaluate on the validation split."""
    m = cfg.model
    train = [e for r in read_demos(demos_path, "train")
             if (e := sft_example(tokenizer, r["prompt"], r["response"], m.max_length)) is not None]
    valid = [e for r in read_demos(demos_path, "validation")
             if (e := sft_example(tokenizer, r["prompt"], r["response"], m.max_length)) is not None]
    if not train:
        raise ValueError(f"{demos_path}: no train-split demonstrations")
    metrics = {"data/train_examples": float(len(train)), "data/eval_examples": float(len(valid))}
    result = _run_loop(model, tokenizer, train, valid, cfg.train, checkpoint_dir, resume, callbacks)
    return StageOutput(model, tokenizer, result, metrics)


def _run_loop(model: Any, tokenizer: Any, train: list[dict], valid: list[dict], tcfg: TrainConfig,
              checkpoint_dir: Path | None, resume: bool, callbacks: LoopCallbacks | None) -> LoopResult:
    pad = tokenizer.pad_token_id
    user_eval = callbacks.on_eval if callbacks else None

    def on_eval(step: int) -> dict[str, float]:
        metrics = evaluate_lm(model, valid, pad, batch_size=tcfg.batch_size, max_batches=tcfg.eval_batches)
        if user_eval is not None:
            metrics.update(user_eval(step) or {})
        return metrics

    cbs = LoopCallbacks(
        on_log=callbacks.on_log if callbacks else None,
        on_eval=on_eval,
        on_checkpoint=callbacks.on_checkpoint if callbacks else None,
        on_step=callbacks.on_step if callbacks else None,
    )
    return train_loop(
        model, train, lambda examples: pad_collate(examples, pad), global_token_mean(causal_lm_loss), tcfg,
        lengths=[len(e["input_ids"]) for e in train], checkpoint_dir=checkpoint_dir, resume=resume, callbacks=cbs,
    )
