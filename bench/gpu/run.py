"""GPU benchmark driver: training throughput and MFU, generation and PPO speed, TRL peers where they run.

One process, one GPU, only torch + transformers + accelerate (+ pandas) needed:
no prefect, mlflow or great-expectations, no network. alignflow is imported
from this source tree when it is not installed (``bench/common.py::src_shim``
maps ``flows/``, ``tasks/``, ``models/`` to ``alignflow.*`` as the wheel does);
``bench/gpu/run.sh`` first makes pydantic and pyyaml importable from carried
wheels if the machine lacks them.

Measured, for each model (``gpt2-125m``, ``llama-350m``; random weights, random
token ids, vocabulary 50,257 / 32,000) at sequence length 1024:

* **SFT**: ``train_loop`` + ``causal_lm_loss`` (bf16 autocast, SDPA, fused AdamW,
  prompt = first quarter of each sequence masked), tokens/s, model TFLOP/s and MFU.
* **reward**: ``train_loop`` + ``reward_loss_fn`` on ``pair_collate`` batches of
  pairs of 1024-token sequences (what ``train_reward`` runs), pairs/s and MFU.
* MFU against 989 TFLOP/s (H100 SXM dense bf16) and against a bf16 matmul
  (8192^3) measured in the same run.
* **generation**: ``model.generate`` with the KV cache (greedy, fixed length),
  new tokens/s; optionally a static cache with compiled decoding (``--compile``).
* **PPO**: ``tasks.train.ppo.train_ppo`` episodes/s (gpt2-125m policy, critic and
  reward model of the same size, 64 rollouts/step, 64 new tokens) when that module
  exists; otherwise the row says "not measured".
* **TRL peers** (``SFTTrainer``, ``RewardTrainer``) on the same model folder and
  token ids, in a subprocess of ``--peer-python`` (default: this python) when
  ``trl`` imports there; otherwise "not run".

FLOPs per step (the usual training convention): 6 x (non-embedding parameters
x tokens + LM-head parameters x positions the head is applied to) + 12 x layers
x width x sequence length x tokens for attention (full square, as in PaLM's MFU).

    bench/gpu/run.sh                 # the H100 run (< 8 minutes)
    bench/gpu/run.sh --tiny          # CPU smoke test (< 2 minutes): tiny models, a few steps
    python bench/gpu/run.py --peer-worker SPEC.json   # internal: one TRL peer measurement
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM, dense bf16 tensor-core peak (no sparsity)
IGNORE = -100

FULL = {
    "models": [("gpt2-125m", 50257, 16, 8), ("llama-350m", 32000, 16, 8)],  # arch, vocab, SFT batch, reward pairs
    "seq": 1024, "skip": 3, "steps": 10, "matmul": 8192,
    "gen": {"arch": "gpt2-125m", "vocab": 50257, "batch": 64, "prompt": 128, "new": 128},
    "ppo": {"arch": "gpt2-125m", "steps": 2, "skip": 1, "batch": 64, "minibatch": 16, "micro": 16, "forward": 64,
            "epochs": 4, "new": 64, "prompt_words": 48},
}
TINY = {
    "models": [("tiny-gpt2", 512, 4, 2), ("tiny-llama", 512, 4, 2)],
    "seq": 64, "skip": 1, "steps": 2, "matmul": 256,
    "gen": {"arch": "tiny-gpt2", "vocab": 512, "batch": 4, "prompt": 16, "new": 8},
    "ppo": {"arch": "tiny-gpt2", "steps": 2, "skip": 1, "batch": 4, "minibatch": 2, "micro": 2, "forward": 4,
            "epochs": 1, "new": 8, "prompt_words": 12},
}


# =============================================================================================== setup


def ensure_alignflow() -> str:
    """Import alignflow: installed, or this source tree through a symlink shim (nothing installed)."""
    try:
        import alignflow.tasks.train.loop  # noqa: F401

        return "installed package"
    except ImportError:
        for name in [m for m in sys.modules if m == "alignflow" or m.startswith("alignflow.")]:
            del sys.modules[name]
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    shim = common.src_shim(ROOT, Path(tempfile.mkdtemp(prefix="alignflow-src-")))
    sys.path.insert(0, str(shim))
    import alignflow.tasks.train.loop  # noqa: F401,F811

    return f"source tree {ROOT} (shim {shim})"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "accelerate", "trl", "pandas"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (CPU runs)


# =============================================================================================== pieces


def matmul_tflops(device, n: int, iters: int = 20) -> float:
    """Achieved TFLOP/s of an n x n x n bf16 matmul (the practical ceiling of this card)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def model_shape(model) -> dict:
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    width = getattr(cfg, "hidden_size", None) or cfg.n_embd
    emb = {id(p) for m in (model.get_input_embeddings(),) for p in m.parameters()}
    pos = getattr(getattr(model, "transformer", None), "wpe", None)
    if pos is not None:
        emb |= {id(p) for p in pos.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    body = sum(p.numel() for p in model.parameters() if id(p) not in emb and id(p) not in head_ids)
    head_params = cfg.vocab_size * width if head is not None else 0  # tied or not, the head is a matmul
    return {"layers": layers, "width": width, "body_params": body, "head_params": head_params,
            "params": sum(p.numel() for p in model.parameters())}


def train_flops(shape: dict, tokens: int, head_positions: int, seq: int) -> float:
    return 6 * (shape["body_params"] * tokens + shape["head_params"] * head_positions) \
        + 12 * shape["layers"] * shape["width"] * seq * tokens


def _stamper(device, skip: int, total: int, marks: dict):
    def on_step(step: int, max_steps: int) -> None:
        if step in (skip, total):  # sync only at the two ends of the timed span
            _sync(device)
            marks[step] = time.perf_counter()

    return on_step


def _train_cfg(total: int, batch: int, device, compile_: bool):
    from alignflow.config import TrainConfig

    return TrainConfig(max_steps=total, batch_size=batch, lr=1e-4, warmup_steps=2, log_every=total,
                       eval_every=total, checkpoint_every=total, mixed_precision="bf16" if device.type == "cuda"
                       else "no", group_by_length=False, compile=compile_, seed=0)


def build_lm(arch: str, vocab: int, seq: int, device):
    import torch

    from alignflow.models import build_causal_lm, build_config

    cfg = build_config(arch, vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2, max_position=seq)
    return build_causal_lm(cfg, seed=0).to(device=device, dtype=torch.float32)


class _IdsTokenizer:
    """The four things reward_model_from_causal_lm reads from a tokenizer (random-id benchmark data)."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.pad_token_id, self.eos_token_id = vocab, 0, 1

    def __len__(self) -> int:
        return self.vocab


def sft_data(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        prompt = seq // 4
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def pair_data(n: int, seq: int, vocab: int, seed: int = 1) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"chosen_input_ids": torch.randint(3, vocab, (seq,), generator=g).tolist() + [1],
             "rejected_input_ids": torch.randint(3, vocab, (seq,), generator=g).tolist() + [1], "margin": 0.0}
            for _ in range(n)]


def run_sft(arch, vocab, batch, p, device, compile_=False) -> dict:
    from alignflow.tasks.train.batching import pad_collate
    from alignflow.tasks.train.lm import causal_lm_loss
    from alignflow.tasks.train.loop import LoopCallbacks, train_loop

    seq, skip, total = p["seq"], p["skip"], p["skip"] + p["steps"]
    model = build_lm(arch, vocab, seq, device)
    shape = model_shape(model)
    data = sft_data(batch * total, seq, vocab)
    marks: dict[int, float] = {}
    _reset_peak(device)
    train_loop(model, data, lambda ex: pad_collate(ex, 0), causal_lm_loss, _train_cfg(total, batch, device, compile_),
               callbacks=LoopCallbacks(on_step=_stamper(device, skip, total, marks)))
    seconds = marks[total] - marks[skip]
    tokens = batch * seq * p["steps"]
    labelled = sum(sum(1 for x in ex["labels"][1:] if x != IGNORE) for ex in data[: batch]) * p["steps"]
    flops = train_flops(shape, tokens, labelled, seq)
    del model
    return {"stage": "sft" + ("+compile" if compile_ else ""), "model": arch, "side": "alignflow",
            "params_m": shape["params"] / 1e6, "batch": batch, "seq": seq, "steps": p["steps"],
            "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12, "peak_mib": _peak_mib(device),
            "seconds": seconds}


def run_reward(arch, vocab, pairs, p, device, compile_=False) -> dict:
    from functools import partial

    from alignflow.models.reward import reward_model_from_causal_lm
    from alignflow.tasks.train.loop import LoopCallbacks, train_loop
    from alignflow.tasks.train.reward import pair_collate, reward_loss_fn

    seq, skip, total = p["seq"], p["skip"], p["skip"] + p["steps"]
    lm = build_lm(arch, vocab, seq + 1, device)
    model = reward_model_from_causal_lm(lm, tokenizer=_IdsTokenizer(vocab), seed=0).train()
    del lm
    shape = model_shape(model)
    data = pair_data(pairs * total, seq - 1, vocab)  # 1023 ids + EOS = 1024 tokens per sequence
    marks: dict[int, float] = {}
    _reset_peak(device)
    train_loop(model, data, partial(pair_collate, pad_id=0), reward_loss_fn,
               _train_cfg(total, pairs, device, compile_),
               callbacks=LoopCallbacks(on_step=_stamper(device, skip, total, marks)))
    seconds = marks[total] - marks[skip]
    tokens = 2 * pairs * seq * p["steps"]
    flops = train_flops(shape, tokens, 0, seq)
    del model
    return {"stage": "reward" + ("+compile" if compile_ else ""), "model": arch, "side": "alignflow",
            "params_m": shape["params"] / 1e6, "batch": pairs, "seq": seq, "steps": p["steps"],
            "pairs_per_s": pairs * p["steps"] / seconds, "tokens_per_s": tokens / seconds,
            "tflops": flops / seconds / 1e12, "peak_mib": _peak_mib(device), "seconds": seconds}


def run_generation(g: dict, device, static_compiled: bool = False) -> dict:
    import torch

    model = build_lm(g["arch"], g["vocab"], g["prompt"] + g["new"], device)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, g["vocab"], (g["batch"], g["prompt"]), generator=gen).to(device)
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=g["new"], min_new_tokens=g["new"], do_sample=False, pad_token_id=0,
                  eos_token_id=1)
    if static_compiled:
        kwargs["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    _reset_peak(device)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, **kwargs)  # warm-up (and compilation)
        if static_compiled:
            model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        _sync(device)
    seconds = time.perf_counter() - t0
    new = (out.shape[1] - g["prompt"]) * g["batch"]
    del model
    return {"stage": "generate" + ("+static+compile" if static_compiled else ""), "model": g["arch"],
            "side": "alignflow (model.generate, KV cache)", "batch": g["batch"], "seq": g["prompt"] + g["new"],
            "gen_tokens_per_s": new / seconds, "peak_mib": _peak_mib(device), "seconds": seconds}


def _words(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ri", "so", "tu") for b in
             ("ba", "de", "fi", "go", "hu", "ja", "ke", "ly", "mo", "ne")]
    return [" ".join(rng.choice(vocab) for _ in range(n)) for _ in range(512)]


def run_ppo(pp: dict, device) -> dict:
    try:
        from alignflow.tasks.train import ppo
    except ImportError as err:
        return {"stage": "ppo", "model": pp["arch"], "side": "alignflow", "note": f"not measured: {err}"}
    from alignflow.config import PpoStageConfig
    from alignflow.models import build_causal_lm, build_config, train_bpe_tokenizer
    from alignflow.models.reward import reward_model_from_causal_lm

    texts = _words(pp["prompt_words"], 0)
    tok = train_bpe_tokenizer(texts, vocab_size=2048, model_max_length=1024)
    cfg_m = build_config(pp["arch"], vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, max_position=1024)
    policy = build_causal_lm(cfg_m, seed=0).to(device)
    reward = reward_model_from_causal_lm(build_causal_lm(cfg_m, seed=1), tokenizer=tok, seed=0).to(device)
    total = pp["skip"] + pp["steps"]
    cfg = PpoStageConfig(total_steps=total, batch_size=pp["batch"], minibatch_size=pp["minibatch"],
                         micro_batch_size=pp["micro"], forward_batch_size=pp["forward"], ppo_epochs=pp["epochs"],
                         max_new_tokens=pp["new"], max_prompt_tokens=192, eval_prompts=0,
                         checkpoint_every=10**6, generations_rows=0, seed=0)
    reward_fn = ppo.text_reward_fn(reward, tok, batch_size=pp["forward"], max_length=192 + pp["new"] + 1)
    marks: dict[int, float] = {}
    _reset_peak(device)
    ppo.train_ppo(cfg, policy=policy, tokenizer=tok, critic=ppo.make_critic(reward), reward_fn=reward_fn,
                  prompts=[t + "\nAnswer:" for t in texts],
                  callbacks=ppo.PpoCallbacks(on_step=_stamper(device, pp["skip"], total, marks)))
    seconds = marks[total] - marks[pp["skip"]]
    return {"stage": "ppo", "model": pp["arch"], "side": "alignflow (train_ppo)", "batch": pp["batch"],
            "episodes_per_s": pp["batch"] * pp["steps"] / seconds,
            "gen_tokens_per_s_upper": pp["batch"] * pp["new"] * pp["steps"] / seconds,
            "peak_mib": _peak_mib(device), "seconds": seconds,
            "note": f"{pp['epochs']} PPO epochs, minibatch {pp['minibatch']}, <= {pp['new']} new tokens; fp32 "
                    "(the ppo stage has no mixed-precision setting)"}


# =============================================================================================== TRL peers


def run_peer(peer_python: str, kind: str, arch: str, vocab: int, batch: int, p: dict, device, work: Path) -> dict:
    """One TRL measurement in a subprocess (``--peer-worker``): same initial weights (a save_pretrained folder of
    the same random init) and the same token ids as ours."""
    from alignflow.models.reward import reward_model_from_causal_lm

    seq, total = p["seq"], p["skip"] + p["steps"]
    folder = work / f"{kind}-{arch}"
    lm = build_lm(arch, vocab, seq + 1, device).cpu()
    model = lm if kind == "sft" else reward_model_from_causal_lm(lm, tokenizer=_IdsTokenizer(vocab), seed=0)
    model.save_pretrained(str(folder))
    shape = model_shape(model)
    del model, lm
    if kind == "sft":
        rows = sft_data(batch * total, seq, vocab)
        rows = [{"input_ids": r["input_ids"], "completion_mask": [0 if x == IGNORE else 1 for x in r["labels"]]}
                for r in rows]
    else:
        rows = [{"chosen_ids": r["chosen_input_ids"], "rejected_ids": r["rejected_input_ids"]}
                for r in pair_data(batch * total, seq - 1, vocab)]
    spec = {"kind": kind, "model_dir": str(folder), "rows": rows, "batch": batch, "max_steps": total,
            "skip": p["skip"], "seq": seq, "bf16": device.type == "cuda", "vocab": vocab,
            "result": str(work / f"{kind}-{arch}.result.json")}
    spec_path = work / f"{kind}-{arch}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([peer_python, str(Path(__file__).resolve()), "--peer-worker", str(spec_path)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true",
                               "TOKENIZERS_PARALLELISM": "false"})
    row = {"stage": kind, "model": arch, "batch": batch, "seq": seq, "steps": p["steps"]}
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {**row, "side": "TRL", "note": f"not run: {tail[0][:160]}"}
    res = json.loads(Path(spec["result"]).read_text())
    seconds = res["seconds"]
    tokens = batch * seq * p["steps"] * (2 if kind == "reward" else 1)
    # the same FLOP count as ours for the same work: the LM head on the labelled positions only (TRL computes it
    # at every position; that extra work is not counted as useful)
    head_positions = (seq - seq // 4) * batch * p["steps"] if kind == "sft" else 0
    flops = train_flops(shape, tokens, head_positions, seq)
    out = {**row, "side": f"TRL {res['trl']}", "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12,
           "peak_mib": res["peak_mib"], "seconds": seconds}
    if kind == "reward":
        out["pairs_per_s"] = batch * p["steps"] / seconds
    return out


def peer_worker(spec_path: str) -> None:
    """Runs in the peer's python: torch, transformers, trl (and datasets); no alignflow."""
    spec = json.loads(Path(spec_path).read_text())
    import datasets
    import torch
    import trl
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast,
                              TrainerCallback)

    cuda = torch.cuda.is_available()
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(spec["vocab"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  pad_token="t0", eos_token="t1", bos_token="t2")
    marks: dict[int, float] = {}
    skip, total = spec["skip"], spec["max_steps"]

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (skip, total):
                if cuda:
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

    common = dict(output_dir=str(Path(spec["result"]).with_suffix(".out")), per_device_train_batch_size=spec["batch"],
                  max_steps=total, learning_rate=1e-4, warmup_steps=2, logging_steps=total, save_strategy="no",
                  report_to="none", bf16=spec["bf16"], gradient_checkpointing=False, disable_tqdm=True,
                  dataloader_num_workers=0, use_cpu=not cuda, max_length=spec["seq"] + 1)
    ds = datasets.Dataset.from_list(spec["rows"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if spec["kind"] == "sft":
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                     attn_implementation="sdpa")
        args = trl.SFTConfig(**common, packing=False, completion_only_loss=True)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Probe()])
    else:
        model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1,
                                                                   dtype=torch.float32, attn_implementation="sdpa")
        args = trl.RewardConfig(**common)
        trainer = trl.RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                    callbacks=[Probe()])
    trainer.train()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result"]).write_text(json.dumps({"seconds": marks[total] - marks[skip], "peak_mib": peak,
                                                "trl": trl.__version__}))


