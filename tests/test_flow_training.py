"""Stages `base` and `sft` as flows: tracking, registry, generations, resume after SIGKILL, NaN guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignflow.flows.cli import app
from flowkit import cli, generate_in_fresh_process, set_args, stage_runs, work_client

pytestmark = pytest.mark.slow

TINY = [
    "pipeline.stages=[ingest, base, pmp, pm, sft]",
    "generate.questions=120",
    "base.model.arch=tiny-gpt2", "base.model.vocab_size=600", "base.model.max_length=128",
    "base.train.max_steps=30", "base.train.batch_size=8", "base.train.eval_every=15",
    "base.train.checkpoint_every=10", "base.train.log_every=5", "base.train.warmup_steps=3",
    "sft.model.max_length=128", "sft.train.max_steps=20", "sft.train.batch_size=4", "sft.train.eval_every=10",
    "sft.train.checkpoint_every=10", "sft.train.log_every=5", "sft.train.warmup_steps=2",
    "sft.generation_prompts=2", "sft.max_new_tokens=16",
    # the demo's preference stages, kept minimal here (tests/test_flow_reward.py covers them)
    "generate.generic_questions=0", "pmp.sources=[{site: '*'}]", "pm.site=null",
    "pmp.model.max_length=64", "pmp.train.max_steps=3", "pmp.train.batch_size=4", "pmp.eval_pairs=16",
    "pm.model.max_length=64", "pm.train.max_steps=3", "pm.train.batch_size=4", "pm.eval_pairs=16",
]


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory, prefect_harness):
    work = tmp_path_factory.mktemp("train") / "work"
    result = CliRunner().invoke(app, ["demo", "--workdir", str(work), *set_args(TINY)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return work, result.output


def test_demo_registers_base_and_sft_with_challenger_alias(demo_workdir):
    work, output = demo_workdir
    client = work_client(work)
    for name in ("alignflow-base", "alignflow-policy-sft"):
        version = client.get_model_version_by_alias(name, "challenger")
        assert str(version.version) == "1", name
    assert "alignflow-policy-sft" in output and "final_loss" in output


def test_stage_runs_have_namespaced_metrics_inputs_and_generations(demo_workdir):
    work, _ = demo_workdir
    client = work_client(work)
    for stage, dataset in (("base", "posts"), ("sft", "demos")):
        run = stage_runs(work, stage)[0]
        assert run.info.status == "FINISHED"
        for metric in ("train/loss", "train/lr", "eval/loss", "eval/perplexity", "perf/tokens_per_s"):
            assert metric in run.data.metrics, (stage, metric)
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == sorted(m.step for m in history) and len(history) >= 4
        assert {d.dataset.name for d in run.inputs.dataset_inputs} == {dataset}
        assert run.data.params[f"{stage}.train.max_steps"] in ("30", "20")
        assert run.data.tags["prefect.flow_run_id"]
    sft_run = stage_runs(work, "sft")[0]
    tables = [a.path for a in client.list_artifacts(sft_run.info.run_id, "eval")]
    assert "eval/generations_step_000010.json" in tables and "eval/generations_step_000020.json" in tables
    local = client.download_artifacts(sft_run.info.run_id, "eval/generations_step_000020.json")
    table = json.loads(Path(local).read_text())
    assert table["columns"] == ["step", "prompt", "response"] and len(table["data"]) == 2
    assert "eval/planted_rate" in sft_run.data.metrics and "eval/planted_rate_start" in sft_run.data.metrics


def test_registered_policy_loads_in_a_fresh_process_and_generates(demo_workdir):
    work, _ = demo_workdir
    proc = generate_in_fresh_process(work, "alignflow-policy-sft", "Question: How do I read a file?\n\nAnswer: ",
                                     max_new_tokens=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GENERATED TextGenerationPipeline" in proc.stdout


def test_sigkill_then_resume_continues_and_links_runs(demo_workdir, tmp_path):
    work, _ = demo_workdir
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    sets = set_args(TINY, ["base.train.max_steps=120", "base.train.checkpoint_every=20", "base.train.eval_every=1000"])
    # Its own session, so the SIGKILL takes the whole job (the command and its Prefect server) as a scheduler would.
    proc = subprocess.Popen(cli(work, "base", *sets), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    ckroot = work / "checkpoints" / "base"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        marker = ckroot / "LATEST_RUN"
        if marker.is_file():
            latest = ckroot / marker.read_text().strip() / "latest"
            if latest.is_file() and latest.read_text().strip() >= "step-000040":
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_at = latest.read_text().strip()
                break
        time.sleep(0.05)
    assert killed_at is not None, f"the run ended or stalled before a checkpoint: {proc.stderr.read()[-2000:]}"
    killed_run = stage_runs(work, "base")[0]
    assert killed_run.info.status == "RUNNING"  # SIGKILL gave it no chance to end

    resumed = subprocess.run(cli(work, "base", *sets, "--resume"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = stage_runs(work, "base")
    new, old = runs[0], work_client(work).get_run(killed_run.info.run_id)
    assert old.info.status == "KILLED"
    assert new.data.tags["alignflow.resumed_from"] == old.info.run_id
    assert old.data.tags["alignflow.resumed_by"] == new.info.run_id
    steps = [m.step for m in work_client(work).get_metric_history(new.info.run_id, "train/loss")]
    assert min(steps) > int(killed_at.split("-")[1]) - 1 and max(steps) == 120

    # The uninterrupted run with the same seed ends with the same loss.
    straight = subprocess.run(cli(work, "base", *sets), env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    final = lambda r: work_client(work).get_metric_history(r.info.run_id, "train/loss")[-1].value  # noqa: E731
    assert abs(final(stage_runs(work, "base")[0]) - final(new)) < 1e-4


def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(demo_workdir, monkeypatch):
    work, _ = demo_workdir
    import alignflow.tasks.train.lm as lm

    real = lm.causal_lm_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, extra = real(model, batch)
        return (loss * float("nan") if calls["n"] == 7 else loss), extra

    monkeypatch.setattr(lm, "causal_lm_loss", poisoned)
    result = CliRunner().invoke(app, ["base", "--workdir", str(work),
                                      *set_args(TINY, ["base.train.checkpoint_every=5", "base.train.max_steps=20"])])
    assert result.exit_code == 2
    assert "step 7" in result.output
    run = stage_runs(work, "base")[0]
    assert run.info.status == "FAILED"
    ckroot = work / "checkpoints" / "base"
    folder = ckroot / (ckroot / "LATEST_RUN").read_text().strip()
    assert (folder / "latest").read_text().strip() == "step-000005"
    from safetensors.torch import load_file

    weights = load_file(folder / "step-000005" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
