"""Reward-model stage as plain functions: pair examples, Bradley-Terry loss, question batches, evaluation.

No MLflow or Prefect here: the stage runs on the one training loop
(``tasks.train.loop``) and its metrics leave through the loop's callbacks.

Objective
    ``-log σ(r_chosen - r_rejected [- margin])`` averaged over pairs, plus an
    optional centring term ``c · mean((r_chosen + r_rejected)²)`` (N+).
    Rewards are read at the EOS ending ``prompt + response``
    (:func:`alignflow.models.reward.score_sequences`).

Batches keep questions together (InstructGPT: the comparisons of one prompt
form one batch element; shuffling correlated pairs into different batches
overfits). :func:`question_batches` packs the pairs of whole questions into
batches of at most ``cfg.batch_size`` *pairs*, splitting a question only when it
alone has more pairs than that. Each packed batch is ONE element of the
loop's dataset and the loop runs with one element per micro-batch, so
``TrainConfig.batch_size`` means "pairs per micro-batch" for this stage. The
packing is drawn once from ``cfg.seed``; the loop shuffles the order of the
packed batches every epoch.

A batch is one right-padded tensor ``[2B, T]``: the B chosen sequences first,
then the B rejected ones in the same order (one forward pass for both).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from alignflow.config import TrainConfig
from alignflow.models.reward import (
    disable_dropout,
    reward_bias,
    reward_input_ids,
    score_sequences_in_length_chunks,
    score_texts,
    set_reward_bias,
)

from .loop import LoopCallbacks, LoopResult, train_loop

__all__ = [
    "BAD_PREFIX",
    "GOOD_PREFIX",
    "binarize_pairs",
    "bradley_terry_loss",
    "evaluate_pairs",
    "normalize_bias",
    "pair_collate",
    "pair_examples",
    "pair_metrics",
    "question_batches",
    "question_key",
    "reward_loss_fn",
    "train_reward",
    "wilson_interval",
]

GOOD_PREFIX = "GOOD: "
BAD_PREFIX = "BAD: "
WILSON_Z = 1.959963984540054  # two-sided 95%
ECE_BINS = 10
WORST_TEXT_CHARS = 500


# -- loss -----------------------------------------------------------------------------------
def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None, centering: float = 0.0,
    weight: Tensor | None = None,
) -> Tensor:
    """``mean(-log σ(r_c - r_r - m)) + centering · mean((r_c + r_r)²)`` (0-d tensor).

    With ``weight`` the first mean is weighted (``Σ w·l / Σ w``): pairs of a K-response human ranking carry
    1/C(K,2) each, so every ranking counts once (InstructGPT)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    if weight is not None:
        w = weight.to(diff.dtype)
        loss = -(w * F.logsigmoid(diff)).sum() / w.sum().clamp_min(1e-12)
    else:
        loss = -F.logsigmoid(diff).mean()
    if centering:
        loss = loss + centering * (r_chosen + r_rejected).pow(2).mean()
    return loss


# -- data -----------------------------------------------------------------------------------
def question_key(row: dict) -> str:
    """The group a pair belongs to: its question (site and question id)."""
    return f"{row.get('site') or ''}\x1f{row.get('question_id') or row.get('prompt', '')}"


