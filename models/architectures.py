"""Named architectures built from a config (no download): the offline default.

=============  ======  ======  ======  ===========  =====================================
arch           family  layers  hidden  heads        notes
=============  ======  ======  ======  ===========  =====================================
tiny-gpt2      GPT-2   2       64      2            CPU demo / test size
small-gpt2     GPT-2   4       256     4
tiny-llama     Llama   2       64      2            intermediate 172
small-llama    Llama   4       128     4            intermediate 344 (the CPU demo's size)
gpt2-125m      GPT-2   12      768     12           GPT-2 small (124.4M with vocab 50257)
llama-350m     Llama   24      1024    16           intermediate 2560 (355.0M, vocab 32000)
=============  ======  ======  ======  ===========  =====================================

Every architecture has dropout 0 (GPT-2: ``attn_pdrop``, ``resid_pdrop``,
``embd_pdrop``, ``summary_first_dropout``; Llama: ``attention_dropout``), so
training is deterministic and reward models score the same text the same way
in train and eval mode. Attention uses PyTorch SDPA. Word embeddings are tied
for GPT-2 and untied for Llama (each family's default).

``llama-350m`` uses intermediate size 2560 (2.5 x hidden) rather than the
2816 of some recipes: with 24 layers and untied embeddings, 2816 gives 374M
parameters at vocab 32000, over the 350M class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedModel

ATTN_IMPLEMENTATION = "sdpa"

__all__ = ["ARCHS", "ArchSpec", "build_causal_lm", "build_config", "count_parameters"]


@dataclass(frozen=True)
class ArchSpec:
    """One named architecture: its family and the size keywords of its config class."""

    family: str  # "gpt2" or "llama"
    sizes: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_GPT2_NO_DROPOUT = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "summary_first_dropout": 0.0}
_LLAMA_NO_DROPOUT = {"attention_dropout": 0.0}

ARCHS: dict[str, ArchSpec] = {
    "tiny-gpt2": ArchSpec("gpt2", {"n_layer": 2, "n_head": 2, "n_embd": 64}, "CPU demo / test size"),
    "small-gpt2": ArchSpec("gpt2", {"n_layer": 4, "n_head": 4, "n_embd": 256}, "small CPU/GPU experiments"),
    "tiny-llama": ArchSpec(
        "llama",
        {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 172},
        "Llama-style test size",
    ),
    "small-llama": ArchSpec(
        "llama",
        {"num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 344},
        "CPU demo size: room for the in-context match of the planted rule",
    ),
    "gpt2-125m": ArchSpec("gpt2", {"n_layer": 12, "n_head": 12, "n_embd": 768}, "GPT-2 small"),
    "llama-350m": ArchSpec(
        "llama",
        {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 2560},
        "~355M parameters at vocab 32000 (GPU)",
    ),
}


def build_config(
    arch: str,
    *,
    vocab_size: int,
    pad_token_id: int,
    eos_token_id: int,
    bos_token_id: int,
    max_position: int,
) -> PretrainedConfig:
    """Config of the named architecture for a tokenizer with these sizes and ids."""
    try:
        spec = ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}") from None
    if vocab_size < 1 or max_position < 1:
        raise ValueError(f"vocab_size and max_position must be positive, got {vocab_size}, {max_position}")
    for name, tid in (("pad_token_id", pad_token_id), ("eos_token_id", eos_token_id), ("bos_token_id", bos_token_id)):
        if not 0 <= tid < vocab_size:
            raise ValueError(f"{name}={tid} is outside the vocabulary (size {vocab_size})")
    ids = {"pad_token_id": pad_token_id, "eos_token_id": eos_token_id, "bos_token_id": bos_token_id}
    if spec.family == "gpt2":
        config: PretrainedConfig = GPT2Config(
            vocab_size=vocab_size, n_positions=max_position, **spec.sizes, **_GPT2_NO_DROPOUT, **ids
        )
    elif spec.family == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, max_position_embeddings=max_position, **spec.sizes, **_LLAMA_NO_DROPOUT, **ids
        )
    else:  # pragma: no cover - ARCHS is closed
        raise ValueError(f"unknown family {spec.family!r}")
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def build_causal_lm(config: PretrainedConfig, seed: int | None = None) -> PreTrainedModel:
    """Fresh causal LM from ``config`` (random init; ``seed`` makes it reproducible).

    With a seed, this calls ``torch.manual_seed(seed)``: the global RNG is
    reseeded, which the training loop reseeds anyway.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once; works on meta tensors)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
