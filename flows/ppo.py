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
from alignflow.tasks import evaluation, registry, tracking
from alignflow.tasks.ingest.run import latest_datasets
from alignflow.tasks.train import ppo as ppo_lib

MODEL_NAME = POLICY_MODEL
POLICY_SOURCE = SFT_MODEL
REWARD_SOURCE = REWARD_MODEL


def read_prompts(path: Path, split: str) -> list[dict]:
    """Rows (prompt, question_id, site) of one split of a prompts dataset, in file order."""
    rows = pq.read_table(path, columns=["prompt", "question_id", "site", "split"]).to_pylist()
    return [r for r in rows if r["split"] == split]


@task(name="load-ppo-models", cache_policy=NO_CACHE)
def load_models(cfg: PpoStageConfig) -> tuple[Any, Any, str, Any, Any, str]:
    """(policy, tokenizer, source, reward model, reward tokenizer, source)."""
    from alignflow.models import load_causal_lm, load_sequence_classifier, load_tokenizer

    if cfg.policy_model:
        tok = load_tokenizer(cfg.policy_model)
        policy, policy_src = load_causal_lm(cfg.policy_model, tokenizer=tok), cfg.policy_model
    else:
        policy, tok, version = registry.load_transformers_components(POLICY_SOURCE, registry.CHALLENGER)
        policy_src = f"models:/{POLICY_SOURCE}/{version}"
    if cfg.reward_model:
        rtok = load_tokenizer(cfg.reward_model)
        reward, reward_src = load_sequence_classifier(cfg.reward_model, tokenizer=rtok), cfg.reward_model
    else:
        reward, rtok, version = registry.load_transformers_components(REWARD_SOURCE, registry.CHALLENGER)
        reward_src = f"models:/{REWARD_SOURCE}/{version}"
    if getattr(reward.config, "num_labels", 1) != 1 or not hasattr(reward, "score"):
        raise ValueError(f"{reward_src} is not a scalar reward model (*ForSequenceClassification, num_labels=1)")
    ppo_lib.check_pad_token(tok)
    return policy, tok, policy_src, reward, rtok, reward_src


@task(name="ppo-train", cache_policy=NO_CACHE)
def optimise(cfg: PpoStageConfig, policy: Any, tok: Any, reward: Any, rtok: Any, prompts: list[str],
             eval_rows: list[dict], judge: Any, ckpt: Path, resume: bool) -> ppo_lib.PpoResult:
    logger = tracking.MetricLogger(cfg.total_steps, "ppo")
    reward_fn = ppo_lib.text_reward_fn(reward, rtok, batch_size=cfg.forward_batch_size,
                                       max_length=cfg.reward_max_length)
    critic = ppo_lib.make_critic(reward, reward_tokenizer=rtok, policy=policy, policy_tokenizer=tok)
    eval_prompts = [r["prompt"] for r in eval_rows]

    def on_generations(rows: list[dict], step: int) -> None:
        mlflow.log_table(pd.DataFrame(rows), artifact_file=f"ppo/generations_step_{step:06d}.json")

    def on_eval(step: int, trained: Any, reference: Any) -> dict[str, float]:
        if not eval_prompts:
            return {}
        metrics, rows = ppo_lib.evaluate_against_reference(trained, reference, tok, reward_fn, eval_prompts, cfg,
                                                          judge=judge)
        mlflow.log_table(pd.DataFrame(rows), artifact_file=f"eval/samples_step_{step:06d}.json")
        return metrics

    try:
        return ppo_lib.train_ppo(cfg, policy=policy, tokenizer=tok, critic=critic, reward_fn=reward_fn,
                                 prompts=prompts, checkpoint_dir=ckpt, resume=resume,
                                 callbacks=ppo_lib.PpoCallbacks(on_log=logger.log, on_step=logger.step,
                                                                on_generations=on_generations, on_eval=on_eval))
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
        policy, tok, policy_src, reward, rtok, reward_src = load_models(p)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        policy.to(device)
        reward.to(device)
        mlflow.log_params({"start_model": policy_src, "reward_model": reward_src, "device": str(device)})
        manifest = json.loads((data / "manifest.json").read_text())["datasets"]
        tracking.log_parquet_input(data / "prompts.parquet", name="prompts", digest=manifest["prompts"]["digest"],
                                   context="training", rows=manifest["prompts"]["rows"])
        mlflow.log_metrics({"data/train_prompts": float(len(train_rows)), "data/eval_prompts": float(len(eval_rows))})
        judge = evaluation.judge_for(data, eval_rows)  # an evaluation hook: the planted rule on a generated dump
        ckpt, resumed_from = tracking.attach_checkpoints(Path(workdir), "ppo", run, resume=resume)
        out = optimise(p, policy, tok, reward, rtok, [r["prompt"] for r in train_rows], eval_rows, judge, ckpt,
                       resume and resumed_from is not None)
        final = ppo_lib.merged_policy(out.policy).to("cpu").eval()
        version = registry.register_transformers(final, tok, name=MODEL_NAME,
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


if __name__ == "__main__":
    ppo()
