"""Flows `pmp`, `pm` and `pmp-transfer`: mixture, registry, evaluation artifacts, centring, resume, tokenizer freedom."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from alignflow.flows.cli import app
from flowkit import set_args, stage_runs, work_client

pytestmark = pytest.mark.slow

TASK_SITE = "synthetic.stackexchange.com"
GENERIC_SITE = "generic.stackexchange.com"
TINY = [
    "pipeline.stages=[ingest, base, pmp, pm, sft]",
    "generate.questions=160", "generate.generic_questions=120",
    "ingest.split={train: 0.7, validation: 0.2, test: 0.1}",
    "base.model.arch=tiny-gpt2", "base.model.vocab_size=600", "base.model.max_length=96",
    "base.train.max_steps=10", "base.train.batch_size=8", "base.train.eval_every=10", "base.train.warmup_steps=2",
    "pmp.model.max_length=96", "pmp.train.max_steps=12", "pmp.train.batch_size=8", "pmp.train.eval_every=6",
    "pmp.train.log_every=3", "pmp.train.warmup_steps=2", "pmp.train.checkpoint_every=4",
    f"pmp.sources=[{{site: '{GENERIC_SITE}', weight: 3.0}}, {{site: '{TASK_SITE}', weight: 1.0}}]",
    "pmp.max_pairs=200",
    "pm.model.max_length=96", "pm.train.max_steps=10", "pm.train.batch_size=8", "pm.train.eval_every=5",
    "pm.train.log_every=2", "pm.train.warmup_steps=2", "pm.train.checkpoint_every=4", f"pm.site={TASK_SITE}",
    "pm.worst_pairs=5",
    "sft.model.max_length=96", "sft.train.max_steps=4", "sft.train.batch_size=4", "sft.generation_prompts=1",
    "sft.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory, prefect_harness):
    work = tmp_path_factory.mktemp("reward-flows") / "work"
    result = CliRunner().invoke(app, ["demo", "--workdir", str(work), *set_args(TINY)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "pm " in result.output and "eval/pairwise_accuracy" in result.output
    return work


def test_pmp_draws_the_weighted_mixture_and_registers(work):
    run = stage_runs(work, "pmp")[0]
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    # weights 3:1 over 200 pairs -> up to 150 generic and 50 task pairs, drawn as whole questions
    generic, task = m[f"data/mixture_{GENERIC_SITE}_drawn"], m[f"data/mixture_{TASK_SITE}_drawn"]
    assert 140 <= generic <= 150 and 40 <= task <= 50, m
    assert m["data/mixture_pairs"] == generic + task
    for key in ("eval/pairwise_accuracy", "eval/accuracy_ci_low", "eval/ece", "eval/margin_mean", "train/loss"):
        assert key in m, key
    version = work_client(work).get_model_version_by_alias("alignflow-pmp", "challenger")
    assert version.tags["start_model"].startswith("models:/alignflow-base/")
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"pairs"}


def test_pm_starts_from_pmp_evaluates_and_centres_on_demos(work):
    client = work_client(work)
    run = stage_runs(work, "pm")[0]
    m = run.data.metrics
    assert run.data.params["start_model"].startswith("models:/alignflow-pmp/")
    for key in ("eval/pairwise_accuracy", "eval/accuracy_ci_low", "eval/accuracy_ci_high", "eval/ece",
                "eval/margin_mean", "eval/pairs", "data/train_pairs"):
        assert key in m, key
    assert m["eval/pairs"] >= 20 and any(k.startswith("eval/accuracy_gap_") for k in m)
    assert m["eval/accuracy_ci_low"] <= m["eval/pairwise_accuracy"] <= m["eval/accuracy_ci_high"]
    assert abs(m["eval/demo_score_mean"]) < 1e-4 and m["eval/demos_centred"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/worst_pairs.json", "eval/calibration.png"} <= artifacts
    worst = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="eval/worst_pairs.json", tracking_uri=f"sqlite:///{work / 'mlflow.db'}"
    )).read_text())
    diffs = [row[worst["columns"].index("reward_diff")] for row in worst["data"]]
    assert len(diffs) == 5 and diffs == sorted(diffs)
    assert str(client.get_model_version_by_alias("alignflow-reward", "challenger").version) == "1"


def test_registered_reward_model_loads_in_a_fresh_process_and_scores_text(work):
    """A new process loads alignflow-reward@challenger as a plain HF sequence classifier; the centring offset
    travels in its config, and it scores text from any policy (its own tokenizer)."""
    code = f"""
