"""Tiny policy, tokenizer and reward model for the PPO tests (built from configs, trained tokenizer, no hub)."""

from __future__ import annotations

import functools
import random

import torch

WORDS = ("alpha beta gamma delta file read write loop list dict error value code python test data run "
         "sort merge split join open close print return yield class import").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]


@functools.lru_cache(maxsize=1)
def tokenizer():
    from alignflow.models import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus(), vocab_size=300, model_max_length=128)


def policy(seed: int = 0, arch: str = "tiny-gpt2", max_position: int = 128, dropout: float = 0.0, tok=None):
    """A tiny causal LM; ``dropout`` > 0 turns on every GPT-2 dropout (as a loaded checkpoint may have it)."""
    from alignflow.models import build_causal_lm, build_config

    tok = tok or tokenizer()
    config = build_config(arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, max_position=max_position)
    if dropout:
        config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = dropout
    return build_causal_lm(config, seed=seed).eval()


def reward_model(seed: int = 0):
    from alignflow.models.reward import reward_model_from_causal_lm

    return reward_model_from_causal_lm(policy(seed + 100), tokenizer=tokenizer(), seed=seed)


def prompts(n: int = 16, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) + " :" for _ in range(n)]


def ppo_config(**overrides):
    from alignflow.config import PpoStageConfig

    base = dict(total_steps=2, batch_size=8, minibatch_size=4, micro_batch_size=2, forward_batch_size=8,
                ppo_epochs=2, max_new_tokens=8, max_prompt_tokens=24, lr=1e-3, eval_prompts=0,
                checkpoint_every=1, generations_every=1, generations_rows=2)
    base.update(overrides)
    return PpoStageConfig(**base)


def set_threads() -> int:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    return previous
