"""The human-feedback loop end to end on tiny models: batch from registered policies -> simulated labelers through
the HTTP API -> scores -> human pairs -> pm, with the reward model's agreement with the labelers in MLflow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ppo_models as M  # noqa: E402
from flowkit import set_args, stage_runs, work_client  # noqa: E402

from alignflow.flows.cli import app  # noqa: E402

pytestmark = pytest.mark.slow

PM_TINY = ["pm.model.max_length=96", "pm.train.max_steps=4", "pm.train.batch_size=8", "pm.train.eval_every=4",
           "pm.train.log_every=2", "pm.train.warmup_steps=1", "pm.train.checkpoint_every=4", "pm.worst_pairs=3"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, prefect_harness):
    from alignflow.tasks import registry, tracking
    from alignflow.tasks.ingest.synthetic import generate_dump

    root = tmp_path_factory.mktemp("label-flow")
    work = root / "work"
    dump = generate_dump(root / "dump", questions=60, seed=0)
    result = CliRunner().invoke(app, ["ingest", str(dump), "--workdir", str(work)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tracking.configure(work, "alignflow/demo")
    tok = M.tokenizer()
    with mlflow.start_run(run_name="fixture-models"):
        registry.register_transformers(M.policy(seed=0), tok, name="alignflow-policy-sft")
        registry.register_transformers(M.policy(seed=1), tok, name="alignflow-policy")
        registry.register_transformers(M.reward_model(seed=0), tok, name="alignflow-pmp", task="text-classification")
    return work


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_label_batch_from_registered_policies_with_provenance_and_gold(work):
    r = _invoke("label-batch", "--workdir", str(work), "--policy", "alignflow-policy@challenger",
                "--policy", "alignflow-policy-sft/1", "--prompts", "6", "--split", "train", "--k", "3", "--name", "b1",
                "--gold", "2",
                "--overlap", "2", "--max-new-tokens", "8", "--instructions", "Prefer <code>code</code>.")
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(work / "label" / "b1" / "comparisons.parquet")
    assert set(df.policy) == {"alignflow-policy@challenger", "alignflow-policy-sft/1"}
    assert (df.groupby("prompt_id").size() <= 3).all() and df.prompt_id.nunique() == 6
    # alignflow-policy takes 2 samples per prompt, -sft 1; every sample pass has its own recorded seed
    assert df.groupby("policy")["sample"].nunique().to_dict() == {"alignflow-policy@challenger": 2,
                                                                    "alignflow-policy-sft/1": 1}
    assert df.groupby(["policy", "sample"])["seed"].nunique().eq(1).all() and df.seed.nunique() == 3
    assert json.loads(df.sampling.iloc[0])["temperature"] == 0.7
    batch = json.loads((work / "label" / "b1" / "batch.json").read_text())
    assert batch["instructions"] == "Prefer <code>code</code>."
    assert sum(1 for it in batch["items"] if it.get("gold")) == 2
    prov = batch["items"][0]["responses"][0].get("provenance") or batch["items"][1]["responses"][0]["provenance"]
    assert {"model", "version", "seed", "sample", "sampling"} <= set(prov)
    run = stage_runs(work, "label-batch")[0]
    assert run.data.metrics["data/items"] + run.data.metrics["data/dropped_items"] == 6
    assert run.data.metrics["data/gold_items"] == 2
    again = _invoke("label-batch", "--workdir", str(work), "--policy", "alignflow-policy@challenger", "--name", "b1",
                    "--prompts", "2", "--k", "2", "--max-new-tokens", "4")
    assert again.exit_code == 2 and again.output.strip().splitlines()[-1].startswith("error: batch 'b1' exists")


def test_bad_batch_input_is_one_line_and_exit_2(work, tmp_path):
    r = _invoke("label-batch", "--workdir", str(work), "--policy", "alignflow-policy@nosuchalias", "--prompts", "2",
                "--name", "b2")
    assert r.exit_code == 2 and "no registered model alignflow-policy@nosuchalias" in r.output
    assert "Traceback" not in r.output
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    r = _invoke("label-batch", "--workdir", str(work), "--prompts-file", str(bad), "--name", "b3")
    assert r.exit_code == 2 and f"{bad}:2: needs a non-empty string field 'prompt'" in r.output
    r = _invoke("label", "scores", "--workdir", str(work), "--batch", "nope")
    assert r.exit_code == 2 and r.output.strip() == "error: no batch 'nope'"


def test_simulate_scores_pairs_and_pm_on_human_pairs(work):
    r = _invoke("label", "simulate", "--workdir", str(work), "--batch", "b1", "--labelers", "3")
    assert r.exit_code == 0, r.output
    assert "refused 0, transport errors 0" in r.output
    from alignflow.tasks.label.store import LabelStore, database_url

    store = LabelStore(database_url(work))
    counts = store.counts("b1")
    store.close()
    assert counts["complete_items"] == counts["items"] - counts["gold_items"]
    assert counts["submissions"] == 2 * (counts["items"] - counts["gold_items"]) + 3 * counts["gold_items"]

    r = _invoke("label", "scores", "--workdir", str(work), "--batch", "b1", "--rounds", "50")
    assert r.exit_code == 0, r.output
    run = stage_runs(work, "label-scores")[0]
    assert run.data.metrics["label/submissions"] == counts["submissions"]
    arts = {a.path for a in work_client(work).list_artifacts(run.info.run_id, "label")}
    assert {"label/leaderboard.json", "label/leaderboard.png", "label/report.json"} <= arts

    r = _invoke("label", "train", "--workdir", str(work), "--batch", "b1", *set_args(PM_TINY))
    assert r.exit_code == 0, r.output
    (pairs_path,) = (work / "label" / "b1").glob("pairs-*.parquet")  # named by content digest
    pairs = pd.read_parquet(pairs_path)
    assert set(pairs.source) == {"human"} and set(pairs.site) == {"human/b1"}
    assert pairs.groupby("ranking_id")["weight"].sum().round(9).eq(1.0).all()
    pm_run = stage_runs(work, "pm")[0]
    assert pm_run.data.params["pm.pairs_file"] == str(pairs_path)
    for key in ("human/pairwise_accuracy", "human/kendall_tau"):
        assert key in pm_run.data.metrics and -1.0 <= pm_run.data.metrics[key] <= 1.0
    assert pm_run.data.tags["alignflow.human_batch"] == "b1"


PPO_TINY = ["ppo.total_steps=2", "ppo.batch_size=8", "ppo.minibatch_size=4", "ppo.micro_batch_size=4",
            "ppo.forward_batch_size=8", "ppo.ppo_epochs=1", "ppo.max_new_tokens=8", "ppo.max_prompt_tokens=48",
            "ppo.checkpoint_every=2", "ppo.generations_every=2", "ppo.generations_rows=2", "ppo.eval_prompts=4",
            "ppo.reward_max_length=96", "promote.models=[alignflow-reward,alignflow-policy]"]


def test_pipeline_runs_pm_ppo_promote_from_human_pairs(work):
    """After `label train`: the pipeline's pm -> ppo -> promote branch on the human pairs file."""
    (pairs_path,) = (work / "label" / "b1").glob("pairs-*.parquet")
    r = _invoke("pipeline", "--workdir", str(work), "--set", "pipeline.stages=[pm,ppo,promote]",
                "--set", f"pm.pairs_file={pairs_path}", "--set", "pm.site=human/b1",
                *set_args(PM_TINY, PPO_TINY))
    assert r.exit_code == 0, r.output
    pm_run = stage_runs(work, "pm")[0]
    assert pm_run.data.params["pm.pairs_file"] == str(pairs_path)
    assert pm_run.data.metrics["data/train_pairs"] > 0
    ppo_run = stage_runs(work, "ppo")[0]
    reward = work_client(work).get_model_version_by_alias("alignflow-reward", "challenger")
    assert reward.run_id == pm_run.info.run_id  # the reward model PPO used is the one trained on human pairs
    assert ppo_run.data.params["reward_model"] == f"models:/alignflow-reward/{reward.version}"
