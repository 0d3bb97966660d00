"""PPO throughput: alignflow's ``train_ppo`` against TRL's last PPO (``trl==0.29.1``, ``trl.experimental.ppo.PPOTrainer``).

Both sides start from the same folders (written once with ``save_pretrained``):
policy = reference = an initial ``small-gpt2`` built from alignflow's
architecture table, reward model = critic init = a ``GPT2ForSequenceClassification``
on another seed's weights (``reward_model_from_causal_lm``), alignflow's BPE
tokenizer (dedicated pad). Same prompts (the ingested synthetic dump's train
prompts, cut to their last ``--prompt-tokens`` tokens), same response length,
temperature, batch, micro-batch and PPO epochs, fp32 on the CPU. Each worker is
a subprocess: ours in the main venv, TRL in ``bench/.venv-trl-ppo`` (created by
this script; torch pinned to the project's 2.13.0 CPU wheel). See README.md.

    .venv/bin/python bench/ppo/run.py            # 2 warm-up + 10 timed PPO steps per side, 2 rounds
    .venv/bin/python bench/ppo/run.py --quick    # 1 + 3, one round
    .venv/bin/python bench/ppo/run.py worker-ours SPEC.json   # (internal) one side
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import common  # noqa: E402  (bench/common.py: stdlib-only at import)

TRL_VERSION = "0.29.1"
TRL_VENV = BENCH / ".venv-trl-ppo"
TARGET_RATIO = 2.0


# =============================================================================================== workers


def _timing(stamps: list[float], cpu: list[float], skip: int, batch: int) -> dict:
    """Wall and CPU time of the steps after the ``skip`` warm-up steps (stamps: end of each step)."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    timed = stamps[-1] - stamps[skip - 1]
    timed_cpu = cpu[-1] - cpu[skip - 1]
    n = len(stamps) - skip
    median = statistics.median(steps[skip - 1:])
    return {"step_seconds": steps, "timed_seconds": timed, "timed_cpu_seconds": timed_cpu, "timed_steps": n,
            "episodes_per_s": n * batch / timed, "episodes_per_s_median_step": batch / median,
            "episodes_per_cpu_s": n * batch / timed_cpu, "step_seconds_median": median,
            "load_avg_1min": os.getloadavg()[0]}


def _finish(spec: dict, result: dict, t0: float) -> None:
    # Linux keeps ru_maxrss across exec: a worker started by a parent that had grown (assets, SFT) reports at
    # least the parent's peak. The parent's polled RSS of the worker (psutil_peak_rss_mib) is the figure to read.
    result["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["total_seconds"] = time.perf_counter() - t0
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2))


def worker_ours(spec: dict) -> None:
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignflow.config import PpoStageConfig
    from alignflow.models import load_causal_lm, load_tokenizer
    from alignflow.tasks.train import ppo

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    h = spec["hparams"]
    tok = load_tokenizer(spec["tokenizer_dir"])
    policy = load_causal_lm(spec["policy_dir"], tokenizer=tok)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"])
    cfg = PpoStageConfig(
        total_steps=spec["steps"], batch_size=h["batch_size"], minibatch_size=h["batch_size"],
        micro_batch_size=h["micro_batch_size"], forward_batch_size=h["batch_size"], ppo_epochs=h["ppo_epochs"],
        max_new_tokens=h["response_length"], max_prompt_tokens=h["prompt_tokens"], temperature=h["temperature"],
        lr=h["lr"], kl_coef=h["kl_coef"], missing_eos="subtract", missing_eos_penalty=h["missing_eos_penalty"],
        max_grad_norm=0.0, seed=spec["seed"], eval_prompts=0, checkpoint_every=10**6, generations_rows=0,
        reward_max_length=h["prompt_tokens"] + h["response_length"] + 1,
    )
    prompts = [json.loads(line)["prompt"] for line in open(spec["prompts_path"], encoding="utf-8")]
    stamps: list[float] = []
    cpu: list[float] = []
    logs: list[dict] = []

    def on_step(step: int, total: int) -> None:
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())

    reward_fn = ppo.text_reward_fn(reward, tok, batch_size=h["batch_size"], max_length=cfg.reward_max_length)
    setup = time.perf_counter() - t0
    ppo.train_ppo(cfg, policy=policy, tokenizer=tok, critic=ppo.make_critic(reward), reward_fn=reward_fn,
                  prompts=prompts,
                  callbacks=ppo.PpoCallbacks(on_step=on_step,
                                             on_log=lambda m, s: logs.append(dict(m))))
    result = {"side": "ours", **_timing(stamps, cpu, spec["skip"], h["batch_size"]), "setup_seconds": setup,
              "reward_mean": [m["ppo/reward_mean"] for m in logs], "kl": [m["ppo/kl"] for m in logs],
              "response_length": [m["ppo/response_length"] for m in logs],
              "threads": torch.get_num_threads(), "versions": _versions("torch", "transformers")}
    _finish(spec, result, t0)


