"""Flow `sft`: the base LM fine-tuned on demonstrations, registered as `alignflow-policy-sft`.

    alignflow sft --workdir ./alignflow-work [--config configs/demo.yaml] [--set sft.train.max_steps=50] [--resume]

Starts from ``sft.model.name_or_path`` when set, else from ``alignflow-base@challenger``.
The loss is on response tokens only. Every evaluation logs validation loss,
perplexity and a table of greedy answers to fixed validation prompts; at the
end, the rate of answers with the generator's planted property is measured for
the policy and for the model it started from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from alignflow.config import AlignflowConfig, SftStageConfig
from alignflow.stages import BASE_MODEL, SFT_MODEL
from alignflow.tasks import launch, registry, tracking
from alignflow.tasks.ingest.run import latest_datasets
from alignflow.tasks.train.lm import StageOutput, generate_greedy, read_demos, train_sft
from alignflow.tasks.train.loop import LoopCallbacks

MODEL_NAME = SFT_MODEL
PLANTED_EVAL_PROMPTS = 64


@task(name="load-start-model", cache_policy=NO_CACHE)
def load_start(cfg: SftStageConfig) -> tuple[Any, Any, str]:
    return registry.resolve_start_model(cfg.model.name_or_path, BASE_MODEL,
                                        trust_remote_code=cfg.model.trust_remote_code)


def planted_property_rate(model: Any, tokenizer: Any, questions: list[dict], cfg: SftStageConfig) -> float | None:
    """Share of greedy answers with the synthetic dump's planted property (None when not a synthetic dump)."""
    from alignflow.tasks.ingest.synthetic import has_planted_property, key_term

    usable = [q for q in questions if key_term(q["title"], q["body"]) is not None]
    if not usable:
        return None
    answers = generate_greedy(model, tokenizer, [q["prompt"] for q in usable], max_new_tokens=cfg.max_new_tokens,
                              max_prompt_tokens=cfg.model.max_length)
    hits = sum(has_planted_property(q["title"], q["body"], a) for q, a in zip(usable, answers))
    return hits / len(usable)


def validation_questions(data: Path, limit: int) -> list[dict]:
    demos = read_demos(data / "demos.parquet", "validation")[:limit]
    posts = pd.read_parquet(data / "posts.parquet", columns=["site", "post_id", "kind", "title", "body"])
    q = posts[posts.kind == "question"].set_index(["site", "post_id"])
    out = []
    for d in demos:
        key = (d["site"], d["question_id"])
        if key in q.index:
            row = q.loc[key]
            out.append({"prompt": d["prompt"], "title": row["title"], "body": row["body"]})
    return out


def train_shard(cfg: AlignflowConfig, plan: dict, callbacks: LoopCallbacks | None = None, model: Any = None,
                tok: Any = None) -> StageOutput:
    """The training of this stage on one process (all of it, or one process's shard under a launcher)."""
    if model is None:
        model, tok = registry.load_start_lm(plan["start"], trust_remote_code=cfg.sft.model.trust_remote_code)
    return train_sft(cfg.sft, model, tok, Path(plan["data"]) / "demos.parquet", checkpoint_dir=Path(plan["ckpt"]),
                     resume=plan["resume"], callbacks=callbacks)


@task(name="fine-tune-sft", cache_policy=NO_CACHE)
def fine_tune(cfg: AlignflowConfig, model: Any, tok: Any, start: str, data: Path, ckpt: Path,
              resume: bool) -> StageOutput:
    plan = {"start": start, "data": str(data), "ckpt": str(ckpt), "resume": resume}
    launch.share_plan(plan)
    section = cfg.sft
    logger = tracking.MetricLogger(section.train.max_steps, "sft")
    fixed = [d["prompt"] for d in read_demos(data / "demos.parquet", "validation")[: section.generation_prompts]]

    def on_eval(step: int) -> dict[str, float]:
        if fixed:
            answers = generate_greedy(model, tok, fixed, max_new_tokens=section.max_new_tokens,
                                      max_prompt_tokens=section.model.max_length)
            mlflow.log_table(pd.DataFrame({"step": step, "prompt": fixed, "response": answers}),
                             artifact_file=f"eval/generations_step_{step:06d}.json")
        return {}

    try:
        return train_shard(cfg, plan, LoopCallbacks(on_log=logger.log, on_step=logger.step, on_eval=on_eval),
                           model=model, tok=tok)
    finally:
        logger.close()


@flow(name="sft", log_prints=True)
def sft(workdir: str = "./alignflow-work", config: AlignflowConfig | None = None, resume: bool = False) -> dict[str, Any]:
    cfg = config or AlignflowConfig()
    tracking.configure(Path(workdir), cfg.experiment)
    data = latest_datasets(Path(workdir))
    with tracking.stage_run("sft", {"sft": cfg.sft.model_dump(mode="json")}) as run:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(run), link_text="MLflow run of this stage")
        model, tok, start = load_start(cfg.sft)
        mlflow.log_param("start_model", start)
        import json

        manifest = json.loads((data / "manifest.json").read_text())["datasets"]
        tracking.log_parquet_input(data / "demos.parquet", name="demos", digest=manifest["demos"]["digest"],
                                   context="training", rows=manifest["demos"]["rows"])
        questions = validation_questions(data, PLANTED_EVAL_PROMPTS)
        start_rate = planted_property_rate(model, tok, questions, cfg.sft)
        ckpt, resumed_from = tracking.attach_checkpoints(Path(workdir), "sft", run, resume=resume)
        out = fine_tune(cfg, model, tok, start, data, ckpt, resume and resumed_from is not None)
        mlflow.log_metrics(out.metrics)
        rate = planted_property_rate(out.model, out.tokenizer, questions, cfg.sft)
        if rate is not None:
            mlflow.log_metrics({"eval/planted_rate": rate, "eval/planted_rate_start": start_rate,
                                "eval/planted_prompts": float(len(questions))})
        version = registry.register_transformers(out.model, out.tokenizer, name=MODEL_NAME,
                                                 tags={"start_model": start})
        summary = {"stage": "sft", "run_id": run.info.run_id, "model": MODEL_NAME, "version": version,
                   "start_model": start, "final_loss": out.loop.final_loss, "planted_rate": rate,
                   "planted_rate_start": start_rate, **out.loop.last_eval}
        create_table_artifact(key="sft-summary", table=[{"metric": k, "value": str(v)} for k, v in summary.items()])
        print(f"registered {MODEL_NAME} version {version} (alias challenger); planted-property rate "
              f"{start_rate} -> {rate}")
        return summary


if __name__ == "__main__":  # `python -m alignflow.flows.sft [options]`: the CLI command (also under a launcher)
    from alignflow.flows.cli import run_module

    run_module("sft")