# =============================================================================================== main


def fmt(row: dict, key: str, spec: str = ",.0f") -> str:
    v = row.get(key)
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, a few steps (< 2 minutes)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile rows (training and static-cache "
                    "decoding; adds compilation minutes)")
    ap.add_argument("--peer-python", default=sys.executable, help="python with trl for the TRL peer rows")
    ap.add_argument("--no-peers", action="store_true", help="skip the TRL peer rows")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default $OUT/gpu-bench.json or "
                    "bench/gpu/results/gpu-bench[-tiny].json)")
    ap.add_argument("--peer-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_worker:
        peer_worker(args.peer_worker)
        return
    started = time.perf_counter()
    where = ensure_alignflow()
    import torch

    p = TINY if args.tiny else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny:
        sys.exit("no CUDA device: run with --tiny for the CPU smoke test")
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"alignflow from {where}; device {device} ({card}); torch {torch.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="alignflow-gpu-bench-"))
    rows: list[dict] = []
    peak = matmul_tflops(device, p["matmul"])
    print(f"bf16 matmul {p['matmul']}^3: {peak:,.1f} TFLOP/s", flush=True)

    def add(row: dict) -> None:
        rows.append(row)
        print("  " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}),
              flush=True)

    def guarded(fn, *a, label: str, **kw) -> None:
        try:
            add(fn(*a, **kw))
        except Exception as err:  # one failing row must not lose the others
            add({"stage": label, "side": "alignflow", "note": f"failed: {type(err).__name__}: {str(err)[:200]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()

    peers_ok = not args.no_peers
    for arch, vocab, batch, pairs in p["models"]:
        guarded(run_sft, arch, vocab, batch, p, device, label="sft")
        guarded(run_reward, arch, vocab, pairs, p, device, label="reward")
        if args.compile:
            guarded(run_sft, arch, vocab, batch, p, device, True, label="sft+compile")
            guarded(run_reward, arch, vocab, pairs, p, device, True, label="reward+compile")
        if peers_ok:
            for kind, b in (("sft", batch), ("reward", pairs)):
                row = run_peer(args.peer_python, kind, arch, vocab, b, p, device, work)
                add(row)
                if "not run" in row.get("note", "") and "No module named" in row["note"]:
                    peers_ok = False  # trl is not there: say so once per stage, don't retry
        else:
            for kind in ("sft", "reward"):
                add({"stage": kind, "model": arch, "side": "TRL",
                     "note": "not run: " + ("--no-peers" if args.no_peers else "trl not importable")})
    guarded(run_generation, p["gen"], device, label="generate")
    if args.compile and device.type == "cuda":
        guarded(run_generation, p["gen"], device, True, label="generate+static+compile")
    guarded(run_ppo, p["ppo"], device, label="ppo")
    add({"stage": "ppo", "model": p["ppo"]["arch"], "side": "TRL 0.29.1 PPOTrainer",
         "note": "not run here: needs trl==0.29.1 in its own environment (bench/ppo/run.py on the CPU)"})
    for row in rows:
        if row.get("tflops") is not None:
            row["mfu_vs_989"] = row["tflops"] / H100_BF16_DENSE_TFLOPS
            row["mfu_vs_matmul"] = row["tflops"] / peak
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": card, "device_type": device.type,
              "tiny": args.tiny, "matmul_bf16_tflops": peak, "h100_bf16_dense_tflops": H100_BF16_DENSE_TFLOPS,
              "versions": _versions(), "python": platform.python_version(), "alignflow_from": where,
              "rows": rows, "seconds": time.perf_counter() - started}
    out = args.out or (Path(os.environ["OUT"]) / "gpu-bench.json" if os.environ.get("OUT") else
                       ROOT / "bench" / "gpu" / "results" / ("gpu-bench-tiny.json" if args.tiny else "gpu-bench.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nresults: {out}  ({result['seconds']:.0f} s)")
    print(f"\n{card}: bf16 matmul {peak:,.1f} TFLOP/s measured; MFU also against {H100_BF16_DENSE_TFLOPS:.0f}")
    header = ["stage", "model", "side", "tokens/s", "pairs|ep/s", "gen tok/s", "TFLOP/s", "MFU/989", "MFU/matmul",
              "peak MiB", "note"]
    table = [[r.get("stage", ""), r.get("model", ""), r.get("side", ""), fmt(r, "tokens_per_s"),
              fmt(r, "pairs_per_s", ",.1f") if "pairs_per_s" in r else fmt(r, "episodes_per_s", ",.2f"),
              fmt(r, "gen_tokens_per_s"), fmt(r, "tflops", ",.1f"), fmt(r, "mfu_vs_989", ".1%"),
              fmt(r, "mfu_vs_matmul", ".1%"), fmt(r, "peak_mib"), r.get("note", "")[:60]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for line in [header, ["-" * w for w in widths], *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)))


if __name__ == "__main__":
    main()