def worker_trl(spec: dict) -> None:
    t0 = time.perf_counter()
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    h = spec["hparams"]
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], dtype=torch.float32)
    rows = [json.loads(line) for line in open(spec["prompts_path"], encoding="utf-8")]
    ds = datasets.Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
    B, micro = h["batch_size"], h["micro_batch_size"]
    args = PPOConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=micro, gradient_accumulation_steps=B // micro,
        num_mini_batches=1, num_ppo_epochs=h["ppo_epochs"], total_episodes=spec["steps"] * B,
        local_rollout_forward_batch_size=B, response_length=h["response_length"], temperature=h["temperature"],
        learning_rate=h["lr"], kl_coef=h["kl_coef"], stop_token="eos", missing_eos_penalty=h["missing_eos_penalty"],
        num_sample_generations=0, report_to="none", save_strategy="no", logging_steps=1, seed=spec["seed"],
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    stamps: list[float] = []
    cpu: list[float] = []
    logs: list[dict] = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=ds, value_model=value, eval_dataset=ds.select(range(min(8, len(ds)))),
                         callbacks=[Probe()])
    real_log = trainer.log

    def log(metrics, *a, **k):
        logs.append(dict(metrics))
        return real_log(metrics, *a, **k)

    trainer.log = log
    setup = time.perf_counter() - t0
    trainer.train()
    result = {"side": "trl", **_timing(stamps, cpu, spec["skip"], B), "setup_seconds": setup,
              "reward_mean": [m.get("objective/scores") for m in logs if "objective/scores" in m],
              "kl": [m.get("objective/kl") for m in logs if "objective/kl" in m],
              "threads": torch.get_num_threads(), "versions": _versions("torch", "transformers", "trl", "accelerate")}
    _finish(spec, result, t0)


def _versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


# =============================================================================================== parent


def prepare(args) -> dict:
    """Assets (dump, ingest, tokenizer, initial policy) via bench/common.py, plus the reward model and the prompts."""
    assets = common.prepare_assets(args.scratch, questions=args.questions, seed=args.seed, arch=args.arch,
                                   max_length=args.max_length, vocab_size=args.vocab_size)
    from alignflow.models import build_causal_lm, load_causal_lm, load_tokenizer, reward_model_from_causal_lm
    from alignflow.tasks.train.ppo import left_pad_queries

    tok = load_tokenizer(assets["tokenizer"])
    if args.sft_steps:
        # A policy that has learnt to answer (and to stop): the initial model fine-tuned on the train demos.
        sft_dir = args.scratch / f"policy-sft-{args.arch}-{args.sft_steps}"
        if not (sft_dir / "config.json").is_file():
            from alignflow.config import load_config
            from alignflow.tasks.train.lm import train_sft

            cfg = load_config(None, [f"sft.train.max_steps={args.sft_steps}", "sft.train.batch_size=8",
                                     "sft.train.lr=2e-3", "sft.train.eval_every=1000000",
                                     f"sft.model.max_length={args.max_length}"])
            out = train_sft(cfg.sft, load_causal_lm(assets["model"], tokenizer=tok), tok,
                            Path(assets["datasets"]) / "demos.parquet", checkpoint_dir=None, resume=False)
            out.model.save_pretrained(str(sft_dir))
        assets = {**assets, "model": str(sft_dir)}
    reward_dir = args.scratch / f"reward-init-{args.arch}"
    if not (reward_dir / "config.json").is_file():
        other = build_causal_lm(load_causal_lm(assets["model"], tokenizer=tok).config, seed=args.seed + 1)
        reward = reward_model_from_causal_lm(other, tokenizer=tok, seed=args.seed)
        reward.save_pretrained(str(reward_dir))
    import pyarrow.parquet as pq

    table = pq.read_table(Path(assets["datasets"]) / "prompts.parquet", columns=["prompt", "split"]).to_pylist()
    prompts = [r["prompt"] for r in table if r["split"] == "train"][: args.prompts]
    rows = []
    for p in prompts:
        ids, mask = left_pad_queries(tok, [p], args.prompt_tokens)
        rows.append({"prompt": p, "input_ids": ids[0][mask[0].bool()].tolist()})
    path = args.scratch / "ppo-prompts.jsonl"
    common.write_jsonl(path, rows)
    return {**assets, "reward": str(reward_dir), "prompts_path": str(path), "prompts": len(rows),
            "prompt_tokens_mean": statistics.mean(len(r["input_ids"]) for r in rows)}


