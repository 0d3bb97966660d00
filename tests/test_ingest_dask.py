"""``ingest.runner=dask``: byte ranges read as Prefect task runs on a Dask cluster, identical datasets.

Two generated sites are ingested by one local process and on Dask: on a
2-worker ``distributed.LocalCluster`` this test starts (``ingest.address``),
and on the cluster alignflow starts itself when no address is given. The
datasets must be byte-identical (their digests) with the same row accounting.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignflow.config import load_config
from alignflow.tasks.ingest.distributed import check_workers, scheduler_endpoint, worker_problems
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
from alignflow.tasks.ingest.synthetic import generate_dump

# The cluster runs in a process of its own started with `python -c`: multiprocessing's spawn then has no main
# script to re-run in the workers (the test runner's may lack an `if __name__ == "__main__"` guard).
CLUSTER = """
import sys
from distributed import LocalCluster
with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                  scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cluster:
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def run(sources, workdir: Path, *overrides: str):
    cfg = load_config(None, list(overrides)).ingest
    plan = plan_ingest([str(s) for s in sources], workdir, cfg)
    return execute_ingest(plan, cfg)


def digests(result) -> dict[str, str]:
    return {k: v["digest"] for k, v in result.datasets.items()}


def accounting(report: dict) -> dict:
    return {k: report[k] for k in ("files", "pairs", "datasets", "score_source", "adds_up")}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("dumps")
    return [generate_dump(out, questions=60, seed=1, site="one.stackexchange.com"),
            generate_dump(out, questions=60, seed=2, site="two.stackexchange.com")]


@pytest.fixture(scope="module")
def local(sites, tmp_path_factory):
    return run(sites, tmp_path_factory.mktemp("local"), "ingest.workers=1")


@pytest.fixture(scope="module")
def cluster():
    """The scheduler address of a 2-worker LocalCluster on 127.0.0.1, closed after the module's tests."""
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), f"the cluster did not start (exit {proc.poll()})"
        yield address
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # a Dask cluster or a CLI process: about a minute each on 2 busy cores
def test_a_running_cluster_gives_identical_datasets(sites, local, cluster, tmp_path, prefect_harness):
    dask = run(sites, tmp_path, "ingest.runner=dask", f"ingest.address={cluster}", "ingest.range_mb=0.02")
    assert not dask.cache_hit
    assert digests(dask) == digests(local)
    assert accounting(dask.report) == accounting(local.report)
    assert local.datasets["pairs"]["rows"] > 0 and len(local.report["files"]) == 4  # both sites, both tables
    # runner and address say how the work is spread, not what it gives: the same datasets are found again
    again = run(sites, tmp_path, "ingest.workers=1")
    assert again.cache_hit and digests(again) == digests(local)


@pytest.mark.slow  # a Dask cluster or a CLI process: about a minute each on 2 busy cores
def test_without_an_address_a_local_cluster_is_started(sites, local, tmp_path, prefect_harness):
    dask = run(sites, tmp_path, "ingest.runner=dask", "ingest.workers=2", "ingest.range_mb=0.05")
    assert digests(dask) == digests(local)
    assert accounting(dask.report) == accounting(local.report)


@pytest.mark.slow  # a Dask cluster or a CLI process: about a minute each on 2 busy cores
def test_a_worker_that_cannot_read_a_source_is_one_error(cluster, tmp_path, prefect_harness):
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    readable = tmp_path / "Posts.xml"
    readable.write_bytes(b"<posts/>\n")
    with Client(cluster, timeout="30s") as client:
        assert check_workers(client, [str(readable)], PREFECT_API_URL.value()) == 2  # two threads in all
        with pytest.raises(IngestError) as err:
            check_workers(client, [str(readable), str(tmp_path / "elsewhere" / "Posts.xml")], PREFECT_API_URL.value())
    message = str(err.value)
    assert message.startswith("Dask worker tcp://127.0.0.1:")
    assert f"cannot read {tmp_path / 'elsewhere' / 'Posts.xml'}" in message and "shared filesystem" in message
    assert "\n" not in message


