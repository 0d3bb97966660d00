"""Shared pieces of the training benchmarks (``bench/sft``, ``bench/base``): alignflow against TRL.

Three roles, one file:

* **Parent helpers** (run in the main venv by ``bench/*/run.py``): build the TRL
  venv, prepare the shared assets (synthetic dump -> ingest -> tokenizer ->
  initial model saved with ``save_pretrained``), write the data files, run the
  two workers as subprocesses and print the table.
* **Worker ``ours``** (``<main venv>/python bench/common.py ours SPEC.json``):
  alignflow's training (``train_sft`` or ``train_loop`` + ``causal_lm_loss``).
* **Worker ``trl``** (``bench/.venv-trl/bin/python bench/common.py trl SPEC.json``):
  TRL's ``SFTTrainer`` on the same model, tokens, batches and hyper-parameters.

This module imports only the standard library at the top: the TRL venv has no
alignflow, and the parent must not pay for torch before it needs it.

Each worker measures itself the same way: a timestamp (``time.perf_counter``)
at the end of every optimizer step (ours: ``LoopCallbacks.on_step``; TRL: a
``TrainerCallback.on_step_end``); the timed span runs from the end of step
``skip_steps`` to the end of the last step, so imports, model loading, dataset
preparation, optimizer creation and the first (warm-up) steps are excluded.
Peak memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the worker at
its end (whole process lifetime, imports and model load included). The parent
also polls the RSS of the worker's process tree with psutil as a cross-check.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TRL_VENV = BENCH / ".venv-trl"
# Verified with transformers 5.24.0 / accelerate 1.15.0 / torch 2.13.0+cpu (the project's pins).
TRL_VERSION = "1.16.0"
MIB = 1 << 20
SITE = "synthetic.stackexchange.com"
IGNORE = -100


# =============================================================================================== parent: venv


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_trl_venv(venv: Path = TRL_VENV, trl_version: str = TRL_VERSION, log=print) -> Path:
    """Create (once) a venv without system site-packages holding ``trl==trl_version``.

    torch, transformers, accelerate, tokenizers, safetensors, numpy ... are held
    to the project's ``constraints.txt`` (pip would otherwise pull a CUDA torch),
    so both sides run the very same torch/transformers/accelerate builds. A stamp
    file records what was installed; a different TRL version or constraints file
    reinstalls. Returns the venv's python.
    """
    constraints = ROOT / "constraints.txt"
    wanted = {
        "trl": trl_version,
        "constraints_sha256": hashlib.sha256(constraints.read_bytes()).hexdigest(),
        "python": platform.python_version(),
    }
    stamp = venv / ".bench-installed.json"
    py = venv_python(venv)
    if py.exists() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == wanted:
                return py
        except json.JSONDecodeError:
            pass
    t0 = time.perf_counter()
    log(f"creating the TRL venv {venv} (trl=={trl_version}; torch etc. pinned by constraints.txt) ...")
    if not py.exists():
        # The base interpreter of this venv; --system-site-packages is deliberately not given.
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", str(constraints)]
    proc = subprocess.run([*pip, "torch==2.13.0", f"trl=={trl_version}"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"pip install into {venv} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    check = subprocess.run(
        [str(py), "-c", "import trl, torch, transformers; print(trl.__version__, torch.__version__, "
         "transformers.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit(f"the TRL venv does not import trl:\n{check.stderr[-4000:]}")
    stamp.write_text(json.dumps(wanted, indent=2))
    log(f"TRL venv ready in {time.perf_counter() - t0:.0f} s: trl, torch, transformers = {check.stdout.strip()}")
    return py


# =============================================================================================== parent: assets


def prepare_assets(scratch: Path, *, questions: int, seed: int, arch: str, max_length: int,
                   vocab_size: int, log=print) -> dict[str, Any]:
    """Synthetic dump -> ingest -> BPE tokenizer (train-split post texts) -> initial model, all cached in ``scratch``.

    The tokenizer and the model are built exactly as ``train_base`` builds them
    (``train_bpe_tokenizer`` on question + answer texts of the train split,
    ``build_config`` + ``build_causal_lm(seed)``), then saved with
    ``save_pretrained``; both workers load these folders.
    """
    from alignflow.config import IngestConfig
    from alignflow.models import build_causal_lm, build_config, save_tokenizer, train_bpe_tokenizer
    from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
    from alignflow.tasks.ingest.synthetic import generate_dump
    from alignflow.tasks.train.lm import iter_post_texts

    scratch.mkdir(parents=True, exist_ok=True)
    marker = scratch / "assets.json"
    key = {"questions": questions, "seed": seed, "arch": arch, "max_length": max_length, "vocab_size": vocab_size}
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("key") == key and all(Path(info[k]).exists() for k in ("datasets", "tokenizer", "model")):
            info["reused"] = True
            return info
    t0 = time.perf_counter()
    log(f"preparing assets in {scratch}: {questions} synthetic questions, ingest, tokenizer, {arch} ...")
    site = generate_dump(scratch / "dump", questions=questions, seed=seed, site=SITE)
    cfg = IngestConfig()
    result = execute_ingest(plan_ingest([site], scratch / "work", cfg), cfg)
    datasets = Path(result.out_dir)
    texts = list(iter_post_texts(datasets / "posts.parquet", kinds=["questions", "answers"], split="train"))
    tok = train_bpe_tokenizer(texts, vocab_size=vocab_size, model_max_length=max_length)
    tok_dir = save_tokenizer(tok, scratch / "tokenizer")
    config = build_config(arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, max_position=max_length)
    model = build_causal_lm(config, seed=seed)
    model_dir = scratch / "model-init"
    model.save_pretrained(str(model_dir))
    info = {"key": key, "datasets": str(datasets), "tokenizer": str(tok_dir), "model": str(model_dir),
            "vocab": len(tok), "parameters": sum(p.numel() for p in model.parameters()),
            "posts_rows": result.datasets["posts"]["rows"], "demos_rows": result.datasets["demos"]["rows"],
            "prepare_seconds": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(info, indent=2))
    info["reused"] = False
    return info


def batch_order(lengths: list[int], batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """The first ``steps`` batches (example indices) that alignflow's loop draws: epoch 0, 1, ... of
    ``LengthGroupedBatches(lengths, batch_size, seed, group_by_length=True)``. Every batch must be full
    (the caller trims the dataset to a multiple of the batch size), so TRL's sequential sampler over
    the flattened order gives exactly the same batches."""
    from alignflow.tasks.train.batching import LengthGroupedBatches

    if len(lengths) % batch_size:
        raise ValueError(f"{len(lengths)} examples is not a multiple of the batch size {batch_size}")
    batcher = LengthGroupedBatches(lengths, batch_size, seed, group_by_length=True)
    out: list[list[int]] = []
    epoch = 0
    while len(out) < steps:
        out.extend(batcher.batches_for_epoch(epoch))
        epoch += 1
    return out[:steps]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def step_token_counts(examples: list[dict], batches: list[list[int]]) -> dict[str, list[int]]:
    """Per step: non-pad tokens, padded tokens (batch x longest) and loss tokens (labels != -100, shifted)."""
    real, padded, loss = [], [], []
    for batch in batches:
        lens = [len(examples[i]["input_ids"]) for i in batch]
        real.append(sum(lens))
        padded.append(len(batch) * max(lens))
        loss.append(sum(sum(1 for x in examples[i]["labels"][1:] if x != IGNORE) for i in batch))
    return {"real": real, "padded": padded, "loss": loss}


# =============================================================================================== parent: running


def _tree_rss(proc) -> int:
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def src_shim(src_root: Path, dest: Path) -> Path:
    """A folder to put on PYTHONPATH so that ``import alignflow`` loads the source tree at ``src_root``.

    The repository keeps ``flows/``, ``tasks/``, ``models/`` and ``data_contracts/`` at the top level, and
    ``pyproject.toml`` maps them to ``alignflow.flows`` etc. (the same mapping an installed wheel has). The shim is
    ``dest/alignflow/`` holding symlinks: ``__init__.py`` and ``config.py`` to ``src_root/alignflow/``, and one
    link per subpackage folder. Nothing is installed. Returns ``dest``.
    """
    src_root, pkg = Path(src_root).resolve(), Path(dest) / "alignflow"
    pkg.mkdir(parents=True, exist_ok=True)
    links = {p.name: p for p in (src_root / "alignflow").glob("*.py")}
    links.update({name: src_root / name for name in ("flows", "tasks", "models", "data_contracts")
                  if (src_root / name).is_dir()})
    for name, target in links.items():
        link = pkg / name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            link.unlink()
        link.symlink_to(target)
    return Path(dest)


def run_worker(python: Path, side: str, spec: dict, log_dir: Path, name: str, script: Path | None = None) -> dict:
    """Run ``python <script> <side> spec.json`` (default script: this file) and return its result dict (plus wall
    time, psutil peak)."""
    import psutil

    log_dir.mkdir(parents=True, exist_ok=True)
    spec_path = log_dir / f"{name}.spec.json"
    result_path = log_dir / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    spec = {**spec, "result_path": str(result_path)}
    spec_path.write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(log_dir.parent / "hf-home"), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_DISABLED": "true", "PYTHONUNBUFFERED": "1", "DISABLE_MLFLOW_INTEGRATION": "TRUE"}
    env.pop("PYTHONPATH", None)
    if side == "ours" and os.environ.get("ALIGNFLOW_BENCH_SRC"):
        # Measure another source tree of alignflow (e.g. an exported older commit) with the same venv.
        env["PYTHONPATH"] = str(src_shim(Path(os.environ["ALIGNFLOW_BENCH_SRC"]), log_dir / "src-shim"))
    out_path, err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        popen = subprocess.Popen([str(python), str(Path(script or __file__).resolve()), side, str(spec_path)],
                                 stdout=out, stderr=err, env=env, cwd=ROOT)
        proc = psutil.Process(popen.pid)
        peak = 0
        while popen.poll() is None:
            peak = max(peak, _tree_rss(proc))
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    if popen.returncode != 0 or not result_path.is_file():
        tail = "\n".join(err_path.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"worker {name} ({side}) failed with exit code {popen.returncode}; stderr tail:\n{tail}")
    result = json.loads(result_path.read_text())
    result.update({"wall_seconds": wall, "psutil_peak_rss_mib": peak / MIB, "log_stdout": str(out_path),
                   "log_stderr": str(err_path)})
    return result


def summarize(results: list[dict], timed_tokens: int) -> dict:
    """Median over repeats of tokens/s; max of peak RSS; final loss of the first run (runs are deterministic)."""
    tps = [timed_tokens / r["timed_seconds"] for r in results]
    # Noise-robust figure for a shared machine: each timed step at its fastest over the rounds
    # (every round runs the same batches), summed.
    skip = results[0]["skip_steps"]
    best_steps = [min(col) for col in zip(*(r["step_seconds"][skip:] for r in results))]
    return {
        "tokens_per_s": statistics.median(tps),
        "tokens_per_s_runs": [round(x, 1) for x in tps],
        "tokens_per_s_best_steps": timed_tokens / sum(best_steps),
        "tokens_per_cpu_s": statistics.median(timed_tokens / r["timed_cpu_seconds"] for r in results),
        "load_avg_1min": [r.get("load_avg_1min") for r in results],
        "step_seconds_median": statistics.median(s for r in results for s in r["step_seconds"][r["skip_steps"]:]),
        "timed_seconds": statistics.median(r["timed_seconds"] for r in results),
        "peak_rss_mib": max(r["ru_maxrss_kib"] / 1024 for r in results),
        "psutil_peak_rss_mib": max(r["psutil_peak_rss_mib"] for r in results),
        "final_loss": results[0]["final_loss"],
        "final_loss_window": results[0]["final_loss_window"],
        "first_loss": results[0]["losses"][0][1] if results[0]["losses"] else None,
        "setup_seconds": statistics.median(r["setup_seconds"] for r in results),
        "wall_seconds": statistics.median(r["wall_seconds"] for r in results),
        "tokens_seen": results[0]["tokens_seen"],
    }


def machine_info() -> dict:
    import psutil

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
            "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
            "python": platform.python_version(), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def report_table(summary: dict, timed_tokens: int, steps: int) -> None:
    ours, trl = summary["ours"], summary["trl"]
    rows = []
    for name, s in (("alignflow", ours), (f"TRL {summary['trl_version']}", trl)):
        rows.append([name, f"{s['tokens_per_s']:,.0f}", f"{s['tokens_per_s_best_steps']:,.0f}",
                     f"{s['tokens_per_cpu_s']:,.0f}",
                     f"{s['step_seconds_median'] * 1000:.0f}",
                     f"{s['timed_seconds']:.1f}", f"{s['peak_rss_mib']:,.0f}", f"{s['final_loss']:.4f}",
                     f"{s['first_loss']:.4f}" if s["first_loss"] is not None else "-"])
    print_table(rows, ["side", "tokens/s", "best-step tokens/s", "tokens/CPU-s", "ms/step (median)",
                       f"s ({steps} steps)", "peak RSS MiB", "final loss", "first loss"])
    print(f"\nratio ours/TRL tokens/s: {summary['ratio_tokens_per_s']:.2f}x (target >= {summary['target_ratio']}x: "
          f"{'met' if summary['target_met'] else 'NOT met'}); best-step ratio "
          f"{summary['ratio_tokens_per_s_best_steps']:.2f}x; per CPU-second "
          f"{summary['ratio_tokens_per_cpu_s']:.2f}x; {timed_tokens:,} non-pad tokens in the timed steps")


# =============================================================================================== parent: orchestration

HPARAMS = {  # the stage defaults of alignflow.config, given to both sides
    "sft": {"lr": 1e-3},
    "base": {"lr": 2e-3},
}
COMMON_HPARAMS = {"weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8,
                  "warmup_steps": 10, "min_lr_ratio": 0.1, "max_grad_norm": 1.0}
TARGET_RATIO = 1.3


def parse_args(task: str, doc: str):
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 warm-up + 10 timed steps, one round")
    p.add_argument("--steps", type=int, default=60, help="timed optimizer steps (default 60)")
    p.add_argument("--skip", type=int, default=5, help="warm-up steps excluded from timing (default 5)")
    p.add_argument("--repeat", type=int, default=2, help="rounds (ours, TRL alternating; median reported)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--arch", default="small-gpt2")
    p.add_argument("--questions", type=int, default=3000, help="synthetic questions in the dump")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-version", default=TRL_VERSION)
    p.add_argument("--trl-padding-free", action="store_true",
                   help="also run TRL with padding_free=True (informative row; alignflow has no such mode)")
    p.add_argument("--profile", action="store_true", help="also run ours once under cProfile and print the top")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) in both workers (default: torch's choice, one per core)")
    p.add_argument("--bf16", action="store_true",
                   help="both sides with bf16 autocast (ours mixed_precision=bf16, TRL bf16=True); default fp32")
    p.add_argument("--scratch", type=Path, default=None, help=f"default bench/{task}/results/scratch")
    p.add_argument("--out", type=Path, default=None, help=f"default bench/{task}/results/{task}.json")
    args = p.parse_args()
    if args.quick:
        args.steps, args.skip, args.repeat = 10, 2, 1
    here = BENCH / task
    args.scratch = args.scratch or here / "results" / "scratch"
    args.suffix = ("-bf16" if args.bf16 else "") + (f"-threads{args.threads}" if args.threads else "")
    args.out = args.out or here / "results" / f"{task}{args.suffix}.json"
    return args


def run_comparison(task: str, args, assets: dict, examples: list[dict], ours_data: dict, notes: list[str]) -> dict:
    """Order the examples as alignflow's loop draws them, run both workers ``args.repeat`` times, report.

    ``examples``: the training examples (``input_ids``, ``labels``), a multiple of the batch size, in
    the order alignflow's worker will hold them; ``ours_data``: spec keys telling ours where its data is.
    """
    B, total = args.batch_size, args.skip + args.steps
    machine = machine_info()
    t0 = time.perf_counter()
    trl_python = ensure_trl_venv(trl_version=args.trl_version)
    venv_seconds = time.perf_counter() - t0
    work = args.scratch / (task + args.suffix)  # e.g. scratch/sft-bf16-threads1
    batches = batch_order([len(e["input_ids"]) for e in examples], B, args.seed, total)
    ordered = [examples[i] for batch in batches for i in batch]
    write_jsonl(work / "trl_examples.jsonl", ordered)
    counts = step_token_counts(examples, batches)
    timed_tokens = sum(counts["real"][args.skip:])
    all_tokens = sum(counts["real"])
    hparams = {**COMMON_HPARAMS, **HPARAMS[task]}
    spec = {
        "task": task, "arch": args.arch, "model_dir": assets["model"], "tokenizer_dir": assets["tokenizer"],
        "batch_size": B, "max_length": args.max_length, "max_steps": total, "skip_steps": args.skip,
        "log_every": 5, "seed": args.seed, "hparams": hparams, "bf16": bool(args.bf16), "threads": args.threads,
        "trl_examples_path": str(work / "trl_examples.jsonl"), "output_dir": str(work / "trl-output"), **ours_data,
    }
    logs = work / "logs"
    runs: dict[str, list[dict]] = {"ours": [], "trl": [], "trl_padding_free": []}
    for r in range(args.repeat):
        order = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
        for side in order:
            py = Path(sys.executable) if side == "ours" else trl_python
            print(f"round {r + 1}/{args.repeat}: {side} ...", flush=True)
            res = run_worker(py, side, spec, logs, f"{side}-{r}")
            print(f"  {timed_tokens / res['timed_seconds']:,.0f} tokens/s, {res['ru_maxrss_kib'] / 1024:,.0f} MiB, "
                  f"final loss {res['final_loss']:.4f}", flush=True)
            runs[side].append(res)
    if args.trl_padding_free:
        print("TRL padding_free=True ...", flush=True)
        res = run_worker(trl_python, "trl", {**spec, "padding_free": True}, logs, "trl-padding-free")
        runs["trl_padding_free"].append(res)
    for side in ("ours", "trl"):
        for res in runs[side]:
            if res["tokens_seen"] != all_tokens:
                sys.exit(f"{side}: saw {res['tokens_seen']} tokens, expected {all_tokens}: the data differ")
    summary = {"ours": summarize(runs["ours"], timed_tokens), "trl": summarize(runs["trl"], timed_tokens),
               "trl_version": runs["trl"][0]["versions"]["trl"]}
    if runs["trl_padding_free"]:
        summary["trl_padding_free"] = summarize(runs["trl_padding_free"], timed_tokens)
    summary["ratio_tokens_per_s"] = summary["ours"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
    summary["ratio_tokens_per_s_best_steps"] = (summary["ours"]["tokens_per_s_best_steps"]
                                                / summary["trl"]["tokens_per_s_best_steps"])
    summary["ratio_tokens_per_cpu_s"] = summary["ours"]["tokens_per_cpu_s"] / summary["trl"]["tokens_per_cpu_s"]
    summary["target_ratio"] = TARGET_RATIO
    summary["target_met"] = summary["ratio_tokens_per_s"] >= TARGET_RATIO
    profile = None
    if args.profile:
        profile = profile_ours(spec, logs)
    out = {
        "bench": task,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine, "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "load_avg (1, 5, 15 min) at the start; other people's jobs share this machine"},
        "setup": {
            "arch": args.arch, "parameters": assets["parameters"], "vocab": assets["vocab"],
            "batch_size": B, "max_length": args.max_length, "timed_steps": args.steps,
            "warmup_steps_excluded": args.skip, "repeat": args.repeat, "hparams": hparams,
            "train_examples": len(examples), "timed_tokens": timed_tokens,
            "timed_padded_tokens": sum(counts["padded"][args.skip:]),
            "timed_loss_tokens": sum(counts["loss"][args.skip:]),
            "padding_fraction": 1 - timed_tokens / sum(counts["padded"][args.skip:]),
            "questions": args.questions, "seed": args.seed, "trl_venv_seconds": round(venv_seconds, 1),
            "packing": False, "padding_free": False, "precision": "bf16 autocast" if args.bf16 else "fp32",
            "torch_threads": args.threads or "default",
        },
        "summary": summary,
        "sides": {side: {k: runs[side][0][k] for k in ("versions", "threads", "attn_implementation", "optimizer",
                                                        "dtype") if k in runs[side][0]}
                  for side in ("ours", "trl")},
        "runs": {side: [{k: v for k, v in res.items() if k != "step_seconds"} | {
            "tokens_per_s": timed_tokens / res["timed_seconds"]} for res in rs] for side, rs in runs.items() if rs},
        "profile_top": profile,
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print()
    report_table(summary, timed_tokens, args.steps)
    if "trl_padding_free" in summary:
        s = summary["trl_padding_free"]
        print(f"TRL padding_free=True (informative): {s['tokens_per_s']:,.0f} tokens/s, "
              f"final loss {s['final_loss']:.4f}")
    print(f"padding: {out['setup']['padding_fraction']:.1%} of the timed batch positions are pad tokens (both sides)")
    print(f"results: {args.out}")
    return out


def profile_ours(spec: dict, logs: Path, top: int = 30, script: Path | None = None) -> list[dict]:
    """One more ours run under cProfile; prints and returns the top functions by own time."""
    import io
    import pstats

    path = logs / "ours-profile.pstats"
    print("profiling ours (cProfile over the training call) ...", flush=True)
    run_worker(Path(sys.executable), "ours", {**spec, "profile_path": str(path)}, logs, "ours-profile", script=script)
    stats = pstats.Stats(str(path))
    buf = io.StringIO()
    stats.stream = buf
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    (logs / "ours-profile.txt").write_text(buf.getvalue())
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": nc, "tottime_s": round(tt, 3),
                     "cumtime_s": round(ct, 3)})
    print(f"profile written to {logs / 'ours-profile.txt'}")
    return rows


# =============================================================================================== workers


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "-"
    return out


def _finish(spec: dict, result: dict, t_start: float) -> None:
    import resource

    result["load_avg_1min"] = [round(spec["_load_start"], 2), round(os.getloadavg()[0], 2)]
    result["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["process_seconds"] = time.perf_counter() - t_start
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2))


def _timing(stamps: list[float], t_train_start: float, skip: int, cpu: list[float], cpu_start: float) -> dict:
    """stamps[k] = end of step k+1 (perf_counter); cpu[k] the process CPU time then (all threads).
    Timed span: end of step ``skip`` (or train start) -> end of the last step."""
    prev = [t_train_start, *stamps[:-1]]
    step_seconds = [b - a for a, b in zip(prev, stamps)]
    start = stamps[skip - 1] if skip > 0 else t_train_start
    cpu0 = cpu[skip - 1] if skip > 0 else cpu_start
    return {"step_seconds": step_seconds, "timed_seconds": stamps[-1] - start, "skip_steps": skip,
            "timed_cpu_seconds": cpu[-1] - cpu0, "train_seconds_all_steps": stamps[-1] - t_train_start}


def train_config(spec: dict) -> Any:
    """alignflow's ``TrainConfig`` for a worker spec: the shared hyper-parameters, no eval or checkpoint
    inside the timed span, fp32 unless ``bf16``."""
    from alignflow.config import TrainConfig

    h = spec["hparams"]
    return TrainConfig(
        max_steps=spec["max_steps"], batch_size=spec["batch_size"], grad_accum=1, lr=h["lr"],
        weight_decay=h["weight_decay"], adam_beta1=h["adam_beta1"], adam_beta2=h["adam_beta2"],
        adam_eps=h["adam_eps"], warmup_steps=h["warmup_steps"], schedule="cosine", min_lr_ratio=h["min_lr_ratio"],
        max_grad_norm=h["max_grad_norm"], seed=spec["seed"], eval_every=spec["max_steps"], eval_batches=1,
        checkpoint_every=spec["max_steps"], log_every=spec["log_every"],
        mixed_precision="bf16" if spec.get("bf16") else "no", group_by_length=True,
    )


def worker_ours(spec: dict) -> None:
    t_start = time.perf_counter()
    import torch

    from alignflow.config import ModelConfig, SftStageConfig
    from alignflow.models import load_causal_lm, load_tokenizer
    from alignflow.tasks.train.batching import pad_collate
    from alignflow.tasks.train.lm import causal_lm_loss, train_sft
    from alignflow.tasks.train.loop import LoopCallbacks, train_loop

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    tcfg = train_config(spec)
    tok = load_tokenizer(spec["tokenizer_dir"])
    model = load_causal_lm(spec["model_dir"], tokenizer=tok, torch_dtype=torch.float32)
    stamps: list[float] = []
    losses: list[tuple[int, float]] = []

    cpu: list[float] = []

    def on_step(step: int, max_steps: int) -> None:
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())

    def on_log(metrics: dict, step: int) -> None:
        if "train/loss" in metrics:
            losses.append((step, float(metrics["train/loss"])))

    callbacks = LoopCallbacks(on_step=on_step, on_log=on_log)
    profiler = None
    if spec.get("profile_path"):
        import cProfile

        profiler = cProfile.Profile()
    setup_seconds = time.perf_counter() - t_start
    t_train, cpu_train = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    if spec["task"] == "sft":
        cfg = SftStageConfig(model=ModelConfig(arch=spec["arch"], max_length=spec["max_length"]), train=tcfg)
        out = train_sft(cfg, model, tok, Path(spec["demos_path"]), checkpoint_dir=None, resume=False,
                        callbacks=callbacks)
        loop = out.loop
    else:
        train = read_jsonl(Path(spec["examples_path"]))
        pad = tok.pad_token_id
        loop = train_loop(model, train, lambda examples: pad_collate(examples, pad), causal_lm_loss, tcfg,
                          lengths=[len(e["input_ids"]) for e in train], checkpoint_dir=None, resume=False,
                          callbacks=callbacks)
    if profiler:
        profiler.disable()
        profiler.dump_stats(spec["profile_path"])
    from alignflow.tasks.train.loop import build_optimizer

    probe = build_optimizer(torch.nn.Linear(2, 2), tcfg)  # what the loop built (same parameters' device and dtype)
    opt_kind = (f"torch.optim.AdamW (fused={probe.defaults.get('fused')}, foreach={probe.defaults.get('foreach')}; "
                "neither -> torch's single-tensor for-loop on CPU)")
    result = {
        "side": "ours", "task": spec["task"], **_timing(stamps, t_train, spec["skip_steps"], cpu, cpu_train),
        "setup_seconds": setup_seconds, "losses": losses,
        "final_loss": losses[-1][1], "final_loss_window": [losses[-2][0] + 1 if len(losses) > 1 else 1, losses[-1][0]],
        "last_step_loss": loop.final_loss, "tokens_seen": loop.tokens_seen, "steps": loop.final_step,
        "threads": torch.get_num_threads(), "attn_implementation": model.config._attn_implementation,
        "optimizer": opt_kind, "dtype": str(next(model.parameters()).dtype),
        "versions": _versions("torch", "transformers", "accelerate", "alignflow"),
    }
    _finish(spec, result, t_start)


def worker_trl(spec: dict) -> None:
    t_start = time.perf_counter()
    import math

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    h = spec["hparams"]
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    rows = read_jsonl(Path(spec["trl_examples_path"]))
    if spec["task"] == "sft":
        # Prompt-completion data, pre-tokenized: TRL builds the labels from `completion_mask`
        # (completion_only_loss=True), i.e. -100 on the prompt.
        data = [{"input_ids": r["input_ids"], "completion_mask": [0 if x == IGNORE else 1 for x in r["labels"]]}
                for r in rows]
    else:
        data = [{"input_ids": r["input_ids"]} for r in rows]  # language modelling: labels = input_ids
    ds = datasets.Dataset.from_list(data)
    args = SFTConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        # padding-free without packing refuses max_length; the examples are already <= max_length
        max_length=None if spec.get("padding_free") else spec["max_length"], max_steps=spec["max_steps"],
        learning_rate=h["lr"], weight_decay=h["weight_decay"], adam_beta1=h["adam_beta1"],
        adam_beta2=h["adam_beta2"], adam_epsilon=h["adam_eps"], max_grad_norm=h["max_grad_norm"],
        # the values are replaced by alignflow's schedule (Trainer.create_scheduler below)
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": h["min_lr_ratio"]},
        warmup_steps=h["warmup_steps"],
        logging_steps=spec["log_every"], save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=0, bf16=bool(spec.get("bf16")), fp16=False, use_cpu=True,
        gradient_checkpointing=False,  # TRL's default is True; alignflow does not checkpoint
        packing=False, padding_free=bool(spec.get("padding_free", False)),
        completion_only_loss=True if spec["task"] == "sft" else None,
        train_sampling_strategy="sequential",  # the data file is already in alignflow's batch order
        seed=spec["seed"], disable_tqdm=True,
    )
    stamps: list[float] = []
    cpu: list[float] = []
    losses: list[tuple[int, float]] = []
    max_steps = spec["max_steps"]

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            if state.global_step == max_steps:
                control.should_log = True  # log the last window as alignflow does (at max_steps)
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

    class Trainer(SFTTrainer):
        # The same lr at every step as alignflow (HF's cosine_with_min_lr lags it by one step: lr 0 at
        # step 1). Only the schedule's values change; the scheduler is still stepped by the Trainer.
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, multiplier)
            return self.lr_scheduler

    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Probe()])
    prepared = trainer.train_dataset
    if len(prepared) != len(rows):
        raise SystemExit(f"TRL kept {len(prepared)} of {len(rows)} examples: the batch order would shift")
    got = prepared["labels"]
    bad = sum(1 for a, r in zip(got, rows) if list(a) != r["labels"])
    if bad or list(prepared["input_ids"][0]) != rows[0]["input_ids"]:
        raise SystemExit(f"TRL's prepared labels differ from alignflow's in {bad} examples")
    profiler = None
    if spec.get("profile_path"):
        import cProfile

        profiler = cProfile.Profile()
    setup_seconds = time.perf_counter() - t_start
    t_train, cpu_train = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    trainer.train()
    if profiler:
        profiler.disable()
        profiler.dump_stats(spec["profile_path"])
    state = trainer.state
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    result = {
        "side": "trl", "task": spec["task"], **_timing(stamps, t_train, spec["skip_steps"], cpu, cpu_train),
        "setup_seconds": setup_seconds, "losses": losses,
        "final_loss": losses[-1][1], "final_loss_window": [losses[-2][0] + 1 if len(losses) > 1 else 1, losses[-1][0]],
        "tokens_seen": int(trainer._total_train_tokens), "steps": state.global_step,
        "threads": torch.get_num_threads(), "attn_implementation": model.config._attn_implementation,
        "optimizer": f"{type(inner).__module__}.{type(inner).__name__} (optim={args.optim}, "
                     f"fused={inner.defaults.get('fused')}, foreach={inner.defaults.get('foreach')})",
        "gradient_checkpointing": args.gradient_checkpointing, "padding_free": args.padding_free,
        "dtype": str(next(model.parameters()).dtype),
        "versions": _versions("torch", "transformers", "accelerate", "trl", "datasets"),
    }
    _finish(spec, result, t_start)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("ours", "trl"):
        sys.exit("usage: python bench/common.py {ours|trl} SPEC.json  (workers; run bench/sft/run.py instead)")
    _spec = json.loads(Path(sys.argv[2]).read_text())
    _spec["_load_start"] = os.getloadavg()[0]
    (worker_ours if sys.argv[1] == "ours" else worker_trl)(_spec)
