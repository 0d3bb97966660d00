"""PPO for RLHF, in one file that reads top to bottom: rollout -> score -> KL-shaped rewards -> advantages -> update -> log.

The recipe is the one of OpenAI's lm-human-preferences ("OAI19") as dissected by
Huang et al. 2024 ("N+"), each detail a small pure function pinned by a unit
test (tests/test_ppo.py). No mlflow, no prefect: metrics, tables and
checkpoints leave through :class:`PpoCallbacks`.

Conventions (the off-by-ones live here)
    *Tensors.* A batch of rollouts is ``query_ids [B, Q]`` (left-padded with the
    dedicated pad id; never EOS) followed by ``response_ids [B, T]``
    (right-padded). ``response_mask[b, t] = 1`` for the response's tokens up to
    and including its first EOS. Attention masks cover query and response;
    position ids are ``cumsum(mask) - 1``, so padding shifts nothing.
    *Log-probs and values.* Token ``t`` of the response is predicted at
    sequence position ``Q + t - 1``: its log-prob (under policy or reference)
    and the value of the state before it are read there. Logits are divided by
    the sampling temperature before every log-softmax (sampling, reference,
    update, evaluation).
    *Score position.* The reward model's score of ``prompt + response`` sits at
    the **last response token** -- index ``response_mask.sum(-1) - 1`` (the
    EOS when there is one) -- not one past it. There the per-token reward is
    ``score - beta * kl_t``; everywhere else it is ``-beta * kl_t``; after it,
    0. GAE bootstraps with value 0 past the last token.
    *Truncation.* Sampling runs ``max_new_tokens`` steps at most; everything
    after a row's first EOS is padding. A response that never produced EOS is
    kept and scored, then penalised (``missing_eos``).

Design choices against the known failure modes of PPO implementations
    * Log-probs of the sampled tokens come from the sampling pass itself (no
      second policy forward per rollout); sampling is our own loop with a KV
      cache, full distribution (top_k = 0, top_p = 1), no forced min length.
    * The reward model reads decoded *text* through its own tokenizer
      (:func:`text_reward_fn`), so policy and reward model may tokenize
      differently; the critic reads the policy's ids, so it is then built on
      the policy (:func:`make_critic`), and a critic that cannot read them is
      refused.
    * A policy loaded in bf16/fp16 trains fp32 master weights under autocast.
    * Frozen networks never get gradients or optimizer state: the reference
      and reward forwards run under ``torch.inference_mode``. With LoRA
      (``lora_r > 0``) the reference *is* the policy with its adapters switched
      off: the frozen weights exist once.
    * Non-finite values stop the run naming the step and the tensor; a ratio
      guard skips and counts minibatches whose mean importance ratio explodes;
      a negative mean KL is warned about.
    * A full-state checkpoint (policy, critic, both optimizers and schedulers,
      KL controller, RNG states, prompt-stream position) is written with
      ``tasks.train.checkpoint`` and restored exactly: on CPU a resumed run
      repeats the uninterrupted one.

Several processes (a torch.distributed process group, e.g. ``alignflow ppo --processes 2``)
    Every process draws the same rollouts (same seed, weights and prompts), and
    the update is data-parallel: process ``r`` backpropagates micro-batches
    ``r, r + n, ...`` of each minibatch and the gradient sums are all-reduced
    before clipping, so every optimizer step is the one-process step. The
    micro-batches per minibatch must be a multiple of the process count.
    Process 0 alone writes checkpoints and calls the hooks' owners' logging.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignflow.config import PpoStageConfig
from alignflow.models.reward import disable_dropout

from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, rng_isolated, save_checkpoint
from .loop import NonFiniteLossError
from .schedule import decay_multiplier, lambda_scheduler

log = logging.getLogger(__name__)

RewardFn = Callable[[Sequence[str], Sequence[str]], Tensor]


class NegativeKLWarning(UserWarning):
    """The batch's mean KL to the reference is negative: sampler and log-probs disagree (e.g. a min length)."""


# =============================================================================================== tokens and masks


def check_pad_token(tokenizer: Any) -> None:
    """A dedicated pad token, distinct from EOS (else masking padding would also mask the real end of a response)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the policy tokenizer has no EOS token: PPO truncates responses at the first EOS")
    if pad is None or pad == eos:
        raise ValueError(
            f"the policy tokenizer's pad token ({pad}) must exist and differ from EOS ({eos}); "
            "alignflow's tokenizers have <|pad|>"
        )


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """Positions counted over real tokens only: left padding does not shift a sequence."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad_queries(tokenizer: Any, prompts: Sequence[str], max_prompt_tokens: int) -> tuple[Tensor, Tensor]:
    """Token ids of the prompts, each cut to its last ``max_prompt_tokens`` tokens, left-padded with the pad id.

    An empty prompt becomes a lone BOS (EOS when there is no BOS): a query needs a token to condition on.
    """
    check_pad_token(tokenizer)
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = []
    for ids in tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]:  # cut by hand below
        ids = list(ids)[-max_prompt_tokens:] or [start]
        rows.append(ids)
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return out, mask


