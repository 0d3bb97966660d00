"""Flow `pipeline` on tiny sizes: nested stage runs, cache hits across runs, restart at the failed stage."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from alignflow import stages
from alignflow.flows import pipeline as pipeline_mod
from alignflow.flows.cli import app

pytestmark = pytest.mark.slow

TINY = [
    "experiment=alignflow/pipeline-test",
    "pipeline.stages=[ingest,base,sft,promote]",
    "promote.models=[alignflow-base,alignflow-policy-sft]",
    "promote.eval_texts=16",
    "generate.questions=120",
    "base.model.vocab_size=600", "base.model.max_length=128", "base.train.max_steps=20", "base.train.batch_size=8",
    "base.train.eval_every=10", "base.train.log_every=5", "base.train.warmup_steps=2",
    "sft.model.max_length=128", "sft.train.max_steps=10", "sft.train.batch_size=4", "sft.train.eval_every=5",
    "sft.train.checkpoint_every=5", "sft.train.log_every=5", "sft.train.warmup_steps=1",
    "sft.generation_prompts=2", "sft.max_new_tokens=8",
]


def _args(work: Path, extra=()):
    out = ["pipeline", "--workdir", str(work)]
    for s in [*TINY, *extra]:
        out += ["--set", s]
    return out


def _client(work: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


def _children(client, parent_id: str) -> dict[str, list]:
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.data.tags["alignflow.stage"], []).append(r)
    return out


def _pipeline_runs(client):
    exp = client.get_experiment_by_name("alignflow/pipeline-test")
    return client.search_runs([exp.experiment_id], filter_string="tags.`alignflow.stage` = 'pipeline'",
                              order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def first(tmp_path_factory, prefect_harness):
    work = tmp_path_factory.mktemp("pipeline") / "work"
    res = CliRunner().invoke(app, _args(work), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return work, res.output


def test_one_parent_run_with_nested_stage_runs(first):
    work, output = first
    client = _client(work)
    [parent] = _pipeline_runs(client)
    assert parent.info.status == "FINISHED"
    children = _children(client, parent.info.run_id)
    assert set(children) == {"ingest", "base", "sft", "promote"}
    assert len(children["promote"]) == 2  # one gate per model
    for stage, runs in children.items():
        for run in runs:
            assert run.info.status == "FINISHED", stage
            assert run.data.tags["prefect.flow_run_id"] and run.data.tags["git.commit"], stage
    assert "train/loss" in children["base"][0].data.metrics
    # the registry: challenger from the stages, champion from the first gate
    for name in ("alignflow-base", "alignflow-policy-sft"):
        assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    # the summary table and the way to the UI
    assert "stage    status" in output and "alignflow-policy-sft  v1          v1" in output
    assert f"mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}" in output
    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "pipeline/summary.json")).read_text())
    assert [r["stage"] for r in summary["stages"]] == ["ingest", "base", "sft", "promote"]
    # the report: alignment figures under the table, the page on the parent run
    assert "planted-property rate  base LM " in output and " -> SFT " in output
    page = Path(client.download_artifacts(parent.info.run_id, "report/report.html")).read_text()
    assert "Learning curves" in page and "data:image/png;base64," in page
    assert f"report: {parent.info.artifact_uri}" in output
    assert "alignment/sft/planted_rate" in parent.data.metrics
    # sampled answers too (greedy saturates): the rate with its interval, under the summary and on the run
    assert "same, sampled (T=1, 4 per prompt, 95% CI)  base LM " in output
    metrics = parent.data.metrics
    assert metrics["alignment/sft/samples"] == 4 * metrics["alignment/sft/prompts"]
    assert metrics["alignment/sft/sampled_ci_low"] <= metrics["alignment/sft/sampled_planted_rate"] \
        <= metrics["alignment/sft/sampled_ci_high"]


def test_second_run_is_all_cache_hits(first):
    work, _ = first
    res = CliRunner().invoke(app, _args(work), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    client = _client(work)
    parent = _pipeline_runs(client)[-1]
    children = _children(client, parent.info.run_id)
    for stage in ("base", "sft"):
        [run] = children[stage]
        assert run.data.tags["alignflow.cache_hit"] == "true", stage
        assert "train/loss" not in run.data.metrics
    assert children["ingest"][0].data.tags["alignflow.cache_hit"] == "true"
    # nothing new registered; the gates see challenger == champion
    assert [str(v.version) for v in client.search_model_versions("name='alignflow-base'")] == ["1"]
    # the gates too: same versions, same thresholds
    assert parent.data.tags["alignflow.cache_hits"] == "4"
    assert [r.data.tags.get("alignflow.cache_hit") for r in children["promote"]] == ["true"]


def test_failed_stage_restarts_there_and_earlier_stages_are_reused(first, tmp_path, monkeypatch):
    work, _ = first
    # a changed sft section: base stays a cache hit, sft must run; first it fails
    broken = tmp_path / "broken_stage.py"
    broken.write_text(textwrap.dedent("""
        from prefect import flow

        @flow(name="sft")
        def sft(workdir, config=None, resume=False):
            raise RuntimeError("simulated failure in sft")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(stages.REGISTRY, "sft", dataclasses.replace(stages.get("sft"), module="broken_stage"))
    change = ["sft.train.max_steps=12"]
    res = CliRunner().invoke(app, _args(work, change))
    assert res.exit_code == 2 and "stage 'sft' failed" in res.output and "simulated failure" in res.output
    state = json.loads((work / "pipeline" / "state.json").read_text())
    assert state["status"] == "failed" and state["failed_stage"] == "sft"
    client = _client(work)
    failed_parent = _pipeline_runs(client)[-1]
    assert failed_parent.info.status == "FAILED"
    assert failed_parent.data.tags["alignflow.failed_stage"] == "sft"

    monkeypatch.undo()
    sys.modules.pop("broken_stage", None)
    res = CliRunner().invoke(app, _args(work, change), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    parent = _pipeline_runs(client)[-1]
    rows = {r["stage"]: r["status"] for r in json.loads(Path(client.download_artifacts(
        parent.info.run_id, "pipeline/summary.json")).read_text())["stages"]}
    assert rows == {"ingest": "cache hit", "base": "cache hit", "sft": "resumed", "promote": "ran"}
    assert str(client.get_model_version_by_alias("alignflow-policy-sft", "challenger").version) == "2"
    assert json.loads((work / "pipeline" / "state.json").read_text())["status"] == "finished"


def test_a_killed_pipeline_restarts_at_the_stage_it_was_running(first):
    work, _ = first
    state_file = work / "pipeline" / "state.json"
    state = json.loads(state_file.read_text())
    # what a SIGKILL during sft leaves behind: the state still says running, with sft in progress
    state.update({"status": "running", "running": ["sft"]})
    state_file.write_text(json.dumps(state))
    res = CliRunner().invoke(app, _args(work, ["sft.train.max_steps=13"]), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    client = _client(work)
    parent = _pipeline_runs(client)[-1]
    rows = {r["stage"]: r["status"] for r in json.loads(Path(client.download_artifacts(
        parent.info.run_id, "pipeline/summary.json")).read_text())["stages"]}
    assert rows["base"] == "cache hit" and rows["sft"] == "resumed"
    assert json.loads(state_file.read_text())["running"] == []


def test_a_stage_that_does_not_import_fails_the_pipeline_before_anything_runs(tmp_path, monkeypatch, prefect_harness):
    monkeypatch.setitem(stages.REGISTRY, "ppo", dataclasses.replace(stages.get("ppo"),
                                                                     module="alignflow.flows.no_such_stage"))
    res = CliRunner().invoke(app, ["pipeline", "--workdir", str(tmp_path / "w"), "--set", "pmp.enabled=false",
                                   "--set", "pipeline.stages=[ingest,base,ppo]"])
    assert res.exit_code == 2
    assert "cannot run these stages" in res.output and "ppo: alignflow.flows.no_such_stage.ppo" in res.output
    assert not (tmp_path / "w" / "mlflow.db").exists()


def test_stage_keys_follow_config_data_and_model_versions():
    from alignflow.config import AlignflowConfig

    cfg = AlignflowConfig()
    base = pipeline_mod.stage_key("sft", cfg, {"demos": "d1", "posts": "p1"}, {"alignflow-base": "1"})
    assert base == pipeline_mod.stage_key("sft", cfg, {"demos": "d1", "posts": "p1", "pairs": "x"},
                                          {"alignflow-base": "1", "alignflow-reward": "7"})
    assert base != pipeline_mod.stage_key("sft", cfg, {"demos": "d2", "posts": "p1"}, {"alignflow-base": "1"})
    assert base != pipeline_mod.stage_key("sft", cfg, {"demos": "d1", "posts": "p1"}, {"alignflow-base": "2"})
    changed = AlignflowConfig.model_validate({"sft": {"max_new_tokens": 3}})
    assert base != pipeline_mod.stage_key("sft", changed, {"demos": "d1", "posts": "p1"}, {"alignflow-base": "1"})
    other_section = AlignflowConfig.model_validate({"pm": {"eval_pairs": 3}})
    assert base == pipeline_mod.stage_key("sft", other_section, {"demos": "d1", "posts": "p1"},
                                          {"alignflow-base": "1"})


def test_independent_branches_run_side_by_side_under_one_parent(tmp_path, prefect_harness):
    work = tmp_path / "work"
    extra = ["pipeline.stages=[ingest,base,pmp,pm,sft]", "pipeline.concurrent=true",
             "generate.generic_questions=60",
             "pmp.model.max_length=96", "pmp.train.max_steps=4", "pmp.train.batch_size=8", "pmp.train.eval_every=4",
             "pmp.train.log_every=2", "pmp.train.warmup_steps=1", "pmp.eval_pairs=16",
             "pmp.sources=[{site: generic.stackexchange.com}]",
             "pm.model.max_length=96", "pm.train.max_steps=4", "pm.train.batch_size=8", "pm.train.eval_every=4",
             "pm.train.log_every=2", "pm.train.warmup_steps=1", "pm.eval_pairs=16",
             "pm.site=synthetic.stackexchange.com", "ingest.split={train: 0.7, validation: 0.2, test: 0.1}"]
    res = CliRunner().invoke(app, _args(work, extra), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    client = _client(work)
    [parent] = _pipeline_runs(client)
    children = _children(client, parent.info.run_id)
    assert set(children) == {"ingest", "base", "pmp", "pm", "sft"}
    runs = {stage: runs[0] for stage, runs in children.items()}
    assert all(r.info.status == "FINISHED" and r.data.tags["prefect.flow_run_id"] for r in runs.values())
    # within a branch the order holds: pm starts after pmp ends. Overlap between the branches is not asserted:
    # with stages this small one branch can finish before the other's thread has started its first run.
    assert runs["pm"].info.start_time >= runs["pmp"].info.end_time
    assert runs["sft"].info.start_time >= runs["base"].info.end_time
    for name in ("alignflow-pmp", "alignflow-reward", "alignflow-policy-sft"):
        assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
