"""Byte-level BPE tokenizer trained from the corpus itself (the offline default).

The tokenizer is byte level, so every string, whatever its script, encodes
and decodes back to itself exactly: no unknown token, no lost whitespace.

Special tokens:

* ``<|endoftext|>``: end of sequence, and also beginning of sequence (GPT-2 style).
* ``<|pad|>``: padding, with its own id. Padding must never share the eos id:
  RLHF code masks padding out of losses and rewards, and a shared id would
  mask the real end-of-sequence token as well (and a reward model reads its
  score at the last real token).

Determinism: with tokenizers 0.23 the same texts give the same vocabulary
and merges -- twice in one process, with the texts in another order, and in
another process with ``RAYON_NUM_THREADS=1`` (tests/test_models.py checks all
three). The BPE trainer breaks frequency ties by the pair itself, not by hash
order, and word counts do not depend on the order threads sum them in. Should
a future ``tokenizers`` break this, set ``RAYON_NUM_THREADS=1`` in the
environment before the first training (the Rust thread pool reads it once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = EOS_TOKEN
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]  # ids 0 and 1, in this order

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "save_tokenizer",
    "train_bpe_tokenizer",
]


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_bpe_tokenizer needs strings, got {type(text).__name__}")
        if text:
            yield text


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 4096,
    model_max_length: int = 1024,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (streamed: any iterable, read once).

    Returns a transformers fast tokenizer with ``eos_token == bos_token ==
    "<|endoftext|>"`` (id 0), ``pad_token == "<|pad|>"`` (id 1) and right
    padding. ``vocab_size`` counts the 256 byte symbols and the 2 special
    tokens, so it must be at least 258; a small corpus may give fewer tokens
    than asked for (the trainer stops when no pair reaches ``min_frequency``).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # without it decoded text shows "Ġ" for spaces
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_strings(texts), trainer=trainer)

    eos_id = tok.token_to_id(EOS_TOKEN)
    pad_id = tok.token_to_id(PAD_TOKEN)
    if eos_id is None or pad_id is None or eos_id == pad_id:  # pragma: no cover - trainer contract
        raise RuntimeError(f"special tokens not set up as expected: eos={eos_id} pad={pad_id}")

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        padding_side="right",
        truncation_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tok, path: str | os.PathLike) -> Path:
    """Write ``tok`` to the folder ``path`` (created if needed); load it back with
    ``AutoTokenizer.from_pretrained(path)``. Returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(path))
    portable_tokenizer_class(path)
    return path


def portable_tokenizer_class(path: str | os.PathLike) -> None:
    """transformers 5 records ``"tokenizer_class": "TokenizersBackend"``, a name
    transformers 4 cannot resolve; ``PreTrainedTokenizerFast`` loads the same
    ``tokenizer.json`` under both (in 5 it is an alias of TokenizersBackend)."""
    cfg_path = Path(path) / "tokenizer_config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
