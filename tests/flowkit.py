"""Helpers shared by the end-to-end flow tests: CLI overrides and the MLflow store of a work directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import mlflow


def set_args(*groups: Iterable[str]) -> list[str]:
    """``--set k=v`` arguments for every override of every group, in order."""
    out: list[str] = []
    for group in groups:
        for item in group:
            out += ["--set", item]
    return out


def work_client(work: Path) -> mlflow.MlflowClient:
    """An MLflow client on the work directory's embedded store."""
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(work) / 'mlflow.db'}")


def stage_runs(work: Path, stage: str, experiment: str = "alignflow/demo") -> list:
    """The runs of one stage (tag ``alignflow.stage``), newest first."""
    client = work_client(work)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`alignflow.stage` = '{stage}'",
                              order_by=["attribute.start_time DESC"])


def cli(work: Path, *args: str) -> list[str]:
    """The installed ``alignflow`` command with ``args`` on a work directory (for subprocess runs)."""
    return [str(Path(sys.executable).parent / "alignflow"), *args, "--workdir", str(work)]


def generate_in_fresh_process(work: Path, model: str, prompt: str, max_new_tokens: int) -> subprocess.CompletedProcess:
    """Load ``models:/<model>@challenger`` as an MLflow transformers pipeline in a new interpreter and greedy-generate;
    stdout has ``GENERATED <pipeline class> <tail of the text>``."""
    code = (
        "import mlflow\n"
        f"pipe = mlflow.transformers.load_model('models:/{model}@challenger')\n"
        f"out = pipe({prompt!r}, max_new_tokens={max_new_tokens}, do_sample=False)\n"
        "print('GENERATED', type(pipe).__name__, repr(out[0]['generated_text'][-40:]))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{Path(work) / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@contextlib.contextmanager
def tracking_restored():
    """Leave MLflow's tracking URI, in this process and in the environment its subprocesses inherit, as it was.

    ``mlflow.set_tracking_uri(previous)`` is not that: it writes ``previous`` (perhaps MLflow's default store)
    into ``MLFLOW_TRACKING_URI``, and every later stage command started by a test would then track there."""
    import mlflow

    from alignflow.tasks import tracking

    keys = ("MLFLOW_TRACKING_URI", tracking._EMBEDDED_MARK)
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None: unset, in MLflow and in the environment
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def kill_child_when_seen(marker: str, killed: list[int], timeout: float = 60.0, poll: float = 0.02) -> None:
    """SIGKILL the first process under this one whose command line holds ``marker`` (e.g. a worker's ``-c``
    code), as soon as it appears; its pid goes to ``killed``. Meant to run on a thread beside the code that
    starts the process; returns after ``timeout`` seconds if none appears."""
    import signal
    import time

    import psutil

    me = psutil.Process()
    deadline = time.time() + timeout
    while time.time() < deadline and not killed:
        for child in me.children(recursive=True):
            try:
                if marker in " ".join(child.cmdline()):
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)
                    return
            except psutil.Error:
                pass
        time.sleep(poll)
