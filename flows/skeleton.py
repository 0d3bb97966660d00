"""The shape every stage flow shares: start its MLflow run, read its inputs, call the work, register, link.

    with stage_run("sft", cfg, workdir) as st:
        demos = st.dataset("demos")                 # path, logged as a run input with its content digest
        model, tok, start = st.start_model(cfg.sft.model, BASE_MODEL)
        ckpt, resume = st.checkpoints(resume)       # this attempt's folder; resume only if there is one
        out = <the stage's work>(...)
        version = st.register(out.model, out.tokenizer)
        return st.summary(final_loss=..., ...)

The run is tagged and parameterised by ``tracking.stage_run`` (the stage's config
section as params), linked from the Prefect flow run as an artifact, and its
summary carries ``stage``, ``run_id``, ``model`` and ``version`` as the pipeline
expects. The model a stage registers is the one of its registry entry.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact

from alignflow import stages
from alignflow.config import AlignflowConfig
from alignflow.tasks import registry, tracking


@dataclass
class StageRun:
    stage: stages.Stage
    cfg: AlignflowConfig
    workdir: Path
    run: Any
    version: str | None = None
    start: str | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @cached_property
    def data(self) -> Path:
        """The latest ingest's datasets folder."""
        from alignflow.tasks.ingest.run import latest_datasets

        return latest_datasets(self.workdir)

    @cached_property
    def manifest(self) -> dict[str, dict]:
        return json.loads((self.data / "manifest.json").read_text())["datasets"]

    def dataset(self, kind: str, *, context: str = "training") -> Path:
        """``<kind>.parquet`` of the latest ingest, logged as an input of this run (content digest, rows)."""
        path = self.data / f"{kind}.parquet"
        entry = self.manifest[kind]
        tracking.log_parquet_input(path, name=kind, digest=entry["digest"], context=context, rows=entry["rows"])
        return path

    def start_model(self, model_cfg: Any, registered: str) -> tuple[Any, Any, str]:
        """The causal LM the stage starts from (``model_cfg.name_or_path``, else ``registered@challenger``)."""
        model, tok, self.start = registry.resolve_start_model(model_cfg.name_or_path, registered,
                                                              trust_remote_code=model_cfg.trust_remote_code)
        self.note_start(self.start)
        return model, tok, self.start

    def note_start(self, source: str) -> None:
        import mlflow

        self.start = source
        mlflow.log_param("start_model", source)

    def checkpoints(self, resume: bool) -> tuple[Path, bool]:
        """This attempt's checkpoint folder, and whether to resume (asked for, and an earlier attempt exists)."""
        folder, resumed_from = tracking.attach_checkpoints(self.workdir, self.stage.name, self.run, resume=resume)
        return folder, resume and resumed_from is not None

    def register(self, model: Any, tokenizer: Any, *, task: str = "text-generation",
                 tags: Mapping[str, str] | None = None) -> str:
        """Register the stage's model (alias ``challenger``) with the start model among its tags."""
        all_tags = {**({"start_model": self.start} if self.start else {}), **self.extra_tags, **(tags or {})}
        self.version = registry.register_transformers(model, tokenizer, name=self.stage.model, task=task,
                                                      tags=all_tags)
        print(f"registered {self.stage.model} version {self.version} (alias challenger)")
        return self.version

    def summary(self, **fields: Any) -> dict[str, Any]:
        return {"stage": self.stage.name, "run_id": self.run_id, "model": self.stage.model,
                "version": self.version, **({"start_model": self.start} if self.start else {}), **fields}


@contextlib.contextmanager
def stage_run(name: str, cfg: AlignflowConfig, workdir: str | Path, *, params: Mapping[str, Any] | None = None,
              **run_kwargs: Any) -> Iterator[StageRun]:
    """The MLflow run of one stage, linked from its Prefect flow run; params: its config section by default."""
    entry = stages.get(name)
    wd = Path(workdir)
    tracking.configure(wd, cfg.experiment)
    if params is None:
        params = {entry.section: cfg.section(entry.section).model_dump(mode="json")} if entry.section else {}
    with tracking.stage_run(name, params, **run_kwargs) as run:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(run), link_text="MLflow run of this stage")
        yield StageRun(entry, cfg, wd, run)