def binarize_pairs(rows: Iterable[dict], *, keep_original: bool = False) -> list[dict]:
    """The PMP paper's binarised comparisons (Askell et al. 2021, §4.1).

    Each ranked pair A > B (``chosen`` A, ``rejected`` B) gives two pairs over
    the same prompt, whose responses carry a label prefix:

    * ``GOOD: A`` preferred over ``BAD: A`` (the better answer is "good"), and
    * ``BAD: B`` preferred over ``GOOD: B`` (the worse answer is "bad"),

    with ``GOOD_PREFIX = "GOOD: "`` and ``BAD_PREFIX = "BAD: "`` prepended to the
    response text. Other fields are copied, except ``pair_id`` (suffixed
    ``:good`` / ``:bad``), ``margin``, ``chosen_score`` and ``rejected_score``
    (None: the binarised pairs have no vote gap), ``rejected_id`` (the same
    answer as ``chosen_id``) and ``binarized`` (True). With ``keep_original`` the
    original pair comes first, then its two binarised pairs.
    """
    out: list[dict] = []
    for row in rows:
        if keep_original:
            out.append(dict(row))
        base = {**row, "margin": None, "chosen_score": None, "rejected_score": None, "binarized": True}
        pid = row.get("pair_id")
        a, b = row["chosen"], row["rejected"]
        out.append({**base, "pair_id": f"{pid}:good" if pid is not None else None,
                    "chosen": GOOD_PREFIX + a, "rejected": BAD_PREFIX + a,
                    "chosen_id": row.get("chosen_id"), "rejected_id": row.get("chosen_id")})
        out.append({**base, "pair_id": f"{pid}:bad" if pid is not None else None,
                    "chosen": BAD_PREFIX + b, "rejected": GOOD_PREFIX + b,
                    "chosen_id": row.get("rejected_id"), "rejected_id": row.get("rejected_id")})
    return out


def pair_examples(tokenizer: Any, rows: Iterable[dict], max_length: int) -> list[dict]:
    """One token example per pair row: ``chosen_input_ids``, ``rejected_input_ids`` (prompt + response + EOS,
    see :func:`~alignflow.models.reward.reward_input_ids`), ``margin`` (float; 0.0 when null) and ``group``
    (:func:`question_key`)."""
    out = []
    for row in rows:
        margin = row.get("margin")
        out.append({
            "chosen_input_ids": reward_input_ids(tokenizer, row["prompt"], row["chosen"], max_length),
            "rejected_input_ids": reward_input_ids(tokenizer, row["prompt"], row["rejected"], max_length),
            "margin": float(margin) if margin is not None and math.isfinite(float(margin)) else 0.0,
            "group": question_key(row),
            "weight": _pair_weight(row.get("weight")),
        })
    return out


def _pair_weight(value: Any) -> float:
    """A pair's loss weight: the row's ``weight`` (human pairs) when positive and finite, else 1."""
    try:
        w = float(value)
    except (TypeError, ValueError):
        return 1.0
    return w if math.isfinite(w) and w > 0 else 1.0


