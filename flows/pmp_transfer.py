"""Flow `pmp-transfer`: does preference-model pretraining make reward models more sample-efficient on our data?

    alignflow pmp-transfer --workdir ./alignflow-work [--config FILE] [--set pmp_transfer.sizes=[64,256,0]]

For every N in ``pmp_transfer.sizes`` (0 = all training pairs) and every seed,
a reward model is fine-tuned on N task pairs (whole questions, nested draws:
the N=256 set contains the N=64 set) twice, with the same loop, steps and
seed: once from ``alignflow-pmp@challenger`` and once from
``alignflow-base@challenger`` with a fresh score head. Each fine-tune is a
nested MLflow run; the parent run holds the table, the accuracy-vs-N plot (PNG)
and the figures, also published as Prefect artifacts. The held-out set is the
task site's validation pairs (``pmp_transfer.eval_pairs`` of them), the same
for every fine-tune.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, task
from prefect.artifacts import create_image_artifact, create_link_artifact, create_markdown_artifact, \
    create_table_artifact
from prefect.cache_policies import NO_CACHE

from alignflow.config import AlignflowConfig
from alignflow.stages import BASE_MODEL, PMP_MODEL
from alignflow.tasks import tracking
from alignflow.tasks.ingest.run import latest_datasets
from alignflow.tasks.preference import plot_transfer, start_reward_model, task_pairs
from alignflow.tasks.train.pairs import PairSelectionError, check_split_hygiene, draw_questions, read_pairs, rows_of_split
from alignflow.tasks.train.reward import evaluate_pairs, train_reward

STARTS = {"pmp": PMP_MODEL, "base": BASE_MODEL}


@task(name="fine-tune-and-evaluate", cache_policy=NO_CACHE)
def fine_tune(cfg: AlignflowConfig, start_model: Any, tok: Any, train_rows: list[dict], held: list[dict],
              seed: int) -> dict[str, float]:
    model = copy.deepcopy(start_model)
    loop_cfg = cfg.pmp_transfer.train.model_copy(update={"seed": seed})
    result = train_reward(loop_cfg, model, tok, train_rows, [], max_length=cfg.pm.model.max_length,
                          use_margin=cfg.pm.use_margin, centering=cfg.pm.centering)
    out = evaluate_pairs(model, tok, held, batch_size=loop_cfg.batch_size, max_length=cfg.pm.model.max_length,
                         n_worst=0)
    metrics = {k: float(v) for k, v in out.items() if k.startswith("eval/")}
    metrics["train/final_loss"] = result.final_loss
    return metrics


def head_start(rows: list[dict]) -> dict[str, float]:
    """PMP's head start at the smallest N: held-out accuracy from PMP and from the base LM (means over seeds).

    ``{}`` when the smallest N lacks one of the two starts.
    """
    if not rows:
        return {}
    n = min(r["n_pairs"] for r in rows)
    acc: dict[str, list[float]] = {}
    for r in rows:
        if r["n_pairs"] == n:
            acc.setdefault(r["start"], []).append(r["accuracy"])
    if "pmp" not in acc or "base" not in acc:
        return {}
    p, b = (sum(acc[k]) / len(acc[k]) for k in ("pmp", "base"))
    return {"n_pairs": n, "pmp_accuracy": p, "base_accuracy": b, "head_start": p - b}


def transfer_table_md(rows: list[dict]) -> str:
    """Markdown table: one line per N with both starts' accuracy (mean over seeds) and the difference."""
    by_n: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        by_n.setdefault(r["n_pairs"], {}).setdefault(r["start"], []).append(r["accuracy"])
    lines = ["| N task pairs | from PMP | from base LM | PMP − base |", "|---|---|---|---|"]
    for n in sorted(by_n):
        acc = {k: sum(v) / len(v) for k, v in by_n[n].items()}
        p, b = acc.get("pmp"), acc.get("base")
        diff = f"{p - b:+.3f}" if p is not None and b is not None else "—"
        lines.append(f"| {n} | {p:.3f} | {b:.3f} | {diff} |" if p is not None and b is not None
                     else f"| {n} | {p} | {b} | {diff} |")
    return "\n".join(lines)


