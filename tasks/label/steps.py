"""The work of the labeling flows: sample a batch, write contracted datasets, plot, judge the reward model.

``flows/label.py`` calls these inside its MLflow runs; the pure parts live in
:mod:`.batch`, :mod:`.report`, :mod:`.rankings` and :mod:`.agreement`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .batch import (
    BatchInputError,
    LabelBatchConfig,
    comparison_rows,
    parse_policy,
    read_prompt_file,
    sample_policy,
    sample_seed,
    spread_samples,
)

__all__ = ["draw_prompts", "generate_responses", "write_contracted", "plot_leaderboard", "reward_agreement",
           "demos_rows"]


def draw_prompts(cfg: LabelBatchConfig, data_dir: Path | None) -> list[dict]:
    """``cfg.prompts`` prompts: from ``cfg.prompts_file``, else a seeded draw from the latest ingest's split."""
    import random

    if cfg.prompts_file:
        rows = read_prompt_file(Path(cfg.prompts_file))
    else:
        if data_dir is None or not (data_dir / "prompts.parquet").is_file():
            raise BatchInputError("no prompts dataset: run `alignflow ingest` first, or give --prompts-file")
        df = pd.read_parquet(data_dir / "prompts.parquet")
        rows = df[df["split"] == cfg.split].to_dict("records")
        if not rows:
            raise BatchInputError(f"{data_dir / 'prompts.parquet'}: no prompts in split {cfg.split!r}")
        rows.sort(key=lambda r: str(r["prompt_id"]))
    rng = random.Random(cfg.seed)
    return rows if len(rows) <= cfg.prompts else rng.sample(rows, cfg.prompts)


def generate_responses(cfg: LabelBatchConfig, prompts: Sequence[dict]) -> list[dict]:
    """One sampling pass per (policy, sample): ``comparison_rows``' generations with provenance."""
    from alignflow.tasks import registry
    from alignflow.tasks.promotion_eval import load_version

    specs = [parse_policy(p) for p in cfg.policies]
    if len({s.label for s in specs}) != len(specs):
        raise BatchInputError(f"a policy is named twice in {cfg.policies}")
    texts = [p["prompt"] for p in prompts]
    settings = {"temperature": cfg.temperature, "top_k": 0, "top_p": 1.0, "max_new_tokens": cfg.max_new_tokens,
                "max_prompt_tokens": cfg.max_prompt_tokens}
    generations = []
    for spec, n_samples in zip(specs, spread_samples(cfg.k, len(specs))):
        if n_samples == 0:
            continue
        version = spec.version or registry.resolve_version(spec.name, spec.alias)
        if version is None:
            raise LookupError(f"no registered model {spec.label}: train and register it first "
                              f"(aliases: challenger after training, champion after `alignflow promote`)")
        model, tok = load_version(spec.name, version)
        for s in range(n_samples):
            seed = sample_seed(cfg.seed, spec.label, s)
            out = sample_policy(model, tok, texts, seed=seed, temperature=cfg.temperature,
                                max_new_tokens=cfg.max_new_tokens, max_prompt_tokens=cfg.max_prompt_tokens)
            generations.append({"policy": spec.label, "model": spec.name, "version": version, "sample": s,
                                "seed": seed, "settings": settings, "texts": out})
        del model
    return comparison_rows(prompts, generations)


def write_contracted(rows: Sequence[dict], kind: str, path: Path, *, docs_dir: Path | None = None) -> dict:
    """Validate ``rows`` against the ``kind`` contract and write the valid ones to ``path`` (temp file, then
    rename); failing rows go to ``<stem>.quarantine.parquet`` beside it. Returns counts and the digest."""
    from alignflow.data_contracts import validate
    from alignflow.tasks.ingest.run import sha256_file

    df = pd.DataFrame(list(rows))
    result = validate(df, kind, docs_dir=docs_dir, batch_name=path.stem)
    result.raise_for_table_failures()
    path.parent.mkdir(parents=True, exist_ok=True)
    quarantine = path.with_name(f"{path.stem}.quarantine.parquet")
    if len(result.rejected):
        _atomic_parquet(result.rejected, quarantine)
    elif quarantine.exists():
        quarantine.unlink()
    _atomic_parquet(result.valid, path)
    return {"path": str(path), "rows": int(len(result.valid)), "quarantined": int(len(result.rejected)),
            "digest": sha256_file(path), "valid": result.valid}


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def demos_rows(export: Sequence[dict], *, site: str, validation_fraction: float = 0.2, seed: int = 0) -> list[dict]:
    """Demonstrations written in the app as rows of the ``demos`` dataset (SFT data), split by prompt like the
    human pairs of the same batch."""
    from .rankings import HUMAN_SOURCE, split_of

    out = []
    for r in export:
        text = (r.get("demonstration") or "").strip()
        if text:
            out.append({"demo_id": f"{r['ranking_id']}:demo", "prompt": r["prompt"], "response": text,
                        "question_id": str(r["prompt_id"]), "answer_id": r["ranking_id"], "site": site,
                        "source": HUMAN_SOURCE, "split": split_of(str(r["prompt_id"]), validation_fraction, seed), "pm_score": None,
                        "author": r["labeler"], "license": ""})
    return out


def plot_leaderboard(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Scores with their 95% bootstrap intervals, best at the top (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(rows))
    fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.errorbar([r["score"] for r in rows], ys, xerr=[[r["score"] - r["low"] for r in rows],
                                                      [r["high"] - r["score"] for r in rows]],
                fmt="o", capsize=4)
    ax.set_yticks(list(ys), [str(r["item"]) for r in rows])
    ax.set_xlabel("Bradley-Terry score (Elo scale, 95% bootstrap interval)")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reward_agreement(model: Any, tokenizer: Any, export: Sequence[dict], *, max_length: int, batch_size: int = 16,
                     split_of_prompt: dict[str, str] | None = None) -> dict[str, float]:
    """The reward model ranks the same responses as the labelers: pairwise accuracy and Kendall tau.

    Over all regular rankings, and (with ``split_of_prompt``) over those of validation prompts only.
    """
    from alignflow.models.reward import score_texts

    from .agreement import model_agreement
    from .rankings import ranks

    rows = [r for r in export if r.get("gold") is None]
    prompts, texts, keys = [], [], []
    for n, r in enumerate(rows):
        for rid, text in r["responses"].items():
            prompts.append(r["prompt"])
            texts.append(text)
            keys.append((n, rid))
    scores = score_texts(model, tokenizer, prompts, texts, batch_size=batch_size, max_length=max_length) \
        if texts else []
    per_row: list[dict[str, float]] = [{} for _ in rows]
    for (n, rid), s in zip(keys, scores):
        per_row[n][rid] = float(s)
    human = [ranks(r["groups"]) for r in rows]
    out = {f"human/{k}": v for k, v in model_agreement(human, per_row).items()}
    if split_of_prompt:
        held = [i for i, r in enumerate(rows) if split_of_prompt.get(str(r["prompt_id"])) == "validation"]
        if held:
            sub = model_agreement([human[i] for i in held], [per_row[i] for i in held])
            out.update({f"human_heldout/{k}": v for k, v in sub.items()})
    return out


def dump_json(obj: Any, path: Path) -> Path:
    """Write JSON (NaN as null) through a temp file and a rename."""
    from .report import json_safe

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=1, default=str))
    os.replace(tmp, path)
    return path
