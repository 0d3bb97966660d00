"""Every training stage on two CPU processes (torchrun, gloo) from the CLI: `alignflow <stage> --processes 2`
logs one MLflow run, registers once, writes its checkpoints once, and its losses follow the one-process run at
the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignflow.flows.cli import app
from flowkit import cli, set_args, stage_runs, work_client

pytestmark = pytest.mark.slow

SETUP = [
    "pipeline.stages=[ingest,base]", "generate.questions=120",
    "base.model.vocab_size=600", "base.model.max_length=64", "base.train.max_steps=4", "base.train.batch_size=8",
    "base.train.warmup_steps=1",
]
STEPS = 3
# Same steps, no length grouping (the data order is then the same seeded permutation whatever the batch size),
# full precision, no evaluation or checkpoint before the end.
COMMON = {
    "base": ["base.model.vocab_size=600", "base.model.max_length=64"],
    "sft": ["sft.model.max_length=64", "sft.max_new_tokens=8", "sft.generation_prompts=0"],
    "pmp": ["pmp.model.max_length=64", "pmp.eval_pairs=16"],
    "pm": ["pmp.enabled=false", "pm.site=null", "pm.model.max_length=64", "pm.eval_pairs=16"],
}
# The same global batch on one process and on two: LM stages take twice the per-process batch; the reward
# stages (one packed batch of pairs per process and micro-batch) accumulate two micro-batches instead.
ONE = {"base": ["base.train.batch_size=8"], "sft": ["sft.train.batch_size=8"],
       "pmp": ["pmp.train.batch_size=4", "pmp.train.grad_accum=2"],
       "pm": ["pm.train.batch_size=4", "pm.train.grad_accum=2"]}
TWO = {"base": ["base.train.batch_size=4"], "sft": ["sft.train.batch_size=4"],
       "pmp": ["pmp.train.batch_size=4", "pmp.train.grad_accum=1"],
       "pm": ["pm.train.batch_size=4", "pm.train.grad_accum=1"]}
MODELS = {"base": "alignflow-base", "sft": "alignflow-policy-sft", "pmp": "alignflow-pmp", "pm": "alignflow-reward"}


def _loop(stage: str) -> list[str]:
    return [f"{stage}.train.{k}" for k in (f"max_steps={STEPS}", "log_every=1", "warmup_steps=1",
                                             "group_by_length=false", "eval_every=100", "checkpoint_every=100",
                                             "mixed_precision='no'")]


@pytest.fixture(scope="module")
def work(tmp_path_factory, prefect_harness):
    work = tmp_path_factory.mktemp("procs") / "work"
    res = CliRunner().invoke(app, ["pipeline", "--workdir", str(work), *set_args(SETUP)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return work


def _env() -> dict[str, str]:
    from prefect.settings import get_current_settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PREFECT_API_URL": str(get_current_settings().api.url)})  # the tests' Prefect server
    return env


def _losses(work: Path, run) -> dict[int, float]:
    history = work_client(work).get_metric_history(run.info.run_id, "train/loss")
    return {m.step: m.value for m in history}


@pytest.mark.parametrize("stage", ["base", "sft", "pmp", "pm"])
def test_two_processes_follow_one_process_at_the_same_global_batch(work, stage):
    sets = [*COMMON[stage], *_loop(stage)]
    one = CliRunner().invoke(app, [stage, "--workdir", str(work), *set_args(sets, ONE[stage])],
                             catch_exceptions=False)
    assert one.exit_code == 0, one.output
    client = work_client(work)
    versions_before = len(client.search_model_versions(f"name = '{MODELS[stage]}'"))
    runs_before = len(stage_runs(work, stage))

    two = subprocess.run(cli(work, stage, "--processes", "2", *set_args(sets, TWO[stage])), capture_output=True,
                         text=True, env=_env(), timeout=600)
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    assert "launching:" in two.stderr and "torch.distributed.run" in two.stderr
    assert "final_loss" in two.stdout and two.stdout.count("run_id") == 1  # one summary, from process 0

    runs = stage_runs(work, stage)
    assert len(runs) == runs_before + 1  # one MLflow run for the two processes
    ddp_run, one_run = runs[0], runs[1]
    assert len(client.search_model_versions(f"name = '{MODELS[stage]}'")) == versions_before + 1
    ckpt = work / "checkpoints" / stage / ddp_run.info.run_id
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-")) == [f"step-{STEPS:06d}"]

    a, b = _losses(work, one_run), _losses(work, ddp_run)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    deltas = {s: abs(a[s] - b[s]) for s in a}
    print(f"{stage}: |loss(1 process) - loss(2 processes)| per step: {deltas}")
    assert max(deltas.values()) < 1e-4, (a, b)


PPO = ["ppo.total_steps=3", "ppo.batch_size=8", "ppo.minibatch_size=4", "ppo.micro_batch_size=2",
       "ppo.forward_batch_size=8", "ppo.ppo_epochs=2", "ppo.max_new_tokens=8", "ppo.max_prompt_tokens=32",
       "ppo.reward_max_length=64", "ppo.eval_prompts=0", "ppo.checkpoint_every=100", "ppo.lr=1e-3"]
PPO_FIGURES = ("ppo/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/policy_grad_norm")


def _history(work: Path, run, key: str) -> dict[int, float]:
    return {m.step: m.value for m in work_client(work).get_metric_history(run.info.run_id, key)}


def test_ppo_on_two_processes_has_the_same_rollouts_and_updates(work):
    from alignflow.tasks import registry, tracking

    tracking.configure(work, "alignflow/demo")
    for stage, model in (("sft", "alignflow-policy-sft"), ("pm", "alignflow-reward")):
        if registry.resolve_version(model) is None:  # this test alone: train the two models it starts from
            res = CliRunner().invoke(app, [stage, "--workdir", str(work), *set_args(COMMON[stage], _loop(stage))],
                                     catch_exceptions=False)
            assert res.exit_code == 0, res.output
    one = CliRunner().invoke(app, ["ppo", "--workdir", str(work), *set_args(PPO)], catch_exceptions=False)
    assert one.exit_code == 0, one.output
    runs_before = len(stage_runs(work, "ppo"))
    two = subprocess.run(cli(work, "ppo", "--processes", "2", *set_args(PPO)), capture_output=True, text=True,
                         env=_env(), timeout=600)
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    runs = stage_runs(work, "ppo")
    assert len(runs) == runs_before + 1
    ddp_run, one_run = runs[0], runs[1]
    ckpt = work / "checkpoints" / "ppo" / ddp_run.info.run_id
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-")) == ["step-000003"]
    worst = {}
    for key in PPO_FIGURES:
        a, b = _history(work, one_run, key), _history(work, ddp_run, key)
        assert sorted(a) == sorted(b) == [1, 2, 3], key
        worst[key] = max(abs(a[s] - b[s]) for s in a)
    print(f"ppo: max |1 process - 2 processes| over 3 steps: {worst}")
    assert max(worst.values()) < 1e-4, worst


def test_a_config_error_stops_before_launching(work):
    res = subprocess.run(cli(work, "sft", "--processes", "2", "--set", "sft.train.lr=-1"), capture_output=True,
                         text=True, env=_env(), timeout=300)
    assert res.returncode == 2 and "launching:" not in res.stderr
    assert res.stderr.strip().splitlines()[0].startswith("error: invalid config")


def test_a_user_error_inside_the_launched_stage_is_one_line_and_exit_2(tmp_path, prefect_harness):
    """An error the stage finds after launching (here: a start model that does not exist) reads as without a
    launcher: exit 2, the error line last, no traceback and no launcher failure summary."""
    missing = tmp_path / "no-such-model"
    res = subprocess.run(cli(tmp_path / "work", "sft", "--processes", "2", "--set",
                             f"sft.model.name_or_path={missing}"), capture_output=True, text=True, env=_env(),
                         timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(missing) in lines[-1], lines[-5:]
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr[-3000:]
    assert not [ln for ln in lines if "| INFO" in ln], lines


def test_each_stage_module_is_its_command():
    from alignflow import stages

    # All at once: each is an interpreter importing the stack, mostly waiting on imports.
    procs = {name: subprocess.Popen([sys.executable, "-m", stage.module, "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, stage in stages.REGISTRY.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        stage = stages.REGISTRY[name]
        assert proc.returncode == 0, (name, stderr[-2000:])
        assert f"alignflow {name}" in stdout, name
        assert ("--processes" in stdout and "--accelerate-config" in stdout) == stage.distributed, name
