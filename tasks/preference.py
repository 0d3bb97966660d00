"""Steps shared by the preference-model stages (``pmp``, ``pm``, ``pmp-transfer``).

* :func:`start_reward_model`: the network a stage starts from (a named model, a
  registered reward model, or a registered causal LM that gets a fresh score head).
* :func:`task_pairs`: the task-specific pairs of ``pm`` (an ingested site, or a
  user's ``prompt/chosen/rejected`` file ingested on the side).
* :func:`log_reward_eval`: metrics, the worst-ranked pairs table and a
  reliability diagram of one evaluation, into the active MLflow run.
* :func:`plot_transfer`: the accuracy-vs-N figure of ``pmp-transfer``.

The flows call these inside their MLflow run; the pure parts live in
``tasks.train.reward`` and ``tasks.train.pairs``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignflow.config import IngestConfig, ModelConfig

__all__ = [
    "REWARD_TASK",
    "train_logged",
    "train_shard",
    "is_reward_model",
    "log_reward_eval",
    "plot_transfer",
    "pmp_sources",
    "select_task_pairs",
    "start_reward_model",
    "task_pairs",
]

#: The MLflow transformers task reward models are logged with (a one-label sequence classifier).
REWARD_TASK = "text-classification"


def is_reward_model(model: Any) -> bool:
    """A one-output sequence classifier (what the reward stages train and register)."""
    return type(model).__name__.endswith("ForSequenceClassification") and getattr(model.config, "num_labels", 0) == 1


def start_reward_model(model_cfg: ModelConfig, *, registered: str, seed: int) -> tuple[Any, Any, str]:
    """``(reward_model, tokenizer, source)`` a reward stage starts from.

    ``model_cfg.name_or_path`` wins: a sequence-classifier folder/hub id is
    loaded as it is; a causal LM gets a new score head
    (:func:`~alignflow.models.reward.reward_model_from_causal_lm`, seeded).
    Otherwise the registered model ``registered@challenger`` is loaded the same
    way (a reward model as it is, a causal LM with a new head).
    """
    from alignflow.models import load_tokenizer, reward_model_from_causal_lm
    from alignflow.models.loading import load_sequence_classifier

    if model_cfg.name_or_path:
        from transformers import AutoConfig

        path = model_cfg.name_or_path
        tok = load_tokenizer(path, trust_remote_code=model_cfg.trust_remote_code)
        archs = getattr(AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code),
                        "architectures", None) or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            model = load_sequence_classifier(path, trust_remote_code=model_cfg.trust_remote_code, tokenizer=tok)
        else:
            model = reward_model_from_causal_lm(path, tokenizer=tok, seed=seed)
        return model, tok, path
    from alignflow.tasks import registry

    model, tok, version = registry.load_transformers_components(registered, registry.CHALLENGER)
    if not is_reward_model(model):
        model = reward_model_from_causal_lm(model, tokenizer=tok, seed=seed)
    return model, tok, f"models:/{registered}/{version}"


def train_shard(section: Any, plan: dict, model: Any = None, tok: Any = None, callbacks: Any = None) -> Any:
    """``train_reward`` for a ``pmp``/``pm`` config section and a plan (start model, rows, checkpoints): all of the
    training on one process, or one process's shard under a launcher (the start model then loaded again)."""
    from alignflow.tasks.train.reward import train_reward

    if model is None:
        model, tok, _ = start_reward_model(section.model.model_copy(update={"name_or_path": plan["path"]}),
                                           registered=plan["registered"], seed=section.train.seed)
    return train_reward(section.train, model, tok, plan["train_rows"], plan["eval_rows"],
                        max_length=section.model.max_length, use_margin=section.use_margin,
                        centering=section.centering, group_by_question=plan["group_by_question"],
                        checkpoint_dir=Path(plan["ckpt"]), resume=plan["resume"], callbacks=callbacks)


