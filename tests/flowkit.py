"""Helpers shared by the end-to-end flow tests: CLI overrides and the MLflow store of a work directory."""

from __future__ import annotations

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
