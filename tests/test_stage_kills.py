"""Fault injection: `pm`, `sft`, `ppo` and `pipeline` killed (SIGKILL) at two seeded points of their progress,
then run again: the last attempt finishes, exactly one new model version is registered (by that attempt), no
metric step is logged twice by it, and no MLflow run is left RUNNING.

The kill points are checkpoint steps drawn with ``random.Random(ALIGNFLOW_FAULT_SEED)`` (default 14), one from
each half of the run; a failure message names the seed and the points.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

import _ppo_models as M
from alignflow.flows.cli import app
from flowkit import cli, set_args, stage_runs, work_client

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("ALIGNFLOW_FAULT_SEED", "14"))

TINY = [
    "ingest.split={train: 0.7, validation: 0.2, test: 0.1}",
    "generate.generic_questions=0", "pmp.enabled=false", "pm.site=null",
    "sft.model.max_length=96", "sft.train.max_steps=24", "sft.train.batch_size=4", "sft.train.eval_every=1000",
    "sft.train.checkpoint_every=2", "sft.train.log_every=1", "sft.train.warmup_steps=1",
    "sft.generation_prompts=0",
    "pm.model.max_length=64", "pm.train.max_steps=24", "pm.train.batch_size=4", "pm.train.eval_every=1000",
    "pm.train.checkpoint_every=2", "pm.train.log_every=1", "pm.eval_pairs=8", "pm.worst_pairs=0",
    "ppo.total_steps=8", "ppo.batch_size=4", "ppo.minibatch_size=4", "ppo.micro_batch_size=4",
    "ppo.forward_batch_size=4", "ppo.ppo_epochs=1", "ppo.max_new_tokens=8", "ppo.max_prompt_tokens=32",
    "ppo.checkpoint_every=1", "ppo.generations_every=100", "ppo.eval_prompts=0", "ppo.reward_max_length=64",
]

PIPELINE = [
    "experiment=alignflow/pipeline-kills",
    "pipeline.stages=[ingest,base,sft]",
    "generate.questions=120", "generate.generic_questions=0",
    "base.model.vocab_size=600", "base.model.max_length=96", "base.train.max_steps=24", "base.train.batch_size=8",
    "base.train.eval_every=1000", "base.train.checkpoint_every=2", "base.train.log_every=1",
    "base.train.warmup_steps=2",
    "sft.model.max_length=96", "sft.train.max_steps=24", "sft.train.batch_size=4", "sft.train.eval_every=1000",
    "sft.train.checkpoint_every=2", "sft.train.log_every=1", "sft.train.warmup_steps=1",
    "sft.generation_prompts=0",
]


def kill_points(stage: str, last: int, every: int) -> tuple[int, int]:
    """Two checkpoint steps of a run of ``last`` steps, one from each half (seeded per stage)."""
    rng = random.Random(f"{SEED}:{stage}")
    steps = list(range(every, last, every))
    half = len(steps) // 2
    return rng.choice(steps[:half]), rng.choice(steps[half:])


@pytest.fixture(scope="module")
def env(prefect_harness, tmp_path_factory):
    """The subprocesses use this session's Prefect server (a temporary one per command would cost ~10 s each)."""
    from prefect.settings import PREFECT_API_URL

    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    out["PREFECT_API_URL"] = PREFECT_API_URL.value()
    out["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    return out


@pytest.fixture(scope="module")
def work(env, tmp_path_factory):
    """An ingested dump and tiny start models under the names `sft`, `pm` and `ppo` read."""
    from alignflow.tasks import registry, tracking
    from alignflow.tasks.ingest.synthetic import generate_dump

    root = tmp_path_factory.mktemp("stage-kills")
    work = root / "work"
    dump = generate_dump(root / "dump", questions=80, seed=0)
    result = CliRunner().invoke(app, ["ingest", str(dump), "--workdir", str(work), *set_args(TINY)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tracking.configure(work, "alignflow/demo")
    tok = M.tokenizer()
    with mlflow.start_run(run_name="fixture-models"):
        registry.register_transformers(M.policy(seed=0), tok, name="alignflow-base")
        registry.register_transformers(M.policy(seed=1), tok, name="alignflow-policy-sft")
        registry.register_transformers(M.reward_model(seed=0), tok, name="alignflow-reward", task="text-classification")
    return work


def _latest_step(ckroot: Path) -> int | None:
    marker = ckroot / "LATEST_RUN"
    if not marker.is_file():
        return None
    latest = ckroot / marker.read_text().strip() / "latest"
    return int(latest.read_text().strip().split("-")[1]) if latest.is_file() else None


def kill_at(args: list[str], env: dict, ckroot: Path, step: int, log: Path) -> int:
    """Start ``args`` in its own session; SIGKILL the whole group once ``ckroot``'s latest checkpoint of a new
    attempt reaches ``step``; return the step of the checkpoint it left."""
    before = (ckroot / "LATEST_RUN").read_text() if (ckroot / "LATEST_RUN").is_file() else None
    start_step = _latest_step(ckroot) if before is not None else None
    with open(log, "wb") as err:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 300
        killed = False
        while time.monotonic() < deadline and proc.poll() is None:
            now = _latest_step(ckroot)
            marker = (ckroot / "LATEST_RUN").read_text() if (ckroot / "LATEST_RUN").is_file() else None
            moved = marker != before or (now is not None and now != start_step)
            if moved and now is not None and now >= step:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
        proc.wait()
    assert killed, f"seed {SEED}: {args[1]} ended before checkpoint {step}: {log.read_text()[-2000:]}"
    return _latest_step(ckroot)


def no_run_left_running(work: Path, experiment: str) -> None:
    client = work_client(work)
    exp = client.get_experiment_by_name(experiment)
    running = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
    assert not running, [(r.data.tags.get("alignflow.stage"), r.info.run_id) for r in running]


def steps_of(work: Path, run_id: str, metric: str) -> list[int]:
    return [m.step for m in work_client(work).get_metric_history(run_id, metric)]


@pytest.mark.parametrize("stage, model, last_key, metric", [
    ("sft", "alignflow-policy-sft", "sft.train.max_steps", "train/loss"),
    ("pm", "alignflow-reward", "pm.train.max_steps", "train/loss"),
    ("ppo", "alignflow-policy", "ppo.total_steps", "ppo/reward_mean"),
])
def test_stage_killed_twice_then_resumed(work, env, tmp_path, stage, model, last_key, metric):
    settings = dict(s.split("=", 1) for s in TINY)
    last = int(settings[last_key])
    every = int(settings.get(f"{stage}.train.checkpoint_every", settings.get(f"{stage}.checkpoint_every", "1")))
    points = kill_points(stage, last, every)
    client = work_client(work)
    versions_before = {v.version for v in client.search_model_versions(f"name='{model}'")}
    ckroot = work / "checkpoints" / stage
    sets = set_args(TINY)

    killed_runs, left_at = [], 0
    for attempt, point in enumerate(points):
        args = cli(work, stage, *sets) + (["--resume"] if attempt else [])
        left_at = kill_at(args, env, ckroot, max(point, left_at + every), tmp_path / f"{stage}-{attempt}.log")
        run = stage_runs(work, stage)[0]
        assert run.info.status == "RUNNING" and run.info.run_id not in killed_runs  # SIGKILL: no chance to end it
        killed_runs.append(run.info.run_id)

    result = CliRunner().invoke(app, [stage, "--workdir", str(work), "--resume", *sets], catch_exceptions=False)
    assert result.exit_code == 0, f"seed {SEED}, kill points {points}: {result.output[-3000:]}"
    final = stage_runs(work, stage)[0]
    assert final.info.status == "FINISHED"
    for run_id in killed_runs:
        assert client.get_run(run_id).info.status == "KILLED"
    no_run_left_running(work, "alignflow/demo")
    # the attempts are linked: final <- second <- first
    assert final.data.tags["alignflow.resumed_from"] == killed_runs[1]
    assert client.get_run(killed_runs[1]).data.tags["alignflow.resumed_from"] == killed_runs[0]
    # exactly one new version, registered by the attempt that finished
    new = [v for v in client.search_model_versions(f"name='{model}'") if v.version not in versions_before]
    assert [v.run_id for v in new] == [final.info.run_id], f"seed {SEED}, kill points {points}"
    assert str(client.get_model_version_by_alias(model, "challenger").version) == str(new[0].version)
    # nothing lost, nothing done twice: the last attempt logs every step after the checkpoint it started from
    assert steps_of(work, final.info.run_id, metric) == list(range(left_at + 1, last + 1))
    for run_id in killed_runs:
        logged = steps_of(work, run_id, metric)
        assert logged == sorted(set(logged))


def test_pipeline_killed_in_two_stages_then_rerun(env, tmp_path):
    """Killed during `base`, rerun and killed during `sft`, rerun: the last run restarts at `sft`, reuses `base`
    and registers one version of each model in all."""
    import json

    work = tmp_path / "work"
    settings = dict(s.split("=", 1) for s in PIPELINE)
    pipeline_args = cli(work, "pipeline", *set_args(PIPELINE))
    left = {}
    for attempt, stage in enumerate(("base", "sft")):
        last, every = int(settings[f"{stage}.train.max_steps"]), int(settings[f"{stage}.train.checkpoint_every"])
        point = kill_points(f"pipeline-{stage}", last, every)[attempt]
        left[stage] = kill_at(pipeline_args, env, work / "checkpoints" / stage, point,
                              tmp_path / f"pipeline-{attempt}.log")
        state = json.loads((work / "pipeline" / "state.json").read_text())
        assert state["status"] == "running" and state["running"] == [stage]

    result = CliRunner().invoke(app, ["pipeline", "--workdir", str(work), *set_args(PIPELINE)],
                                catch_exceptions=False)
    assert result.exit_code == 0, f"seed {SEED}, left at {left}: {result.output[-3000:]}"
    experiment = "alignflow/pipeline-kills"
    no_run_left_running(work, experiment)
    parents = stage_runs(work, "pipeline", experiment)
    assert [r.info.status for r in parents] == ["FINISHED", "KILLED", "KILLED"]
    state = json.loads((work / "pipeline" / "state.json").read_text())
    assert state["status"] == "finished"
    client = work_client(work)
    for stage, model in (("base", "alignflow-base"), ("sft", "alignflow-policy-sft")):
        [version] = client.search_model_versions(f"name='{model}'")
        finished = [r for r in stage_runs(work, stage, experiment) if r.info.status == "FINISHED"
                    and r.data.tags.get("alignflow.cache_hit") != "true"]
        assert [r.info.run_id for r in finished] == [version.run_id], stage
    sft_final = client.get_run(client.search_model_versions("name='alignflow-policy-sft'")[0].run_id)
    assert steps_of(work, sft_final.info.run_id, "train/loss") == list(range(left["sft"] + 1, 25))
    base_runs = stage_runs(work, "base", experiment)
    assert base_runs[0].data.tags.get("alignflow.cache_hit") == "true"  # the last run reused base


def _versions(db: Path, model: str) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("select count(*) from model_versions where name = ?", (model,)).fetchone()[0]
    except sqlite3.Error:
        return -1


def test_stage_killed_after_registering_then_resumed(work, env, tmp_path):
    """The window between the registration and the end of the run: the killed attempt's version is replaced,
    not kept beside the resumed attempt's."""
    stage, model = "pm", "alignflow-reward"
    client = work_client(work)
    versions_before = {v.version for v in client.search_model_versions(f"name='{model}'")}
    db = work / "mlflow.db"
    sets = set_args(TINY)
    with open(tmp_path / "registering.log", "wb") as err:
        proc = subprocess.Popen(cli(work, stage, *sets), env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        deadline, killed = time.monotonic() + 300, False
        while time.monotonic() < deadline and proc.poll() is None:
            if _versions(db, model) > len(versions_before):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
        proc.wait()
    assert killed, f"{stage} ended before its version was registered: {(tmp_path / 'registering.log').read_text()[-2000:]}"
    killed_run = stage_runs(work, stage)[0]
    assert killed_run.info.status == "RUNNING"

    result = CliRunner().invoke(app, [stage, "--workdir", str(work), "--resume", *sets], catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    final = stage_runs(work, stage)[0]
    assert final.info.status == "FINISHED" and client.get_run(killed_run.info.run_id).info.status == "KILLED"
    no_run_left_running(work, "alignflow/demo")
    new = [v for v in client.search_model_versions(f"name='{model}'") if v.version not in versions_before]
    assert [v.run_id for v in new] == [final.info.run_id]
    assert str(client.get_model_version_by_alias(model, "challenger").version) == str(new[0].version)
