"""A command's start-up: migrated empty stores copied into new work directories (tasks/store_templates.py),
Prefect's temporary server started early (flows/environment.py)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from alignflow.tasks import store_templates as st


def _fake_template(path, revision="abc123"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # as the real build does: a new file renamed over the old one
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE alembic_version (version_num TEXT)")
        db.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(st.CACHE_ENV, str(tmp_path / "cache"))
    return st.cache_dir()


def test_seed_copies_the_template_once_and_never_replaces_a_database(tmp_path, cache, monkeypatch):
    template = _fake_template(st.template_path("mlflow"))
    monkeypatch.setattr(st, "_build_in_child", lambda folder: pytest.fail("a usable template is not rebuilt"))
    dest = tmp_path / "work" / "mlflow.db"
    assert st.seed("mlflow", dest)
    assert dest.read_bytes() == template.read_bytes()
    with sqlite3.connect(dest) as db:  # the work directory's database goes its own way from here
        db.execute("CREATE TABLE runs (id TEXT)")
    assert not st.seed("mlflow", dest)
    with sqlite3.connect(dest) as db:
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'runs'").fetchone()[0] == 1
    assert not list(dest.parent.glob(".*.tmp")), "no temporary copy left behind"


def test_an_unusable_template_is_rebuilt_and_a_failed_build_leaves_the_store_to_migrate_itself(
        tmp_path, cache, monkeypatch):
    bad = st.template_path("prefect")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"half a database")  # an interrupted copy, a full disk
    assert not st.is_usable(bad)
    calls = []

    def build_fails(folder):
        calls.append(folder)
        raise subprocess.CalledProcessError(1, ["python"], stderr=b"no space left")

    monkeypatch.setattr(st, "_build_in_child", build_fails)
    dest = tmp_path / "home" / "prefect.db"
    assert not st.seed("prefect", dest)
    assert calls == [cache] and not dest.exists()

    monkeypatch.setattr(st, "_build_in_child", lambda folder: _fake_template(st.template_path("prefect", folder)))
    assert st.seed("prefect", dest) and st.is_usable(dest)


def test_template_names_follow_the_installed_library_versions(cache):
    from importlib.metadata import version

    assert st.template_path("prefect").name == f"prefect-{version('prefect')}.sqlite"
    assert st.template_path("mlflow").name == f"mlflow-{version('mlflow')}.sqlite"
    with pytest.raises(ValueError, match="unknown store kind"):
        st.template_path("postgres")


@pytest.mark.slow
def test_built_templates_are_at_the_libraries_latest_revision(tmp_path):
    """The real migrations (what make install runs): MLflow opens a copy without migrating it."""
    import mlflow.store.db.utils as mlflow_db
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path / "templates"
    st._build_in_child(folder)  # a fresh interpreter, as on first need: Prefect reads its settings at import
    built = {kind: st.template_path(kind, folder) for kind in st.KINDS}
    assert all(st.is_usable(p) for p in built.values())
    stamps = {kind: p.stat().st_mtime_ns for kind, p in built.items()}
    st._build_in_child(folder)
    assert {kind: p.stat().st_mtime_ns for kind, p in built.items()} == stamps, "usable templates are kept"
    with sqlite3.connect(built["mlflow"]) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == \
            mlflow_db._get_latest_schema_revision()
        assert db.execute("SELECT count(*) FROM experiments").fetchone()[0] == 0  # MLflow makes its default one
    work = tmp_path / "work"
    work.mkdir()
    (work / "mlflow.db").write_bytes(built["mlflow"].read_bytes())
    store = SqlAlchemyStore(f"sqlite:///{work / 'mlflow.db'}", (work / "mlruns").as_uri())
    exp = store.create_experiment("e", artifact_location=(work / "art").as_uri())
    assert store.get_experiment(exp).name == "e"
    store.engine.dispose()
    with sqlite3.connect(built["prefect"]) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"flow", "flow_run", "task_run", "deployment"} <= tables


def test_a_configured_prefect_server_or_database_gets_no_template(monkeypatch, tmp_path):
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert st.prefect_database_file() is None
    with temporary_settings({PREFECT_SERVER_DATABASE_CONNECTION_URL: "postgresql+asyncpg://u@127.0.0.1/db"}):
        assert st.prefect_database_file() is None
    db = tmp_path / "home" / "prefect.db"
    # (an earlier test in this process may have started Prefect's temporary server, which sets the API URL)
    with temporary_settings({PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{db}"},
                            restore_defaults={PREFECT_API_URL}):
        assert st.prefect_database_file() == db


DEFAULT_DATABASE = r"""
import json
from alignflow.tasks import store_templates as st
without_prefect = st.default_database_file()
import prefect.settings  # noqa: F401  loaded: prefect_database_file now asks Prefect's settings
print(json.dumps({"without_prefect": str(without_prefect) if without_prefect else None,
                  "prefect": str(st.prefect_database_file() or "")}))
