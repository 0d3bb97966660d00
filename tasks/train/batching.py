"""Deterministic, resumable batches of example indices, and dynamic right padding.

The training loop never uses a ``DataLoader`` with a random sampler: the data
position must be exactly resumable from ``(epoch, batch index)``. A
:class:`LengthGroupedBatches` gives, for any epoch, the same list of batches on
every machine and every run, computed from ``seed + epoch`` alone with a private
``torch.Generator`` (no global RNG is read or advanced).

Length grouping (as Hugging Face's ``LengthGroupedSampler``): shuffle all
indices, cut the shuffled list into mega-chunks of ``50 × batch_size``, sort
each chunk by length (longest first), cut it into batches and shuffle the
order of all batches. A batch then holds examples of similar lengths (little
padding) while the sequence of batches stays random.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MEGA_CHUNK_BATCHES = 50


class LengthGroupedBatches:
    """Batches of example indices for each epoch; a pure function of (lengths, batch_size, seed, epoch).

    ``drop_last`` drops the one short batch an epoch may end with (the loop
    sets it under distributed training so that every process gets a share of
    every batch).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        group_by_length: bool = True,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.group_by_length = bool(group_by_length)
        self.drop_last = bool(drop_last)

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        n, b = self.num_examples, self.batch_size
        gen = torch.Generator().manual_seed(self.seed + int(epoch))
        perm = torch.randperm(n, generator=gen).tolist()
        if self.group_by_length:
            mega = MEGA_CHUNK_BATCHES * b
            ordered: list[int] = []
            for start in range(0, n, mega):
                chunk = perm[start : start + mega]
                # Stable sort: ties keep their shuffled order, so the result is deterministic.
                ordered.extend(sorted(chunk, key=lambda i: -self.lengths[i]))
            perm = ordered
        # A chunk holds a whole number of batches, so only the very last batch can be short.
        batches = [perm[i : i + b] for i in range(0, n, b)]
        if self.drop_last and batches and len(batches[-1]) < b:
            batches.pop()
        if self.group_by_length and len(batches) > 1:
            order = torch.randperm(len(batches), generator=gen).tolist()
            batches = [batches[i] for i in order]
        return batches


def pad_collate(
    examples: list[dict[str, list[int]]],
    pad_token_id: int,
    *,
    label_pad: int = -100,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into one batch (no packing: attention never crosses examples).

    Each example has ``input_ids`` and optionally ``attention_mask`` and
    ``labels`` (same length as ``input_ids``). The batch has ``input_ids``
    (padded with ``pad_token_id``), ``attention_mask`` (1 on real tokens) and
    ``labels``: the example's labels padded with ``label_pad``, or, when the
    examples carry none, ``input_ids`` with every padded position set to
    ``label_pad`` (decided from the mask, never from the token value, so a pad
    id that is also EOS still counts where it is real). Scalar fields
    (int/float/bool, e.g. a score) are stacked into a 1-D tensor; other fields
    are left out.
    """
    if not examples:
        raise ValueError("pad_collate got no examples")
    has_labels = "labels" in examples[0]
    if any(("labels" in ex) != has_labels for ex in examples):
        raise ValueError("either every example has `labels` or none has")
    lengths = [len(ex["input_ids"]) for ex in examples]
    width = max(max(lengths), 1)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch_size = len(examples)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    labels = torch.full((batch_size, width), label_pad, dtype=torch.long)
    for row, (ex, n) in enumerate(zip(examples, lengths)):
        if n == 0:
            continue
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        mask = ex.get("attention_mask")
        if mask is not None:
            if len(mask) != n:
                raise ValueError(f"example {row}: attention_mask has {len(mask)} entries for {n} input_ids")
            attention_mask[row, :n] = torch.as_tensor(mask, dtype=torch.long)
        else:
            attention_mask[row, :n] = 1
        if has_labels:
            if len(ex["labels"]) != n:
                raise ValueError(f"example {row}: labels has {len(ex['labels'])} entries for {n} input_ids")
            labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        else:
            labels[row, :n] = torch.where(attention_mask[row, :n].bool(), input_ids[row, :n], label_pad)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for key, value in examples[0].items():
        if key in batch or not isinstance(value, (int, float, bool)):
            continue
        batch[key] = torch.tensor([ex[key] for ex in examples])
    return batch
