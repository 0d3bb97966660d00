"""Flows of the human-feedback loop: comparison batches, scores, rankings -> pairs -> `pm`.

    alignflow label-batch --policy alignflow-policy@champion --policy alignflow-policy-sft@champion --prompts 20
    alignflow label serve                      # the labeling app on 127.0.0.1 (SQLite in the work directory)
    alignflow label scores --batch B           # leaderboard + labeler quality, one MLflow run
    alignflow label train --batch B            # human pairs -> pm, the reward model's agreement with the labelers

* ``label_batch``: N prompts x K sampled responses from registered policies
  (provenance per response), the ``comparisons`` dataset (contract checked),
  loaded into the labeling store; one MLflow run.
* ``label_scores``: Bradley-Terry leaderboard of the policies with bootstrap
  intervals, agreement (pairwise, Krippendorff's alpha), labeler quality and
  gold accuracy; MLflow run with tables and a plot.
* ``label_pairs``: the batch's rankings as a ``pairs`` dataset (C(K,2) pairs
  weighted 1/C(K,2) per ranking, ties dropped) and its demonstrations as
  ``demos``; MLflow run.
* ``label_train``: ``label_pairs``, then the ``pm`` flow on those pairs, then
  the new reward model ranks the labelers' responses (pairwise accuracy,
  Kendall tau) and the figures go to its run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from alignflow.config import AlignflowConfig
from alignflow.stages import REWARD_MODEL
from alignflow.tasks import tracking
from alignflow.tasks.label import steps
from alignflow.tasks.label.batch import LabelBatchConfig, gold_items, items_from_rows
from alignflow.tasks.label.report import batch_report, human_pairs, response_scores
from alignflow.tasks.label.report import json_safe
from alignflow.tasks.label.store import Conflict, LabelStore, NotFound, database_url

__all__ = ["label_batch", "label_scores", "label_pairs", "label_train", "batch_dir"]


def batch_dir(workdir: Path, batch_id: str) -> Path:
    return Path(workdir) / "label" / batch_id


def _latest_data(workdir: Path) -> Path | None:
    from alignflow.tasks.ingest.run import latest_datasets

    try:
        return latest_datasets(workdir)
    except (FileNotFoundError, LookupError, ValueError):
        return None


@flow(name="label-batch", log_prints=True)
def label_batch(workdir: str, config: AlignflowConfig | None = None, batch: LabelBatchConfig | None = None,
                db_url: str | None = None) -> dict[str, Any]:
    cfg = config or AlignflowConfig()
    bc = batch or LabelBatchConfig()
    wd = Path(workdir)
    batch_id = bc.name or f"label-{bc.seed}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d%H%M%S}"
    out = batch_dir(wd, batch_id)
    with contextlib.closing(LabelStore(database_url(wd, db_url))) as store:
        try:
            store.batch(batch_id)
        except NotFound:
            pass
        else:
            raise Conflict(f"batch {batch_id!r} exists already: choose another --name")
        return _make_batch(wd, cfg, bc, batch_id, out, store)


def _make_batch(wd: Path, cfg: AlignflowConfig, bc: LabelBatchConfig, batch_id: str, out: Path,
                store: LabelStore) -> dict[str, Any]:
    tracking.configure(wd, cfg.experiment)
    with tracking.stage_run("label-batch", {"label": bc.model_dump(mode="json"), "batch_id": batch_id}) as run:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(run), link_text="MLflow run of this batch")
        data = _latest_data(wd)
        prompts = steps.draw_prompts(bc, data)
        rows = steps.generate_responses(bc, prompts)
        written = steps.write_contracted(rows, "comparisons", out / "comparisons.parquet", docs_dir=out / "contracts")
        tracking.log_parquet_input(Path(written["path"]), name=f"comparisons-{batch_id}", digest=written["digest"],
                                   context="labeling", rows=written["rows"])
        items, dropped = items_from_rows(written["valid"].to_dict("records"), seed=bc.seed)
        gold: list[dict] = []
        if bc.gold:
            if data is None:
                raise FileNotFoundError("gold items come from the ingested pairs: run `alignflow ingest` first")
            import pandas as pd

            pairs = pd.read_parquet(data / "pairs.parquet")
            gold = gold_items(pairs[pairs["split"] == "test"].to_dict("records"), bc.gold, bc.seed)
        provenance = {"mlflow_run_id": run.info.run_id, "policies": bc.policies, "seed": bc.seed, "k": bc.k,
                      "temperature": bc.temperature, "dataset": written["path"], "digest": written["digest"]}
        all_items = _mix_gold(items, gold)
        n = store.create_batch(batch_id, batch_id, all_items, instructions=bc.instructions, overlap=bc.overlap,
                               demonstrations=bc.demonstrations, provenance=provenance)
        steps.dump_json({"id": batch_id, "instructions": bc.instructions, "overlap": bc.overlap,
                         "demonstrations": bc.demonstrations, "provenance": provenance, "items": all_items},
                        out / "batch.json")
        metrics = {"data/items": float(len(items)), "data/gold_items": float(len(gold)),
                   "data/responses": float(written["rows"]), "data/quarantined_responses": float(written["quarantined"]),
                   "data/dropped_items": float(dropped)}
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(out / "batch.json"), artifact_path="label")
        print(f"batch {batch_id}: {n} items ({len(gold)} gold), {written['rows']} responses, "
              f"{written['quarantined']} quarantined")
        return {"stage": "label-batch", "batch": batch_id, "run_id": run.info.run_id, "items": n,
                "gold_items": len(gold), "responses": written["rows"], "quarantined": written["quarantined"],
                "dropped_items": dropped, "dataset": written["path"]}


def _mix_gold(items: list[dict], gold: list[dict]) -> list[dict]:
    """Gold items spread evenly through the batch (positions decide the serving order among equals)."""
    if not gold:
        return items
    out, step = [], max(1, len(items) // (len(gold) + 1))
    g = iter(gold)
    for i, it in enumerate(items):
        if i and i % step == 0:
            nxt = next(g, None)
            if nxt is not None:
                out.append(nxt)
        out.append(it)
    out.extend(g)
    return out


@flow(name="label-scores", log_prints=True)
def label_scores(workdir: str, batch_id: str, config: AlignflowConfig | None = None, db_url: str | None = None,
                 rounds: int = 1000, seed: int = 0) -> dict[str, Any]:
    cfg = config or AlignflowConfig()
    wd = Path(workdir)
    store = LabelStore(database_url(wd, db_url))
    export = store.export(batch_id)
    counts = store.counts(batch_id)
    store.close()
    if not export:
        raise ValueError(f"batch {batch_id!r} has no submissions yet")
    tracking.configure(wd, cfg.experiment)
    with tracking.stage_run("label-scores", {"batch_id": batch_id, "rounds": rounds, "seed": seed}) as run:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(run), link_text="MLflow run of these scores")
        report = batch_report(export, rounds=rounds, seed=seed)
        out = batch_dir(wd, batch_id)
        steps.dump_json({"counts": counts, **report}, out / "report.json")
        mlflow.log_artifact(str(out / "report.json"), artifact_path="label")
        board = report["leaderboard"]["rows"]
        metrics = {"label/submissions": float(len(export)), "label/labelers": float(report["labelers"]),
                   "label/complete_items": float(counts["complete_items"])}
        for key in ("pairwise", "krippendorff_alpha"):
            value = report["agreement"][key]
            if value == value:  # not NaN
                metrics[f"agreement/{key}"] = float(value)
        mlflow.log_metrics(metrics)
        import pandas as pd

        if board:
            mlflow.log_table(pd.DataFrame(board), artifact_file="label/leaderboard.json")
            mlflow.log_table(pd.DataFrame(report["leaderboard"]["pairs"]), artifact_file="label/policy_pairs.json")
            figure = steps.plot_leaderboard(board, out / "leaderboard.png", f"Policies by human judgement ({batch_id})")
            mlflow.log_artifact(str(figure), artifact_path="label")
            create_table_artifact(key="label-leaderboard", table=json_safe(board),
                                  description=f"Policy leaderboard of batch {batch_id}")
        mlflow.log_table(pd.DataFrame(report["labeler_quality"]), artifact_file="label/labeler_quality.json")
        over_time = [{"labeler": who, **w} for who, ws in report["agreement_over_time"].items() for w in ws]
        if over_time:
            mlflow.log_table(pd.DataFrame(over_time), artifact_file="label/agreement_over_time.json")
        responses = response_scores(export)
        if responses:
            mlflow.log_table(pd.DataFrame(responses), artifact_file="label/response_scores.json")
        create_markdown_artifact(key="label-scores", markdown=_scores_md(batch_id, report))
        print(_scores_md(batch_id, report))
        return {"stage": "label-scores", "batch": batch_id, "run_id": run.info.run_id, "report": report,
                "counts": counts}


def _scores_md(batch_id: str, report: dict) -> str:
    lines = [f"# Human judgement: batch {batch_id}", "", "| rank | policy | score | 95% interval | comparisons | "
             "P(better than next) | distinguishable |", "|---|---|---|---|---|---|---|"]
    for r in report["leaderboard"]["rows"]:
        p = r.get("p_better_than_next")
        d = r.get("distinguishable_from_next")
        lines.append(f"| {r['rank']} | {r['item']} | {r['score']:.0f} | {r['low']:.0f} .. {r['high']:.0f} | "
                     f"{r['comparisons']} | {'' if p is None else f'{p:.2f}'} | "
                     f"{'' if d is None else ('yes' if d else 'no')} |")
    a = report["agreement"]
    lines += ["", f"pairwise agreement {a['pairwise']:.3f} over {a['judgements']} judgements; "
                  f"Krippendorff's alpha {a['krippendorff_alpha']:.3f}", "",
              "| labeler | submissions | agreement with others | gold accuracy |", "|---|---|---|---|"]
    for q in report["labeler_quality"]:
        lines.append(f"| {q['labeler']} | {q['submissions']} | {q['agreement_with_others']:.3f} | "
                     f"{q['gold_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


@flow(name="label-pairs", log_prints=True)
def label_pairs(workdir: str, batch_id: str, config: AlignflowConfig | None = None, db_url: str | None = None,
                validation_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    cfg = config or AlignflowConfig()
    wd = Path(workdir)
    store = LabelStore(database_url(wd, db_url))
    export = store.export(batch_id)
    store.close()
    site = f"human/{batch_id}"
    rows = human_pairs(export, site=site, validation_fraction=validation_fraction, seed=seed)
    if not rows:
        raise ValueError(f"batch {batch_id!r} has no ranking that orders two responses yet")
    tracking.configure(wd, cfg.experiment)
    out = batch_dir(wd, batch_id)
    with tracking.stage_run("label-pairs", {"batch_id": batch_id, "validation_fraction": validation_fraction,
                                            "seed": seed}) as run:
        pairs = steps.write_contracted(rows, "pairs", out / "pairs.parquet", docs_dir=out / "contracts")
        # Named by content: a pipeline keyed on `pm.pairs_file` sees new rankings as a new input.
        named = out / f"pairs-{pairs['digest'][:12]}.parquet"
        Path(pairs["path"]).replace(named)
        pairs["path"] = str(named)
        tracking.log_parquet_input(Path(pairs["path"]), name=f"human-pairs-{batch_id}", digest=pairs["digest"],
                                   context="training", rows=pairs["rows"])
        demos = steps.demos_rows(export, site=site, validation_fraction=validation_fraction, seed=seed)
        demo_info = steps.write_contracted(demos, "demos", out / "demos.parquet") if demos else None
        metrics = {"data/human_pairs": float(pairs["rows"]), "data/quarantined_pairs": float(pairs["quarantined"]),
                   "data/rankings": float(len({r["ranking_id"] for r in rows})),
                   "data/demonstrations": float(demo_info["rows"] if demo_info else 0)}
        mlflow.log_metrics(metrics)
        print(f"{pairs['rows']} human pairs from {int(metrics['data/rankings'])} rankings -> {pairs['path']}")
        return {"stage": "label-pairs", "batch": batch_id, "run_id": run.info.run_id, "pairs": pairs["path"],
                "rows": pairs["rows"], "site": site, "demos": demo_info["path"] if demo_info else None,
                "splits": {r["question_id"]: r["split"] for r in rows}}


@flow(name="label-train", log_prints=True)
def label_train(workdir: str, batch_id: str, config: AlignflowConfig | None = None, db_url: str | None = None,
                validation_fraction: float = 0.2) -> dict[str, Any]:
    """Rankings -> pairs -> `pm` (a task site of its own), then the reward model against the labelers."""
    from alignflow.flows.pm import pm as pm_flow
    from alignflow.tasks.promotion_eval import load_version

    cfg = config or AlignflowConfig()
    wd = Path(workdir)
    made = label_pairs(workdir, batch_id, cfg, db_url, validation_fraction)
    pm_cfg = cfg.model_copy(update={"pm": cfg.pm.model_copy(update={"pairs_file": made["pairs"],
                                                                      "site": made["site"]})})
    summary = pm_flow(workdir=workdir, config=pm_cfg)
    tracking.configure(wd, cfg.experiment)
    model, tok = load_version(REWARD_MODEL, summary["version"])
    store = LabelStore(database_url(wd, db_url))
    export = store.export(batch_id)
    store.close()
    agreement = steps.reward_agreement(model, tok, export, max_length=cfg.pm.model.max_length,
                                       split_of_prompt=made["splits"])
    client = mlflow.MlflowClient()
    for key, value in agreement.items():
        if value == value:
            client.log_metric(summary["run_id"], key, float(value))
    client.set_tag(summary["run_id"], "alignflow.human_batch", batch_id)
    print("reward model vs labelers: " + ", ".join(f"{k}={v:.3f}" for k, v in agreement.items()))
    return {"stage": "label-train", "batch": batch_id, "pairs": made["pairs"], "pm_run_id": summary["run_id"],
            "reward_version": summary["version"], **agreement}