"""


@pytest.mark.parametrize("setup", ["nothing", "api_url", "profiles", "dotenv", "prefect_toml", "pyproject"])
def test_the_database_file_found_without_prefect_is_prefects_own(tmp_path, setup):
    """With nothing but PREFECT_HOME configured, the file is found without importing Prefect and is the one
    Prefect's settings give; each other source of Prefect settings sends the question to Prefect, which
    indeed answers differently for it."""
    import json
    import os
    import sys

    home, cwd, other = tmp_path / "home", tmp_path / "cwd", tmp_path / "other.db"
    home.mkdir()
    cwd.mkdir()
    url = f"sqlite+aiosqlite:///{other}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if setup == "api_url":
        env["PREFECT_API_URL"] = "http://127.0.0.1:4200/api"
    elif setup == "profiles":
        (home / "profiles.toml").write_text(f'active = "x"\n\n[profiles.x]\nPREFECT_SERVER_DATABASE_CONNECTION_URL = "{url}"\n')
    elif setup == "dotenv":
        (cwd / ".env").write_text(f"PREFECT_SERVER_DATABASE_CONNECTION_URL={url}\n")
    elif setup == "prefect_toml":
        (cwd / "prefect.toml").write_text(f'[server.database]\nconnection_url = "{url}"\n')
    elif setup == "pyproject":
        (cwd / "pyproject.toml").write_text(f'[tool.prefect.server.database]\nconnection_url = "{url}"\n')
    out = subprocess.run([sys.executable, "-c", DEFAULT_DATABASE], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if setup == "nothing":
        assert got == {"without_prefect": str(home / "prefect.db"), "prefect": str(home / "prefect.db")}
    else:
        assert got["without_prefect"] is None
        assert got["prefect"] == ("" if setup == "api_url" else str(other))


EARLY_SERVER = r"""
import json, os, socket, sys
from alignflow.flows.environment import (
    _SERVER, prepare, start_prefect_server, wait_for_prefect_server, TEMPORARY_API_ENV, flow_run_settings)
prepare(sys.argv[1])
start_prefect_server()
from prefect import flow
from prefect.settings import get_current_settings

@flow
def hello():
    return 7, get_current_settings().flows.heartbeat_frequency

wait_for_prefect_server()
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    api = str(client.api_url)
    runs = client.read_flow_runs()
    types_at_start = len(client.read_block_types())
    triggers = client.request("GET", "/admin/settings").json()["server"]["services"]["triggers"]["enabled"]
with flow_run_settings():
    result, heartbeat = hello()
Secret(value="s3cr3t").save("alignflow-test")  # a block saved and loaded back through the temporary server
loaded = Secret.load("alignflow-test").get()
with get_client(sync_client=True) as client:
    types_after = [t.slug for t in client.read_block_types()]
print(json.dumps({"result": result, "heartbeat": heartbeat,
                  "heartbeat_after": get_current_settings().flows.heartbeat_frequency, "api": api, "env": os.environ["PREFECT_API_URL"],
                  "mark": os.environ[TEMPORARY_API_ENV], "runs_before": len(runs),
                  "server_modules_here": "prefect.server.api.server" in sys.modules,
                  "types_at_start": types_at_start, "types_after": types_after, "loaded": loaded,
                  "triggers": triggers, "nodelay": _SERVER[0].sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)}))