import json, mlflow, torch
from transformers import AutoModelForSequenceClassification
mlflow.set_tracking_uri("sqlite:///{work / 'mlflow.db'}")
parts = mlflow.transformers.load_model("models:/alignflow-reward@challenger", return_type="components")
model, tok = parts["model"], parts["tokenizer"]
from alignflow.models.reward import score_texts, reward_bias
s = score_texts(model, tok, ["Question: how to foo?"], ["Use `foo` like this."], max_length=96)
print(json.dumps({{"cls": type(model).__name__, "bias": reward_bias(model), "score": s[0],
                  "pad": tok.pad_token_id, "eos": tok.eos_token_id}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["cls"].endswith("ForSequenceClassification")
    assert info["bias"] != 0.0 and info["pad"] != info["eos"]
    assert isinstance(info["score"], float)


def test_pm_without_pmp_starts_from_base_and_resumes(work):
    result = CliRunner().invoke(app, ["pm", "--workdir", str(work), *set_args(TINY, ["pmp.enabled=false"])],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = stage_runs(work, "pm")[0]
    assert run.data.params["start_model"].startswith("models:/alignflow-base/")
    assert str(work_client(work).get_model_version_by_alias("alignflow-reward", "challenger").version) == "2"
    # --resume on a finished attempt picks up its last checkpoint and ends at the same step
    result = CliRunner().invoke(app, ["pm", "--workdir", str(work), "--resume", *set_args(TINY, ["pmp.enabled=false"])],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    resumed = stage_runs(work, "pm")[0]
    assert resumed.data.tags.get("alignflow.resumed_from") == run.info.run_id


def test_pm_on_an_unknown_site_names_the_sites_present(work):
    result = CliRunner().invoke(app, ["pm", "--workdir", str(work), *set_args(TINY, ["pm.site=nope.example"])])
    assert result.exit_code == 2
    assert "nope.example" in result.output and TASK_SITE in result.output


def test_pmp_transfer_compares_starts_per_n(work):
    extra = ["pmp_transfer.sizes=[8,0]", "pmp_transfer.seeds=[0]", "pmp_transfer.train.max_steps=4",
             "pmp_transfer.train.batch_size=8", "pmp_transfer.eval_pairs=40"]
    result = CliRunner().invoke(app, ["pmp-transfer", "--workdir", str(work), *set_args(TINY, extra)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    parent = stage_runs(work, "pmp-transfer")
    client = work_client(work)
    top = [r for r in parent if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in parent if "mlflow.parentRunId" in r.data.tags]
    assert len(top) == 1 and len(children) == 4
    assert {r.data.tags["alignflow.start"] for r in children} == {"pmp", "base"}
    ns = sorted({int(r.data.params["n_pairs"]) for r in children})
    assert ns[0] <= 8 and ns[1] > 8
    arts = {a.path for a in client.list_artifacts(top[0].info.run_id, "pmp_transfer")}
    assert any(p.endswith(".png") for p in arts) and "pmp_transfer/table.md" in arts
    held = {r.data.metrics["eval/pairs"] for r in children}
    assert len(held) == 1 and 20 <= held.pop() <= 40  # one held-out set for every fine-tune
    for r in children:
        assert 0.0 <= r.data.metrics["eval/pairwise_accuracy"] <= 1.0
