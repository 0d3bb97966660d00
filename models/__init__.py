"""Networks and tokenizers: named architectures, BPE training, safe loading and saving.

Imports nothing else from alignflow (architecture rule).
"""

from .architectures import ARCHS, ArchSpec, build_causal_lm, build_config, count_parameters
from .loading import (
    ModelLoadError,
    UnsafeArtifactError,
    check_builtin_artifact,
    load_builtin_artifact,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    save_pretrained,
)
from .reward import (
    head_init_std,
    last_token_index,
    reward_bias,
    reward_input_ids,
    reward_model_from_causal_lm,
    score_sequences,
    score_texts,
    set_reward_bias,
)
from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, save_tokenizer, train_bpe_tokenizer

__all__ = [
    "ARCHS",
    "ArchSpec",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "ModelLoadError",
    "UnsafeArtifactError",
    "check_builtin_artifact",
    "load_builtin_artifact",
    "PAD_TOKEN",
    "build_causal_lm",
    "build_config",
    "count_parameters",
    "head_init_std",
    "last_token_index",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "reward_bias",
    "reward_input_ids",
    "reward_model_from_causal_lm",
    "save_pretrained",
    "save_tokenizer",
    "score_sequences",
    "score_texts",
    "set_reward_bias",
    "train_bpe_tokenizer",
]