def truncate_after_eos(response_ids: Tensor, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut every response after its first EOS (the EOS stays): ``(ids, mask, has_eos)``.

    Tokens after the first EOS become ``pad_id`` with mask 0. A row without EOS keeps all its tokens.
    """
    is_eos = response_ids == eos_id
    # position of the first EOS, or T when none
    T = response_ids.shape[1]
    idx = torch.arange(T, device=response_ids.device).expand_as(response_ids)
    first = torch.where(is_eos, idx, torch.full_like(idx, T)).min(dim=1).values
    mask = idx <= first.unsqueeze(1)
    ids = response_ids.masked_fill(~mask, pad_id)
    return ids, mask.long(), first < T


def last_token_index(response_mask: Tensor) -> Tensor:
    """Index of the last response token (the first EOS, or the last token of a response without one)."""
    return (response_mask.long().sum(-1) - 1).clamp(min=0)


# =============================================================================================== forwards


def _base(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a peft wrapper (for signature checks)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x calls the KV cache argument ``cache``; 4.x ``past_key_values``."""
    params = inspect.signature(_base(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def sample_next_token(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Draw one token per row from ``softmax(logits / temperature)`` over the *whole* vocabulary.

    No top-k, no top-p, no minimum length (a forced min length biases the
    sampler away from the policy and makes the KL estimate negative).
    Returns ``(tokens [B], logprobs [B])`` with the log-prob under the same tempered distribution.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    tokens = torch.multinomial(logp.exp(), 1).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    query_ids: Tensor,
    query_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
) -> tuple[Tensor, Tensor]:
    """Sample responses to left-padded queries with a KV cache: ``(response_ids [B, T], logprobs [B, T])``.

    Positions come from the attention mask, so a query's tokens get the same
    positions whatever its padding. A row stops at its first EOS (later
    tokens are padding, log-prob 0); the loop ends when every row has stopped
    or after ``max_new_tokens`` tokens, so ``T <= max_new_tokens``.
    """
    was_training = model.training
    model.eval()
    cache_kw = _cache_kwarg(model)
    B = query_ids.shape[0]
    mask = query_mask.long()
    positions = position_ids_from_mask(mask)
    out = model(input_ids=query_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    logits = out.logits[:, -1]
    next_pos = positions[:, -1] + 1
    finished = torch.zeros(B, dtype=torch.bool, device=query_ids.device)
    tokens, logps = [], []
    for step in range(max_new_tokens):
        tok, logp = sample_next_token(logits, temperature)
        tok = tok.masked_fill(finished, pad_id)
        tokens.append(tok)
        logps.append(logp.masked_fill(finished, 0.0))
        finished = finished | (tok == eos_id)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = model(input_ids=tok.unsqueeze(1), attention_mask=mask, position_ids=next_pos.unsqueeze(1),
                    use_cache=True, **{cache_kw: cache})
        cache = _cache_of(out)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    if was_training:
        model.train()
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


def _joined(query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor
            ) -> tuple[Tensor, Tensor, Tensor]:
    ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    return ids, mask, position_ids_from_mask(mask)


def response_logits(model: nn.Module, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                    response_mask: Tensor, temperature: float) -> Tensor:
    """Tempered logits that predict each response token: ``[B, T, V]`` read at positions ``Q - 1 .. Q + T - 2``.

    Only the last ``T + 1`` positions go through the LM head (``logits_to_keep``).
    """
    ids, mask, pos = _joined(query_ids, query_mask, response_ids, response_mask)
    T = response_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=T + 1).logits
    return logits[:, :-1].float() / temperature


def trim_padding(query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Drop the columns that are padding in every row: leading query columns, trailing response columns.

    Exact: a padded column is masked out of attention, positions come from the
    mask, and causal attention never lets a later column change an earlier one.
    A micro-batch of short responses then costs what its longest response costs.
    """
    q_len = max(int(query_mask.sum(-1).max()), 1)
    r_len = max(int(response_mask.sum(-1).max()), 1)
    return query_ids[:, -q_len:], query_mask[:, -q_len:], response_ids[:, :r_len], response_mask[:, :r_len]


def logprobs_of(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-prob of each token under (already tempered) logits ``[B, T, V]``."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: Tensor) -> Tensor:
    """Entropy (nats) of the tempered next-token distribution at each position."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def critic_values(critic: nn.Module, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                  response_mask: Tensor) -> Tensor:
    """Per-token values ``[B, T]``: the critic's score head on every hidden state, read where the logits are.

    The critic is a ``*ForSequenceClassification`` (a copy of the reward
    model): its transformer gives hidden states, its ``score`` head (plus the
    ``config.reward_bias`` offset) turns each into a value. Value ``t`` is read
    at position ``Q + t - 1``: the state before response token ``t``.
    """
    ids, mask, pos = _joined(query_ids, query_mask, response_ids, response_mask)
    T = response_ids.shape[1]
    hidden = critic.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    values = critic.score(hidden[:, -T - 1 : -1]).squeeze(-1).float()
    return values + float(getattr(critic.config, "reward_bias", 0.0) or 0.0)


def text_reward_fn(reward_model: nn.Module, reward_tokenizer: Any, *, batch_size: int = 32,
                   max_length: int = 512) -> RewardFn:
    """Score ``(prompt, response)`` texts with a reward model and its own tokenizer (frozen, inference mode)."""
    from alignflow.models.reward import score_texts

    reward_model.eval()
    reward_model.requires_grad_(False)

    def score(prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        with torch.inference_mode():
            values = score_texts(reward_model, reward_tokenizer, prompts, responses, batch_size=batch_size,
                                 max_length=max_length)
        return torch.tensor(values, dtype=torch.float32)

    return score


# =============================================================================================== scores, KL, rewards


def apply_missing_eos_penalty(scores: Tensor, has_eos: Tensor, mode: str, penalty: float) -> Tensor:
    """Scores of responses without EOS: replaced by ``-penalty`` (N+), lowered by ``penalty`` (TRL), or kept."""
    if mode == "replace":
        return torch.where(has_eos, scores, torch.full_like(scores, -penalty))
    if mode == "subtract":
        return torch.where(has_eos, scores, scores - penalty)
    if mode == "none":
        return scores
    raise ValueError(f"missing_eos must be replace, subtract or none, got {mode!r}")


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k1 estimator ``log pi - log pi_ref`` (unbiased, can be negative per token)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator ``(r - 1) - log r`` with ``r = pi_ref / pi`` (unbiased, never negative)."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def shaped_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards ``-beta * kl_t``, plus the score at the last response token; 0 after the response."""
    mask = response_mask.float()
    rewards = -beta * kl * mask
    last = last_token_index(response_mask)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.float().unsqueeze(1))


class FixedKLController:
    """beta that never changes."""

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def update(self, kl: float, n_rollouts: int) -> None:
        return None

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController(FixedKLController):
    """OAI19: ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)`` after each batch of n rollouts."""

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        super().__init__(beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, kl: float, n_rollouts: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_rollouts / self.horizon


def kl_controller(cfg: PpoStageConfig) -> FixedKLController:
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


# =============================================================================================== advantages


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.float()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    mask = mask.float()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten over the valid (mask 1) entries only; padding neither counts nor changes (it is set to 0)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.float()


def gae(rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens: ``(advantages, returns = advantages + values)``.

    Rewards and values past the last response token are treated as 0, so the
    last token's TD error is ``r_last - V_last`` (no bootstrap past the end).
    """
    mask = response_mask.float()
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    var_r = masked_var(returns, mask)
    if float(var_r) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_r)


# =============================================================================================== losses


def policy_loss(new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (token-level masked mean) and its diagnostics (detached)."""
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(new_values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """``0.5 * max((v - R)^2, (v_clipped - R)^2)`` with ``v_clipped`` within ``cliprange_value`` of the old value."""
    clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (new_values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


# =============================================================================================== optimisation plumbing


def build_adam(params: Sequence[nn.Parameter], lr: float, eps: float) -> torch.optim.Adam:
    """Adam with the RLHF epsilon (1e-5), over the trainable parameters only."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    return torch.optim.Adam(params, lr=lr, eps=eps)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, anneal: bool
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """lr of PPO step ``k + 1`` (after ``k`` steps): falling linearly from the full lr to 0 after the last step."""
    return lambda_scheduler(optimizer, lambda done: decay_multiplier(done / total_steps,
                                                                     "linear" if anneal else "constant"))


def minibatch_plan(batch_size: int, minibatch_size: int, micro_batch_size: int) -> list[list[Tensor]]:
    """One epoch's shuffle of a batch: minibatches (one optimizer step each) of micro-batches (one backward each).

    Draws the permutation from the global torch RNG, which checkpoints save and restore.
    """
    if batch_size % minibatch_size or minibatch_size % micro_batch_size:
        raise ValueError(f"sizes must divide: batch {batch_size}, minibatch {minibatch_size}, micro {micro_batch_size}")
    perm = torch.randperm(batch_size)
    return [list(perm[m : m + minibatch_size].split(micro_batch_size)) for m in range(0, batch_size, minibatch_size)]


# =============================================================================================== guards


def check_finite(step: int, **tensors: Tensor | float) -> None:
    """Raise :class:`NonFiniteLossError` naming the step and the first tensor with a NaN or infinity."""
    for name, value in tensors.items():
        t = torch.as_tensor(value)
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise NonFiniteLossError(
                f"PPO step {step}: `{name}` holds {bad} non-finite value(s) (NaN/inf) of {t.numel()}; nothing of "
                "this step was applied (the last checkpoint is intact)",
                step=step,
            )


def warn_if_negative_kl(kl_mean: float, step: int, tolerance: float) -> bool:
    """Warn (and return True) when the mean KL per response is below ``-tolerance``."""
    if kl_mean < -tolerance:
        message = (f"PPO step {step}: mean KL to the reference is negative ({kl_mean:.4f} nats per response): the "
                   "sampler and the log-probs disagree (temperature, min length or a non-sampled token?)")
        warnings.warn(message, NegativeKLWarning, stacklevel=2)
        log.warning(message)
        return True
    return False


# =============================================================================================== prompts


class PromptStream:
    """An endless, seeded stream of prompt indices: epoch ``e`` is a permutation drawn with seed ``seed + e``.

    Its whole state is ``position`` (prompts handed out so far).
    """

    def __init__(self, n_prompts: int, seed: int, position: int = 0) -> None:
        if n_prompts < 1:
            raise ValueError("PPO needs at least one prompt")
        self.n, self.seed, self.position = n_prompts, seed, position
        self._perm: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1]

    def next(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            epoch, i = divmod(self.position, self.n)
            out.append(self._order(epoch)[i])
            self.position += 1
        return out


# =============================================================================================== models


class Reference:
    """The frozen reference policy: a separate frozen module, or the LoRA policy with its adapters off."""

    def __init__(self, policy: nn.Module, module: nn.Module | None) -> None:
        self.policy, self.module = policy, module
        if module is None and not hasattr(policy, "disable_adapter"):
            raise ValueError("a reference needs a frozen module unless the policy is a peft (LoRA) model")

    @contextlib.contextmanager
    def model(self) -> Iterator[nn.Module]:
        if self.module is not None:
            yield self.module
        else:
            with self.policy.disable_adapter():
                yield self.policy


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with no gradients, in eval mode (the reference of full fine-tuning)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def apply_lora(policy: nn.Module, cfg: PpoStageConfig) -> nn.Module:
    """Wrap the policy with LoRA adapters (peft); the base weights are frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise ImportError("ppo.lora_r > 0 needs the `peft` package") from err
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(policy, lora)


def merged_policy(policy: nn.Module) -> nn.Module:
    """The plain Hugging Face model to save: LoRA adapters merged into the weights (no-op without LoRA)."""
    if hasattr(policy, "merge_and_unload"):
        return policy.merge_and_unload()
    return policy


def same_tokenization(a: Any, b: Any) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary and the same EOS and pad ids)."""
    if a is b:
        return True
    return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
            and a.pad_token_id == b.pad_token_id)


def make_critic(reward_model: nn.Module, *, reward_tokenizer: Any = None, policy: nn.Module | None = None,
                policy_tokenizer: Any = None, seed: int = 0) -> nn.Module:
    """The critic: a separate, trainable network that reads the policy's token ids.

    When the reward model tokenizes as the policy does (or no tokenizers are
    given), a copy of the reward model (its score head becomes the value head;
    N+). When they differ, the reward model cannot read the policy's ids, so
    the critic is built on the policy: its transformer weights and a new value
    head (:func:`~alignflow.models.reward.reward_model_from_causal_lm`).
    """
    if reward_tokenizer is not None and policy_tokenizer is not None and not same_tokenization(
            reward_tokenizer, policy_tokenizer):
        if policy is None:
            raise ValueError("the reward model tokenizes differently from the policy: pass the policy to build "
                             "the critic on its tokenizer")
        from alignflow.models.reward import reward_model_from_causal_lm

        log.info("reward model and policy tokenize differently: the critic starts from the policy's weights")
        critic = reward_model_from_causal_lm(_base(policy), tokenizer=policy_tokenizer, seed=seed)
        critic.to(next(policy.parameters()).device)
    else:
        critic = copy.deepcopy(reward_model)
    critic.requires_grad_(True)
    disable_dropout(critic)
    return critic.train()


def check_critic_reads_policy_ids(critic: nn.Module, tokenizer: Any) -> None:
    """Refuse a critic whose embeddings cannot hold every id of the policy's tokenizer (e.g. a reward model copy)."""
    rows = critic.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ValueError(
            f"the critic has {rows} token embeddings but the policy's tokenizer has {len(tokenizer)} tokens: it "
            "was built for another tokenizer; build it with make_critic(..., policy=, policy_tokenizer=)")


# =============================================================================================== rollouts


@dataclass
class Rollout:
    """One batch of experience. Per-token tensors are ``[B, T]`` over response tokens."""

    prompts: list[str]
    responses: list[str]
    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    has_eos: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    raw_scores: Tensor
    scores: Tensor


def _pad_to(t: Tensor, width: int, value: float) -> Tensor:
    return F.pad(t, (0, width - t.shape[1]), value=value) if t.shape[1] < width else t


def collect_rollouts(policy: nn.Module, reference: Reference | None, critic: nn.Module | None, tokenizer: Any,
                     reward_fn: RewardFn, prompts: Sequence[str], cfg: PpoStageConfig, device: torch.device
                     ) -> Rollout:
    """Sample a response per prompt and gather everything PPO needs about it, in ``forward_batch_size`` chunks.

    Policy log-probs come from sampling; reference log-probs and values are a
    forward each (the reference under inference mode); the reward model scores
    the decoded texts. ``reference=None`` / ``critic=None`` skip those forwards
    (their tensors are zeros).
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    budget = _prompt_budget(policy, cfg)
    chunks: dict[str, list[Tensor]] = {k: [] for k in ("q", "qm", "r", "rm", "eos", "lp", "ref", "v")}
    for start in range(0, len(prompts), cfg.forward_batch_size):
        part = prompts[start : start + cfg.forward_batch_size]
        q, qm = left_pad_queries(tokenizer, part, budget)
        q, qm = q.to(device), qm.to(device)
        sampled, logprobs = sample_responses(policy, q, qm, max_new_tokens=cfg.max_new_tokens,
                                             temperature=cfg.temperature, eos_id=eos, pad_id=pad)
        r, rm, has_eos = truncate_after_eos(sampled, eos, pad)
        logprobs = logprobs * rm
        if reference is not None:
            with torch.inference_mode(), reference.model() as ref:
                ref_lp = logprobs_of(response_logits(ref, q, qm, r, rm, cfg.temperature), r)
            ref_lp = ref_lp.clone() * rm  # a normal tensor again (inference tensors cannot enter autograd)
        else:
            ref_lp = torch.zeros_like(logprobs)
        if critic is not None:
            with torch.no_grad():
                values = critic_values(critic, q, qm, r, rm) * rm
        else:
            values = torch.zeros_like(logprobs)
        for key, value in zip(chunks, (q, qm, r, rm, has_eos, logprobs, ref_lp, values)):
            chunks[key].append(value)
    Q = max(t.shape[1] for t in chunks["q"])
    T = max(t.shape[1] for t in chunks["r"])
    left = lambda t, v: F.pad(t, (Q - t.shape[1], 0), value=v)  # noqa: E731  queries stay left-padded
    query_ids = torch.cat([left(t, pad) for t in chunks["q"]])
    query_mask = torch.cat([left(t, 0) for t in chunks["qm"]])
    response_ids = torch.cat([_pad_to(t, T, pad) for t in chunks["r"]])
    response_mask = torch.cat([_pad_to(t, T, 0) for t in chunks["rm"]])
    cat = lambda key: torch.cat([_pad_to(t, T, 0.0) for t in chunks[key]])  # noqa: E731

    # -- score: the reward model reads text (its own tokenizer); the query as the policy saw it
    texts_q = [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=False)
               for row, m in zip(query_ids.cpu(), query_mask.cpu())]
    texts_r = [tokenizer.decode([t for t in row[m.bool()].tolist() if t != eos], skip_special_tokens=True)
               for row, m in zip(response_ids.cpu(), response_mask.cpu())]
    has_eos = torch.cat(chunks["eos"])
    raw = reward_fn(texts_q, texts_r).to(device).float()
    scores = apply_missing_eos_penalty(raw, has_eos, cfg.missing_eos, cfg.missing_eos_penalty)
    return Rollout(list(texts_q), texts_r, query_ids, query_mask, response_ids, response_mask, has_eos,
                   cat("lp"), cat("ref"), cat("v"), raw, scores)


def _prompt_budget(policy: nn.Module, cfg: PpoStageConfig) -> int:
    config = _base(policy).config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    budget = cfg.max_prompt_tokens
    if positions:
        budget = min(budget, positions - cfg.max_new_tokens)
    if budget < 1:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in {positions} positions")
    return budget


# =============================================================================================== training


@dataclass
class PpoCallbacks:
    """Hooks through which a flow sees training. Every one may be None; none may change the run (RNG isolated).

    on_log(metrics, step)            ``ppo/*`` and ``perf/*`` metrics every ``log_every`` steps
    on_generations(rows, step)       sample generations (prompt, response, score, kl) every ``generations_every``
    on_eval(step, policy, reference) -> metrics
                                     evaluation every ``eval_every`` steps and at the end (logged via on_log);
                                     ``policy`` is the trained module (a peft model with LoRA), ``reference`` the
                                     :class:`Reference` (use :func:`evaluate_against_reference`)
    on_checkpoint(path, step)        a checkpoint was written
    on_step(step, total)             progress
    """

    on_log: Callable[[dict[str, float], int], None] | None = None
    on_generations: Callable[[list[dict[str, Any]], int], None] | None = None
    on_eval: Callable[[int, nn.Module, Reference], dict[str, float] | None] | None = None
    on_checkpoint: Callable[[Path, int], None] | None = None
    on_step: Callable[[int, int], None] | None = None


@dataclass
class PpoResult:
    policy: nn.Module  # the trained policy (a peft model when lora_r > 0; see merged_policy)
    critic: nn.Module
    final_step: int
    resumed_from: int | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    skipped_minibatches: int = 0
    seconds: float = 0.0


class _Bundle:
    """Several state_dict holders saved as one (two optimizers, two schedulers) in a training checkpoint."""

    def __init__(self, **parts: Any) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


@dataclass
class PpoState:
    """What a PPO run carries from one step to the next; a checkpoint saves all of it."""

    policy: nn.Module
    critic: nn.Module
    ref: Reference
    optimizers: _Bundle  # policy, critic
    schedulers: _Bundle  # policy, critic
    kl_ctl: FixedKLController
    stream: PromptStream
    compute_dtype: torch.dtype | None = None  # a low-precision load: trained in fp32 under autocast to this dtype
    step: int = 0
    resumed_from: int | None = None
    skipped_total: int = 0
    lr_used: float = 0.0  # the policy's lr in the last update
    last_checkpoint: Path | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)

    @property
    def nets(self) -> nn.ModuleDict:
        return nn.ModuleDict({"policy": self.policy, "critic": self.critic})

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)


def train_ppo(
    cfg: PpoStageConfig,
    *,
    policy: nn.Module,
    tokenizer: Any,
    critic: nn.Module,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    reference: nn.Module | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    callbacks: PpoCallbacks | None = None,
) -> PpoResult:
    """Optimise ``policy`` against ``reward_fn`` on ``prompts`` for ``cfg.total_steps`` PPO steps.

    ``critic``: a trainable ``*ForSequenceClassification`` on the policy's token ids (see :func:`make_critic`).
    ``reference``: the frozen SFT policy; None = a frozen copy of ``policy``
    (full fine-tuning) or, with ``cfg.lora_r > 0``, the policy with adapters
    off. ``checkpoint_dir``/``resume``: as the training loop (a fresh run
    refuses a folder with checkpoints; resume continues from the newest).
    A policy loaded in bf16/fp16 is trained with fp32 master weights (Adam's
    state in fp32) under autocast to its dtype, and handed back in its dtype.
    """
    started = time.perf_counter()
    callbacks = callbacks or PpoCallbacks()
    check_pad_token(tokenizer)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        if not resume and list_checkpoints(checkpoint_dir):
            raise FileExistsError(f"{checkpoint_dir} already holds checkpoints; pass resume=True or use an empty folder")
    check_critic_reads_policy_ids(critic, tokenizer)
    device = next(policy.parameters()).device
    state = setup_ppo(cfg, policy, critic, reference, n_prompts=len(prompts), device=device)
    if process_group()[1] > 1:  # every process starts from process 0's weights (a critic's new head included)
        import torch.distributed as dist

        for t in state.nets.state_dict().values():
            dist.broadcast(t, src=0)
    if resume and checkpoint_dir is not None:
        resume_ppo(state, checkpoint_dir)

    while state.step < cfg.total_steps:
        state.step += 1
        ro, kl_seq, metrics = ppo_step(state, cfg, tokenizer, reward_fn, prompts, device)
        state.last_metrics = metrics
        run_step_hooks(state, cfg, callbacks, ro, kl_seq, metrics, checkpoint_dir)

    state.policy.eval()
    state.critic.eval()
    if callbacks.on_eval is not None:
        _evaluate(state, callbacks)
    policy = state.policy
    if state.compute_dtype is not None:
        policy = policy.to(state.compute_dtype)
    return PpoResult(policy=policy, critic=state.critic, final_step=state.step, resumed_from=state.resumed_from,
                     last_metrics=state.last_metrics, last_eval=state.last_eval, checkpoint=state.last_checkpoint,
                     skipped_minibatches=state.skipped_total, seconds=time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------- setup


def setup_ppo(cfg: PpoStageConfig, policy: nn.Module, critic: nn.Module, reference: nn.Module | None, *,
              n_prompts: int, device: torch.device) -> PpoState:
    """Reference, LoRA, fp32 master weights, optimizers, schedulers, KL controller and prompt stream."""
    critic.to(device)
    disable_dropout(policy)
    compute_dtype = _low_precision_dtype(policy)
    if cfg.lora_r > 0:
        if reference is not None:
            raise ValueError("with LoRA the reference is the adapter-free policy; do not pass another")
        policy = apply_lora(policy, cfg)
        ref = Reference(policy, None)
    else:
        ref = Reference(policy, reference if reference is not None else frozen_copy(policy))
        if ref.module is not None:
            ref.module.requires_grad_(False).eval()
    if compute_dtype is not None:  # fp32 master weights: Adam never updates bf16 weights directly
        log.info("policy loaded in %s: training fp32 master weights under %s autocast", compute_dtype, compute_dtype)
        policy.float()
    if _low_precision_dtype(critic) is not None:
        critic.float()
    torch.manual_seed(cfg.seed)
    policy_opt = build_adam(list(policy.parameters()), cfg.lr, cfg.adam_eps)
    critic_opt = build_adam(list(critic.parameters()), cfg.critic_lr or cfg.lr, cfg.adam_eps)
    schedulers = _Bundle(policy=build_scheduler(policy_opt, cfg.total_steps, cfg.anneal_lr),
                         critic=build_scheduler(critic_opt, cfg.total_steps, cfg.anneal_lr))
    return PpoState(policy=policy, critic=critic, ref=ref, optimizers=_Bundle(policy=policy_opt, critic=critic_opt),
                    schedulers=schedulers, kl_ctl=kl_controller(cfg), stream=PromptStream(n_prompts, cfg.seed),
                    compute_dtype=compute_dtype)


def _low_precision_dtype(model: nn.Module) -> torch.dtype | None:
    """bf16/fp16 when the model's trainable weights are stored that way, else None."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = dtypes & {torch.bfloat16, torch.float16}
    return next(iter(low)) if low else None


def resume_ppo(state: PpoState, checkpoint_dir: Path) -> None:
    """Continue from the newest checkpoint in ``checkpoint_dir`` (none: a fresh start)."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return
    saved = load_checkpoint(path, model=state.nets, optimizer=state.optimizers, scheduler=state.schedulers)
    state.step = state.resumed_from = int(saved["step"])
    state.stream.position = int(saved["data_state"]["prompt_position"])
    state.kl_ctl.load_state_dict(saved["extra"]["kl_controller"])
    state.skipped_total = int(saved["extra"].get("skipped_minibatches", 0))
    state.last_checkpoint = path
    log.info("resumed PPO from %s (step %d)", path, state.step)


# ----------------------------------------------------------------------------------------------- one PPO step


def ppo_step(state: PpoState, cfg: PpoStageConfig, tokenizer: Any, reward_fn: RewardFn, prompts: Sequence[str],
             device: torch.device) -> tuple[Rollout, Tensor, dict[str, float]]:
    """Rollout -> score -> KL-shaped rewards -> advantages -> update -> metrics: ``(rollout, KL per response, metrics)``."""
    t0 = time.perf_counter()
    beta = state.kl_ctl.beta

    # -- 1. rollout: sample responses to a batch of prompts (log-probs from the sampling pass), 2. score them
    batch_prompts = [prompts[i] for i in state.stream.next(cfg.batch_size)]
    state.policy.eval()
    state.critic.eval()
    with state.autocast(device):
        ro = collect_rollouts(state.policy, state.ref, state.critic, tokenizer, reward_fn, batch_prompts, cfg, device)

    # -- 3. KL-shaped per-token rewards (score at the last response token)
    mask = ro.response_mask.float()
    kl1 = kl_k1(ro.logprobs, ro.ref_logprobs) * mask
    kl3 = kl_k3(ro.logprobs, ro.ref_logprobs) * mask
    kl_in_reward = kl1 if cfg.kl_estimator == "k1" else kl3
    rewards = shaped_rewards(ro.scores, kl_in_reward, ro.response_mask, beta)
    check_finite(state.step, logprobs=ro.logprobs, ref_logprobs=ro.ref_logprobs, values=ro.values,
                 scores=ro.scores, rewards=rewards)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, ro.response_mask, shift_mean=False)

    # -- 4. advantages: GAE over response tokens, then masked whitening
    advantages, returns = gae(rewards, ro.values, ro.response_mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, ro.response_mask)
    check_finite(state.step, advantages=advantages, returns=returns)

    # -- 5. update: epochs x minibatches (one optimizer step each) x micro-batches (accumulated)
    update_stats, skipped = ppo_update(state, cfg, ro, advantages, returns, device)

    # -- 6. KL controller and the step's metrics
    kl_seq = kl1.sum(-1)
    kl_mean = float(kl_seq.mean())
    state.kl_ctl.update(kl_mean, cfg.batch_size)
    warn_if_negative_kl(kl_mean, state.step, cfg.negative_kl_tolerance)
    metrics = step_metrics(cfg, ro, kl_mean=kl_mean, kl3=kl3, kl_in_reward=kl_in_reward, beta=beta,
                           returns=returns, advantages=advantages, update_stats=update_stats, skipped=skipped,
                           lr=state.lr_used, seconds=time.perf_counter() - t0)
    return ro, kl_seq, metrics


def ppo_update(state: PpoState, cfg: PpoStageConfig, ro: Rollout, advantages: Tensor, returns: Tensor,
               device: torch.device) -> tuple[dict[str, float], int]:
    """``ppo_epochs`` reshuffled passes over the batch: ``(mean stats over applied minibatches, skipped count)``."""
    policy_opt, critic_opt = state.optimizers.parts["policy"], state.optimizers.parts["critic"]
    state.policy.train()
    state.critic.train()
    sums: dict[str, float] = {}
    counted = skipped = 0
    for _epoch in range(cfg.ppo_epochs):
        for minibatch in minibatch_plan(cfg.batch_size, cfg.minibatch_size, cfg.micro_batch_size):
            stats = _minibatch_gradients(state, cfg, ro, advantages, returns, minibatch, device)
            # the ratio guard: a minibatch whose importance ratio exploded is skipped, not applied
            if float(stats["ratio_mean"]) > cfg.ratio_threshold:
                skipped += 1
                log.warning("PPO step %d: minibatch skipped, mean ratio %.3g > %.3g", state.step,
                            float(stats["ratio_mean"]), cfg.ratio_threshold)
                policy_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                continue
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")  # inf: measure, don't clip
            stats["policy_grad_norm"] = torch.nn.utils.clip_grad_norm_(
                [p for p in state.policy.parameters() if p.requires_grad], max_norm)
            stats["critic_grad_norm"] = torch.nn.utils.clip_grad_norm_(state.critic.parameters(), max_norm)
            check_finite(state.step, policy_grad_norm=stats["policy_grad_norm"],
                         critic_grad_norm=stats["critic_grad_norm"])
            policy_opt.step()
            critic_opt.step()
            policy_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
            counted += 1
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    state.lr_used = policy_opt.param_groups[0]["lr"]
    for sched in state.schedulers.parts.values():
        sched.step()
    state.skipped_total += skipped
    return {k: v / counted for k, v in sums.items()} if counted else {}, skipped


def process_group() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_processes(state: PpoState, stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """The minibatch's gradients and stats: each process holds the sums over its micro-batches."""
    import torch.distributed as dist

    params = [p for net in (state.policy, state.critic) for p in net.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.stack([torch.as_tensor(stats[k]).float().to(
        grads[0].device) for k in sorted(stats)])])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    return {k: flat[offset + i] for i, k in enumerate(sorted(stats))}


def _minibatch_gradients(state: PpoState, cfg: PpoStageConfig, ro: Rollout, advantages: Tensor, returns: Tensor,
                         minibatch: list[Tensor], device: torch.device) -> dict[str, Tensor]:
    """Accumulate the gradients of one minibatch, micro-batch by micro-batch; its stats (weighted by rows)."""
    stats: dict[str, Tensor] = {}
    rank, world = process_group()
    if len(minibatch) % world:
        raise ValueError(f"{len(minibatch)} micro-batches per minibatch cannot be shared by {world} processes: "
                         f"make minibatch_size / micro_batch_size a multiple of {world}")
    for micro in minibatch[rank::world]:
        idx = micro.to(device)
        q, qm, r, rm = trim_padding(ro.query_ids[idx], ro.query_mask[idx], ro.response_ids[idx], ro.response_mask[idx])
        T = r.shape[1]
        with state.autocast(device):
            logits = response_logits(state.policy, q, qm, r, rm, cfg.temperature)
            new_values = critic_values(state.critic, q, qm, r, rm)
        new_logprobs = logprobs_of(logits, r)
        pg_loss, pg_stats = policy_loss(new_logprobs, ro.logprobs[idx, :T], advantages[idx, :T], rm, cfg.cliprange)
        vf_loss, vf_stats = value_loss(new_values, ro.values[idx, :T], returns[idx, :T], rm, cfg.cliprange_value)
        weight = len(micro) / cfg.minibatch_size
        loss = (pg_loss + cfg.vf_coef * vf_loss) * weight  # accumulated micro-batches sum to the minibatch mean
        check_finite(state.step, loss=loss.detach())
        loss.backward()
        with torch.no_grad():
            micro_stats = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                           "entropy": masked_mean(entropy_of(logits), rm), **pg_stats, **vf_stats}
        for k, v in micro_stats.items():
            stats[k] = stats.get(k, 0.0) + v * weight
    return _sum_over_processes(state, stats) if world > 1 else stats


def step_metrics(cfg: PpoStageConfig, ro: Rollout, *, kl_mean: float, kl3: Tensor, kl_in_reward: Tensor, beta: float,
                 returns: Tensor, advantages: Tensor, update_stats: dict[str, float], skipped: int, lr: float,
                 seconds: float) -> dict[str, float]:
    """The ``ppo/*`` and ``perf/*`` metrics of one step (rlhf-details row 14)."""
    lengths = ro.response_mask.sum(-1).float()
    metrics = {
        "ppo/reward_mean": float(ro.scores.mean()),
        "ppo/reward_std": float(ro.scores.std()) if cfg.batch_size > 1 else 0.0,
        "ppo/reward_model_score_mean": float(ro.raw_scores.mean()),
        "ppo/kl": kl_mean,
        "ppo/kl_k1": kl_mean,
        "ppo/kl_k3": float(kl3.sum(-1).mean()),
        "ppo/beta": beta,
        "ppo/rlhf_reward": float((ro.scores - beta * kl_in_reward.sum(-1)).mean()),
        "ppo/response_length": float(lengths.mean()),
        "ppo/no_eos_rate": float((~ro.has_eos).float().mean()),
        "ppo/explained_variance": explained_variance(ro.values, returns, ro.response_mask),
        "ppo/advantage_mean_raw": float(masked_mean(returns - ro.values, ro.response_mask)),
        "ppo/advantage_mean": float(masked_mean(advantages, ro.response_mask)),
        "ppo/advantage_std": float(masked_var(advantages, ro.response_mask).sqrt()),
        "ppo/skipped_minibatches": float(skipped),
        "ppo/lr": lr,
        "perf/episodes_per_s": cfg.batch_size / max(seconds, 1e-9),
        "perf/step_time_s": seconds,
    }
    for k in ("entropy", "clipfrac", "approx_kl", "value_loss", "policy_loss", "ratio_mean", "value_clipfrac",
              "policy_grad_norm", "critic_grad_norm"):
        metrics[f"ppo/{k}"] = update_stats.get(k, float("nan"))
    return metrics


# ----------------------------------------------------------------------------------------------- periodic hooks


def run_step_hooks(state: PpoState, cfg: PpoStageConfig, callbacks: PpoCallbacks, ro: Rollout, kl_seq: Tensor,
                   metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
    """Log, sample table, evaluation and checkpoint when due, then progress (no hook changes the run's RNG)."""
    step, total = state.step, cfg.total_steps
    if callbacks.on_log is not None and (step % cfg.log_every == 0 or step == total):
        with rng_isolated():
            callbacks.on_log(metrics, step)
    if callbacks.on_generations is not None and cfg.generations_rows > 0 and (
            step % cfg.generations_every == 0 or step == total):
        rows = [{"step": step, "prompt": ro.prompts[i], "response": ro.responses[i],
                 "score": float(ro.scores[i]), "kl": float(kl_seq[i])}
                for i in range(min(cfg.generations_rows, len(ro.prompts)))]
        with rng_isolated():
            callbacks.on_generations(rows, step)
    if callbacks.on_eval is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
        _evaluate(state, callbacks)
    if checkpoint_dir is not None and (step % cfg.checkpoint_every == 0 or step == total) and process_group()[0] == 0:
        state.last_checkpoint = save_ppo_checkpoint(state, cfg, checkpoint_dir, callbacks)
    if callbacks.on_step is not None:
        callbacks.on_step(step, total)


def _evaluate(state: PpoState, callbacks: PpoCallbacks) -> None:
    with rng_isolated():
        state.last_eval = callbacks.on_eval(state.step, state.policy, state.ref) or {}
        if state.last_eval and callbacks.on_log is not None:
            callbacks.on_log(state.last_eval, state.step)


def save_ppo_checkpoint(state: PpoState, cfg: PpoStageConfig, checkpoint_dir: Path, callbacks: PpoCallbacks) -> Path:
    path = save_checkpoint(checkpoint_dir, step=state.step, model=state.nets, optimizer=state.optimizers,
                           scheduler=state.schedulers, data_state={"prompt_position": state.stream.position},
                           extra={"kl_controller": state.kl_ctl.state_dict(), "stage": "ppo",
                                  "skipped_minibatches": state.skipped_total},
                           keep=cfg.keep_checkpoints)
    if callbacks.on_checkpoint is not None:
        with rng_isolated():
            callbacks.on_checkpoint(path, state.step)
    return path


# =============================================================================================== evaluation


def evaluate_against_reference(
    policy: nn.Module,
    reference: Reference | nn.Module,
    tokenizer: Any,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    cfg: PpoStageConfig,
    *,
    judge: Callable[[int, str], bool] | None = None,
    seed: int = 1234,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out comparison of the policy with the reference (SFT) policy, both sampled as in training.

    Returns ``eval/*`` metrics -- mean reward of each, KL of the policy to the
    reference (k1, per response), win rate of the policy judged by the reward
    model (ties count half), no-EOS rates and, with ``judge(prompt_index,
    response) -> bool``, the rate of responses with the property it checks --
    and the per-prompt rows. Sampling uses a fixed seed, so evaluations at
    different steps see the same draws of the sampler; the caller's RNG state
    is left untouched.
    """
    if not prompts:
        return {}, []
    ref = reference if isinstance(reference, Reference) else Reference(policy, reference)
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    with rng_isolated():
        torch.manual_seed(seed)
        ours = collect_rollouts(policy, ref, None, tokenizer, reward_fn, prompts, cfg, device)
        torch.manual_seed(seed)
        with ref.model() as sft_model:
            sft = collect_rollouts(sft_model, None, None, tokenizer, reward_fn, prompts, cfg, device)
    if was_training:
        policy.train()
    kl = (kl_k1(ours.logprobs, ours.ref_logprobs) * ours.response_mask).sum(-1)
    wins = (ours.scores > sft.scores).float() + 0.5 * (ours.scores == sft.scores).float()
    metrics = {
        "eval/reward_mean": float(ours.scores.mean()),
        "eval/reward_mean_sft": float(sft.scores.mean()),
        "eval/reward_gain": float(ours.scores.mean() - sft.scores.mean()),
        "eval/reward_model_score_mean": float(ours.raw_scores.mean()),  # before the missing-EOS penalty
        "eval/reward_model_score_mean_sft": float(sft.raw_scores.mean()),
        "eval/kl": float(kl.mean()),
        "eval/win_rate": float(wins.mean()),
        "eval/no_eos_rate": float((~ours.has_eos).float().mean()),
        "eval/no_eos_rate_sft": float((~sft.has_eos).float().mean()),
        "eval/response_length": float(ours.response_mask.sum(-1).float().mean()),
        "eval/prompts": float(len(prompts)),
    }
    rows = [{"prompt": ours.prompts[i], "response": ours.responses[i], "score": float(ours.scores[i]),
             "response_sft": sft.responses[i], "score_sft": float(sft.scores[i]), "kl": float(kl[i])}
            for i in range(len(prompts))]
    if judge is not None:
        hits = [judge(i, ours.responses[i]) for i in range(len(prompts))]
        hits_sft = [judge(i, sft.responses[i]) for i in range(len(prompts))]
        metrics["eval/planted_rate"] = sum(hits) / len(hits)
        metrics["eval/planted_rate_sft"] = sum(hits_sft) / len(hits_sft)
    return metrics, rows
