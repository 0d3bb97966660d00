"""Process environment for the embedded default, set before Prefect or MLflow is imported.

Everything a run writes stays in the work directory: Prefect's home (its
SQLite database when no server is configured) and its result storage. A user
who points ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` at servers keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path


def prepare(workdir: str | Path) -> Path:
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server can take longer than the default 20 s to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(workdir / "prefect" / "storage"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return workdir
