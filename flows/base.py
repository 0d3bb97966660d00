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
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from alignflow.config import AlignflowConfig, BaseStageConfig
from alignflow.tasks import launch, tracking
from alignflow.tasks.train.lm import StageOutput, train_base
from alignflow.tasks.train.loop import LoopCallbacks

from .skeleton import stage_run


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


@flow(name="base", log_prints=True)
def base(workdir: str = "./alignflow-work", config: AlignflowConfig | None = None, resume: bool = False) -> dict[str, Any]:
    cfg = config or AlignflowConfig()
    with stage_run("base", cfg, workdir) as st:
        if cfg.base.model.name_or_path:
            out, source = adopt(cfg.base), cfg.base.model.name_or_path
        else:
            posts = st.dataset("posts")
            ckpt, resume = st.checkpoints(resume)
            out, source = pretrain(cfg, posts, ckpt, resume), f"pretrained:{cfg.base.model.arch}"
            mlflow.log_metrics(out.metrics)
        st.register(out.model, out.tokenizer, tags={"source": source})
        summary = st.summary(source=source, final_loss=out.loop.final_loss if out.loop else None,
                             eval=out.loop.last_eval if out.loop else {})
        create_markdown_artifact(key="base-summary", markdown=_summary_md(summary))
        return summary


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
