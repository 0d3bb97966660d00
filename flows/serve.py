"""Deployments: ingest on a cron schedule, the pipeline on a cron schedule, training after every ingest.

    alignflow serve --workdir DIR --config FILE [--ingest-cron "0 * * * *"] [--pipeline-cron "0 3 * * *"]
                    [--train-after-ingest auto|trigger|run-deployment|off]

needs a Prefect server (``PREFECT_API_URL``, e.g. ``infra/local-up.sh``); the
process serves the deployments (runs their flow runs) until stopped. With a
worker and a work pool instead, see ``infra/prefect.yaml``.

Training after ingest (the ``train`` deployment: the pipeline without its
ingest stage, on the datasets the ingest just wrote):

* ``trigger``: a Prefect deployment trigger on ``prefect.flow-run.Completed``
  of the flow named ``ingest``.
* ``run-deployment``: the scheduled ingest flow starts the ``train`` deployment
  itself with ``run_deployment`` when its ingest completed.
* ``auto`` (default): the trigger, and the ingest flow checks that a train run
  was created within ``ALIGNFLOW_TRIGGER_WAIT_S`` seconds (default 60) of its
  ingest completing; if the trigger did not fire, it starts the run itself.
  Either way exactly one train run follows an ingest.
* ``off``: no training after ingest.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger

INGEST_FLOW = "scheduled-ingest"
TRAIN_DEPLOYMENT = "train-after-ingest"
Mode = Literal["auto", "trigger", "run-deployment", "off"]
MODES = ("auto", "trigger", "run-deployment", "off")
MODE_ENV = "ALIGNFLOW_TRAIN_AFTER_INGEST"
WAIT_ENV = "ALIGNFLOW_TRIGGER_WAIT_S"


class _RunRef:
    """Just enough of an MLflow run for ``tracking.run_url``."""

    def __init__(self, experiment_id: str, run_id: str) -> None:
        self.info = type("Info", (), {"experiment_id": experiment_id, "run_id": run_id})()


def _train_runs_since(deployment: str, since: dt.datetime) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterExpectedStartTime

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=since)),
        )
        return len(runs)


@flow(name=INGEST_FLOW, log_prints=True)
def scheduled_ingest(
    workdir: str = "./alignflow-work",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    train_deployment: str | None = None,
    train_mode: str = "auto",
) -> dict[str, Any]:
    """Ingest the configured sources (``pipeline.sources``, else a generated dump), then (maybe) start training."""
    from alignflow.config import load_config
    from alignflow.flows.environment import prepare
    from alignflow.flows.ingest import ingest
    from alignflow.tasks.stage_cache import default_sources

    wd = prepare(workdir)
    cfg = load_config(config_file, overrides or [])
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=2)
    out = ingest(default_sources(cfg, wd), workdir=str(wd), config=cfg)
    from prefect.artifacts import create_link_artifact

    from alignflow.tasks import tracking

    create_link_artifact(key="mlflow-run", link=tracking.run_url(_RunRef(out["experiment_id"], out["run_id"])),
                         link_text="MLflow run of this ingest")
    started_train = None
    if train_deployment and train_mode in ("auto", "run-deployment"):
        if train_mode == "auto":
            # Polling, not an event subscription (bench/serve/poll_latency.py): one read of the deployment's
            # flow runs took 55 ms (median, max 87 ms, 30 reads on the Prefect test server of a loaded 2-core
            # machine), so a 2 s poll costs
            # under 3% of a core for at most the WAIT_ENV window (30 reads by default) and notices the
            # trigger's run within 2 s; Prefect's events websocket would add an async client and a
            # reconnect path for no gain at that scale.
            wait = float(os.environ.get(WAIT_ENV, "60"))
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _train_runs_since(train_deployment, started) == 0:
                time.sleep(2)
            if _train_runs_since(train_deployment, started):
                print(f"the deployment trigger started {train_deployment}")
                train_mode = "trigger fired"
        if train_mode != "trigger fired":
            from prefect.deployments import run_deployment

            run = run_deployment(train_deployment, timeout=0, as_subflow=False,
                                 idempotency_key=f"after-ingest-{out['run_id']}")
            started_train = str(run.id)
            print(f"started {train_deployment}: flow run {run.id}")
    return {"stage": "ingest", "run_id": out["run_id"], "cache_hit": out["cache_hit"], "out_dir": out["out_dir"],
            "train_flow_run": started_train, "train_mode": train_mode}


def ingest_completed_trigger(flow_name: str = "ingest"):
    """Deployment trigger: a flow run of ``flow_name`` reached Completed."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"train after {flow_name} completed",
        expect={"prefect.flow-run.Completed"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": flow_name},
    )


def _schedule(cron: str | None, every: float | None) -> dict[str, Any]:
    if every:
        return {"interval": dt.timedelta(seconds=every)}
    if cron:
        return {"cron": cron}
    return {}


def build_deployments(
    workdir: str,
    config_file: str | None,
    overrides: list[str],
    *,
    ingest_cron: str | None = "0 * * * *",
    pipeline_cron: str | None = "0 3 * * *",
    ingest_every: float | None = None,
    pipeline_every: float | None = None,
    train_after_ingest: Mode = "auto",
    train_stages: list[str] | None = None,
) -> list[Any]:
    """The RunnerDeployments ``alignflow serve`` serves (``*_cron=None`` and no ``*_every``: no schedule)."""
    from alignflow.config import load_config
    from alignflow.flows.pipeline import pipeline

    if train_after_ingest not in MODES:
        raise ValueError(f"train_after_ingest must be one of {', '.join(MODES)}, not {train_after_ingest!r}")
    cfg = load_config(config_file, overrides)  # fail now on a bad config, not at 3 am
    config_file = str(Path(config_file).resolve()) if config_file else None
    common = {"workdir": str(Path(workdir).resolve()), "config_file": config_file, "overrides": list(overrides)}
    stages = train_stages or [s for s in cfg.pipeline.stages if s != "ingest"]
    pipeline_name = pipeline.name
    deployments = []
    train_name = f"{pipeline_name}/{TRAIN_DEPLOYMENT}" if train_after_ingest != "off" else None
    deployments.append(scheduled_ingest.to_deployment(
        name="ingest", parameters={**common, "train_deployment": train_name, "train_mode": train_after_ingest},
        description="Ingest the configured dumps (then training, see train-after-ingest).",
        tags=["alignflow"], concurrency_limit=1, **_schedule(ingest_cron, ingest_every)))
    deployments.append(pipeline.to_deployment(
        name="scheduled", parameters=common, description="The whole pipeline, cached stages skipped.",
        tags=["alignflow"], concurrency_limit=1, **_schedule(pipeline_cron, pipeline_every)))
    if train_after_ingest != "off":
        triggers = [ingest_completed_trigger()] if train_after_ingest in ("auto", "trigger") else None
        deployments.append(pipeline.to_deployment(
            name=TRAIN_DEPLOYMENT, parameters={**common, "stages": stages}, triggers=triggers,
            tags=["alignflow"], concurrency_limit=1,
            description="Training stages on the latest ingested datasets; started after each ingest."))
    return deployments


def serve_all(deployments: list[Any], limit: int | None = None) -> None:
    from prefect import serve

    get_logger().info("serving %d deployments", len(deployments))
    serve(*deployments, limit=limit)


def get_logger():
    import logging

    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("alignflow.serve")
