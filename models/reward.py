"""Reward (preference) models: a causal LM's transformer with a scalar score head.

A reward model here is a plain Hugging Face ``AutoModelForSequenceClassification``
with ``num_labels=1`` (``GPT2ForSequenceClassification``,
``LlamaForSequenceClassification``, ...), built on a base LM's weights by
:func:`reward_model_from_causal_lm`:

* **Score position.** The reward of ``prompt + response + EOS`` is the head's
  output at the last real token (the EOS), for right-padded batches. The pad
  token must differ from EOS (checked), so padding is never mistaken for a
  real end of sequence.
* **Head init.** ``score.weight ~ N(0, std = 1/sqrt(d_model + 1))`` (InstructGPT,
  OAI19 / N+); with ``seed`` the draw is reproducible and leaves the global
  RNG alone.
* **Dropout off.** Every ``*dropout*`` / ``*pdrop*`` config attribute is 0 and
  every ``nn.Dropout`` has ``p = 0``: a text gets the same score in train and
  eval mode.
* **Score offset (bias): in the config, not in the weights.** Hugging Face's
  decoder score heads are ``nn.Linear(d, num_labels, bias=False)``, and
  ``from_pretrained`` builds them that way: a ``score.bias`` tensor in the
  weights would be dropped (with only a warning) by a plain
  ``AutoModelForSequenceClassification.from_pretrained``. So the offset lives
  in ``config.reward_bias`` (a float, default 0.0), which ``config.json``
  carries through ``save_pretrained`` / ``from_pretrained`` untouched. The
  reward is ``logits + config.reward_bias``: :func:`score_sequences` and
  :func:`score_texts` add it; a caller that uses HF's ``logits`` directly must
  add it too (:func:`reward_bias`). It is a settable offset, not a trained
  parameter (the Bradley-Terry loss does not depend on it); it is set after
  training so that reference responses score 0 on average (``normalize_bias``
  in ``tasks.train.reward``).

Text in, score out: :func:`score_texts` tokenizes prompt and response with the
reward model's *own* tokenizer, so a policy with any tokenizer can be scored
from its decoded text. :func:`reward_input_ids` is the one encoding used for
training and scoring.

Imports nothing else from alignflow (architecture rule).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from .loading import ModelLoadError

__all__ = [
    "head_init_std",
    "last_token_index",
    "reward_bias",
    "reward_input_ids",
    "reward_model_from_causal_lm",
    "score_sequences",
    "score_sequences_in_length_chunks",
    "score_texts",
    "set_reward_bias",
]

REWARD_BIAS_ATTR = "reward_bias"


# --------------------------------------------------------------------------- building


def head_init_std(d_model: int) -> float:
    """Standard deviation of the reward head's initial weights: ``1 / sqrt(d_model + 1)``."""
    return 1.0 / math.sqrt(d_model + 1)


def _no_dropout(config: PretrainedConfig) -> None:
    """Set every numeric ``*dropout*`` / ``*pdrop*`` attribute of ``config`` (and its sub-configs) to 0."""
    for key, value in list(config.to_dict().items()):
        lowered = key.lower()
        if ("dropout" in lowered or "pdrop" in lowered) and isinstance(value, (int, float)) and not isinstance(
            value, bool
        ):
            setattr(config, key, 0.0)
    for sub_name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, sub_name, None)
        if isinstance(sub, PretrainedConfig):
            _no_dropout(sub)


def disable_dropout(model: nn.Module) -> None:
    """Every dropout of ``model`` to 0 (its config and its modules): scores, ratios and values must not be noise."""
    config = getattr(model, "config", None)
    if isinstance(config, PretrainedConfig):
        _no_dropout(config)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):  # functional dropout rates kept on attention modules
            value = getattr(module, attr, None)
            if isinstance(value, float) and value != 0.0:
                setattr(module, attr, 0.0)


def _score_head(model: nn.Module) -> nn.Linear:
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has no linear `score` head; reward models here are decoder "
            "*ForSequenceClassification models (GPT-2, Llama, ...)"
        )
    return head


def _hidden_size(config: PretrainedConfig) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def _check_tokenizer(tokenizer: Any) -> None:
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; a reward model needs one distinct from EOS")
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; the reward is read at the EOS that ends each text")
    if pad == eos:
        raise ValueError(
            f"pad_token_id == eos_token_id ({pad}): the reward is read at the last real token (EOS), so padding "
            "needs its own id (models.load_tokenizer adds <|pad|>)"
        )


