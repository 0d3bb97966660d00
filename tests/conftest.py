"""Shared test setup: offline Prefect and MLflow inside temporary folders, the real fixture dumps."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports prefect: offline, and nothing written to ~/.prefect.
_PREFECT_HOME = tempfile.mkdtemp(prefix="alignflow-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
# One test file per core (pytest-xdist): each process, and the commands it starts, computes on one thread, so that
# two files training small models side by side do not fight over the same two cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

# The test process's own Prefect home starts from the migrated empty database, as a command's work directory does.
from alignflow.tasks.store_templates import seed  # noqa: E402  (no Prefect import: the settings above stay in force)

seed("prefect", Path(_PREFECT_HOME) / "prefect.db")

REPO = Path(__file__).resolve().parents[1]
# Real Stack Exchange dumps, copied with their CC BY-SA attribution (tests/fixtures/README.md).
FIXTURES = REPO / "tests" / "fixtures" / "stackexchange"
CONLANG = FIXTURES / "conlang.meta-2020"
DATASCIENCE = FIXTURES / "datascience.meta-2024"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (CONLANG / "Posts.xml").is_file() or not (DATASCIENCE / "Posts.xml").is_file():
        pytest.fail(f"the real dumps are missing from {FIXTURES}: they are part of the repository")
    return FIXTURES


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (starting one costs ~10 s). Its flow runs send no
    heartbeats, as a command's on its temporary server (``flow_run_settings``)."""
    from prefect.testing.utilities import prefect_test_harness

    from alignflow.flows.environment import flow_run_settings

    with prefect_test_harness(server_startup_timeout=120), flow_run_settings():
        yield


# The slowest test files start first. `make test` runs one file per core (pytest-xdist, --dist loadfile, and
# --no-loadscope-reorder, which keeps this order instead of xdist's own by number of tests): a long file that
# starts last keeps one core busy while the other has nothing left. Seconds per file come from a recorded run
# (tests/file_durations.json, refreshed by `make test-durations`); a file not in it counts as a short one.
FILE_SECONDS = REPO / "tests" / "file_durations.json"


def pytest_collection_modifyitems(config, items):
    try:
        seconds = json.loads(FILE_SECONDS.read_text())
    except (OSError, ValueError):
        return
    first: dict[str, int] = {}
    for item in items:
        first.setdefault(item.nodeid.split("::")[0], len(first))

    def key(item):
        path = item.nodeid.split("::")[0]
        return -float(seconds.get(path, 0.0)), first[path]

    items.sort(key=key)  # stable: a file's tests keep their order