@flow(name="pmp-transfer", log_prints=True)
def pmp_transfer(workdir: str = "./alignflow-work", config: AlignflowConfig | None = None,
                 resume: bool = False) -> dict[str, Any]:
    """``resume`` is accepted for a uniform CLI; each fine-tune is short and reruns whole."""
    cfg = config or AlignflowConfig()
    wd = Path(workdir)
    tracking.configure(wd, cfg.experiment)
    tcfg = cfg.pmp_transfer
    with tracking.stage_run("pmp-transfer", {"pmp_transfer": tcfg.model_dump(mode="json"),
                                             "pm": cfg.pm.model_dump(mode="json")}) as run:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(run), link_text="MLflow run of this flow")
        data = latest_datasets(wd)
        pairs_path, entry = task_pairs(cfg.pm.pairs_file, data, wd, cfg.ingest)
        tracking.log_parquet_input(pairs_path, name="pairs", digest=entry["digest"], context="training",
                                   rows=entry["rows"])
        rows = read_pairs(pairs_path)
        train_all = rows_of_split(rows, "train", cfg.pm.site)
        held = draw_questions(rows_of_split(rows, "validation", cfg.pm.site), tcfg.eval_pairs, 0)
        if not train_all or not held:
            raise PairSelectionError(f"{pairs_path}: pmp-transfer needs training and validation pairs of site "
                             f"{cfg.pm.site or '*'}; found {len(train_all)} and {len(held)}")
        check_split_hygiene(train_all, held)
        registered_only = cfg.pm.model.model_copy(update={"name_or_path": None})
        results: list[dict] = []
        for seed in tcfg.seeds:
            # The base LM gets a fresh score head drawn from this seed (the same head for every N).
            starts = {name: start_reward_model(registered_only, registered=registered, seed=seed)
                      for name, registered in STARTS.items()}
            for name, (_, _, source) in starts.items():
                mlflow.log_param(f"start_{name}", source)
            done: set[int] = set()
            for size in tcfg.sizes:
                subset = draw_questions(train_all, size or None, seed)
                if len(subset) in done:  # e.g. N=1024 and "all" on a site with fewer pairs
                    print(f"N={size or 'all'} gives the same {len(subset)} pairs as an earlier N: skipped")
                    continue
                done.add(len(subset))
                for name, (model, tok, source) in starts.items():
                    label = f"from-{name}-n{len(subset)}-seed{seed}"
                    with mlflow.start_run(run_name=label, nested=True,
                                          tags={"alignflow.stage": "pmp-transfer", "alignflow.start": name}):
                        mlflow.log_params({"start": name, "start_model": source, "n_pairs": len(subset),
                                           "seed": seed, "max_steps": tcfg.train.max_steps})
                        metrics = fine_tune(cfg, model, tok, subset, held, seed)
                        mlflow.log_metrics(metrics)
                    results.append({"start": name, "n_pairs": len(subset), "seed": seed,
                                    "accuracy": metrics["eval/pairwise_accuracy"],
                                    "ci_low": metrics["eval/accuracy_ci_low"],
                                    "ci_high": metrics["eval/accuracy_ci_high"],
                                    "ece": metrics["eval/ece"], "final_loss": metrics["train/final_loss"]})
                    print(f"{label}: held-out accuracy {metrics['eval/pairwise_accuracy']:.3f}")

        import pandas as pd

        mlflow.log_table(pd.DataFrame(results), artifact_file="pmp_transfer/results.json")
        figure = plot_transfer(results, wd / "reports" / f"pmp-transfer-{run.info.run_id}.png")
        mlflow.log_artifact(str(figure), artifact_path="pmp_transfer")
        table = transfer_table_md(results)
        mlflow.log_text(table + "\n", "pmp_transfer/table.md")
        create_table_artifact(key="pmp-transfer-results", table=results,
                              description=f"held-out accuracy on {len(held)} validation pairs")
        create_image_artifact(image_url=tracking.run_url(run).split("/#/")[0] +
                              f"/get-artifact?path=pmp_transfer/{figure.name}&run_uuid={run.info.run_id}",
                              key="pmp-transfer-plot", description="accuracy vs N (served by the MLflow UI)")
        create_markdown_artifact(key="pmp-transfer-summary", markdown=(
            f"# PMP transfer\n\nHeld-out pairs: {len(held)}; steps per fine-tune: {tcfg.train.max_steps}; "
            f"seeds: {tcfg.seeds}.\n\n{table}\n"))
        print(table)
        first = head_start(results)
        if first:
            mlflow.log_metrics({f"head_start/{k}": float(v) for k, v in first.items()})
        return {"stage": "pmp-transfer", "run_id": run.info.run_id, "model": None, "version": None,
                "eval_pairs": len(held), **first, "transfer": results, "plot": str(figure)}


if __name__ == "__main__":  # `python -m alignflow.flows.pmp_transfer [options]`: the CLI command
    from alignflow.flows.cli import run_module

    run_module("pmp-transfer")