def reward_model_from_causal_lm(
    lm_or_path: PreTrainedModel | str | os.PathLike,
    *,
    tokenizer: Any,
    seed: int | None = None,
) -> PreTrainedModel:
    """A scalar reward model (``AutoModelForSequenceClassification``, ``num_labels=1``) on a base LM's weights.

    ``lm_or_path``: a causal LM in memory (its transformer weights are copied;
    the LM itself is not changed and shares nothing with the result) or a
    folder written by ``save_pretrained`` (``from_pretrained(path,
    num_labels=1)``; the LM head is dropped). ``tokenizer``: the reward
    model's tokenizer; its pad id becomes ``config.pad_token_id`` and must
    differ from its EOS id (``ValueError`` otherwise); the embeddings grow to
    ``len(tokenizer)`` if needed. ``seed``: makes the head init reproducible
    without touching the global RNG (None: drawn from the global RNG).

    The result has dropout off, head weights ``N(0, 1/sqrt(d_model + 1))``,
    ``config.reward_bias = 0.0``, the LM's dtype and device, and is in eval mode.
    """
    _check_tokenizer(tokenizer)
    if isinstance(lm_or_path, PreTrainedModel):
        lm = lm_or_path
        config = copy.deepcopy(lm.config)
        config.num_labels = 1
        config.architectures = None
        _no_dropout(config)
        model = AutoModelForSequenceClassification.from_config(config)
        missing, unexpected = model.base_model.load_state_dict(lm.base_model.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{type(lm).__name__}'s transformer does not fit {type(model).__name__}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        param = next(lm.parameters())
        model.to(device=param.device, dtype=param.dtype)
    else:
        path = os.fspath(lm_or_path)
        if not os.path.isdir(path):
            raise ModelLoadError(f"no such model folder: {path!r} (pass a folder written by save_pretrained)")
        try:
            config = AutoConfig.from_pretrained(path)
            config.num_labels = 1
            _no_dropout(config)
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load a reward model from {path!r}: {err}") from err

    n_tok = len(tokenizer)
    if n_tok > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(n_tok)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    setattr(model.config, REWARD_BIAS_ATTR, 0.0)
    disable_dropout(model)

    head = _score_head(model)
    std = head_init_std(_hidden_size(model.config))
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    with torch.no_grad():
        weight = torch.randn(head.weight.shape, generator=gen, dtype=torch.float32) * std
        head.weight.copy_(weight.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()
    return model.eval()


# --------------------------------------------------------------------------- bias


def _unwrap(model: nn.Module) -> nn.Module:
    """The PreTrainedModel under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    for _ in range(4):
        if isinstance(model, PreTrainedModel):
            return model
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def reward_bias(model: nn.Module) -> float:
    """The score offset ``config.reward_bias`` (0.0 when absent): reward = HF ``logits`` + this."""
    return float(getattr(_unwrap(model).config, REWARD_BIAS_ATTR, 0.0) or 0.0)


def set_reward_bias(model: nn.Module, value: float) -> None:
    """Set the score offset (saved in ``config.json`` by ``save_pretrained``)."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"reward bias must be finite, got {value}")
    setattr(_unwrap(model).config, REWARD_BIAS_ATTR, value)


# --------------------------------------------------------------------------- scoring


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token (mask 1) of each row, as a LongTensor [batch].

    Read from the mask, never from token values: right for right padding,
    for a row with no padding at all, and for left padding too. A row with
    no real token gives 0.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.ne(0)).argmax(dim=-1)


def score_sequences(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Reward of each row of a (right-)padded batch: the score head at :func:`last_token_index`, plus the bias.

    Returns a float32 tensor [batch] (with grad when enabled). The model is
    called as a whole (``model(input_ids, attention_mask)``), so DDP,
    accelerate's autocast and torch.compile wrappers all apply. Hugging Face
    pools the per-token scores at the rightmost token whose id is not the pad
    id; every position after the last real token is set to the pad id first,
    so that is exactly :func:`last_token_index` -- provided the last real
    token is not itself the pad token, which holds for every sequence ending
    in EOS (pad != EOS is enforced). tests/test_reward.py checks the result
    against the transformer's hidden state at that index times the head.
    """
    core = _unwrap(model)
    pad = core.config.pad_token_id
    if pad is None:
        raise ValueError("config.pad_token_id is not set; build the model with reward_model_from_causal_lm")
    idx = last_token_index(attention_mask)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    after = positions.unsqueeze(0) > idx.unsqueeze(1)
    ids = input_ids.masked_fill(after, pad)
    # No KV cache: a decoder's config defaults to use_cache=True, which builds one in every forward (training too).
    no_cache = {"use_cache": False} if getattr(core.config, "use_cache", None) is not None else {}
    out = model(input_ids=ids, attention_mask=attention_mask, **no_cache)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.squeeze(-1).float() + reward_bias(core)


# Split a CPU batch in two length-sorted chunks only when that saves at least this share of the padded positions.
CHUNK_MIN_SAVING = 0.1


def score_sequences_in_length_chunks(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """:func:`score_sequences` of a right-padded batch, computed in (at most) two chunks of rows of similar length.

    A reward batch holds chosen and rejected answers of different lengths, all padded to the longest; on the
    CPU every padded position costs as much as a real one. The rows are sorted by length and cut where padding
    each part to its own longest row leaves the fewest positions; each part is scored on its own columns, and
    the rewards come back in the batch's row order (the same values up to float rounding; gradients flow).
    Used only for an unwrapped model on the CPU (one forward per step keeps GPU kernels large and DDP's
    one-forward-per-backward contract); otherwise this is :func:`score_sequences`.
    """
    n = input_ids.shape[0]
    if n < 2 or input_ids.device.type != "cpu" or not isinstance(model, PreTrainedModel):
        return score_sequences(model, input_ids, attention_mask)
    lengths = (last_token_index(attention_mask) + 1).tolist()
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    longest = [lengths[i] for i in order]
    cut, cost = n, n * longest[0]
    for i in range(1, n):
        c = i * longest[0] + (n - i) * longest[i]
        if c < cost:
            cut, cost = i, c
    if cut == n or cost > (1.0 - CHUNK_MIN_SAVING) * n * input_ids.shape[1]:
        return score_sequences(model, input_ids, attention_mask)
    parts = []
    for rows in (order[:cut], order[cut:]):
        idx = torch.tensor(rows, dtype=torch.long)
        width = longest[order.index(rows[0])]
        parts.append(score_sequences(model, input_ids[idx, :width], attention_mask[idx, :width]))
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(n)
    return torch.cat(parts)[inverse]


def reward_input_ids(tokenizer: Any, prompt: str, response: str, max_length: int) -> list[int]:
    """Token ids of ``prompt + response + EOS`` for a reward model (no other special tokens).

    Prompt and response are tokenized separately (the same split in training
    and scoring). Too long: the prompt is cut from the left (its end, which
    leads into the answer, stays); if the response + EOS alone leaves the
    prompt fewer than ``max_length // 4`` tokens, the prompt keeps its last
    ``min(len(prompt), max_length // 4)`` tokens and the response is cut at
    the right. The EOS always ends the sequence.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    p = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if len(p) + len(r) + 1 > max_length:
        keep_prompt = max(max_length - 1 - len(r), min(len(p), max_length // 4))
        p = p[len(p) - keep_prompt :] if keep_prompt > 0 else []
        r = r[: max_length - 1 - len(p)]
    return p + r + [eos]


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(max((len(s) for s in seqs), default=1), 1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def score_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[float]:
    """Rewards of ``prompt + response`` texts, tokenized with the reward model's own ``tokenizer``.

    Text in, floats out (in input order): a policy with another tokenizer is
    scored from its decoded text. Encoding: :func:`reward_input_ids`; batches
    of texts of similar length, right-padded; the model's train/eval mode is
    left as it is (dropout is off).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_tokenizer(tokenizer)
    seqs = [reward_input_ids(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    device = next(_unwrap(model).parameters()).device
    scores = [0.0] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = _right_pad([seqs[i] for i in chunk], tokenizer.pad_token_id)
        values = score_sequences(model, ids.to(device), mask.to(device)).tolist()
        for i, v in zip(chunk, values):
            scores[i] = float(v)
    return scores
