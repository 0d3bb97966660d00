"""Flow `ingest`: upvote dumps -> posts, pairs, demos, prompts (+ quarantine), one MLflow run.

    alignflow ingest tests/fixtures/stackexchange/conlang.meta-2020 --workdir ./alignflow-work

Orchestration only: the work is in ``alignflow.tasks.ingest`` (plain functions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from alignflow.config import AlignflowConfig, IngestConfig
from alignflow.tasks import tracking
from alignflow.tasks.ingest.run import IngestPlan, IngestResult, execute_ingest, mark_latest, plan_ingest


@task(name="plan-ingest")
def plan(sources: list[str], workdir: str, cfg: IngestConfig, fmt: str | None) -> IngestPlan:
    return plan_ingest(sources, Path(workdir), cfg, fmt)


@task(name="build-datasets")
def build(plan: IngestPlan, cfg: IngestConfig) -> IngestResult:
    return execute_ingest(plan, cfg, mark=False)


@task(name="track-ingest")
def track(plan: IngestPlan, result: IngestResult) -> None:
    for kind, meta in result.datasets.items():
        tracking.log_parquet_input(Path(meta["path"]), name=kind, digest=meta["digest"], context="ingest-output",
                                   rows=meta["rows"])
    metrics = {f"data/{kind}": meta["rows"] for kind, meta in result.datasets.items()}
    metrics.update({f"data/pairs_{k.replace(':', '_')}": v for k, v in result.report["pairs"].items()})
    metrics["data/input_mb"] = result.input_bytes / 1e6
    if not result.cache_hit and result.seconds > 0:
        metrics["perf/input_mb_per_s"] = result.input_bytes / 1e6 / result.seconds
    metrics["perf/seconds"] = result.seconds
    mlflow.log_metrics(metrics)
    out = Path(result.out_dir)
    mlflow.log_artifact(str(out / "ingest_report.json"))
    if (out / "contracts").is_dir():
        mlflow.log_artifacts(str(out / "contracts"), artifact_path="contracts")
    create_markdown_artifact(key="ingest-report", markdown=report_markdown(result),
                             description="Datasets, row accounting and contract results of this ingest")


def report_markdown(result: IngestResult) -> str:
    lines = [f"# Ingest {'(cache hit)' if result.cache_hit else ''}", "", f"Datasets in `{result.out_dir}`", "",
             "| dataset | rows | digest |", "|---|---:|---|"]
    for kind, meta in result.datasets.items():
        lines.append(f"| {kind} | {meta['rows']} | `{meta['digest'][:16]}` |")
    lines += ["", "## Input rows", "", "| file | rows | adds up | outcome |", "|---|---:|---|---|"]
    for f, v in result.report["files"].items():
        outcome = ", ".join(f"{k}={n}" for k, n in v.items() if k not in ("rows", "accounted", "adds_up"))
        lines.append(f"| `{f}` | {v['rows']} | {v['adds_up']} | {outcome} |")
    lines += ["", "## Pairs", "", *(f"- {k}: {v}" for k, v in result.report["pairs"].items())]
    lines += ["", "## Contracts", "", "| dataset | stats |", "|---|---|"]
    for kind, stats in result.report.get("contracts", {}).items():
        lines.append(f"| {kind} | {', '.join(f'{k}={v}' for k, v in stats.items())} |")
    return "\n".join(lines) + "\n"


@flow(name="ingest", log_prints=True)
def ingest(
    sources: list[str],
    workdir: str = "./alignflow-work",
    config: AlignflowConfig | None = None,
    format: str | None = None,
) -> dict[str, Any]:
    """Read dumps, build and validate the datasets, track everything in one MLflow run."""
    cfg = config or AlignflowConfig()
    tracking.configure(Path(workdir), cfg.experiment)
    with tracking.stage_run("ingest", {"ingest": cfg.ingest.model_dump(mode="json")}) as run:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(run), link_text="MLflow run of this ingest")
        p = plan(sources, workdir, cfg.ingest, format)
        mlflow.log_params({f"input.{i}.path": s.path for i, s in enumerate(p.sources)})
        mlflow.log_params({f"input.{i}.format": s.format for i, s in enumerate(p.sources)})
        mlflow.log_params({f"input.{i}.sha256": s.sha256 for i, s in enumerate(p.sources)})
        mlflow.set_tag("alignflow.cache_key", p.key)
        result = build(p, cfg.ingest)
        for site, how in result.report["score_source"].items():
            mlflow.log_param(tracking.param_key(f"score_source.{site}"), how)
        mlflow.set_tag("alignflow.cache_hit", str(result.cache_hit).lower())
        track(p, result)
        mark_latest(Path(result.out_dir))  # later stages read these datasets only once all of the above worked
        print(f"datasets: {result.out_dir} ({'cache hit' if result.cache_hit else 'built'})")
        return {
            "out_dir": result.out_dir,
            "cache_hit": result.cache_hit,
            "datasets": result.datasets,
            "report": result.report,
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        }


if __name__ == "__main__":  # `python -m alignflow.flows.ingest [options]`: the CLI command
    from alignflow.flows.cli import run_module

    run_module("ingest")
