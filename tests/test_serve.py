"""Deployments against a real `prefect server start`: a schedule produces a run that executes and shows in MLflow;
an ingest completing starts the training deployment, by a deployment trigger or by `run_deployment`."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import BIN, clean_env, prefect_server, spawn, stop, wait_for  # noqa: E402

TINY = """\
experiment: alignflow/serve-test
generate: {questions: 60}
pipeline: {stages: [ingest, base]}
base:
  model: {vocab_size: 400, max_length: 64}
  train: {max_steps: 4, batch_size: 4, eval_every: 4, log_every: 2, warmup_steps: 1, checkpoint_every: 4}
"""


def _runs(work: Path, stage: str) -> list:
    db = work / "mlflow.db"
    if not db.is_file():
        return []
    try:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
        exp = client.get_experiment_by_name("alignflow/serve-test")
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], filter_string=f"tags.`alignflow.stage` = '{stage}' and "
                                  "attributes.status = 'FINISHED'")
    except Exception:  # the database is being created by the served process
        return []


def _flow_run(api: str, flow_run_id: str):
    import os

    from prefect.client.orchestration import SyncPrefectClient

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with SyncPrefectClient(api) as client:
        run = client.read_flow_run(flow_run_id)
        dep = client.read_deployment(run.deployment_id) if run.deployment_id else None
        return run, dep


def _completed(api: str, flow_name: str, since, work: Path) -> list:
    """Completed runs of ``flow_name`` since ``since`` for this work directory (the server is shared by the modes:
    a new serve process may still run an earlier mode's queued runs, with that mode's parameters)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterStartTime

    with SyncPrefectClient(api) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))
    return [r for r in runs if r.state and r.state.is_completed() and r.parameters.get("workdir") == str(work)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One Prefect server for the three modes: re-serving a deployment replaces the automations it owns."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api:
        yield api


def _drop_unstarted_runs(api: str) -> int:
    """Delete the flow runs no one has started (scheduled, late, pending). The server is shared by the modes, and
    Prefect keeps a deployment's past-due runs when it is served again: without this, the next mode's serve process
    first works through this one's backlog (each an ingest and a training run, with this mode's parameters)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    unstarted = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType.SCHEDULED, StateType.PENDING])))
    with SyncPrefectClient(api) as client:
        runs = client.read_flow_runs(flow_run_filter=unstarted)
        for run in runs:
            client.delete_flow_run(run.id)
    return len(runs)


def _serve(tmp_path: Path, api: str, mode: str):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    work = (tmp_path / "work").resolve()
    env = clean_env(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "client-home"),
                    ALIGNFLOW_TRIGGER_WAIT_S="90")  # auto: a generous wait for the trigger on a busy machine
    proc = spawn([str(BIN / "alignflow"), "serve", "--workdir", str(work), "--config", str(cfg),
                  "--ingest-every", "15", "--pipeline-cron", "none", "--train-after-ingest", mode],
                 env, tmp_path / "serve.log")
    return proc, work


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "run-deployment"])
def test_scheduled_ingest_runs_and_training_follows(tmp_path, mode, server):
    import datetime as dt

    api = server
    since = dt.datetime.now(dt.timezone.utc)
    proc, work = _serve(tmp_path, api, mode)
    log = tmp_path / "serve.log"
    try:
        # the schedule: an ingest flow run created by the scheduler executes; its MLflow run appears
        # (MLflow is read only once the served process has created its database)
        wait_for(lambda: _completed(api, "scheduled-ingest", since, work), 240, what="a completed scheduled ingest",
                 on_timeout=lambda: log.read_text()[-4000:])
        ingest = wait_for(lambda: _runs(work, "ingest"), 60, what="a scheduled ingest run in MLflow",
                          on_timeout=lambda: log.read_text()[-4000:])[0]
        run, dep = _flow_run(api, ingest.data.tags["prefect.flow_run_id"])
        assert run.name and run.state.is_completed()
        # the scheduled wrapper: its deployment is `scheduled-ingest/ingest`, started by the schedule
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(api) as client:
            wrapper_dep = client.read_deployment_by_name("scheduled-ingest/ingest")
        done = _completed(api, "scheduled-ingest", since, work)
        assert done and all(w.deployment_id == wrapper_dep.id for w in done)
        assert any(w.auto_scheduled for w in done)

        # training after ingest: a pipeline run of the train deployment, with its base stage, in MLflow
        wait_for(lambda: _completed(api, "pipeline", since, work), 300, what="a completed training pipeline",
                 on_timeout=lambda: log.read_text()[-4000:])
        train = wait_for(lambda: _runs(work, "pipeline"), 60, what="a training pipeline run in MLflow",
                         on_timeout=lambda: log.read_text()[-4000:])[0]
        trun, tdep = _flow_run(api, train.data.tags["prefect.flow_run_id"])
        assert tdep is not None and tdep.name == "train-after-ingest"
        assert trun.state.is_completed()
        assert _runs(work, "base"), "the training pipeline's base stage run"
        if mode == "run-deployment":
            assert (trun.idempotency_key or "").startswith("after-ingest-")
            assert "started pipeline/train-after-ingest" in log.read_text()
        else:  # auto: each training run was started by the deployment trigger's automation, or by the fallback
            trains = _completed(api, "pipeline", since, work)
            by_trigger = [r for r in trains if r.created_by is not None and r.created_by.type == "AUTOMATION"]
            by_fallback = [r for r in trains if (r.idempotency_key or "").startswith("after-ingest-")]
            assert trains and len(by_trigger) + len(by_fallback) == len(trains)
            text = log.read_text()
            assert not by_trigger or "the deployment trigger started" in text
            assert not by_fallback or "started pipeline/train-after-ingest" in text
            print(f"auto: {len(by_trigger)} training run(s) by the trigger, {len(by_fallback)} by run_deployment")
    finally:
        stop(proc)
        _drop_unstarted_runs(api)


def test_deployments_built_for_serve(tmp_path):
    from alignflow.flows.serve import build_deployments

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    deps = {f"{d.flow_name}/{d.name}": d for d in build_deployments(str(tmp_path), str(cfg), ["generate.seed=3"],
                                                                   train_after_ingest="auto")}
    assert set(deps) == {"scheduled-ingest/ingest", "pipeline/scheduled", "pipeline/train-after-ingest"}
    ingest = deps["scheduled-ingest/ingest"]
    assert ingest.schedules[0].schedule.cron == "0 * * * *"
    assert ingest.parameters["train_deployment"] == "pipeline/train-after-ingest"
    assert ingest.parameters["overrides"] == ["generate.seed=3"]
    assert deps["pipeline/scheduled"].schedules[0].schedule.cron == "0 3 * * *"
    train = deps["pipeline/train-after-ingest"]
    assert train.parameters["stages"] == ["base"] and not train.schedules
    [trigger] = train.triggers
    assert trigger.expect == {"prefect.flow-run.Completed"}
    assert trigger.match_related.model_dump() == {"prefect.resource.role": "flow", "prefect.resource.name": "ingest"}
    off = build_deployments(str(tmp_path), str(cfg), [], ingest_every=10, pipeline_cron=None,
                            train_after_ingest="off")
    assert [f"{d.flow_name}/{d.name}" for d in off] == ["scheduled-ingest/ingest", "pipeline/scheduled"]
    assert off[0].parameters["train_deployment"] is None and not off[1].schedules
    with pytest.raises(ValueError):
        build_deployments(str(tmp_path), str(cfg), [], train_after_ingest="sometimes")


def test_work_pool_prefect_yaml_points_at_real_flows():
    import yaml
    from prefect.utilities.importtools import import_object

    repo = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((repo / "infra" / "prefect.yaml").read_text())
    names = {}
    for dep in spec["deployments"]:
        path, fn = dep["entrypoint"].split(":")
        flow_obj = import_object(f"{repo / path}:{fn}")
        names[dep["name"]] = flow_obj.name
        assert dep["work_pool"]["name"] == "alignflow"
    assert names == {"ingest": "scheduled-ingest", "scheduled": "pipeline", "train-after-ingest": "pipeline"}
    [trigger] = next(d for d in spec["deployments"] if d["name"] == "train-after-ingest")["triggers"]
    assert trigger["expect"] == ["prefect.flow-run.Completed"]
    assert trigger["match_related"]["prefect.resource.name"] == "ingest"
