"""Helpers for tests/test_train_loop.py, and a training run to start as a subprocess (and kill).

As a script::

    python tests/_train_worker.py --ckpt DIR --losses FILE --result FILE [--resume] [--steps 40]
        [--checkpoint-every 10] [--slow-after 20] [--seed 0] [--crash-at N] [--record FILE]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_train_worker.py --distributed ...

trains a tiny GPT-2 (dropout on, so the RNG state matters) on a seeded
synthetic dataset, prints ``step N loss X`` after every optimizer step,
appends ``N X`` (the loss as repr) to the losses file, and at the end writes
a JSON result. ``--slow-after K`` sleeps a little after each step past K, so
a test can kill the process between two checkpoints without racing it.
``--crash-at N`` exits abruptly (every process) after step N. ``--record FILE`` writes,
per process (``FILE.rank<i>``), the example indices of each micro-batch it
trained on. ``--distributed`` runs on CPU processes (gloo) under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

VOCAB = 300
PAD = 0


def make_model(seed: int = 0, *, dropout: float = 0.0, n_layer: int = 2, n_embd: int = 32) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_head=2,
        n_embd=n_embd,
        vocab_size=VOCAB,
        n_positions=128,
        attn_pdrop=dropout,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
    )
    return transformers.GPT2LMHeadModel(config)


def make_dataset(n: int = 64, seed: int = 0, *, min_len: int = 8, max_len: int = 40) -> list[dict[str, list[int]]]:
    """Learnable sequences: a random start token, then counting up by a per-sequence stride of 1 or 2.

    The first token is unpredictable; every later one follows from the two before it.
    """
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        start = rng.randrange(2, VOCAB)
        stride = rng.choice((1, 2))
        ids = [2 + (start - 2 + i * stride) % (VOCAB - 2) for i in range(length)]
        data.append({"input_ids": ids})
    return data


def lm_loss(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, {}


def collate(examples):
    from alignflow.tasks.train.batching import pad_collate

    return pad_collate(examples, PAD)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--losses", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--slow-after", type=int, default=None)
    parser.add_argument("--sleep", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crash-at", type=int, default=None)
    parser.add_argument("--record", type=Path, default=None)
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--equal-length", action="store_true", help="64 sequences of one length (exact DDP parity)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    from alignflow.config import TrainConfig
    from alignflow.tasks.train.loop import LoopCallbacks, train_loop

    cfg = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=2,
        lr=3e-3,
        warmup_steps=5,
        schedule="cosine",
        seed=args.seed,
        log_every=1,
        eval_every=15,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=2,
        mixed_precision="no",
    )
    accelerator = None
    if args.distributed:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=cfg.grad_accum)
    rank = accelerator.process_index if accelerator is not None else 0
    suffix = f".rank{rank}" if rank else ""
    model = make_model(args.seed, dropout=args.dropout)
    # `idx` rides along (pad_collate stacks scalar fields) so that --record can see which examples were used.
    raw = make_dataset(64, seed=args.seed, min_len=24, max_len=24) if args.equal_length else make_dataset(62, seed=args.seed)
    dataset = [{**ex, "idx": i} for i, ex in enumerate(raw)]
    losses = open(str(args.losses) + suffix, "a")
    seen: list[list[int]] = []

    def loss_fn(model, batch):
        if args.crash_at is not None and len(seen) == args.crash_at * cfg.grad_accum:
            losses.flush()
            os._exit(3)  # every process dies abruptly at the start of step crash_at + 1
        seen.append(batch["idx"].tolist())
        return lm_loss(model, batch)

    def on_log(metrics, step):
        if "train/loss" not in metrics:
            return
        print(f"step {step} loss {metrics['train/loss']!r}", flush=True)
        losses.write(f"{step} {metrics['train/loss']!r}\n")
        losses.flush()
        if args.slow_after is not None and step > args.slow_after:
            time.sleep(args.sleep)

    def on_eval(step):
        # Draws random numbers on purpose: the loop must isolate callbacks from the training RNG.
        torch.rand(3)
        random.random()
        return {"eval/marker": float(step)}

    result = train_loop(
        model,
        dataset,
        collate,
        loss_fn,
        cfg,
        checkpoint_dir=args.ckpt,
        resume=args.resume,
        callbacks=LoopCallbacks(on_log=on_log, on_eval=on_eval),
        accelerator=accelerator,
    )
    losses.close()
    if args.record is not None:
        Path(str(args.record) + suffix).write_text(json.dumps(seen))
    Path(str(args.result) + suffix).write_text(
        json.dumps(
            {
                "final_step": result.final_step,
                "final_loss": result.final_loss,
                "resumed_from": result.resumed_from,
                "tokens_seen": result.tokens_seen,
                "checkpoint": str(result.checkpoint),
                "last_eval": result.last_eval,
            }
        )
    )
    print(f"done final_loss {result.final_loss!r} resumed_from {result.resumed_from}", flush=True)
    from alignflow.tasks import launch

    # Leave together and close gloo, as a launched stage does (launch.finish); then exit as it does, without the
    # interpreter's finalization, where gloo's leftovers can abort a process whose work is done.
    launch.finish()
    return 0


if __name__ == "__main__":
    status = main()
    from alignflow.tasks import launch

    if launch.group_closed():
        launch.exit_without_finalization(status)
    sys.exit(status)
