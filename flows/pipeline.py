"""Flow `pipeline`: ingest -> base -> (pmp -> pm) and sft -> ppo -> promote, as one parent MLflow run.

    alignflow pipeline --config configs/demo.yaml [--set k=v] [--workdir DIR]

Every stage is its own Prefect subflow and a nested MLflow child run of the
pipeline's parent run (tags ``alignflow.stage``, ``prefect.flow_run_id``,
``git.commit``). A stage is skipped as a cache hit when its key (the stage's
config section digest, the content digests of the datasets it reads and of the
files its config names, and the registered versions of the models it starts
from) matches a finished earlier
run of it whose model version is still the ``challenger``; the skip is recorded
as a child run tagged ``alignflow.cache_hit=true`` that points at the run that
did the work. A pipeline that failed at stage k restarts at stage k when run
again (the stages before it are cache hits; stage k resumes from its latest
checkpoint). At the end: a summary table (stage, run id, key metrics, registry
aliases), the alignment figures of base / SFT / PPO on the same held-out
prompts with a link to the HTML report (``flows/report.py``), and how to open
the MLflow UI.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from alignflow import stages as stage_registry
from alignflow.config import AlignflowConfig, load_config
from alignflow.flows.report import pipeline_report
from alignflow.tasks import registry, tracking
from alignflow.tasks.processes import process_tags
from alignflow.tasks.stage_cache import (
    SUMMARY_TAG,
    challengers,
    default_sources,
    figures,
    find_cached,
    key_metrics,
    manifest_digests,
    plain,
    read_state,
    stage_key,
    summary_table,
    write_state,
)

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A stage could not be run (not available, or it failed)."""


def stages_to_run(cfg: AlignflowConfig, only: list[str] | None = None) -> list[str]:
    order = stage_registry.pipeline_stages()
    wanted = set(only or cfg.pipeline.stages)
    unknown = wanted - set(order)
    if unknown:
        raise PipelineError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(order)}")
    out = [s for s in order if s in wanted]
    if "pmp" in out and not cfg.pmp.enabled:
        out.remove("pmp")
    return out


def load_stage_flows(stages: list[str]) -> dict[str, Callable[..., dict]]:
    """Import every stage's flow before anything runs; a missing stage is an error, never a silent skip."""
    flows: dict[str, Callable[..., dict]] = {}
    missing = []
    for stage in stages:
        entry = stage_registry.get(stage)
        try:
            flows[stage] = entry.load_flow()
        except (ImportError, AttributeError) as exc:
            missing.append(f"  {stage}: {entry.flow_path} is not available ({type(exc).__name__}: {exc})")
    if missing:
        raise PipelineError("the pipeline cannot run these stages:\n" + "\n".join(missing)
                            + "\nleave them out with --set pipeline.stages=[...] (and pmp.enabled=false for pmp)")
    return flows


def ui_hint(experiment_id: str, run_id: str) -> str:
    uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        return f"MLflow UI: {uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return (f"open the MLflow UI:  mlflow ui --backend-store-uri {uri} --port 5000\n"
            f"  then http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}  (the pipeline run; its "
            f"stages are the nested runs; select two pipeline runs and Compare)")


class _StageFailed(Exception):
    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(stage)
        self.stage, self.exc = stage, exc


def schedule(order: list[str]) -> list[list[list[str]]]:
    """Steps of branches: ``[[ingest]], [[base]], [[pmp, pm], [sft]], [[ppo]], [[promote]]`` (absent stages left out),
    derived from each stage's ``after`` in the registry.

    The branches of one step are independent of each other and may run side by side.
    """
    return stage_registry.schedule(order)


