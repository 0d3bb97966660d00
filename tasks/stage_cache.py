"""The pipeline's memory: cache keys of stages, finished runs to reuse, the state file, the summary table.

A stage's cache key (:func:`stage_key`) is the digest of its config section,
the content digests of the datasets it reads, the registered versions of the
models it starts from (all from its entry in ``alignflow.stages``) and the
content digests of the files and folders its config names
(:mod:`alignflow.tasks.named_files`: a pairs file edited in place is not a
cache hit). A
finished run with the same key whose model is still the ``challenger`` is a
cache hit (:func:`find_cached`). The state file (``<workdir>/pipeline/state.json``)
records which stages finished, which ran and which failed, so that a pipeline
that failed or was killed restarts at the stage it stopped at.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from alignflow import stages as stage_registry
from alignflow.config import AlignflowConfig
from alignflow.tasks import registry
from alignflow.tasks.named_files import named_file_digests

SUMMARY_TAG = "alignflow.stage_summary"


def stage_key(stage: str, cfg: AlignflowConfig, digests: dict[str, str], versions: dict[str, str | None]) -> str:
    """Content key of a stage: its config section, the digests of its datasets, the versions of its models and
    the content digests of the files its config names (a pairs file edited in place is not a cache hit)."""
    entry = stage_registry.get(stage)
    section = cfg.section(entry.section) if entry.section else None
    body = {
        "stage": stage,
        "config": section.model_dump(mode="json") if section is not None else None,
        "also": {k: _dotted(cfg, k) for k in entry.key_config},
        "data": {k: digests.get(k, "") for k in entry.reads},
        "models": {m: versions.get(m) for m in stage_registry.models_read(entry)},
    }
    body["files"] = named_file_digests({"config": body["config"], "also": body["also"]})
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _dotted(cfg: AlignflowConfig, key: str) -> Any:
    head, *rest = key.split(".")
    value = cfg.section(head)
    for part in rest:
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def manifest_digests(workdir: Path) -> dict[str, str]:
    from alignflow.tasks.ingest.run import latest_datasets

    try:
        manifest = json.loads((latest_datasets(workdir) / "manifest.json").read_text())["datasets"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return {}
    return {k: v.get("digest", "") for k, v in manifest.items()}


def challengers() -> dict[str, str | None]:
    return {m: registry.resolve_version(m, registry.CHALLENGER) for m in stage_registry.models()}


def find_cached(client: MlflowClient, experiment_id: str, stage: str, key: str) -> dict | None:
    """The summary of a finished earlier run of ``stage`` with this key, if its model is still the challenger."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`alignflow.stage` = '{stage}' and tags.`alignflow.cache_key` = '{key}' "
                      f"and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=5)
    for run in runs:
        text = run.data.tags.get(SUMMARY_TAG)
        if not text:
            continue
        summary = json.loads(text)
        model = stage_registry.get(stage).model
        if model and registry.resolve_version(model, registry.CHALLENGER) != str(summary.get("version")):
            continue  # the alias moved on: the cached output is not what the next stage would read
        return summary
    return None


def plain(summary: dict) -> dict:
    """The JSON-able scalars of a stage summary (what is kept for cache hits and the table)."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    if summary.get("stage") == "promote" and "results" in summary:  # promote: one decision per model
        out["decisions"] = {r["model"]: r["decision"] for r in summary["results"]}
    return out


def figures(summary: dict) -> dict[str, float]:
    """The numeric results of a stage summary (logged on the parent run as ``<stage>/<name>``)."""
    skip = {"version", "steps", "resumed_from_step"}
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in skip and v == v}


def key_metrics(summary: dict) -> str:
    entry = stage_registry.REGISTRY.get(summary.get("stage") or "")
    keys = entry.key_metrics if entry else ()
    parts = [f"{k}={summary[k]:.4g}" for k in keys if isinstance(summary.get(k), (int, float))
             and not isinstance(summary.get(k), bool)]
    if "decisions" in summary:
        parts += [f"{m.removeprefix('alignflow-')}:{d}" for m, d in summary["decisions"].items()]
    if "cache_hit" in summary and summary.get("stage") == "ingest":
        parts.append(f"datasets {'reused' if summary['cache_hit'] else 'built'}")
    return ", ".join(parts[:6])


def state_file(workdir: Path) -> Path:
    return Path(workdir).resolve() / "pipeline" / "state.json"


def write_state(workdir: Path, state: dict) -> None:
    path = state_file(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, path)


def read_state(workdir: Path) -> dict:
    try:
        return json.loads(state_file(workdir).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def default_sources(cfg: AlignflowConfig, workdir: Path) -> list[str]:
    if cfg.pipeline.sources:
        return list(cfg.pipeline.sources)
    from alignflow.tasks.ingest.synthetic import generate_dump

    g = cfg.generate
    dumps = [generate_dump(workdir / "dumps", questions=g.questions, seed=g.seed, site=g.site)]
    if getattr(g, "generic_questions", 0):
        dumps.append(generate_dump(workdir / "dumps", questions=g.generic_questions, seed=g.seed + 1,
                                   site=g.generic_site))
    return [str(d) for d in dumps]


def summary_table(rows: list[dict], aliases: dict[str, dict[str, str | None]]) -> str:
    w = max([9, *(len(r["stage"]) + 1 for r in rows)])  # a long stage name (pmp-transfer) widens the column
    lines = [f"{'stage':<{w}}{'status':<11}{'mlflow run':<34}{'model':<22}{'version':<8}key metrics"]
    for r in rows:
        lines.append(f"{r['stage']:<{w}}{r['status']:<11}{r.get('run_id') or '-':<34}{r.get('model') or '-':<22}"
                     f"{str(r.get('version') or '-'):<8}{r.get('metrics', '')}")
    lines += ["", f"{'registered model':<22}{'challenger':<12}{'champion':<10}"]
    for m, a in aliases.items():
        lines.append(f"{m:<22}{'v' + a['challenger'] if a['challenger'] else '-':<12}"
                     f"{'v' + a['champion'] if a['champion'] else '-':<10}")
    return "\n".join(lines)