def run_side(python: Path, side: str, spec: dict, logs: Path, name: str) -> dict:
    import subprocess

    import psutil

    logs.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result_path": str(logs / f"{name}.result.json")}
    Path(spec["result_path"]).unlink(missing_ok=True)
    spec_path = logs / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "DISABLE_MLFLOW_INTEGRATION": "TRUE",
           "HF_HOME": str(logs.parent / "hf-home"), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    with open(logs / f"{name}.stdout", "wb") as out, open(logs / f"{name}.stderr", "wb") as err:
        popen = subprocess.Popen([str(python), str(Path(__file__).resolve()), f"worker-{side}", str(spec_path)],
                                 stdout=out, stderr=err, env=env, cwd=ROOT)
        proc = psutil.Process(popen.pid)
        peak = 0
        while popen.poll() is None:
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.1)
    if popen.returncode != 0 or not Path(spec["result_path"]).is_file():
        tail = "\n".join((logs / f"{name}.stderr").read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"worker {name} failed ({popen.returncode}):\n{tail}")
    result = json.loads(Path(spec["result_path"]).read_text())
    result["psutil_peak_rss_mib"] = peak / (1 << 20)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed PPO steps")
    p.add_argument("--steps", type=int, default=10, help="timed PPO steps (default 10)")
    p.add_argument("--skip", type=int, default=2, help="warm-up PPO steps excluded from timing (default 2)")
    p.add_argument("--repeat", type=int, default=2, help="rounds per side, order alternating (median reported)")
    p.add_argument("--batch-size", type=int, default=32, help="rollouts per PPO step")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--response-length", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--sft-steps", type=int, default=0,
                   help="fine-tune the policy on the demos for N steps first (a policy that stops; 0 = the "
                        "initial model, which never emits EOS)")
    p.add_argument("--arch", default="small-gpt2")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--questions", type=int, default=3000)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads in both workers (default 1: steady figures on a shared machine; "
                        "0 = torch's choice)")
    p.add_argument("--scratch", type=Path, default=HERE / "results" / "scratch")
    p.add_argument("--out", type=Path, default=HERE / "results" / "ppo.json")
    args = p.parse_args()
    if args.sft_steps:
        args.out = args.out.with_name(args.out.stem + f"-sft{args.sft_steps}.json")
    if args.quick:
        args.steps, args.skip, args.repeat = 3, 1, 1
        args.out = args.out.with_name("ppo-quick.json")
    machine = common.machine_info()
    trl_python = common.ensure_trl_venv(TRL_VENV, TRL_VERSION)
    assets = prepare(args)
    hparams = {"batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
               "ppo_epochs": args.ppo_epochs, "response_length": args.response_length,
               "prompt_tokens": args.prompt_tokens, "temperature": 0.7, "lr": 1e-5, "kl_coef": 0.05,
               "missing_eos_penalty": 1.0}
    spec = {"policy_dir": assets["model"], "reward_dir": assets["reward"], "tokenizer_dir": assets["tokenizer"],
            "prompts_path": assets["prompts_path"], "steps": args.skip + args.steps, "skip": args.skip,
            "seed": args.seed, "threads": args.threads, "hparams": hparams,
            "output_dir": str(args.scratch / "trl-output")}
    logs = args.scratch / "logs"
    rounds: dict[str, list[dict]] = {"ours": [], "trl": []}
    sides = {"ours": Path(sys.executable), "trl": trl_python}
    for r in range(args.repeat):  # alternate the order: ours, TRL, TRL, ours, ... (drifting load hits both)
        for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            print(f"round {r + 1}/{args.repeat}: {side} ...", flush=True)
            res = run_side(sides[side], side, spec, logs, f"{side}-{r}")
            rounds[side].append(res)
            print(f"  {res['episodes_per_s']:.2f} episodes/s, median step {res['step_seconds_median']:.2f} s, "
                  f"peak RSS {res['psutil_peak_rss_mib']:.0f} MiB", flush=True)
    results = {}
    for side, runs in rounds.items():  # the round with the median episodes/s stands for the side
        runs = sorted(runs, key=lambda x: x["episodes_per_s"])
        results[side] = {**runs[(len(runs) - 1) // 2],
                         "episodes_per_s_rounds": [round(x["episodes_per_s"], 3) for x in rounds[side]],
                         "ru_maxrss_mib": max(x["ru_maxrss_mib"] for x in runs),
                         "psutil_peak_rss_mib": max(x["psutil_peak_rss_mib"] for x in runs)}
    ours, trl = results["ours"], results["trl"]
    ratio = ours["episodes_per_s"] / trl["episodes_per_s"]
    ratios = [a["episodes_per_s"] / b["episodes_per_s"] for a, b in zip(rounds["ours"], rounds["trl"])]
    cpu_ratio = (statistics.median(x["episodes_per_cpu_s"] for x in rounds["ours"])
                 / statistics.median(x["episodes_per_cpu_s"] for x in rounds["trl"]))
    rows = [[name, f"{r['episodes_per_s']:.2f}", f"{r['episodes_per_s_median_step']:.2f}",
             f"{r['episodes_per_cpu_s']:.2f}",
             f"{r['step_seconds_median']:.2f}", f"{r['timed_seconds']:.1f}", f"{r['psutil_peak_rss_mib']:.0f}",
             f"{r['ru_maxrss_mib']:.0f}", f"{r['reward_mean'][-1]:.3f}" if r["reward_mean"] else "-"]
            for name, r in (("alignflow", ours), (f"TRL {TRL_VERSION}", trl))]
    print()
    common.print_table(rows, ["side", "episodes/s", "episodes/s (median step)", "episodes/CPU-s", "s/step (median)",
                              f"s ({args.steps} steps)", "peak RSS MiB (polled)", "ru_maxrss MiB", "last reward"])
    print(f"\nratio ours/TRL episodes/s: {ratio:.2f}x (target >= {TARGET_RATIO}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}); per round {', '.join(f'{x:.2f}x' for x in ratios)}; "
          f"per CPU-second {cpu_ratio:.2f}x")
    summary = {"ratio_episodes_per_s": ratio, "ratio_per_round": ratios, "ratio_episodes_per_cpu_s": cpu_ratio, "target_ratio": TARGET_RATIO, "target_met": ratio >= TARGET_RATIO,
               "args": {k: str(v) for k, v in vars(args).items()}, "hparams": hparams, "machine": machine,
               "assets": {k: v for k, v in assets.items() if k != "key"}, "ours": ours, "trl": trl}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"results: {args.out}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("worker-ours", "worker-trl"):
        _spec = json.loads(Path(sys.argv[2]).read_text())
        (worker_ours if sys.argv[1] == "worker-ours" else worker_trl)(_spec)
    else:
        main()