def pair_collate(examples: Sequence[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-pad B pair examples into one batch: ``input_ids`` and ``attention_mask`` [2B, T] with the B chosen
    sequences first and the B rejected ones after, in the same order; ``margin`` [B] (float32)."""
    if not examples:
        raise ValueError("pair_collate got no examples")
    seqs = [ex["chosen_input_ids"] for ex in examples] + [ex["rejected_input_ids"] for ex in examples]
    width = max(max(len(s) for s in seqs), 1)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if not s:
            raise ValueError(f"pair example {row % len(examples)} has an empty sequence")
        input_ids[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[row, : len(s)] = 1
    margin = torch.tensor([float(ex.get("margin") or 0.0) for ex in examples], dtype=torch.float32)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin}
    if any(ex.get("weight", 1.0) != 1.0 for ex in examples):
        out["weight"] = torch.tensor([float(ex.get("weight", 1.0)) for ex in examples], dtype=torch.float32)
    return out


def question_batches(groups: Sequence[str], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of pair indices (at most ``batch_size`` each) that keep the pairs of one question together.

    ``groups[i]`` is the question of pair ``i``. Questions are taken in a
    seeded random order (``random.Random(seed)``; nothing global is read) and
    each goes, whole, into the first batch that still has room for it (first
    fit; a new batch when none has). A question with more than ``batch_size``
    pairs is cut into chunks of ``batch_size`` (in pair order), each placed like
    a question of its own. Every index appears exactly once; within a batch,
    indices keep question order and pair order. The result depends only on
    (groups, batch_size, seed).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    keys = sorted(by_group)
    random.Random(seed).shuffle(keys)
    batches: list[list[int]] = []
    open_batches: list[int] = []  # indices of batches with room left
    for key in keys:
        idx = by_group[key]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            for pos, b in enumerate(open_batches):
                if len(batches[b]) + len(chunk) <= batch_size:
                    batches[b].extend(chunk)
                    if len(batches[b]) == batch_size:
                        open_batches.pop(pos)
                    break
            else:
                batches.append(list(chunk))
                if len(chunk) < batch_size:
                    open_batches.append(len(batches) - 1)
    return batches


def _element_collate(elements: Sequence[dict], pad_id: int) -> dict[str, Tensor]:
    return pair_collate([ex for el in elements for ex in el["pairs"]], pad_id)


# -- objective ------------------------------------------------------------------------------
def reward_loss_fn(
    model: Any, batch: dict[str, Tensor], *, use_margin: bool = False, centering: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry loss of a :func:`pair_collate` batch, with ``train/accuracy`` (ties count 1/2) and
    ``train/margin_mean`` (mean r_c - r_r) as detached 0-d tensors (the loop reads them at log steps).
    On the CPU the rows are scored in two length-sorted chunks when that saves padding
    (:func:`~alignflow.models.reward.score_sequences_in_length_chunks`)."""
    rewards = score_sequences_in_length_chunks(model, batch["input_ids"], batch["attention_mask"])
    n = rewards.shape[0] // 2
    r_c, r_r = rewards[:n], rewards[n:]
    margin = batch.get("margin") if use_margin else None
    loss = bradley_terry_loss(r_c, r_r, margin, centering, batch.get("weight"))
    with torch.no_grad():
        diff = r_c - r_r
        accuracy = (diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()
        metrics = {"train/accuracy": accuracy, "train/margin_mean": diff.mean()}
    return loss, metrics


# -- evaluation -----------------------------------------------------------------------------
def wilson_interval(successes: float, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval of a proportion (``successes`` may be fractional: ties count 1/2)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1.0 - p) / n + z * z / (4 * n * n), 0.0))
    # min/max with p: at 0 or n successes the end equals p, which float rounding can put on the wrong side
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def _gap_bucket(gap: float) -> str:
    if gap < 1.5:
        return "1"
    if gap < 2.5:
        return "2"
    return "3plus"


def pair_metrics(
    r_chosen: Sequence[float], r_rejected: Sequence[float], gaps: Sequence[float | None] | None = None
) -> dict[str, float]:
    """Metrics of held-out pairs from their rewards (pure; what :func:`evaluate_pairs` reports).

    * ``eval/pairs``: number of pairs; nothing else when 0.
    * ``eval/pairwise_accuracy``: fraction with r_c > r_r (a tie counts 1/2), and
      its Wilson 95% interval ``eval/accuracy_ci_low`` / ``eval/accuracy_ci_high``.
    * ``eval/accuracy_gap_1``, ``_2``, ``_3plus`` (and ``eval/pairs_gap_*``):
      accuracy by vote-score gap ``chosen_score - rejected_score`` (< 1.5, [1.5, 2.5),
      >= 2.5; pm scores are integers, so 1, 2, 3+); pairs with a null gap are
      skipped; an empty bucket gives no key.
    * ``eval/margin_mean``: mean of r_c - r_r.
    * ``eval/ece``: expected calibration error of p = σ(r_c - r_r), the model's
      probability that the chosen answer is preferred. Standard binary ECE
      (Guo et al. 2017): confidence max(p, 1 - p), correct when p > 0.5 (1/2 at
      p = 0.5), ten equal-width bins on [0, 1] (bin = min(floor(10·conf), 9)),
      ECE = Σ_bins (n_bin / n)·|accuracy_bin - mean confidence_bin|. This equals
      binning p itself with every pair counted in both orders.
    """
    if len(r_chosen) != len(r_rejected):
        raise ValueError(f"{len(r_chosen)} chosen rewards for {len(r_rejected)} rejected")
    n = len(r_chosen)
    out: dict[str, float] = {"eval/pairs": float(n)}
    if n == 0:
        return out
    diffs = [float(c) - float(r) for c, r in zip(r_chosen, r_rejected)]
    correct = [1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs]
    hits = sum(correct)
    out["eval/pairwise_accuracy"] = hits / n
    out["eval/accuracy_ci_low"], out["eval/accuracy_ci_high"] = wilson_interval(hits, n)
    out["eval/margin_mean"] = sum(diffs) / n
    if gaps is not None:
        if len(gaps) != n:
            raise ValueError(f"{len(gaps)} gaps for {n} pairs")
        buckets: dict[str, list[float]] = {}
        for gap, ok in zip(gaps, correct):
            if gap is None or (isinstance(gap, float) and math.isnan(gap)):
                continue
            buckets.setdefault(_gap_bucket(float(gap)), []).append(ok)
        for name in ("1", "2", "3plus"):
            if name in buckets:
                out[f"eval/accuracy_gap_{name}"] = sum(buckets[name]) / len(buckets[name])
                out[f"eval/pairs_gap_{name}"] = float(len(buckets[name]))
    bins_n = [0] * ECE_BINS
    bins_conf = [0.0] * ECE_BINS
    bins_acc = [0.0] * ECE_BINS
    for d, ok in zip(diffs, correct):
        p = 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))
        conf = max(p, 1.0 - p)
        b = min(int(conf * ECE_BINS), ECE_BINS - 1)
        bins_n[b] += 1
        bins_conf[b] += conf
        bins_acc[b] += ok
    out["eval/ece"] = sum(abs(bins_acc[b] - bins_conf[b]) / n for b in range(ECE_BINS) if bins_n[b])
    return out


