"""Server mode: infra/local-up.sh starts MLflow (PostgreSQL backend) and Prefect (PostgreSQL); the same pipeline
runs against them with nothing but MLFLOW_TRACKING_URI and PREFECT_API_URL set."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import BIN, clean_env, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PG = {"PGHOST": os.environ.get("PGHOST", "127.0.0.1"), "PGPORT": os.environ.get("PGPORT", "5432"),
      "PGUSER": os.environ.get("PGUSER", "root")}
TINY = [
    "experiment=alignflow/server-mode", "pipeline.stages=[ingest,base]", "generate.questions=60",
    "base.model.vocab_size=400", "base.model.max_length=64", "base.train.max_steps=4", "base.train.batch_size=4",
    "base.train.eval_every=4", "base.train.log_every=2", "base.train.warmup_steps=1",
]


def _pg(dbname: str = "postgres"):
    import psycopg2

    return psycopg2.connect(host=PG["PGHOST"], port=PG["PGPORT"], user=PG["PGUSER"], dbname=dbname,
                            connect_timeout=5)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    try:
        _pg().close()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG['PGHOST']}:{PG['PGPORT']}: {exc}")
        pytest.skip(f"PostgreSQL is not reachable at {PG['PGHOST']}:{PG['PGPORT']}: {exc}")
    tag = uuid.uuid4().hex[:8]
    infra = tmp_path_factory.mktemp("infra")
    env = clean_env(**PG, ALIGNFLOW_INFRA_DIR=str(infra), MLFLOW_PORT=str(free_port()),
                    PREFECT_PORT=str(free_port()), ALIGNFLOW_MLFLOW_DB=f"af_test_{tag}_mlflow",
                    ALIGNFLOW_PREFECT_DB=f"af_test_{tag}_prefect")
    try:
        up = subprocess.run(["bash", str(REPO / "infra" / "local-up.sh")], env=env, capture_output=True, text=True,
                            timeout=420)
        assert up.returncode == 0, up.stdout + up.stderr
        settings = dict(line.removeprefix("export ").split("=", 1)
                        for line in (infra / "env.sh").read_text().splitlines() if line.startswith("export "))
        yield {"env": env, "infra": infra, "settings": settings, "up": up.stdout}
    finally:
        subprocess.run(["bash", str(REPO / "infra" / "local-down.sh")], env=env, capture_output=True, timeout=120)
        conn = _pg()
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in (env["ALIGNFLOW_MLFLOW_DB"], env["ALIGNFLOW_PREFECT_DB"]):
                cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.close()


@pytest.mark.slow
def test_local_up_binds_loopback_and_writes_settings(servers):
    s = servers["settings"]
    assert s["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    assert s["PREFECT_API_URL"].startswith("http://127.0.0.1:") and s["PREFECT_API_URL"].endswith("/api")
    assert "postgresql://" in servers["up"]


@pytest.mark.slow
def test_pipeline_in_server_mode_on_postgresql(servers, tmp_path):
    s, env = servers["settings"], servers["env"]
    work = tmp_path / "work"
    run_env = clean_env(**s, PREFECT_HOME=str(tmp_path / "client-home"))
    args = [str(BIN / "alignflow"), "pipeline", "--workdir", str(work)]
    for item in TINY:
        args += ["--set", item]
    proc = subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert f"MLflow UI: {s['MLFLOW_TRACKING_URI']}/#/experiments/" in proc.stdout
    assert not (work / "mlflow.db").exists(), "server mode must not fall back to the embedded SQLite store"

    # MLflow, through its server: the parent run, its nested stages, the registered model
    client = mlflow.MlflowClient(tracking_uri=s["MLFLOW_TRACKING_URI"], registry_uri=s["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("alignflow/server-mode")
    [parent] = client.search_runs([exp.experiment_id], filter_string="tags.`alignflow.stage` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["alignflow.stage"] for r in children) == ["base", "ingest"]
    base = next(r for r in children if r.data.tags["alignflow.stage"] == "base")
    assert "train/loss" in base.data.metrics
    version = client.get_model_version_by_alias("alignflow-base", "challenger")
    assert str(version.version) == "1"
    # artifacts went through the tracking server into its artifact folder
    assert any((servers["infra"] / "mlartifacts").rglob("model.safetensors"))

    # the stores really are PostgreSQL
    with _pg(env["ALIGNFLOW_MLFLOW_DB"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'")
        assert cur.fetchone()[0] >= 3
        cur.execute("SELECT count(*) FROM registered_models WHERE name = 'alignflow-base'")
        assert cur.fetchone()[0] == 1
    with _pg(env["ALIGNFLOW_PREFECT_DB"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
        states = {(name, str(state)) for name, state in cur.fetchall()}
        assert ("pipeline", "COMPLETED") in states and ("base", "COMPLETED") in states, states
        cur.execute("SELECT id::text FROM flow_run")
        flow_run_ids = {row[0] for row in cur.fetchall()}
    # every stage run links to its Prefect flow run
    assert {r.data.tags["prefect.flow_run_id"] for r in children} <= flow_run_ids


def test_docker_compose_describes_the_same_server_mode():
    import yaml

    spec = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "worker"} <= set(services)
    for name in ("postgres", "minio", "mlflow", "prefect-server"):
        for port in services[name]["ports"]:
            assert port.startswith("${ALIGNFLOW_BIND:-127.0.0.1}:"), (name, port)
    mlflow_cmd = " ".join(services["mlflow"]["command"].split())
    assert "--backend-store-uri postgresql+psycopg2://" in mlflow_cmd and "--artifacts-destination s3://mlflow" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")
    worker = services["worker"]["environment"]
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "infra/prefect.yaml" in services["deploy"]["command"]
