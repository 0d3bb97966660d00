"""The `ingest` Prefect flow and the CLI, as a user runs them: one MLflow run with params, metrics, inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from alignflow.flows.cli import app

pytestmark = pytest.mark.slow


def _run_cli(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result


def test_cli_ingest_tracks_one_mlflow_run(fixtures_dir, tmp_path, prefect_harness):
    work = tmp_path / "work"
    result = _run_cli("ingest", str(fixtures_dir / "conlang.meta-2020"), "--workdir", str(work),
                      "--set", "ingest.max_pairs_per_question=5")
    assert result.exit_code == 0, result.output
    assert "pairs" in result.output and "mlflow run" in result.output
    assert (work / "mlflow.db").is_file()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("alignflow/demo")
    assert exp is not None and exp.artifact_location.startswith((work / "mlartifacts").resolve().as_uri())
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["alignflow.stage"] == "ingest"
    assert run.data.tags["prefect.flow_run_id"]
    assert run.data.tags["alignflow.cache_hit"] == "false"
    assert run.data.params["ingest.max_pairs_per_question"] == "5"
    assert run.data.params["score_source.conlang.meta-2020"] == "votes"
    assert run.data.metrics["data/posts"] == 169
    assert run.data.metrics["data/prompts"] == 54
    assert run.data.metrics["perf/input_mb_per_s"] > 0
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"posts", "pairs", "demos", "prompts", "quarantine"}
    out_dir = next(p for p in (work / "data" / "ingest").iterdir() if p.is_dir())
    from alignflow.tasks.ingest.run import sha256_file

    assert inputs["pairs"].digest == sha256_file(out_dir / "pairs.parquet")[:36]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"ingest_report.json", "contracts"} <= artifacts
    docs = [a.path for a in client.list_artifacts(run.info.run_id, "contracts/pairs")]
    assert docs, "the pairs contract's results / Data Docs are not in the run"

    # The same command again: a cache hit, tracked as its own run, same datasets.
    again = _run_cli("ingest", str(fixtures_dir / "conlang.meta-2020"), "--workdir", str(work),
                     "--set", "ingest.max_pairs_per_question=5")
    assert again.exit_code == 0 and "cache hit" in again.output
    runs = client.search_runs([exp.experiment_id], order_by=["attribute.start_time DESC"])
    assert len(runs) == 2 and runs[0].data.tags["alignflow.cache_hit"] == "true"
    assert runs[0].data.metrics["data/pairs"] == run.data.metrics["data/pairs"]


def test_cli_bad_input_fails_cleanly_and_marks_the_run_failed(tmp_path, prefect_harness):
    site = tmp_path / "site"
    site.mkdir()
    (site / "Posts.xml").write_bytes(b'<posts>\n<row Id="1" PostTypeId="1" Score="1" Title="t"/>\n<row Id="2"')
    work = tmp_path / "work"
    result = CliRunner().invoke(app, ["ingest", str(site), "--workdir", str(work)])
    assert result.exit_code == 2
    assert "Posts.xml" in result.output and "line 3" in result.output
    assert list((work / "data" / "ingest").glob("*")) == [] if (work / "data" / "ingest").exists() else True
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("alignflow/demo").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_cli_config_errors_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["ingest", "x", "--workdir", str(tmp_path), "--set", "ingest.nope=1"])
    assert result.exit_code == 2 and "ingest.nope" in result.output


def test_console_script_end_to_end(fixtures_dir, tmp_path):
    """The installed `alignflow` command in a fresh process, with the embedded Prefect server."""
    exe = Path(sys.executable).parent / "alignflow"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.run(
        [str(exe), "ingest", str(fixtures_dir / "datascience.meta-2024"), "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pairs" in proc.stdout and "165 rows" in proc.stdout
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()  # nothing outside --workdir
