"""MLflow conventions shared by every stage.

- Tracking URI: ``MLFLOW_TRACKING_URI`` when set (server mode), else
  ``sqlite:///<workdir>/mlflow.db`` (the embedded default).
- One experiment per pipeline name, created with its artifact location inside
  the work directory (MLflow's default would be ``./mlruns`` of whatever folder
  the user stands in).
- Stage runs are tagged ``alignflow.stage``, ``prefect.flow_run_id`` and
  ``git.commit``; params are the stage's whole validated config, flattened.
- Datasets are logged as run inputs with their content digest.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import posixpath
import re
import socket
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

from alignflow.config import flatten
from alignflow.tasks.processes import file_lock, process_alive, process_tags

MAX_PARAM_CHARS = 6000


_EMBEDDED_MARK = "ALIGNFLOW_EMBEDDED_TRACKING_URI"


def user_tracking_uri() -> str | None:
    """The tracking server the user configured, if any.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into the
    environment, so a URI alignflow set for one work directory must not be
    mistaken for the user's choice when another work directory comes next.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri == os.environ.get(_EMBEDDED_MARK):
        return None
    return uri or None


def tracking_uri_for(workdir: Path) -> str:
    return user_tracking_uri() or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def configure(workdir: Path, experiment: str) -> str:
    """Point MLflow at the work directory (unless a server is configured); return the experiment id."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    embedded = user_tracking_uri() is None
    uri = tracking_uri_for(workdir)
    mlflow.set_tracking_uri(uri)
    if embedded:
        os.environ[_EMBEDDED_MARK] = uri
    # The first access creates mlflow.db's tables; two processes doing it at once fail ("table already
    # exists"), so the embedded store is created and its experiment looked up under a file lock.
    with file_lock(workdir / ".mlflow.lock") if embedded else contextlib.nullcontext():
        if embedded:  # a new work directory: the migrated empty store instead of migrating one here
            from alignflow.tasks.store_templates import seed

            seed("mlflow", workdir / "mlflow.db")
        experiment_id = _set_experiment(workdir, experiment, embedded)
    end_orphaned_runs(experiment_id)
    return experiment_id


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark ``KILLED`` the runs still ``RUNNING`` whose process (on this host) is gone: a SIGKILL gives a run
    no chance to end itself. Returns their ids."""
    client = mlflow.MlflowClient()
    host = socket.gethostname().replace("'", "")
    try:
        runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                  f"tags.`alignflow.host` = '{host}'", max_results=1000)
    except mlflow.exceptions.MlflowException:
        return []
    ended = []
    for run in runs:
        pid = run.data.tags.get("alignflow.pid", "")
        if pid.isdigit() and not process_alive(int(pid)):
            client.set_tag(run.info.run_id, "alignflow.ended_by", "process gone; marked KILLED by a later run")
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended




