"""Flow `base`: the language model every later stage starts from, registered as `alignflow-base`.

    alignflow base --workdir ./alignflow-work [--config configs/demo.yaml] [--set base.train.max_steps=50] [--resume]

With ``base.model.name_or_path`` set, the named Hugging Face model (hub id or
local folder) is registered as it is. Without it (the offline default), a
small LM is pretrained on the ingested questions and answers with a tokenizer
trained on the same text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from alignflow.config import AlignflowConfig, BaseStageConfig
from alignflow.stages import BASE_MODEL
from alignflow.tasks import launch, registry, tracking
from alignflow.tasks.ingest.run import latest_datasets
from alignflow.tasks.train.lm import StageOutput, train_base
from alignflow.tasks.train.loop import LoopCallbacks

MODEL_NAME = BASE_MODEL


def train_shard(cfg: AlignflowConfig, plan: dict, callbacks: LoopCallbacks | None = None) -> StageOutput:
    """The training of this stage on one process (all of it, or one process's shard under a launcher)."""
    return train_base(cfg.base, Path(plan["posts"]), checkpoint_dir=Path(plan["ckpt"]), resume=plan["resume"],
                      callbacks=callbacks)


@task(name="pretrain-base", cache_policy=NO_CACHE)
def pretrain(cfg: AlignflowConfig, posts: Path, checkpoint_dir: Path, resume: bool) -> StageOutput:
    plan = {"posts": str(posts), "ckpt": str(checkpoint_dir), "resume": resume}
    launch.share_plan(plan)
    logger = tracking.MetricLogger(cfg.base.train.max_steps, "base")
    try:
        return train_shard(cfg, plan, LoopCallbacks(on_log=logger.log, on_step=logger.step))
    finally:
        logger.close()


@task(name="adopt-pretrained", cache_policy=NO_CACHE)
def adopt(cfg: BaseStageConfig) -> StageOutput:
    from alignflow.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_causal_lm(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code, tokenizer=tok)
    return StageOutput(model, tok, None, trained=False)


@task(name="register-base", cache_policy=NO_CACHE)
def register(out: StageOutput, source: str) -> str:
    return registry.register_transformers(out.model, out.tokenizer, name=MODEL_NAME, tags={"source": source})


@flow(name="base", log_prints=True)
def base(workdir: str = "./alignflow-work", config: AlignflowConfig | None = None, resume: bool = False) -> dict[str, Any]:
    cfg = config or AlignflowConfig()
    tracking.configure(Path(workdir), cfg.experiment)
    with tracking.stage_run("base", {"base": cfg.base.model_dump(mode="json")}) as run:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(run), link_text="MLflow run of this stage")
        if cfg.base.model.name_or_path:
            out = adopt(cfg.base)
            source = cfg.base.model.name_or_path
        else:
            data = latest_datasets(Path(workdir))
            posts = data / "posts.parquet"
            manifest = _manifest(data)
            tracking.log_parquet_input(posts, name="posts", digest=manifest["posts"]["digest"], context="training",
                                       rows=manifest["posts"]["rows"])
            ckpt, resumed_from = tracking.attach_checkpoints(Path(workdir), "base", run, resume=resume)
            out = pretrain(cfg, posts, ckpt, resume and resumed_from is not None)
            mlflow.log_metrics(out.metrics)
            source = f"pretrained:{cfg.base.model.arch}"
        version = register(out, source)
        summary = {"stage": "base", "run_id": run.info.run_id, "model": MODEL_NAME, "version": version,
                   "source": source, "final_loss": out.loop.final_loss if out.loop else None,
                   "eval": out.loop.last_eval if out.loop else {}}
        create_markdown_artifact(key="base-summary", markdown=_summary_md(summary))
        print(f"registered {MODEL_NAME} version {version} (alias challenger)")
        return summary


def _manifest(data_dir: Path) -> dict:
    import json

    return json.loads((data_dir / "manifest.json").read_text())["datasets"]


def _summary_md(summary: dict) -> str:
    lines = [f"# Stage `{summary['stage']}`", "", "| field | value |", "|---|---|"]
    for k, v in summary.items():
        if k != "eval":
            lines.append(f"| {k} | {v} |")
    for k, v in (summary.get("eval") or {}).items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # `python -m alignflow.flows.base [options]`: the CLI command (also under a launcher)
    from alignflow.flows.cli import run_module

    run_module("base")
