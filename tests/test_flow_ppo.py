"""Flow `ppo` end to end on tiny data: registry, metrics, tables, evaluation vs SFT, SIGKILL and resume.

A generated dump is ingested; a tiny SFT policy and reward model are registered
directly (as `alignflow-policy-sft` and `alignflow-reward`, the names the `sft`
and `pm` stages register), so the test needs no other stage's training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

import _ppo_models as M
from alignflow.flows.cli import app
from flowkit import cli, generate_in_fresh_process

pytestmark = pytest.mark.slow

TINY = [
    "ingest.split={train: 0.7, validation: 0.2, test: 0.1}",
    "ppo.total_steps=4", "ppo.batch_size=8", "ppo.minibatch_size=4", "ppo.micro_batch_size=4",
    "ppo.forward_batch_size=8", "ppo.ppo_epochs=2", "ppo.max_new_tokens=12", "ppo.max_prompt_tokens=48",
    "ppo.lr=1e-3", "ppo.checkpoint_every=2", "ppo.generations_every=2", "ppo.generations_rows=3",
    "ppo.eval_prompts=8", "ppo.reward_max_length=96",
]
METRICS = ("ppo/reward_mean", "ppo/reward_std", "ppo/kl", "ppo/kl_k1", "ppo/kl_k3", "ppo/beta", "ppo/entropy",
           "ppo/clipfrac", "ppo/approx_kl", "ppo/value_loss", "ppo/explained_variance", "ppo/ratio_mean",
           "ppo/response_length", "ppo/no_eos_rate", "perf/episodes_per_s")


def _sets(extra=()):
    out = []
    for s in [*TINY, *extra]:
        out += ["--set", s]
    return out


def _client(work: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


def _runs(work: Path, stage: str = "ppo"):
    client = _client(work)
    exp = client.get_experiment_by_name("alignflow/demo")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`alignflow.stage` = '{stage}'",
                              order_by=["attribute.start_time DESC"])


@pytest.fixture(scope="module")
def work(tmp_path_factory, prefect_harness):
    from alignflow.tasks import registry, tracking
    from alignflow.tasks.ingest.synthetic import generate_dump

    root = tmp_path_factory.mktemp("ppo-flow")
    work = root / "work"
    dump = generate_dump(root / "dump", questions=80, seed=0)
    result = CliRunner().invoke(app, ["ingest", str(dump), "--workdir", str(work), *_sets()],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tracking.configure(work, "alignflow/demo")
    tok = M.tokenizer()
    with mlflow.start_run(run_name="fixture-models"):
        registry.register_transformers(M.policy(seed=0), tok, name="alignflow-policy-sft")
        registry.register_transformers(M.reward_model(seed=0), tok, name="alignflow-reward", task="text-classification")
    return work


def test_ppo_flow_registers_policy_with_metrics_tables_and_evaluation(work):
    result = CliRunner().invoke(app, ["ppo", "--workdir", str(work), *_sets()], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = _client(work)
    version = client.get_model_version_by_alias("alignflow-policy", "challenger")
    run = _runs(work)[0]
    assert run.info.status == "FINISHED" and version.run_id == run.info.run_id
    assert run.data.params["start_model"] == "models:/alignflow-policy-sft/1"
    assert run.data.params["reward_model"] == "models:/alignflow-reward/1"
    for name in METRICS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert steps == [1, 2, 3, 4], name
    for name in ("eval/reward_mean", "eval/reward_mean_sft", "eval/kl", "eval/win_rate", "eval/planted_rate",
                 "eval/planted_rate_sft"):
        assert name in run.data.metrics, name
    assert 0.0 <= run.data.metrics["eval/win_rate"] <= 1.0
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"prompts"}
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "ppo")}
    assert tables == {"ppo/generations_step_000002.json", "ppo/generations_step_000004.json"}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "ppo/generations_step_000004.json")).read_text())
    assert table["columns"] == ["step", "prompt", "response", "score", "kl"] and len(table["data"]) == 3
    assert "eval/samples_step_000004.json" in {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert "alignflow-policy" in result.output and "eval/win_rate" in result.output

    # the registered policy loads and generates in a fresh process
    proc = generate_in_fresh_process(work, "alignflow-policy", "Question: alpha?\n\nAnswer: ", max_new_tokens=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GENERATED TextGenerationPipeline" in proc.stdout


def _history(work: Path, run_id: str, name: str = "ppo/reward_mean") -> dict[int, float]:
    return {m.step: m.value for m in _client(work).get_metric_history(run_id, name)}


def test_sigkill_then_resume_continues_the_same_curve(work, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    sets = _sets(["ppo.total_steps=20", "ppo.checkpoint_every=5", "ppo.eval_prompts=0",
                  "ppo.generations_every=100", "ppo.adaptive_kl=true", "ppo.kl_horizon=200"])
    proc = subprocess.Popen(cli(work, "ppo", *sets), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    ckroot = work / "checkpoints" / "ppo"
    before = (ckroot / "LATEST_RUN").read_text() if (ckroot / "LATEST_RUN").is_file() else None
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        marker = ckroot / "LATEST_RUN"
        if marker.is_file() and marker.read_text() != before:
            latest = ckroot / marker.read_text().strip() / "latest"
            if latest.is_file() and latest.read_text().strip() >= "step-000010":
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_at = int(latest.read_text().strip().split("-")[1])
                break
        time.sleep(0.05)
    assert killed_at is not None, f"the run ended or stalled before a checkpoint: {proc.stderr.read()[-2000:]}"
    killed = _runs(work)[0]
    assert killed.info.status == "RUNNING"

    # resume and the uninterrupted run go in this process (each subprocess pays a Prefect server start)
    resumed = CliRunner().invoke(app, ["ppo", "--workdir", str(work), *sets, "--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    new, old = _runs(work)[0], _client(work).get_run(killed.info.run_id)
    assert old.info.status == "KILLED"
    assert new.data.tags["alignflow.resumed_from"] == old.info.run_id
    assert old.data.tags["alignflow.resumed_by"] == new.info.run_id
    resumed_curve = _history(work, new.info.run_id)
    assert min(resumed_curve) == killed_at + 1 and max(resumed_curve) == 20

    # the uninterrupted run with the same seed draws the same curve
    straight = CliRunner().invoke(app, ["ppo", "--workdir", str(work), *sets], catch_exceptions=False)
    assert straight.exit_code == 0, straight.output
    straight_run = _runs(work)[0]
    for name in ("ppo/reward_mean", "ppo/kl", "ppo/beta"):
        want = _history(work, straight_run.info.run_id, name)
        got = {**_history(work, old.info.run_id, name), **_history(work, new.info.run_id, name)}
        assert sorted(got) == list(range(1, 21))
        for step in range(1, 21):
            assert got[step] == pytest.approx(want[step], abs=1e-4), (name, step)