"""


def test_a_command_starts_prefects_server_early_and_stops_it_on_exit(tmp_path):
    """The server boots while the command imports its flow, on a new home seeded from the template;
    this process never imports Prefect's server, its children would get the URL, and exit stops it."""
    import json
    import os
    import sys

    from alignflow.flows.reaper import _children_servers

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen([sys.executable, "-c", EARLY_SERVER, str(tmp_path / "w")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    servers: set[int] = set()
    while proc.poll() is None:
        servers |= set(_children_servers(proc.pid))
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    got = json.loads(out.strip().splitlines()[-1])
    assert got["result"] == 7 and got["runs_before"] == 0
    # the flow run on the temporary server sent no heartbeats; the setting is back afterwards
    assert got["heartbeat"] is None and got["heartbeat_after"] == 180
    # the server registered no block type on start (SERVER_SETTINGS); saving a block registered its own
    assert got["types_at_start"] == 0 and got["types_after"] == ["secret"] and got["loaded"] == "s3cr3t"
    assert got["triggers"] is False  # no automations' services on a server that lives as long as the command
    # replies are not held back by Nagle's algorithm (the connections inherit it: test below)
    assert got["nodelay"] != 0
    assert got["api"].rstrip("/") == got["env"] == got["mark"] and got["env"].startswith("http://127.0.0.1:")
    assert not got["server_modules_here"], "the command imported Prefect's server instead of only starting it"
    assert (tmp_path / "w" / "prefect" / "prefect.db").is_file()
    assert len(servers) == 1, "one temporary server, started by the command"
    assert not any(Path(f"/proc/{pid}").exists() for pid in servers), "the server outlived the command"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inheritance checked is Linux's")
def test_connections_accepted_on_a_nodelay_socket_send_without_nagle():
    """What the temporary server's socket relies on: uvicorn takes the listening socket as it is (``--fd``) and
    asyncio sets nothing on the connections it accepts there, so they must inherit TCP_NODELAY from it."""
    import socket

    for nodelay in (1, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, nodelay)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            with socket.create_connection(listener.getsockname()):
                accepted, _ = listener.accept()
                with accepted:
                    assert bool(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) == bool(nodelay)


KILLED_SERVER = r"""
import json, os, signal, sys, time
from alignflow.flows import environment
from alignflow.flows.environment import prepare, start_prefect_server, wait_for_prefect_server, flow_run_settings
prepare(sys.argv[1])
start_prefect_server()
from prefect import flow, task

@task
def double(x):
    return 2 * x

@flow
def work(x):
    return double(x)

wait_for_prefect_server()
server = environment._SERVER[0]
first = server.proc.pid
with flow_run_settings():
    before = work(1)
    server.proc.kill()  # between two flow runs: the next one's first requests wait in the backlog for the new server
    after = work(2)
pids = [first, server.proc.pid]
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    states = sorted(r.state_type.value for r in client.read_flow_runs())
print(json.dumps({"before": before, "after": after, "restarts": server.restarts, "pids": pids, "states": states}))
"""


def test_a_temporary_server_that_dies_is_started_again_and_the_command_goes_on(tmp_path):
    """A temporary server killed while the command runs: a new one starts on the same socket and database, the
    flow runs complete (their states are on the new server), the user sees one warning, and exit stops it."""
    import json
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([sys.executable, "-c", KILLED_SERVER, str(tmp_path / "w")], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got["before"], got["after"]) == (2, 4)
    assert got["restarts"] == 1 and got["pids"][0] != got["pids"][1]
    assert got["states"] == ["COMPLETED", "COMPLETED"]  # the run before the kill is in the same database
    warnings = [line for line in proc.stderr.splitlines() if "temporary server exited" in line]
    assert len(warnings) == 1 and "starting it again" in warnings[0], proc.stderr[-3000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in got["pids"]), "a server outlived the command"


def test_flow_runs_send_heartbeats_only_to_a_server_the_user_runs(monkeypatch):
    """A temporary server (Prefect's own, or the command's) stops with the command: its runs send no
    heartbeats. A server the user runs gets them as configured."""
    from prefect.settings import get_current_settings, temporary_settings

    from alignflow.flows.environment import TEMPORARY_API_ENV, flow_run_settings, on_temporary_server

    ours, users = "http://127.0.0.1:9/api", "http://127.0.0.1:4200/api"
    cases = [({}, True), ({TEMPORARY_API_ENV: ours, "PREFECT_API_URL": ours}, True),
             ({"PREFECT_API_URL": users}, False), ({TEMPORARY_API_ENV: ours, "PREFECT_API_URL": users}, False)]
    # a configured frequency (this process may be inside the tests' shared server's settings, which have none)
    with temporary_settings(updates={"flows.heartbeat_frequency": 120}):
        for env, temporary in cases:
            for name in ("PREFECT_API_URL", TEMPORARY_API_ENV):
                monkeypatch.delenv(name, raising=False)
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            assert on_temporary_server() is temporary, env
            with flow_run_settings():
                assert get_current_settings().flows.heartbeat_frequency == (None if temporary else 120), env
            assert get_current_settings().flows.heartbeat_frequency == 120


def test_a_temporary_server_that_cannot_start_is_one_error_line_and_exit_2(tmp_path, fixtures_dir):
    """A work directory whose Prefect database is not one (a corrupt file): one line naming the database and
    the server's log, exit 2; the server's own traceback is in that log, not on the console."""
    import os
    import sys

    work = tmp_path / "w"
    (work / "prefect").mkdir(parents=True)
    (work / "prefect" / "prefect.db").write_bytes(b"not a database\n" * 1000)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false")
    exe = Path(sys.executable).parent / "alignflow"
    proc = subprocess.run([str(exe), "ingest", str(fixtures_dir / "conlang.meta-2020"), "--workdir", str(work)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Prefect's temporary server exited with code"), proc.stderr[-3000:]
    assert str(work / "prefect" / "prefect.db") in last
    log = work / "prefect" / "server.log"
    assert f"its messages: {log}" in last
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert "Traceback" in log.read_text()  # the server's reason, kept
