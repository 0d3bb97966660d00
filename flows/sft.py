"""Flow `sft`: the base LM fine-tuned on demonstrations, registered as `alignflow-policy-sft`.

    alignflow sft --workdir ./alignflow-work [--config configs/demo.yaml] [--set sft.train.max_steps=50] [--resume]

Starts from ``sft.model.name_or_path`` when set, else from ``alignflow-base@challenger``.
The loss is on response tokens only. Every evaluation logs validation loss,
perplexity and a table of greedy answers to fixed validation prompts; at the
end, when an evaluation hook applies to the validation prompts (on a generated
dump: the planted property, ``tasks/evaluation.py``), the share of greedy
answers it accepts is measured for the policy and for the model it started from,
and at every evaluation (``eval/planted_rate``: its learning curve).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from alignflow.config import AlignflowConfig
from alignflow.stages import BASE_MODEL
from alignflow.tasks import evaluation, launch, registry, tracking
from alignflow.tasks.train.lm import StageOutput, generate_greedy, read_demos, train_sft
from alignflow.tasks.train.loop import LoopCallbacks

from .skeleton import stage_run

JUDGED_PROMPTS = 64


def train_shard(cfg: AlignflowConfig, plan: dict, callbacks: LoopCallbacks | None = None, model: Any = None,
                tok: Any = None) -> StageOutput:
    """The training of this stage on one process (all of it, or one process's shard under a launcher)."""
    if model is None:
        model, tok = registry.load_start_lm(plan["start"], trust_remote_code=cfg.sft.model.trust_remote_code)
    return train_sft(cfg.sft, model, tok, Path(plan["demos"]), checkpoint_dir=Path(plan["ckpt"]),
                     resume=plan["resume"], callbacks=callbacks)


@task(name="fine-tune-sft", cache_policy=NO_CACHE)
def fine_tune(cfg: AlignflowConfig, model: Any, tok: Any, start: str, demos: Path, ckpt: Path,
              resume: bool, judged: Callable[[Any, Any], dict[str, float]] | None = None) -> StageOutput:
    plan = {"start": start, "demos": str(demos), "ckpt": str(ckpt), "resume": resume}
    launch.share_plan(plan)
    section = cfg.sft
    logger = tracking.MetricLogger(section.train.max_steps, "sft")
    fixed = [d["prompt"] for d in read_demos(demos, "validation")[: section.generation_prompts]]

    def on_eval(step: int) -> dict[str, float]:
        if fixed:
            answers = generate_greedy(model, tok, fixed, max_new_tokens=section.max_new_tokens,
                                      max_prompt_tokens=section.model.max_length)
            mlflow.log_table(pd.DataFrame({"step": step, "prompt": fixed, "response": answers}),
                             artifact_file=f"eval/generations_step_{step:06d}.json")
        return judged(model, tok) if judged else {}

    try:
        return train_shard(cfg, plan, LoopCallbacks(on_log=logger.log, on_step=logger.step, on_eval=on_eval),
                           model=model, tok=tok)
    finally:
        logger.close()


@flow(name="sft", log_prints=True)
def sft(workdir: str = "./alignflow-work", config: AlignflowConfig | None = None, resume: bool = False) -> dict[str, Any]:
    cfg = config or AlignflowConfig()
    with stage_run("sft", cfg, workdir) as st:
        model, tok, start = st.start_model(cfg.sft.model, BASE_MODEL)
        demos = st.dataset("demos")
        rows = read_demos(demos, "validation")[:JUDGED_PROMPTS]
        judge = evaluation.judge_for(st.data, rows)

        def judged(m: Any, t: Any) -> float:
            return evaluation.judged_rate(judge, m, t, rows, max_new_tokens=cfg.sft.max_new_tokens,
                                          max_prompt_tokens=cfg.sft.model.max_length)

        def judged_at_eval(m: Any, t: Any) -> dict[str, float]:  # the rate's learning curve, at every evaluation
            return {f"eval/{judge.name}_rate": judged(m, t)}

        start_rate = judged(model, tok) if judge else None
        ckpt, resume = st.checkpoints(resume)
        out = fine_tune(cfg, model, tok, start, demos, ckpt, resume, judged_at_eval if judge else None)
        mlflow.log_metrics(out.metrics)
        judged_figures = {}
        if judge:
            name, rate = judge.name, judged(out.model, out.tokenizer)
            mlflow.log_metrics({f"eval/{name}_rate": rate, f"eval/{name}_rate_start": start_rate,
                                f"eval/{name}_prompts": float(len(judge.judged))})
            judged_figures = {f"{name}_rate": rate, f"{name}_rate_start": start_rate}
            print(f"{name}-property rate {start_rate:.3f} -> {rate:.3f} on {len(judge.judged)} prompts")
        st.register(out.model, out.tokenizer)
        summary = st.summary(final_loss=out.loop.final_loss, **judged_figures, **out.loop.last_eval)
        create_table_artifact(key="sft-summary", table=[{"metric": k, "value": str(v)} for k, v in summary.items()])
        return summary


if __name__ == "__main__":  # `python -m alignflow.flows.sft [options]`: the CLI command (also under a launcher)
    from alignflow.flows.cli import run_module

    run_module("sft")