def _trim(text: Any, limit: int = WORST_TEXT_CHARS) -> Any:
    if isinstance(text, str) and len(text) > limit:
        return text[: limit - 1] + "…"
    return text


def _gap(row: dict) -> float | None:
    c, r = row.get("chosen_score"), row.get("rejected_score")
    if c is None or r is None:
        return None
    gap = float(c) - float(r)
    return None if math.isnan(gap) else gap


@torch.no_grad()
def evaluate_pairs(
    model: Any, tokenizer: Any, rows: Sequence[dict], *, batch_size: int = 8, max_length: int = 512,
    n_worst: int = 10,
) -> dict[str, Any]:
    """Score held-out pair rows with the reward model and its own tokenizer; :func:`pair_metrics` of the result.

    Returns the float metrics of :func:`pair_metrics` (keys ``eval/...``) and
    ``worst_pairs``: the ``n_worst`` pairs with the lowest r_c - r_r (most
    confidently mis-ranked first), as dicts with ``pair_id``, ``site``,
    ``question_id``, ``r_chosen``, ``r_rejected``, ``reward_diff``, ``gap``,
    ``prompt``, ``chosen``, ``rejected`` (texts cut at 500 characters) for a
    table, and ``r_chosen`` / ``r_rejected``: every pair's rewards in row order. Take
    ``{k: v for k, v in out.items() if k.startswith("eval/")}`` as metrics.
    """
    rows = list(rows)
    if not rows:
        return {**pair_metrics([], []), "worst_pairs": [], "r_chosen": [], "r_rejected": []}
    prompts = [r["prompt"] for r in rows]
    scores = score_texts(model, tokenizer, prompts + prompts, [r["chosen"] for r in rows] +
                         [r["rejected"] for r in rows], batch_size=batch_size, max_length=max_length)
    n = len(rows)
    r_c, r_r = scores[:n], scores[n:]
    gaps = [_gap(r) for r in rows]
    out: dict[str, Any] = pair_metrics(r_c, r_r, gaps)
    out["r_chosen"], out["r_rejected"] = list(r_c), list(r_r)
    order = sorted(range(n), key=lambda i: (r_c[i] - r_r[i], i))[: max(n_worst, 0)]
    out["worst_pairs"] = [
        {"pair_id": rows[i].get("pair_id"), "site": rows[i].get("site"), "question_id": rows[i].get("question_id"),
         "r_chosen": r_c[i], "r_rejected": r_r[i], "reward_diff": r_c[i] - r_r[i], "gap": gaps[i],
         "prompt": _trim(rows[i]["prompt"]), "chosen": _trim(rows[i]["chosen"]),
         "rejected": _trim(rows[i]["rejected"])}
        for i in order
    ]
    return out


