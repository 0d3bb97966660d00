"""Flow `pm`: the reward model fine-tuned on task-specific pairs, registered as `alignflow-reward`.

    alignflow pm --workdir ./alignflow-work [--config configs/demo.yaml] [--set pm.site=cooking.stackexchange.com]

Starts from ``pm.model.name_or_path`` when set, else from ``alignflow-pmp@challenger``
(or ``alignflow-base@challenger`` with a new score head when ``pmp.enabled`` is
false). Task pairs: the latest ingest's pairs of ``pm.site`` (all sites when
empty), or a user's ``prompt/chosen/rejected`` file (``pm.pairs_file``) ingested
on the side. After training: evaluation on the validation split (accuracy
overall and by vote gap, Wilson interval, mean margin, calibration error and
diagram, worst-ranked pairs), then the score offset is set so that the
validation demos score 0 on average. The test split is left for promotion gates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from alignflow.config import AlignflowConfig, PmStageConfig
from alignflow.models.reward import score_texts
from alignflow.stages import BASE_MODEL, PMP_MODEL
from alignflow.tasks import preference, tracking
from alignflow.tasks.preference import (
    REWARD_TASK,
    log_reward_eval,
    reliability_figure,
    select_task_pairs,
    start_reward_model,
    task_pairs,
    train_logged,
)
from alignflow.tasks.train.lm import read_demos
from alignflow.tasks.train.loop import LoopResult
from alignflow.tasks.train.pairs import read_pairs
from alignflow.tasks.train.reward import evaluate_pairs, normalize_bias

from .skeleton import stage_run

CENTRING_DEMOS = 256


@task(name="train-reward", cache_policy=NO_CACHE)
def train(cfg: PmStageConfig, model: Any, tok: Any, train_rows: list[dict], eval_rows: list[dict], ckpt: Path,
          resume: bool, registered: str) -> LoopResult:
    return train_logged("pm", cfg, model, tok, train_rows, eval_rows, ckpt, resume, registered=registered)


def train_shard(cfg: AlignflowConfig, plan: dict) -> LoopResult:
    """One process's shard of the training under a launcher (process 0 runs the flow)."""
    return preference.train_shard(cfg.pm, plan)


@task(name="centre-on-demos", cache_policy=NO_CACHE)
def centre(model: Any, tok: Any, demos: list[dict], cfg: PmStageConfig) -> dict[str, float]:
    """Shift the score offset so the demos average 0; the mean before and after (the latter ~0, measured)."""
    prompts = [d["prompt"] for d in demos]
    responses = [d["response"] for d in demos]
    before = normalize_bias(model, tok, prompts, responses, batch_size=cfg.train.batch_size,
                            max_length=cfg.model.max_length)
    after = score_texts(model, tok, prompts, responses, batch_size=cfg.train.batch_size,
                        max_length=cfg.model.max_length)
    return {"eval/demo_score_before_centring": before, "eval/demo_score_mean": sum(after) / len(after),
            "eval/demos_centred": float(len(demos))}


@flow(name="pm", log_prints=True)
def pm(workdir: str = "./alignflow-work", config: AlignflowConfig | None = None, resume: bool = False) -> dict[str, Any]:
    cfg = config or AlignflowConfig()
    params = {"pm": cfg.pm.model_dump(mode="json"), "pmp_enabled": cfg.pmp.enabled}
    with stage_run("pm", cfg, workdir, params=params) as st:
        pairs_path, entry = task_pairs(cfg.pm.pairs_file, st.data, st.workdir, cfg.ingest)
        tracking.log_parquet_input(pairs_path, name="pairs", digest=entry["digest"], context="training",
                                   rows=entry["rows"])
        train_rows, held = select_task_pairs(read_pairs(pairs_path), cfg.pm, pairs_path)
        mlflow.log_metrics({"data/train_pairs": float(len(train_rows)), "data/eval_pairs": float(len(held)),
                            "data/mismatched_pairs": float(sum(1 for r in train_rows if r.get("mismatched")))})
        start_name = PMP_MODEL if cfg.pmp.enabled else BASE_MODEL
        model, tok, start = start_reward_model(cfg.pm.model, registered=start_name, seed=cfg.pm.train.seed)
        st.note_start(start)
        ckpt, resume = st.checkpoints(resume)
        eval_during = held[: cfg.pm.train.eval_batches * cfg.pm.train.batch_size]
        loop = train(cfg.pm, model, tok, train_rows, eval_during, ckpt, resume, start_name)

        result = evaluate_pairs(model, tok, held, batch_size=cfg.pm.train.batch_size,
                                max_length=cfg.pm.model.max_length, n_worst=cfg.pm.worst_pairs)
        metrics = log_reward_eval(result)
        if held:
            figure = reliability_figure(result["r_chosen"], result["r_rejected"], ckpt / "calibration.png")
            mlflow.log_artifact(str(figure), artifact_path="eval")

        demos = read_demos(st.data / "demos.parquet", "validation")[:CENTRING_DEMOS] if cfg.pm.normalize_on_demos else []
        if demos:
            centring = centre(model, tok, demos, cfg.pm)
            mlflow.log_metrics(centring)
            metrics.update(centring)
        elif cfg.pm.normalize_on_demos:
            print(f"no validation demos in {st.data}: the score offset is left at 0")
        st.register(model, tok, task=REWARD_TASK, tags={"task_site": cfg.pm.site or "*"})
        summary = st.summary(train_pairs=len(train_rows), final_loss=loop.final_loss, **metrics)
        create_markdown_artifact(key="pm-summary", markdown=_summary_md(summary, result.get("worst_pairs", [])))
        acc = metrics.get("eval/pairwise_accuracy")
        if acc is not None:
            print(f"held-out pairwise accuracy {acc:.3f} (95% CI {metrics['eval/accuracy_ci_low']:.3f}-"
                  f"{metrics['eval/accuracy_ci_high']:.3f}, {len(held)} pairs)")
        return summary


def _summary_md(summary: dict, worst: list[dict]) -> str:
    lines = ["# Stage `pm`", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    if worst:
        lines += ["", "## Worst-ranked held-out pairs", "", "| pair | r_chosen - r_rejected | vote gap |",
                  "|---|---|---|"]
        lines += [f"| {w['pair_id']} | {w['reward_diff']:.3f} | {w['gap']} |" for w in worst[:10]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # `python -m alignflow.flows.pm [options]`: the CLI command (also under a launcher)
    from alignflow.flows.cli import run_module

    run_module("pm")
