"""Flow `ppo`: the SFT policy optimised against the reward model with PPO, registered as `alignflow-policy`.

    alignflow ppo --workdir ./alignflow-work [--config configs/demo.yaml] [--set ppo.total_steps=50] [--resume]

Policy: ``ppo.policy_model`` when set, else ``alignflow-policy-sft@challenger``;
the frozen reference is the same weights (with LoRA, the adapter-free policy
itself). Reward: ``ppo.reward_model`` when set, else ``alignflow-reward@challenger``,
frozen; the critic is a separate, trainable copy of it (built on the policy's weights
when the two tokenize differently: the critic reads the policy's token ids). Prompts: the latest
ingest's ``prompts`` dataset, train split; evaluation on its validation split
against the SFT policy (mean reward, KL, win rate judged by the reward model
and, on a generated dump, the rate of answers with the planted property).

Per PPO step the run logs ``ppo/*`` and ``perf/episodes_per_s``; every
``ppo.generations_every`` steps a table of sample generations
(``ppo/generations_step_*.json``); evaluations as ``eval/*`` with a table of
held-out answers. ``--resume`` continues from the last full-state checkpoint
of the latest attempt (the killed run is marked KILLED and linked).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import torch
from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from alignflow.config import AlignflowConfig, PpoStageConfig
from alignflow.stages import POLICY_MODEL, REWARD_MODEL, SFT_MODEL
from alignflow.tasks import evaluation, launch, registry, tracking
from alignflow.tasks.ingest.run import latest_datasets
from alignflow.tasks.train import ppo as ppo_lib

MODEL_NAME = POLICY_MODEL
POLICY_SOURCE = SFT_MODEL
REWARD_SOURCE = REWARD_MODEL


def read_prompts(path: Path, split: str) -> list[dict]:
    """Rows (prompt, question_id, site) of one split of a prompts dataset, in file order."""
    rows = pq.read_table(path, columns=["prompt", "question_id", "site", "split"]).to_pylist()
    return [r for r in rows if r["split"] == split]


def load_sources(policy_source: str | None, reward_source: str | None) -> tuple[Any, Any, str, Any, Any, str]:
    """(policy, tokenizer, source, reward model, reward tokenizer, source): a folder or hub id, a registered
    version (``models:/<name>/<version>``), or (None) the registered challenger."""
    from alignflow.models import load_causal_lm, load_sequence_classifier, load_tokenizer

    def load(source: str | None, registered: str, build: Any) -> tuple[Any, Any, str]:
        if source is None:
            model, tok, version = registry.load_transformers_components(registered, registry.CHALLENGER)
            return model, tok, f"models:/{registered}/{version}"
        if source.startswith("models:/"):
            return (*registry.load_version_components(*source.removeprefix("models:/").split("/", 1)), source)
        tok = load_tokenizer(source)
        return build(source, tokenizer=tok), tok, source

    policy, tok, policy_src = load(policy_source, POLICY_SOURCE, load_causal_lm)
    reward, rtok, reward_src = load(reward_source, REWARD_SOURCE, load_sequence_classifier)
    if getattr(reward.config, "num_labels", 1) != 1 or not hasattr(reward, "score"):
        raise ValueError(f"{reward_src} is not a scalar reward model (*ForSequenceClassification, num_labels=1)")
    ppo_lib.check_pad_token(tok)
    return policy, tok, policy_src, reward, rtok, reward_src


@task(name="load-ppo-models", cache_policy=NO_CACHE)
def load_models(cfg: PpoStageConfig) -> tuple[Any, Any, str, Any, Any, str]:
    return load_sources(cfg.policy_model, cfg.reward_model)


def device_of_process() -> torch.device:
    """This process's accelerator (its local rank's GPU under a launcher), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")


def train_shard(cfg: AlignflowConfig, plan: dict, callbacks: Any = None, models: tuple | None = None
                ) -> ppo_lib.PpoResult:
    """The PPO run of one process (all of it, or one process's part of each update under a launcher)."""
    policy, tok, _, reward, rtok, _ = models or load_sources(plan["policy"], plan["reward"])
    device = device_of_process()
    policy.to(device)
    reward.to(device)
    p = cfg.ppo
    reward_fn = ppo_lib.text_reward_fn(reward, rtok, batch_size=p.forward_batch_size, max_length=p.reward_max_length)
    critic = ppo_lib.make_critic(reward, reward_tokenizer=rtok, policy=policy, policy_tokenizer=tok)
    if callbacks is not None:
        callbacks = callbacks(tok, reward_fn)
    return ppo_lib.train_ppo(p, policy=policy, tokenizer=tok, critic=critic, reward_fn=reward_fn,
                             prompts=plan["prompts"], checkpoint_dir=Path(plan["ckpt"]), resume=plan["resume"],
                             callbacks=callbacks)


