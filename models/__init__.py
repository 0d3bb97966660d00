"""Networks and tokenizers: named architectures, BPE training, safe loading and saving.

Imports nothing else from alignflow (architecture rule).
"""

from .architectures import ARCHS, ArchSpec, build_causal_lm, build_config, count_parameters
from .loading import (
    ModelLoadError,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    save_pretrained,
)
from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, save_tokenizer, train_bpe_tokenizer

__all__ = [
    "ARCHS",
    "ArchSpec",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "ModelLoadError",
    "PAD_TOKEN",
    "build_causal_lm",
    "build_config",
    "count_parameters",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "save_pretrained",
    "save_tokenizer",
    "train_bpe_tokenizer",
]