def _set_experiment(workdir: Path, experiment: str, embedded: bool) -> str:
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is None:
        artifact_location = (workdir / "mlartifacts").as_uri() if embedded else None
        try:
            experiment_id = mlflow.create_experiment(experiment, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException:
            # another process created it between our lookup and create
            experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    else:
        experiment_id = existing.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prefect_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:  # not inside a flow run
        return None


_PARENT_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("alignflow_parent_run", default=None)


@contextlib.contextmanager
def parent_run(run_id: str) -> Iterator[None]:
    """Stage runs started inside nest under ``run_id``, also in threads that copy this context
    (MLflow's active run is per thread; the pipeline runs independent stages side by side)."""
    token = _PARENT_RUN.set(run_id)
    try:
        yield
    finally:
        _PARENT_RUN.reset(token)


@contextlib.contextmanager
def stage_run(stage: str, config: Mapping[str, Any], *, run_name: str | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start the MLflow run of one stage: nested under the active run of this thread, else under the
    :func:`parent_run` of this context, else a top-level run."""
    nested = mlflow.active_run() is not None
    parent = None if nested else _PARENT_RUN.get()
    all_tags = {"alignflow.stage": stage, "git.commit": git_commit(), **process_tags()}
    flow_run_id = prefect_flow_run_id()
    if flow_run_id:
        all_tags["prefect.flow_run_id"] = str(flow_run_id)
    all_tags.update(tags or {})
    with mlflow.start_run(run_name=run_name or stage, nested=nested, parent_run_id=parent, tags=all_tags) as run:
        params = {param_key(k): _param_value(v) for k, v in flatten(dict(config)).items()}
        mlflow.log_params(params)
        yield run


_KEY_CHARS = re.compile(r"[A-Za-z0-9_.\-/ ]+")
_MAX_KEY_CHARS = 250


def param_key(name: str) -> str:
    """``name`` if MLflow accepts it as a param/metric/tag key, else a readable, collision-free stand-in.

    MLflow keys hold letters, digits, ``_ - . / space`` and must not change
    under path normalisation; names built from user data (site names such as
    ``cooking (copy)``) get the rest replaced by ``_`` and a hash of the name.
    """
    if (len(name) <= _MAX_KEY_CHARS and _KEY_CHARS.fullmatch(name) and posixpath.normpath(name) == name
            and not name.startswith(("..", "/")) and name != "."):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("._") or "key"
    return f"{readable[: _MAX_KEY_CHARS - 12]}-{digest}"


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 1] + "…"


def log_parquet_input(path: Path, *, name: str, digest: str, context: str, rows: int | None = None) -> None:
    """Log a Parquet dataset as a run input, identified by its content digest."""
    import pyarrow.parquet as pq
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    arrow_to_mlflow = {"string": DataType.string, "large_string": DataType.string, "int64": DataType.long,
                       "double": DataType.double, "bool": DataType.boolean}
    arrow_schema = pq.read_schema(path)
    columns = [ColSpec(arrow_to_mlflow.get(str(f.type), DataType.string), f.name) for f in arrow_schema]
    with warnings.catch_warnings():  # two registered local-file sources both claim file:// URIs; either is right
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    dataset = MetaDataset(source=source, name=name, digest=digest[:36], schema=Schema(columns))
    tags = {"rows": str(rows)} if rows is not None else None
    mlflow.log_input(dataset, context=context, tags=tags)


def run_url(run: Any) -> str:
    """Where the run shows in the MLflow UI (``MLFLOW_UI_URL``, default: a local ``mlflow ui``)."""
    base = os.environ.get("MLFLOW_UI_URL")
    if not base:
        uri = mlflow.get_tracking_uri()
        base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


# -- training runs: metrics from the loop, checkpoints linked across attempts -------------------
class MetricLogger:
    """Loop callbacks that send metrics to the active MLflow run (and a progress bar to the console)."""

    def __init__(self, total_steps: int, description: str, progress: bool = True) -> None:
        self.total = total_steps
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            # disable=None: a bar on a terminal, nothing in logs and CI output
            self.bar = tqdm(total=total_steps, desc=description, unit="step", dynamic_ncols=True, disable=None)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            mlflow.log_metrics(clean, step=step)
        if self.bar is not None and "train/loss" in clean:
            self.bar.set_postfix(loss=f"{clean['train/loss']:.4f}")

    def step(self, step: int, max_steps: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def checkpoint_root(workdir: Path, stage: str) -> Path:
    return Path(workdir).resolve() / "checkpoints" / stage


def previous_attempt(workdir: Path, stage: str) -> tuple[Path, str | None] | None:
    """The checkpoint folder of the stage's latest attempt and the MLflow run that wrote it."""
    root = checkpoint_root(workdir, stage)
    marker = root / "LATEST_RUN"
    if not marker.is_file():
        return None
    folder = root / marker.read_text().strip()
    run_file = folder / "run.json"
    run_id = None
    if run_file.is_file():
        import json

        run_id = json.loads(run_file.read_text()).get("mlflow_run_id")
    return folder, run_id


def attach_checkpoints(workdir: Path, stage: str, run: Any, *, resume: bool) -> tuple[Path, str | None]:
    """Checkpoint folder for this attempt; with ``resume``, the previous attempt's, whose run is marked KILLED."""
    import json

    root = checkpoint_root(workdir, stage)
    root.mkdir(parents=True, exist_ok=True)
    previous = previous_attempt(workdir, stage) if resume else None
    resumed_from = None
    if previous is not None:
        folder, resumed_from = previous
        if resumed_from and resumed_from != run.info.run_id:
            client = mlflow.MlflowClient()
            try:
                old = client.get_run(resumed_from)
                if old.info.status == "RUNNING":  # the attempt was killed without a chance to end its run
                    client.set_terminated(resumed_from, status="KILLED")
                client.set_tag(resumed_from, "alignflow.resumed_by", run.info.run_id)
            except mlflow.exceptions.MlflowException:
                pass
            mlflow.set_tag("alignflow.resumed_from", resumed_from)
    else:
        folder = root / run.info.run_id
        folder.mkdir(parents=True, exist_ok=True)
    history = []
    run_file = folder / "run.json"
    if run_file.is_file():
        history = json.loads(run_file.read_text()).get("attempts", [])
    tmp = folder / f".run.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"mlflow_run_id": run.info.run_id, "attempts": [*history, run.info.run_id]}))
    os.replace(tmp, run_file)
    marker_tmp = root / f".LATEST_RUN.tmp-{os.getpid()}"
    marker_tmp.write_text(folder.name + "\n")
    os.replace(marker_tmp, root / "LATEST_RUN")
    return folder, resumed_from