@task(name="ppo-train", cache_policy=NO_CACHE)
def optimise(cfg: AlignflowConfig, models: tuple, prompts: list[str], eval_rows: list[dict], judge: Any,
             ckpt: Path, resume: bool) -> ppo_lib.PpoResult:
    p = cfg.ppo
    plan = {"policy": models[2], "reward": models[5], "prompts": prompts, "ckpt": str(ckpt), "resume": resume}
    launch.share_plan(plan)
    logger = tracking.MetricLogger(p.total_steps, "ppo")
    eval_prompts = [r["prompt"] for r in eval_rows]

    def hooks(tok: Any, reward_fn: Any) -> ppo_lib.PpoCallbacks:
        def on_generations(rows: list[dict], step: int) -> None:
            mlflow.log_table(pd.DataFrame(rows), artifact_file=f"ppo/generations_step_{step:06d}.json")

        def on_eval(step: int, trained: Any, reference: Any) -> dict[str, float]:
            if not eval_prompts:
                return {}
            metrics, rows = ppo_lib.evaluate_against_reference(trained, reference, tok, reward_fn, eval_prompts, p,
                                                              judge=judge)
            mlflow.log_table(pd.DataFrame(rows), artifact_file=f"eval/samples_step_{step:06d}.json")
            return metrics

        return ppo_lib.PpoCallbacks(on_log=logger.log, on_step=logger.step, on_generations=on_generations,
                                    on_eval=on_eval)

    try:
        return train_shard(cfg, plan, hooks, models)
    finally:
        logger.close()


@flow(name="ppo", log_prints=True)
def ppo(workdir: str = "./alignflow-work", config: AlignflowConfig | None = None, resume: bool = False
        ) -> dict[str, Any]:
    cfg = config or AlignflowConfig()
    p = cfg.ppo
    tracking.configure(Path(workdir), cfg.experiment)
    data = latest_datasets(Path(workdir))
    train_rows = read_prompts(data / "prompts.parquet", "train")
    if not train_rows:
        raise ValueError(f"{data / 'prompts.parquet'}: no train-split prompts for PPO")
    eval_rows = read_prompts(data / "prompts.parquet", "validation")[: p.eval_prompts]
    with tracking.stage_run("ppo", {"ppo": p.model_dump(mode="json")}) as run:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(run), link_text="MLflow run of this stage")
        models = load_models(p)
        policy_src, reward_src = models[2], models[5]
        mlflow.log_params({"start_model": policy_src, "reward_model": reward_src, "device": str(device_of_process())})
        manifest = json.loads((data / "manifest.json").read_text())["datasets"]
        tracking.log_parquet_input(data / "prompts.parquet", name="prompts", digest=manifest["prompts"]["digest"],
                                   context="training", rows=manifest["prompts"]["rows"])
        mlflow.log_metrics({"data/train_prompts": float(len(train_rows)), "data/eval_prompts": float(len(eval_rows))})
        judge = evaluation.judge_for(data, eval_rows)  # an evaluation hook: the planted rule on a generated dump
        ckpt, resumed_from = tracking.attach_checkpoints(Path(workdir), "ppo", run, resume=resume)
        out = optimise(cfg, models, [r["prompt"] for r in train_rows], eval_rows, judge, ckpt,
                       resume and resumed_from is not None)
        final = ppo_lib.merged_policy(out.policy).to("cpu").eval()
        version = registry.register_transformers(final, models[1], name=MODEL_NAME,
                                                 tags={"start_model": policy_src, "reward_model": reward_src})
        summary = {"stage": "ppo", "run_id": run.info.run_id, "model": MODEL_NAME, "version": version,
                   "start_model": policy_src, "reward_model": reward_src, "steps": out.final_step,
                   "resumed_from_step": out.resumed_from, "skipped_minibatches": out.skipped_minibatches,
                   **{k: out.last_metrics[k] for k in ("ppo/reward_mean", "ppo/kl", "ppo/no_eos_rate")
                      if k in out.last_metrics},
                   **out.last_eval}
        create_table_artifact(key="ppo-summary", table=[{"metric": k, "value": str(v)} for k, v in summary.items()])
        gain = out.last_eval.get("eval/reward_gain")
        print(f"registered {MODEL_NAME} version {version} (alias challenger)"
              + (f"; held-out reward {out.last_eval['eval/reward_mean_sft']:.3f} (SFT) -> "
                 f"{out.last_eval['eval/reward_mean']:.3f}, win rate {out.last_eval['eval/win_rate']:.2f}, "
                 f"KL {out.last_eval['eval/kl']:.2f}" if gain is not None else ""))
        return summary


if __name__ == "__main__":  # `python -m alignflow.flows.ppo [options]`: the CLI command (also under a launcher)
    from alignflow.flows.cli import run_module

    run_module("ppo")