def train_logged(stage: str, section: Any, model: Any, tok: Any, train_rows: list[dict], eval_rows: list[dict],
                 ckpt: Path, resume: bool, *, registered: str, group_by_question: bool = True) -> Any:
    """``train_reward`` for a ``pmp``/``pm`` config section, metrics to the active MLflow run and a progress bar
    (the other processes of a launched stage get the plan and train with it)."""
    from alignflow.tasks import launch, tracking
    from alignflow.tasks.train.loop import LoopCallbacks

    plan = {"path": section.model.name_or_path, "registered": registered, "train_rows": train_rows,
            "eval_rows": eval_rows, "group_by_question": group_by_question, "ckpt": str(ckpt), "resume": resume}
    launch.share_plan(plan)
    logger = tracking.MetricLogger(section.train.max_steps, stage)
    try:
        return train_shard(section, plan, model, tok, LoopCallbacks(on_log=logger.log, on_step=logger.step))
    finally:
        logger.close()


def task_pairs(pairs_file: str | None, latest: Path, workdir: Path, ingest_cfg: IngestConfig) -> tuple[Path, dict]:
    """``(pairs.parquet, manifest entry)`` of the task pairs.

    Without ``pairs_file``: the latest ingest's pairs. A Parquet file that is
    already a pairs dataset (every contract column, e.g. ``alignflow label
    pairs``' human pairs with their ``weight``) is validated and used as it is.
    Otherwise the file is ingested as a ``pairs`` source into ``<workdir>/data/pm-task`` (same
    splitting by question, contracts, quarantine and cache as ``alignflow
    ingest``; the work directory's latest datasets are left as they are).
    """
    from alignflow.tasks.ingest.run import execute_ingest, plan_ingest

    if not pairs_file:
        manifest = json.loads((latest / "manifest.json").read_text())["datasets"]
        return latest / "pairs.parquet", manifest["pairs"]
    if Path(pairs_file).suffix == ".parquet" and _is_pairs_dataset(Path(pairs_file)):
        return Path(pairs_file), _checked_pairs_dataset(Path(pairs_file))
    plan = plan_ingest([pairs_file], Path(workdir) / "data" / "pm-task", ingest_cfg, "pairs")
    result = execute_ingest(plan, ingest_cfg)
    pairs = result.datasets["pairs"]
    if not pairs["rows"]:
        from alignflow.tasks.train.pairs import PairSelectionError

        raise PairSelectionError(f"{pairs_file}: no usable pairs after ingest (see {result.out_dir}/ingest_report.json)")
    return Path(pairs["path"]), pairs


