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
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

from alignflow.config import flatten

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


@contextlib.contextmanager
def stage_run(stage: str, config: Mapping[str, Any], *, run_name: str | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or nest under the active parent) the MLflow run of one stage."""
    nested = mlflow.active_run() is not None
    all_tags = {"alignflow.stage": stage, "git.commit": git_commit()}
    flow_run_id = prefect_flow_run_id()
    if flow_run_id:
        all_tags["prefect.flow_run_id"] = str(flow_run_id)
    all_tags.update(tags or {})
    with mlflow.start_run(run_name=run_name or stage, nested=nested, tags=all_tags) as run:
        params = {k: _param_value(v) for k, v in flatten(dict(config)).items()}
        mlflow.log_params(params)
        yield run


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
