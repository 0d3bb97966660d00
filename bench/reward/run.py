"""Reward-model training throughput: alignflow's ``train_reward`` against TRL's ``RewardTrainer``.

Same initial reward model (``reward_model_from_causal_lm`` on a ``small-gpt2``
built from alignflow's architecture table, saved once with ``save_pretrained``;
both sides load that folder), same pairs (a generated synthetic dump, ingested
to ``pairs.parquet``, train split), same token ids (alignflow's
``reward_input_ids``: prompt + response + EOS), the same pairs in the same
optimizer step (alignflow packs the pairs of a question into one batch; the TRL
worker is handed exactly those batches through a batch sampler), same
hyper-parameters and learning-rate values at every step, fp32 on the CPU, in one
run. Afterwards the parent scores the same held-out pairs with both trained
models through one function (``tasks.train.reward.evaluate_pairs``). See README.md.

    .venv/bin/python bench/reward/run.py            # 5 warm-up + 60 timed steps, 2 rounds
    .venv/bin/python bench/reward/run.py --quick    # 2 + 10 steps, 1 round
    .venv/bin/python bench/reward/run.py --profile  # also cProfile ours

Workers (run by the parent, one process each):
    .venv/bin/python bench/reward/run.py ours SPEC.json
    bench/.venv-trl/bin/python bench/reward/run.py trl SPEC.json

This file imports only the standard library and ``bench/common.py`` at the
top: the TRL venv has no alignflow.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (bench/common.py)

TASK = "reward"
HERE = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
HPARAMS = {"lr": 1e-3}  # the other values: common.COMMON_HPARAMS (alignflow's TrainConfig defaults)
ACCURACY_TOLERANCE = 0.01  # "equal accuracy": within one percentage point


# =============================================================================================== parent


def parse_args():
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 warm-up + 10 timed steps, one round")
    p.add_argument("--steps", type=int, default=60, help="timed optimizer steps (default 60)")
    p.add_argument("--skip", type=int, default=5, help="warm-up steps excluded from timing (default 5)")
    p.add_argument("--repeat", type=int, default=2, help="rounds (ours, TRL alternating; median reported)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (at most; see README)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--arch", default="small-gpt2")
    p.add_argument("--questions", type=int, default=3000, help="synthetic questions in the dump")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--eval-pairs", type=int, default=512, help="held-out pairs scored after training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-version", default=common.TRL_VERSION)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) in both workers")
    p.add_argument("--bf16", action="store_true", help="both sides under bf16 autocast (default fp32)")
    p.add_argument("--profile", action="store_true", help="also run ours once under cProfile")
    p.add_argument("--scratch", type=Path, default=None, help="default bench/reward/results/scratch")
    p.add_argument("--out", type=Path, default=None, help="default bench/reward/results/reward.json")
    args = p.parse_args()
    if args.quick:
        args.steps, args.skip, args.repeat = 10, 2, 1
        args.eval_pairs = min(args.eval_pairs, 256)
    args.scratch = args.scratch or HERE / "results" / "scratch"
    args.suffix = ("-bf16" if args.bf16 else "") + (f"-threads{args.threads}" if args.threads else "")
    args.out = args.out or HERE / "results" / f"{TASK}{args.suffix}.json"
    return args


def plan_steps(tok, train_rows: list[dict], batch_size: int, max_length: int, seed: int, steps: int):
    """The pairs of each optimizer step exactly as ``train_reward`` draws them.

    ``train_reward`` tokenizes every row (``pair_examples``), packs the pairs of
    each question into batches of at most ``batch_size`` pairs
    (``question_batches(groups, batch_size, seed)``), and runs the loop with one
    packed batch per micro-batch, drawn by ``LengthGroupedBatches(lengths, 1,
    seed)`` epoch after epoch. Returns (examples, per-step lists of example indices).
    """
    from alignflow.tasks.train.reward import pair_examples, question_batches

    examples = pair_examples(tok, train_rows, max_length)
    packed = question_batches([e["group"] for e in examples], batch_size, seed)
    lengths = [max(max(len(examples[i]["chosen_input_ids"]), len(examples[i]["rejected_input_ids"])) for i in b)
               for b in packed]
    order = common.batch_order(lengths, 1, seed, steps)
    return examples, [packed[el[0]] for el in order]


def evaluate_side(model_dir: Path, tok, held: list[dict], max_length: int) -> dict:
    """Held-out metrics of a trained model, scored by alignflow's ``evaluate_pairs`` (same for both sides)."""
    import torch

    from alignflow.models import load_sequence_classifier
    from alignflow.tasks.train.reward import evaluate_pairs

    model = load_sequence_classifier(model_dir, tokenizer=tok)
    model.to(torch.float32).eval()
    out = evaluate_pairs(model, tok, held, batch_size=32, max_length=max_length, n_worst=0)
    return {k.removeprefix("eval/"): v for k, v in out.items() if k.startswith("eval/")}


