"""After a SIGKILL: the next run removes the dead process's temporary folders, ends its MLflow run as KILLED,
and Prefect's temporary server does not outlive the killed command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from alignflow.tasks import tracking
from alignflow.tasks.ingest.run import remove_dead_temporaries
from flowkit import tracking_restored


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    gone, mine = dead_pid(), os.getpid()
    (tmp_path / f".abc.tmp-{gone}").mkdir()
    (tmp_path / f".abc.tmp-{gone}" / "staging.sqlite").write_bytes(b"x" * 100)
    (tmp_path / f".LATEST.tmp-{gone}").write_text("abc\n")
    (tmp_path / f".abc.tmp-{mine}").mkdir()
    (tmp_path / "abc").mkdir()
    removed = remove_dead_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".abc.tmp-{gone}", f".LATEST.tmp-{gone}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".abc.tmp-{mine}", "abc"])


def test_runs_of_dead_processes_are_marked_killed(tmp_path):
    with tracking_restored():
        exp = tracking.configure(tmp_path, "kills")
        client = mlflow.MlflowClient()
        host = {"alignflow.host": __import__("socket").gethostname()}
        orphan = client.create_run(exp, tags={**host, "alignflow.pid": str(dead_pid())})
        alive = client.create_run(exp, tags={**host, "alignflow.pid": str(os.getpid())})
        elsewhere = client.create_run(exp, tags={"alignflow.host": "another-host", "alignflow.pid": str(dead_pid())})
        assert tracking.configure(tmp_path, "kills") == exp
        status = {r: client.get_run(r.info.run_id).info.status for r in (orphan, alive, elsewhere)}
        assert status == {orphan: "KILLED", alive: "RUNNING", elsewhere: "RUNNING"}


def _servers_of(parent: int) -> list[int]:
    from alignflow.flows.reaper import _children_servers

    return list(_children_servers(parent))


@pytest.mark.slow
def test_temporary_server_dies_with_a_killed_command(fixtures_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    exe = Path(sys.executable).parent / "alignflow"
    proc = subprocess.Popen([str(exe), "ingest", str(fixtures_dir / "conlang.meta-2020"), "--workdir",
                             str(tmp_path / "w")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers: list[int] = []
    deadline = time.monotonic() + 240
    while not servers and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        servers = _servers_of(proc.pid)
    assert servers, "no temporary server was started"
    time.sleep(1.0)  # the reaper polls twice a second
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in servers):
        time.sleep(0.2)
    left = [pid for pid in servers if Path(f"/proc/{pid}").exists()]
    for pid in left:  # do not leave it running even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, "the temporary Prefect server outlived the killed command"


@pytest.mark.slow
def test_ingest_killed_mid_build_then_rerun(tmp_path):
    """SIGKILL while the datasets are being built; the rerun cleans up, ends the killed run as KILLED and
    builds the same datasets as an ingest that was never interrupted."""
    from alignflow.config import IngestConfig
    from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
    from alignflow.tasks.ingest.synthetic import generate_dump

    dump = generate_dump(tmp_path / "dump", questions=3000, seed=3)
    work = tmp_path / "w"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = [str(Path(sys.executable).parent / "alignflow"), "ingest", str(dump), "--workdir", str(work)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    building = []
    while not building and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if (work / "data" / "ingest").is_dir():
            building = list((work / "data" / "ingest").glob(f".*.tmp-{proc.pid}"))
    assert building and proc.poll() is None, "the ingest ended before it could be killed"
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert building[0].exists()  # what the killed process left

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not list((work / "data" / "ingest").glob(".*.tmp-*"))
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("alignflow/demo").experiment_id],
                              order_by=["attribute.start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]

    import json

    cfg = IngestConfig()
    straight = execute_ingest(plan_ingest([dump], tmp_path / "straight", cfg), cfg)
    latest = work / "data" / "ingest" / (work / "data" / "ingest" / "LATEST").read_text().strip()
    rerun = json.loads((latest / "manifest.json").read_text())["datasets"]
    assert {k: v["digest"] for k, v in rerun.items()} == {k: v["digest"] for k, v in straight.datasets.items()}


_CREATE_STORE = """
import sys, time
from pathlib import Path
from alignflow.tasks import tracking
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
print(tracking.configure(Path(sys.argv[1]), "race"))
"""


@pytest.mark.slow
def test_two_processes_creating_a_new_store_at_once(tmp_path):
    """Both first runs on an empty work directory succeed, agree on one experiment and leave a usable store
    (table creation is serialised by the store's file lock)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ALIGNFLOW_"))}
    work = tmp_path / "w"
    start = time.time() + 8  # both interpreters have imported mlflow by then
    procs = [subprocess.Popen([sys.executable, "-c", _CREATE_STORE, str(work), str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(ids) == 1
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    assert [e.experiment_id for e in client.search_experiments(filter_string="name = 'race'")] == list(ids)
    run = client.create_run(ids.pop())
    client.log_metric(run.info.run_id, "m", 1.0)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
