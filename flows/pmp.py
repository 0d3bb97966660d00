"""Flow `pmp`: preference-model pretraining on a weighted mixture of generic pairs, registered as `alignflow-pmp`.

    alignflow pmp --workdir ./alignflow-work [--config configs/demo.yaml] [--set pmp.train.max_steps=50] [--resume]

Starts from ``pmp.model.name_or_path`` when set, else from ``alignflow-base@challenger``
with a new score head. The training pairs are a mixture of ``pmp.sources``
(sites of ingested datasets, each with a weight; a source smaller than its
share is repeated), optionally binarised (the PMP paper's GOOD:/BAD: pairs).
Evaluation: held-out (validation-split) ranked pairs of the same sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from alignflow.config import AlignflowConfig, PmpStageConfig
from alignflow.stages import BASE_MODEL, PMP_MODEL
from alignflow.tasks import preference, tracking
from alignflow.tasks.preference import REWARD_TASK, log_reward_eval, pmp_sources, start_reward_model, train_logged
from alignflow.tasks.train.loop import LoopResult
from alignflow.tasks.train.pairs import (
    MixtureSource,
    check_split_hygiene,
    draw_mixture,
    draw_questions,
    read_pairs,
    rows_of_split,
)
from alignflow.tasks.train.reward import binarize_pairs, evaluate_pairs

from .skeleton import stage_run



@task(name="train-pmp", cache_policy=NO_CACHE)
def train(cfg: PmpStageConfig, model: Any, tok: Any, train_rows: list[dict], eval_rows: list[dict], ckpt: Path,
          resume: bool) -> LoopResult:
    return train_logged("pmp", cfg, model, tok, train_rows, eval_rows, ckpt, resume, registered=BASE_MODEL,
                        group_by_question=cfg.group_by_question)


def train_shard(cfg: AlignflowConfig, plan: dict) -> LoopResult:
    """One process's shard of the training under a launcher (process 0 runs the flow)."""
    return preference.train_shard(cfg.pmp, plan)


@flow(name="pmp", log_prints=True)
def pmp(workdir: str = "./alignflow-work", config: AlignflowConfig | None = None, resume: bool = False) -> dict[str, Any]:
    cfg = config or AlignflowConfig()
    if not cfg.pmp.enabled:
        print(f"pmp.enabled is false: nothing to do (pm starts from {BASE_MODEL})")
        return {"stage": "pmp", "run_id": None, "model": PMP_MODEL, "version": None, "skipped": "pmp.enabled=false"}
    with stage_run("pmp", cfg, workdir) as st:
        datasets = pmp_sources(cfg.pmp, st.workdir)
        rows: list[dict] = []
        for path, entry in datasets.items():
            tracking.log_parquet_input(path, name="pairs", digest=entry.get("digest") or path.name,
                                       context="training", rows=entry.get("rows"))
            rows.extend(read_pairs(path))
        sources = [MixtureSource(s.site, s.weight) for s in cfg.pmp.sources]
        seed = cfg.pmp.train.seed
        mixture, report = draw_mixture(rows_of_split(rows, "train"), sources, cfg.pmp.max_pairs, seed)
        sites = {r["site"] for r in mixture}
        held = draw_questions([r for r in rows_of_split(rows, "validation") if r["site"] in sites],
                              cfg.pmp.eval_pairs, seed)
        check_split_hygiene(mixture, held)
        mlflow.log_metrics(report.as_metrics())
        mlflow.log_dict({"sources": report.per_source, "total": report.total}, "data/mixture.json")
        train_rows = binarize_pairs(mixture) if cfg.pmp.binarize else mixture
        model, tok, start = start_reward_model(cfg.pmp.model, registered=BASE_MODEL, seed=seed)
        st.note_start(start)
        ckpt, resume = st.checkpoints(resume)
        loop = train(cfg.pmp, model, tok, train_rows, held[: cfg.pmp.train.eval_batches * cfg.pmp.train.batch_size],
                     ckpt, resume)
        result = evaluate_pairs(model, tok, held, batch_size=cfg.pmp.train.batch_size,
                                max_length=cfg.pmp.model.max_length, n_worst=20)
        metrics = log_reward_eval(result)
        st.register(model, tok, task=REWARD_TASK, tags={"binarized": str(cfg.pmp.binarize)})
        summary = st.summary(train_pairs=len(train_rows), final_loss=loop.final_loss, **metrics)
        create_markdown_artifact(key="pmp-summary", markdown=_summary_md(summary, report.per_source))
        print(f"held-out accuracy {metrics.get('eval/pairwise_accuracy', float('nan')):.3f} on {len(held)} pairs")
        return summary


def _summary_md(summary: dict, per_source: dict) -> str:
    lines = ["# Stage `pmp`", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "## Mixture", "", "| source | weight | pairs available | pairs drawn |", "|---|---|---|---|"]
    lines += [f"| {s} | {v['weight']:.3f} | {int(v['available'])} | {int(v['drawn'])} |" for s, v in per_source.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # `python -m alignflow.flows.pmp [options]`: the CLI command (also under a launcher)
    from alignflow.flows.cli import run_module

    run_module("pmp")
