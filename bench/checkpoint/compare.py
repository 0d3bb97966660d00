"""alignflow's training checkpoint (`tasks/train/checkpoint.py`) against `accelerate.Accelerator.save_state`.

    .venv/bin/python bench/checkpoint/compare.py [--arch tiny-gpt2|small-gpt2] [--reps 5]

Same model (built from a config), AdamW after one step and the same lr scheduler, one process. Reports the
time of a save and of a load (best of ``--reps``), the bytes on disk and the files written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="small-gpt2")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from alignflow.config import TrainConfig
    from alignflow.models import build_causal_lm, build_config
    from alignflow.tasks.train.checkpoint import load_checkpoint, save_checkpoint
    from alignflow.tasks.train.loop import build_optimizer, build_scheduler

    cfg = TrainConfig(max_steps=10, mixed_precision="no")
    model = build_causal_lm(build_config(args.arch, vocab_size=4096, pad_token_id=0, eos_token_id=1,
                                         bos_token_id=2, max_position=256), seed=0)
    acc = Accelerator(cpu=True)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    model, opt, sched = acc.prepare(model, opt, sched)
    ids = torch.randint(3, 4096, (2, 32))
    acc.backward(model(input_ids=ids, labels=ids).loss)
    opt.step()
    sched.step()
    params = sum(p.numel() for p in model.parameters())
    root = Path(tempfile.mkdtemp(prefix="ckpt-compare-"))
    try:
        ours_dir, acc_dir = root / "ours", root / "accelerate"
        step = iter(range(1, 10**6))

        def ours_save():
            shutil.rmtree(ours_dir, ignore_errors=True)
            save_checkpoint(ours_dir, step=next(step), model=model, optimizer=opt, scheduler=sched,
                            data_state={"epoch": 0, "batch_index": 1}, keep=1)

        def acc_save():
            shutil.rmtree(acc_dir, ignore_errors=True)
            acc.save_state(str(acc_dir))

        t_ours, t_acc = best(ours_save, args.reps), best(acc_save, args.reps)
        ours_path = next(p for p in ours_dir.iterdir() if p.name.startswith("step-"))
        l_ours = best(lambda: load_checkpoint(ours_path, model=model, optimizer=opt, scheduler=sched), args.reps)
        l_acc = best(lambda: acc.load_state(str(acc_dir)), args.reps)
        print(f"{args.arch}: {params / 1e6:.1f} M parameters, AdamW state, one process, best of {args.reps}")
        print(f"  alignflow save_checkpoint   save {t_ours * 1e3:7.1f} ms  load {l_ours * 1e3:7.1f} ms  "
              f"{folder_bytes(ours_path) / 2**20:6.1f} MiB  files {sorted(p.name for p in ours_path.iterdir())}")
        print(f"  Accelerator.save_state      save {t_acc * 1e3:7.1f} ms  load {l_acc * 1e3:7.1f} ms  "
              f"{folder_bytes(acc_dir) / 2**20:6.1f} MiB  files {sorted(p.name for p in acc_dir.iterdir())}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