def _run_branches(branches: list[list[str]], run_one: Callable[[str], None]) -> None:
    """Each branch in its own thread (with this context: the Prefect flow run and the MLflow parent run);
    the first failure is raised once every branch has stopped."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    def branch_fn(branch: list[str]) -> None:
        for stage in branch:
            run_one(stage)

    with ThreadPoolExecutor(max_workers=len(branches), thread_name_prefix="alignflow-branch") as pool:
        futures = [pool.submit(contextvars.copy_context().run, branch_fn, b) for b in branches]
        errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err


def _run_stage(stage: str, flow_fn: Callable[..., dict], cfg: AlignflowConfig, wd: Path, client: MlflowClient,
               experiment_id: str, digests: dict[str, str], *, resume: bool, failed_before: str | None,
               previous: dict) -> dict:
    """One training/promotion stage: a cache hit (recorded as a child run) or a run of its flow."""
    key = stage_key(stage, cfg, digests, challengers())
    cached = None
    if cfg.pipeline.cache or failed_before:
        cached = find_cached(client, experiment_id, stage, key)
        if cached is not None and not cfg.pipeline.cache:
            # without the cache, only the stages the failed pipeline finished are reused
            done = previous.get("stages", {}).get(stage, {})
            cached = cached if done.get("key") == key else None
    if cached is not None:
        with tracking.stage_run(stage, {"cache_key": key}, run_name=f"{stage} (cache hit)",
                                tags={"alignflow.cache_hit": "true", "alignflow.cache_key": key,
                                      "alignflow.cache_source_run": str(cached.get("run_id"))}) as hit:
            mlflow.set_tag(SUMMARY_TAG, json.dumps(cached)[:7900])
        summary, status = {**cached, "cache_run_id": hit.info.run_id}, "cache hit"
        print(f"{stage}: cache hit (run {cached.get('run_id')}, {cached.get('model')} v{cached.get('version')})")
    else:
        resume_stage = resume or stage == failed_before
        summary = plain(flow_fn(workdir=str(wd), config=cfg, resume=resume_stage))
        status = "resumed" if resume_stage and stage == failed_before else "ran"
        if summary.get("run_id"):
            client.set_tag(summary["run_id"], "alignflow.cache_key", key)
            client.set_tag(summary["run_id"], SUMMARY_TAG, json.dumps(summary)[:7900])
    return {"stage": stage, "status": status, "run_id": summary.get("run_id"),
            "model": summary.get("model") if stage_registry.get(stage).reads_models != stage_registry.EVERY_MODEL
            else "(gates)",
            "version": summary.get("version"), "metrics": key_metrics(summary), "key": key,
            "figures": figures(summary)}


@flow(name="pipeline", log_prints=True)
def pipeline(
    workdir: str = "./alignflow-work",
    config: AlignflowConfig | None = None,
    resume: bool = False,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
) -> dict[str, Any]:
    """Run the stages in order under one parent MLflow run; returns the per-stage rows and the aliases.

    ``config`` or (``config_file`` + ``overrides``, read at run time: what deployments pass).
    ``stages``: run only these (default ``pipeline.stages``). ``resume`` is implied for the stage a
    failed pipeline stopped at.
    """
    cfg = config or load_config(config_file, overrides or [])
    wd = Path(workdir).expanduser().resolve()
    order = stages_to_run(cfg, stages)
    flows = load_stage_flows(order)
    experiment_id = tracking.configure(wd, cfg.experiment)
    client = MlflowClient()
    previous = read_state(wd)
    # a pipeline that failed, or was killed (its state still says running), restarts at that stage
    failed_before = previous.get("failed_stage") if previous.get("status") == "failed" else None
    if previous.get("status") == "running":
        failed_before = next((s for s in order if s in previous.get("running", [])), None)
    rows: list[dict] = []
    state: dict[str, Any] = {"status": "running", "stages": {}, "running": [], "config_digest": cfg.digest()}
    tags = {"alignflow.stage": "pipeline", "git.commit": tracking.git_commit(),
            "alignflow.pipeline_stages": ",".join(order)}
    flow_run_id = tracking.prefect_flow_run_id()
    if flow_run_id:
        tags["prefect.flow_run_id"] = str(flow_run_id)
    with mlflow.start_run(run_name="pipeline", tags={**tags, **process_tags()}) as parent:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(parent), link_text="MLflow run of this pipeline")
        mlflow.log_params({k: tracking._param_value(v) for k, v in
                           tracking.flatten({"pipeline": cfg.pipeline.model_dump(mode="json")}).items()})
        mlflow.log_param("config_digest", cfg.digest())
        digests = manifest_digests(wd)

        def run_one(stage: str) -> None:
            nonlocal digests
            state["running"].append(stage)
            write_state(wd, {**state, "status": "running"})
            try:
                if stage == stage_registry.INGEST.name:
                    out = flows[stage](default_sources(cfg, wd), workdir=str(wd), config=cfg)
                    digests = {k: v["digest"] for k, v in out["datasets"].items()}
                    row = {"stage": "ingest", "status": "cache hit" if out["cache_hit"] else "ran",
                           "run_id": out["run_id"], "metrics": key_metrics({**out, "stage": "ingest"}),
                           "figures": {f"data/{k}": float(v["rows"]) for k, v in out["datasets"].items()}}
                else:
                    row = _run_stage(stage, flows[stage], cfg, wd, client, experiment_id, digests,
                                     resume=resume, failed_before=failed_before, previous=previous)
            except Exception as exc:
                raise _StageFailed(stage, exc) from exc
            rows.append(row)
            state["stages"][stage] = row
            state["running"].remove(stage)
            write_state(wd, {**state, "status": "running"})

        try:
            with tracking.parent_run(parent.info.run_id):
                for step in schedule(order):
                    if len(step) == 1 or not cfg.pipeline.concurrent:
                        for branch in step:
                            for stage in branch:
                                run_one(stage)
                    else:
                        _run_branches(step, run_one)
        except _StageFailed as failed:
            exc, current = failed.exc, failed.stage
            write_state(wd, {**state, "status": "failed", "failed_stage": current, "running": [],
                              "error": repr(exc)[:2000]})
            mlflow.set_tag("alignflow.failed_stage", current)
            raise PipelineError(f"stage '{current}' failed: {type(exc).__name__}: {exc}\n"
                                f"run the same command again to restart at '{current}' (earlier stages are reused)"
                                ) from exc
        rows.sort(key=lambda r: order.index(r["stage"]))
        # every stage's results on the parent run too: two pipeline runs compare stage by stage in the UI
        stage_figures = {r["stage"]: r.pop("figures", {}) for r in rows}
        figures = {f"{stage}/{k}"[:250]: v for stage, f in stage_figures.items() for k, v in f.items()}
        if figures:
            mlflow.log_metrics(figures)
        aliases = {m: {"challenger": registry.resolve_version(m, registry.CHALLENGER),
                       "champion": registry.resolve_version(m, registry.CHAMPION)} for m in stage_registry.models()}
        table = summary_table(rows, aliases)
        try:  # report/report.html on this run, its figures under the table; a report never fails a pipeline
            table += "\n\n" + pipeline_report(rows, cfg, wd, stage_figures)["text"]
        except Exception as exc:  # noqa: BLE001
            log.warning("the pipeline report could not be built: %s: %s", type(exc).__name__, exc, exc_info=True)
        mlflow.log_text(table, "pipeline/summary.txt")
        mlflow.log_dict({"stages": rows, "aliases": aliases}, "pipeline/summary.json")
        mlflow.set_tag("alignflow.cache_hits", str(sum(r["status"] == "cache hit" for r in rows)))
        create_table_artifact(key="pipeline-summary", table=[{k: str(v) for k, v in r.items() if k != "key"}
                                                              for r in rows],
                              description="Stages of this pipeline run: status, MLflow run, model, key metrics")
        create_markdown_artifact(key="pipeline-aliases", markdown="| model | challenger | champion |\n|---|---|---|\n"
                                 + "\n".join(f"| {m} | {a['challenger'] or '-'} | {a['champion'] or '-'} |"
                                             for m, a in aliases.items()) + "\n")
        hint = ui_hint(experiment_id, parent.info.run_id)
        print("\n" + table + "\n\n" + hint)
        write_state(wd, {**state, "status": "finished", "running": [], "parent_run_id": parent.info.run_id})
        return {"stage": "pipeline", "run_id": parent.info.run_id, "experiment_id": experiment_id,
                "model": "", "version": "", "stages": rows, "aliases": aliases, "table": table, "ui": hint,
                "tracking_uri": mlflow.get_tracking_uri()}