def test_worker_problems_names_the_path_and_the_api():
    assert worker_problems([__file__], None) == []
    problems = worker_problems(["/nonexistent/Posts.xml"], f"http://127.0.0.1:{free_port()}/api")
    assert problems[0].startswith("cannot read /nonexistent/Posts.xml (No such file or directory)")
    assert problems[1].startswith("cannot reach Prefect's API at http://127.0.0.1:") and "PREFECT_API_URL" in problems[1]


@pytest.mark.parametrize("address, endpoint", [("tcp://10.0.0.5:8786", ("10.0.0.5", 8786)),
                                               ("scheduler:8786", ("scheduler", 8786))])
def test_scheduler_endpoint(address, endpoint):
    assert scheduler_endpoint(address) == endpoint


@pytest.mark.parametrize("address", ["tcp://host", "http://host:8786", "tcp://host:port", "tcp://:8786"])
def test_malformed_address_is_a_user_error(address):
    with pytest.raises(IngestError, match="not a Dask scheduler address"):
        scheduler_endpoint(address)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a Dask cluster or a CLI process: about a minute each on 2 busy cores
def test_unreachable_address_is_one_line_from_the_cli(sites, tmp_path, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    address = f"tcp://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(Path(sys.executable).parent / "alignflow"), "ingest", *map(str, sites), "--workdir",
                           "w", "--set", "ingest.runner=dask", "--set", f"ingest.address={address}"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot reach the Dask scheduler at {address} (ingest.address): ")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not list((tmp_path / "w" / "data" / "ingest").glob("[!.]*"))  # nothing built, no LATEST


def test_the_local_cluster_lives_in_its_own_process_group_and_ends_with_its_block():
    import psutil

    from alignflow.tasks.ingest.dask_cluster import local_cluster

    me = psutil.Process()
    with local_cluster(1) as address:
        host, port = scheduler_endpoint(address)
        socket.create_connection((host, port), timeout=10).close()  # the scheduler answers
        cluster = [p for p in me.children(recursive=True) if "dask" in " ".join(p.cmdline())]
        assert cluster  # the host and its scheduler and worker
        # none in this process's group: the terminal's Ctrl-C reaches the command only
        assert all(os.getpgid(p.pid) != os.getpgid(0) for p in cluster)
    gone, alive = psutil.wait_procs(cluster, timeout=10)
    assert not alive


def test_the_local_clusters_scheduler_and_workers_close_once_their_host_is_killed():
    """A ``kill -9`` of the host (with the command, or the OOM killer) leaves nobody to close the cluster: its
    scheduler and workers watch their host and close themselves. Before, they ran on."""
    import psutil

    from alignflow.tasks.ingest.dask_cluster import local_cluster

    me = psutil.Process()
    with local_cluster(2) as address:
        socket.create_connection(scheduler_endpoint(address), timeout=10).close()
        (host,) = [p for p in me.children() if "dask_cluster import serve" in " ".join(p.cmdline())]
        deadline = time.monotonic() + 60
        while len(host.children()) < 3 and time.monotonic() < deadline:  # the scheduler and both workers
            time.sleep(0.1)
        cluster = host.children()
        assert len(cluster) == 3, [p.cmdline() for p in cluster]
        time.sleep(1.0)  # their watch has begun (it starts as each finishes its start)
        host.kill()
        gone, alive = psutil.wait_procs(cluster, timeout=30)
        for p in alive:  # do not leave them running even when the test fails
            p.kill()
        assert not alive, f"{len(alive)} of the scheduler and workers outlived their host"


def test_a_local_cluster_that_cannot_start_is_one_error(monkeypatch):
    from alignflow.tasks.ingest import dask_cluster

    monkeypatch.setattr(dask_cluster, "host_command", lambda workers: [sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(IngestError, match=r"local Dask cluster .* did not start .*exit status 3"):
        with dask_cluster.local_cluster(2):
            pass