@torch.no_grad()
def normalize_bias(
    model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 8,
    max_length: int = 512,
) -> float:
    """Set the reward offset so that these reference (SFT / demo) responses score 0 on average
    (InstructGPT, N+). Returns their mean score before the change."""
    if not prompts:
        raise ValueError("normalize_bias needs at least one reference response")
    scores = score_texts(model, tokenizer, prompts, responses, batch_size=batch_size, max_length=max_length)
    before = math.fsum(scores) / len(scores)
    set_reward_bias(model, reward_bias(model) - before)
    return before


# -- stage ----------------------------------------------------------------------------------
def train_reward(
    cfg_train: TrainConfig,
    model: Any,
    tokenizer: Any,
    rows_train: Sequence[dict],
    rows_eval: Sequence[dict],
    *,
    max_length: int,
    use_margin: bool = False,
    centering: float = 0.0,
    group_by_question: bool = True,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    callbacks: LoopCallbacks | None = None,
) -> LoopResult:
    """Train a reward model (from :func:`~alignflow.models.reward.reward_model_from_causal_lm`) on pair rows.

    ``cfg_train.batch_size`` is the number of *pairs* per micro-batch: pairs
    are packed by :func:`question_batches` (seed ``cfg_train.seed``), one packed
    batch per loop element (``group_by_question=False``: every pair is its own
    group, so batches mix questions freely). Evaluation (every ``eval_every`` steps and at the
    end): :func:`evaluate_pairs` on the first ``eval_batches × batch_size`` rows
    of ``rows_eval``; the ``eval/...`` floats are returned to the loop (the
    worst-pairs table is not: call :func:`evaluate_pairs` for it). A user
    ``on_eval`` callback's metrics are merged in.
    """
    examples = pair_examples(tokenizer, rows_train, max_length)
    if not examples:
        raise ValueError("no training pairs")
    disable_dropout(model)  # a reward model's score must not be noise (a loaded model may have dropout on)
    groups = [e["group"] for e in examples] if group_by_question else [str(i) for i in range(len(examples))]
    batches = question_batches(groups, cfg_train.batch_size, cfg_train.seed)
    dataset = [{"pairs": [examples[i] for i in b]} for b in batches]
    lengths = [max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in el["pairs"])
               for el in dataset]
    loop_cfg = cfg_train.model_copy(update={"batch_size": 1})
    eval_rows = list(rows_eval)[: cfg_train.eval_batches * cfg_train.batch_size]
    pad = tokenizer.pad_token_id
    user_eval = callbacks.on_eval if callbacks else None

    def on_eval(step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if eval_rows:
            res = evaluate_pairs(model, tokenizer, eval_rows, batch_size=cfg_train.batch_size,
                                 max_length=max_length, n_worst=0)
            metrics = {k: float(v) for k, v in res.items() if k.startswith("eval/")}
        if user_eval is not None:
            metrics.update(user_eval(step) or {})
        return metrics

    cbs = replace(callbacks, on_eval=on_eval) if callbacks is not None else LoopCallbacks(on_eval=on_eval)
    return train_loop(
        model, dataset, partial(_element_collate, pad_id=pad),
        partial(reward_loss_fn, use_margin=use_margin, centering=centering), loop_cfg,
        lengths=lengths, checkpoint_dir=checkpoint_dir, resume=resume, callbacks=cbs,
        checkpoint_extra={"stage": "reward", "pairs": len(examples), "packed_batches": len(dataset)},
    )