def summarize(results: list[dict], timed_pairs: int, timed_tokens: int) -> dict:
    s = common.summarize(results, timed_pairs)
    out = {k.replace("tokens_per", "pairs_per"): v for k, v in s.items()}
    out["tokens_per_s"] = statistics.median(timed_tokens / r["timed_seconds"] for r in results)
    return out


def main() -> None:
    args = parse_args()
    import pyarrow.parquet as pq

    from alignflow.models import load_tokenizer, reward_model_from_causal_lm

    total = args.skip + args.steps
    machine = common.machine_info()
    assets = common.prepare_assets(args.scratch, questions=args.questions, seed=args.seed, arch=args.arch,
                                   max_length=args.max_length, vocab_size=args.vocab_size)
    tok = load_tokenizer(assets["tokenizer"])
    rm_init = args.scratch / "rm-init"
    if not (rm_init / "config.json").is_file():
        rm = reward_model_from_causal_lm(assets["model"], tokenizer=tok, seed=args.seed)
        rm.save_pretrained(str(rm_init))
    rows = pq.read_table(Path(assets["datasets"]) / "pairs.parquet").to_pylist()
    train_rows = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] in ("validation", "test")][: args.eval_pairs]

    t0 = time.perf_counter()
    trl_python = common.ensure_trl_venv(trl_version=args.trl_version)
    venv_seconds = time.perf_counter() - t0

    examples, steps = plan_steps(tok, train_rows, args.batch_size, args.max_length, args.seed, total)
    work = args.scratch / (TASK + args.suffix)
    ordered = [{"chosen_ids": examples[i]["chosen_input_ids"], "rejected_ids": examples[i]["rejected_input_ids"]}
               for b in steps for i in b]
    common.write_jsonl(work / "trl_pairs.jsonl", ordered)
    train_path = work / "train_pairs.jsonl"
    common.write_jsonl(train_path, [{k: r.get(k) for k in ("prompt", "chosen", "rejected", "margin", "site",
                                                           "question_id", "pair_id")} for r in train_rows])
    pairs_per_step = [len(b) for b in steps]
    tokens_per_step = [sum(len(examples[i]["chosen_input_ids"]) + len(examples[i]["rejected_input_ids"]) for i in b)
                       for b in steps]
    padded_per_step = [2 * len(b) * max(max(len(examples[i]["chosen_input_ids"]), len(examples[i]["rejected_input_ids"]))
                                        for i in b) for b in steps]
    timed_pairs, timed_tokens = sum(pairs_per_step[args.skip:]), sum(tokens_per_step[args.skip:])
    hparams = {**common.COMMON_HPARAMS, **HPARAMS}
    spec = {
        "task": TASK, "model_dir": str(rm_init), "tokenizer_dir": assets["tokenizer"],
        "batch_size": args.batch_size, "max_length": args.max_length, "max_steps": total, "skip_steps": args.skip,
        "log_every": 5, "seed": args.seed, "hparams": hparams, "bf16": bool(args.bf16), "threads": args.threads,
        "train_rows_path": str(train_path), "trl_pairs_path": str(work / "trl_pairs.jsonl"),
        "pairs_per_step": pairs_per_step, "expected_tokens": sum(tokens_per_step),
        "output_dir": str(work / "trl-output"),
    }
    logs = work / "logs"
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for r in range(args.repeat):
        for side in (["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]):
            py = Path(sys.executable) if side == "ours" else trl_python
            print(f"round {r + 1}/{args.repeat}: {side} ...", flush=True)
            res = common.run_worker(py, side, {**spec, "save_dir": str(work / f"trained-{side}")}, logs,
                                    f"{side}-{r}", script=SCRIPT)
            print(f"  {timed_pairs / res['timed_seconds']:,.1f} pairs/s, {res['ru_maxrss_kib'] / 1024:,.0f} MiB, "
                  f"final loss {res['final_loss']:.4f}", flush=True)
            runs[side].append(res)
    for side in ("ours", "trl"):
        for res in runs[side]:
            if res["tokens_seen"] != sum(tokens_per_step):
                sys.exit(f"{side}: saw {res['tokens_seen']} tokens, expected {sum(tokens_per_step)}: the data differ")
    print("scoring the held-out pairs with both trained models (alignflow's evaluate_pairs) ...", flush=True)
    evals = {"initial": evaluate_side(rm_init, tok, held, args.max_length)}
    for side in ("ours", "trl"):
        evals[side] = evaluate_side(work / f"trained-{side}", tok, held, args.max_length)
    summary = {"ours": summarize(runs["ours"], timed_pairs, timed_tokens),
               "trl": summarize(runs["trl"], timed_pairs, timed_tokens),
               "trl_version": runs["trl"][0]["versions"]["trl"]}
    for key in ("pairs_per_s", "pairs_per_s_best_steps", "pairs_per_cpu_s"):
        summary[f"ratio_{key}"] = summary["ours"][key] / summary["trl"][key]
    acc_o, acc_t = evals["ours"]["pairwise_accuracy"], evals["trl"]["pairwise_accuracy"]
    summary["accuracy_ours"], summary["accuracy_trl"] = acc_o, acc_t
    summary["accuracy_difference"] = acc_o - acc_t
    summary["equal_accuracy"] = abs(acc_o - acc_t) <= ACCURACY_TOLERANCE + 1e-12
    summary["target_ratio"] = common.TARGET_RATIO
    summary["target_met"] = summary["ratio_pairs_per_s"] >= common.TARGET_RATIO and summary["equal_accuracy"]
    profile = common.profile_ours({**spec, "save_dir": None}, logs, script=SCRIPT) if args.profile else None
    out = {
        "bench": TASK,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine, "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "load_avg (1, 5, 15 min) at the start; other people's jobs share this machine"},
        "setup": {
            "arch": args.arch, "parameters": assets["parameters"], "vocab": assets["vocab"],
            "max_pairs_per_step": args.batch_size, "pairs_per_step_mean": statistics.mean(pairs_per_step[args.skip:]),
            "max_length": args.max_length, "timed_steps": args.steps, "warmup_steps_excluded": args.skip,
            "repeat": args.repeat, "hparams": hparams, "train_pairs": len(train_rows), "eval_pairs": len(held),
            "timed_pairs": timed_pairs, "timed_tokens": timed_tokens,
            "padding_fraction": 1 - timed_tokens / sum(padded_per_step[args.skip:]),
            "questions": args.questions, "seed": args.seed, "trl_venv_seconds": round(venv_seconds, 1),
            "precision": "bf16 autocast" if args.bf16 else "fp32", "torch_threads": args.threads or "default",
        },
        "summary": summary,
        "eval": evals,
        "sides": {side: {k: runs[side][0][k] for k in ("versions", "threads", "optimizer", "dtype")
                         if k in runs[side][0]} for side in ("ours", "trl")},
        "runs": {side: [{k: v for k, v in res.items() if k != "step_seconds"}
                        | {"pairs_per_s": timed_pairs / res["timed_seconds"]} for res in rs]
                 for side, rs in runs.items()},
        "profile_top": profile,
        "notes": [
            "ours: alignflow.tasks.train.reward.train_reward (question-packed batches, train_loop, reward_loss_fn) "
            "in a subprocess of the main venv; TRL: RewardTrainer in a subprocess of bench/.venv-trl",
            "data: the same token ids (alignflow's reward_input_ids); TRL gets them pre-tokenized as "
            "chosen_ids/rejected_ids and pads them with its DataCollatorForPreference",
            "batches: identical pairs in every optimizer step: the TRL worker's train dataloader uses a batch "
            "sampler over alignflow's packed batches (question-grouped, so a step may hold fewer than "
            "batch_size pairs)",
            "lr: identical values at every step (the TRL worker overrides create_scheduler with alignflow's "
            "lr_multiplier); fp32 unless --bf16; gradient_checkpointing=False (TRL's default is True)",
            "accuracy: the parent loads both trained models and scores the same held-out pairs with "
            "alignflow's evaluate_pairs (reward at the last real token)",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print()
    table = []
    for name, s, ev in (("alignflow", summary["ours"], evals["ours"]),
                        (f"TRL {summary['trl_version']}", summary["trl"], evals["trl"])):
        table.append([name, f"{s['pairs_per_s']:,.1f}", f"{s['pairs_per_s_best_steps']:,.1f}",
                      f"{s['pairs_per_cpu_s']:,.2f}", f"{s['step_seconds_median'] * 1000:.0f}",
                      f"{s['peak_rss_mib']:,.0f}", f"{s['final_loss']:.4f}", f"{ev['pairwise_accuracy']:.4f}"])
    common.print_table(table, ["side", "pairs/s", "best-step pairs/s", "pairs/CPU-s", "ms/step (median)",
                               "peak RSS MiB", "final loss", "held-out accuracy"])
    print(f"\ninitial model held-out accuracy: {evals['initial']['pairwise_accuracy']:.4f} "
          f"({len(held)} pairs)")
    print(f"ratio ours/TRL pairs/s: {summary['ratio_pairs_per_s']:.2f}x (best-step "
          f"{summary['ratio_pairs_per_s_best_steps']:.2f}x, per CPU-s {summary['ratio_pairs_per_cpu_s']:.2f}x); "
          f"target >= {common.TARGET_RATIO}x at equal accuracy (+-1 point): "
          f"{'met' if summary['target_met'] else 'NOT met'}; accuracy difference {100 * (acc_o - acc_t):+.2f} points")
    print(f"results: {args.out}")


# =============================================================================================== workers


def worker_ours(spec: dict) -> None:
    t_start = time.perf_counter()
    import torch

    from alignflow.models import load_sequence_classifier, load_tokenizer
    from alignflow.tasks.train.loop import LoopCallbacks
    from alignflow.tasks.train.reward import train_reward

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    tcfg = common.train_config(spec)
    tok = load_tokenizer(spec["tokenizer_dir"])
    model = load_sequence_classifier(spec["model_dir"], tokenizer=tok)
    model.to(torch.float32)
    rows = common.read_jsonl(Path(spec["train_rows_path"]))
    stamps: list[float] = []
    cpu: list[float] = []
    losses: list[tuple[int, float]] = []

    def on_step(step: int, max_steps: int) -> None:
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())

    def on_log(metrics: dict, step: int) -> None:
        if "train/loss" in metrics:
            losses.append((step, float(metrics["train/loss"])))

    profiler = None
    if spec.get("profile_path"):
        import cProfile

        profiler = cProfile.Profile()
    setup_seconds = time.perf_counter() - t_start
    t_train, cpu_train = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    # rows_eval=[]: no evaluation inside the run (the parent scores both sides' models the same way)
    loop = train_reward(tcfg, model, tok, rows, [], max_length=spec["max_length"],
                        callbacks=LoopCallbacks(on_step=on_step, on_log=on_log))
    if profiler:
        profiler.disable()
        profiler.dump_stats(spec["profile_path"])
    if spec.get("save_dir"):
        model.save_pretrained(spec["save_dir"])
    from alignflow.tasks.train.loop import build_optimizer

    probe = build_optimizer(torch.nn.Linear(2, 2), tcfg)
    result = {
        "side": "ours", "task": TASK, **common._timing(stamps, t_train, spec["skip_steps"], cpu, cpu_train),
        "setup_seconds": setup_seconds, "losses": losses,
        "final_loss": losses[-1][1], "final_loss_window": [losses[-2][0] + 1 if len(losses) > 1 else 1, losses[-1][0]],
        "tokens_seen": loop.tokens_seen, "steps": loop.final_step, "threads": torch.get_num_threads(),
        "optimizer": f"torch.optim.AdamW (fused={probe.defaults.get('fused')}, "
                     f"foreach={probe.defaults.get('foreach')})",
        "dtype": str(next(model.parameters()).dtype),
        "versions": common._versions("torch", "transformers", "accelerate", "alignflow"),
    }
    common._finish(spec, result, t_start)


def worker_trl(spec: dict) -> None:
    t_start = time.perf_counter()
    import math

    import datasets
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    h = spec["hparams"]
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    tok.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    rows = common.read_jsonl(Path(spec["trl_pairs_path"]))
    sizes = spec["pairs_per_step"]
    if sum(sizes) != len(rows):
        raise SystemExit(f"{len(rows)} pairs for {sum(sizes)} planned")
    ds = datasets.Dataset.from_list(rows)
    max_steps = spec["max_steps"]
    args = RewardConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_length=spec["max_length"], max_steps=max_steps,
        learning_rate=h["lr"], weight_decay=h["weight_decay"], adam_beta1=h["adam_beta1"],
        adam_beta2=h["adam_beta2"], adam_epsilon=h["adam_eps"], max_grad_norm=h["max_grad_norm"],
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": h["min_lr_ratio"]},
        warmup_steps=h["warmup_steps"],
        logging_steps=spec["log_every"], save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=0, bf16=bool(spec.get("bf16")), fp16=False, use_cpu=True,
        gradient_checkpointing=False,  # TRL's default is True; alignflow does not checkpoint
        disable_dropout=True, seed=spec["seed"], disable_tqdm=True,
    )
    stamps: list[float] = []
    cpu: list[float] = []
    losses: list[tuple[int, float]] = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            if state.global_step == max_steps:
                control.should_log = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))

    def multiplier(done_steps: int) -> float:
        """alignflow's lr_multiplier(done_steps + 1) (tasks/train/loop.py), copied: this venv has no alignflow."""
        step, warmup, total, floor = done_steps + 1, h["warmup_steps"], max_steps, h["min_lr_ratio"]
        if warmup > 0 and step <= warmup:
            return step / warmup
        progress = 1.0 if total - warmup <= 0 else min(max((step - warmup) / (total - warmup), 0.0), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    class StepBatches(torch.utils.data.Sampler):
        """alignflow's packed batches, in order: consecutive slices of the (already ordered) rows."""

        def __iter__(self):
            start = 0
            for n in sizes:
                yield list(range(start, start + n))
                start += n

        def __len__(self):
            return len(sizes)

    class Trainer(RewardTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, multiplier)
            return self.lr_scheduler

        def get_train_dataloader(self):
            # The only change to TRL's pipeline: which pairs form each batch (alignflow's question packing).
            data = self._remove_unused_columns(self.train_dataset, description="training")
            loader = DataLoader(data, batch_sampler=StepBatches(), collate_fn=self.data_collator,
                                num_workers=0, pin_memory=False)
            return self.accelerator.prepare(loader)

    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Probe()])
    if len(trainer.train_dataset) != len(rows):
        raise SystemExit(f"TRL kept {len(trainer.train_dataset)} of {len(rows)} pairs: the batches would shift")
    profiler = None
    setup_seconds = time.perf_counter() - t_start
    t_train, cpu_train = time.perf_counter(), time.process_time()
    trainer.train()
    if spec.get("save_dir"):
        trainer.model.save_pretrained(spec["save_dir"])
    del profiler
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    result = {
        "side": "trl", "task": TASK, **common._timing(stamps, t_train, spec["skip_steps"], cpu, cpu_train),
        "setup_seconds": setup_seconds, "losses": losses,
        "final_loss": losses[-1][1], "final_loss_window": [losses[-2][0] + 1 if len(losses) > 1 else 1, losses[-1][0]],
        "tokens_seen": int(trainer._total_train_tokens), "steps": trainer.state.global_step,
        "threads": torch.get_num_threads(),
        "optimizer": f"{type(inner).__module__}.{type(inner).__name__} (optim={args.optim}, "
                     f"fused={inner.defaults.get('fused')}, foreach={inner.defaults.get('foreach')})",
        "gradient_checkpointing": args.gradient_checkpointing, "dtype": str(next(model.parameters()).dtype),
        "versions": common._versions("torch", "transformers", "accelerate", "trl", "datasets"),
    }
    common._finish(spec, result, t_start)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("ours", "trl"):
        _spec = json.loads(Path(sys.argv[2]).read_text())
        _spec["_load_start"] = os.getloadavg()[0]
        (worker_ours if sys.argv[1] == "ours" else worker_trl)(_spec)
    else:
        main()