def select_task_pairs(rows: list[dict], cfg: Any, source: Path) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out validation pairs) of the task site (``pm`` section), by whole questions."""
    from alignflow.tasks.train.pairs import (
        PairSelectionError, check_split_hygiene, draw_questions, mismatched_pairs, rows_of_split,
    )

    train = rows_of_split(rows, "train", cfg.site)
    if not train:
        sites = sorted({r.get("site") or "" for r in rows})
        where = f"site {cfg.site!r}" if cfg.site else "any site"
        raise PairSelectionError(f"{source}: no training pairs for {where}; sites present: {', '.join(sites) or '(none)'}")
    train = draw_questions(train, cfg.max_train_pairs, cfg.train.seed)
    held = draw_questions(rows_of_split(rows, "validation", cfg.site), cfg.eval_pairs, cfg.train.seed)
    check_split_hygiene(train, held)
    if getattr(cfg, "mismatched_pairs", 0):
        train = train + mismatched_pairs(train, cfg.mismatched_pairs, cfg.train.seed,
                                         getattr(cfg, "mismatched_donors", "random"))
    return train, held


def pmp_sources(cfg: Any, workdir: Path) -> dict[Path, dict]:
    """Each distinct pairs dataset the sources of a ``pmp`` section read, with its manifest entry
    (path -> {digest, rows})."""
    from alignflow.tasks.ingest.run import latest_datasets

    out: dict[Path, dict] = {}
    for src in cfg.sources:
        folder = Path(src.data) if src.data else latest_datasets(workdir)
        path = folder / "pairs.parquet" if folder.is_dir() else folder
        manifest_file = path.parent / "manifest.json"
        entry = {"digest": "", "rows": None}
        if manifest_file.is_file():
            entry = json.loads(manifest_file.read_text())["datasets"]["pairs"]
        out[path.resolve()] = entry
    return out


def _is_pairs_dataset(path: Path) -> bool:
    """A Parquet file with every column of the ``pairs`` dataset (e.g. human pairs from the labeling app)."""
    import pyarrow.parquet as pq

    from alignflow.data_contracts import COLUMNS

    return path.is_file() and set(COLUMNS["pairs"]) <= set(pq.read_schema(path).names)


def _checked_pairs_dataset(path: Path) -> dict:
    """Validate a ready pairs dataset against its contract (used as it is, extra columns such as ``weight``
    kept); its manifest-like entry."""
    import pandas as pd

    from alignflow.data_contracts import validate
    from alignflow.tasks.ingest.run import sha256_file
    from alignflow.tasks.train.pairs import PairSelectionError

    df = pd.read_parquet(path)
    result = validate(df, "pairs", batch_name=path.name)
    result.raise_for_table_failures()
    if len(result.rejected):
        first = result.rejected.iloc[0]
        raise PairSelectionError(f"{path}: {len(result.rejected)} row(s) break the pairs contract, e.g. pair_id "
                                 f"{first.get('pair_id')!r}: {first['expectation']}")
    return {"path": str(path), "rows": int(len(df)), "digest": sha256_file(path)}


def log_reward_eval(result: dict[str, Any], *, prefix: str = "eval", step: int | None = None) -> dict[str, float]:
    """Log an :func:`~alignflow.tasks.train.reward.evaluate_pairs` result to the active MLflow run.

    Metrics go under ``prefix/`` (``eval/pairwise_accuracy`` ...); the worst
    pairs become the table ``<prefix>/worst_pairs.json``. Returns the metrics.
    """
    import mlflow
    import pandas as pd

    metrics = {f"{prefix}/{k.split('/', 1)[1]}": float(v) for k, v in result.items() if k.startswith("eval/")}
    mlflow.log_metrics(metrics, step=step)
    worst = result.get("worst_pairs") or []
    if worst:
        mlflow.log_table(pd.DataFrame(worst), artifact_file=f"{prefix}/worst_pairs.json")
    return metrics


def reliability_figure(r_chosen: Sequence[float], r_rejected: Sequence[float], path: Path, bins: int = 10) -> Path:
    """Reliability diagram of p = σ(r_c − r_r) over both orders of every pair, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs, labels = [], []
    for c, r in zip(r_chosen, r_rejected):
        d = float(c) - float(r)
        p = 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))
        probs += [p, 1.0 - p]
        labels += [1.0, 0.0]
    sums = [[0.0, 0.0, 0] for _ in range(bins)]
    for p, y in zip(probs, labels):
        b = min(int(p * bins), bins - 1)
        sums[b][0] += p
        sums[b][1] += y
        sums[b][2] += 1
    xs = [s[0] / s[2] for s in sums if s[2]]
    ys = [s[1] / s[2] for s in sums if s[2]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(xs, ys, "o-", label="reward model")
    ax.set_xlabel("predicted P(first preferred) = σ(r₁ − r₂)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Calibration on {len(r_chosen)} held-out pairs")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_transfer(rows: Sequence[dict], path: Path) -> Path:
    """Accuracy vs number of task pairs, one line per start model, error bars = Wilson 95% interval (PNG).

    ``rows``: dicts with ``start``, ``n_pairs``, ``accuracy``, ``ci_low``, ``ci_high`` (averaged over seeds by
    the caller or one row per seed; rows of one (start, n_pairs) are averaged here).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for start in sorted({r["start"] for r in rows}):
        pts: dict[int, list[dict]] = {}
        for r in rows:
            if r["start"] == start:
                pts.setdefault(int(r["n_pairs"]), []).append(r)
        ns = sorted(pts)
        acc = [sum(p["accuracy"] for p in pts[n]) / len(pts[n]) for n in ns]
        lo = [a - sum(p["ci_low"] for p in pts[n]) / len(pts[n]) for a, n in zip(acc, ns)]
        hi = [sum(p["ci_high"] for p in pts[n]) / len(pts[n]) - a for a, n in zip(acc, ns)]
        ax.errorbar(ns, acc, yerr=[lo, hi], marker="o", capsize=3, label=f"from {start}")
    ax.set_xscale("log", base=2)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("task training pairs (N)")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title("Preference-model pretraining transfer")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
