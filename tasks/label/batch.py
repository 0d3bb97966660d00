"""Comparison batches: N prompts, K sampled responses each from registered policies, with provenance.

Prompts come from the latest ingest's ``prompts`` dataset (one split) or a
user's JSONL (one ``{"prompt": ...}`` object a line, optional ``prompt_id``).
The K responses of a prompt are spread over the policies (``K // P`` samples
each, the first ``K % P`` policies one more). Each (policy, sample) is one
sampling pass over all prompts with its own recorded seed; every response
keeps its provenance: model, version, seed, sample index and sampling
settings. Held-out pairs of the ingest can be mixed in as gold items (K = 2,
the voted order known).

The batch is a ``comparisons`` dataset (one row per response, contract
checked: empty generations are quarantined and an item left with fewer than
two responses is dropped and counted) plus the items the labeling store takes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from alignflow.stages import POLICY_MODEL, SFT_MODEL

__all__ = ["LabelBatchConfig", "PolicySpec", "parse_policy", "read_prompt_file", "spread_samples", "sample_seed",
           "comparison_rows", "items_from_rows", "gold_items", "BatchInputError"]

DEFAULT_INSTRUCTIONS = (
    "Read the prompt, then order the responses from best (top) to worst. Prefer the response that answers the "
    "question correctly and helpfully; a response with working code that uses the asked-about term beats one "
    "without. Tie two responses only when you truly cannot tell them apart.")


class BatchInputError(ValueError):
    """The batch cannot be made from what was given (no prompts, a bad policy spec, a bad prompts file)."""


class LabelBatchConfig(BaseModel):
    """What `alignflow label-batch` makes."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="Batch id (letters, digits, - and _); default: label-<seed>-<time>.")
    policies: list[str] = Field(default_factory=lambda: [f"{POLICY_MODEL}@champion", f"{SFT_MODEL}@champion"],
                                description="Registered policies: name@alias or name/version.")
    prompts: int = Field(20, ge=1, description="Number of prompts.")
    prompts_file: str | None = Field(None, description="JSONL of prompts instead of the ingested prompts dataset.")
    split: str = Field("test", description="Split of the prompts dataset to sample from.")
    k: int = Field(4, ge=2, le=9, description="Responses per prompt.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (top_k=0, top_p=1).")
    max_new_tokens: int = Field(64, ge=1, description="Longest response in tokens.")
    max_prompt_tokens: int = Field(192, ge=1, description="Prompts are cut from the left to this many tokens.")
    seed: int = Field(0, description="Seed of the prompt draw and of every sampling pass.")
    overlap: int = Field(3, ge=1, description="Labelers per item.")
    gold: int = Field(0, ge=0, description="Held-out ingest pairs mixed in as gold items (known order).")
    instructions: str = Field(DEFAULT_INSTRUCTIONS, description="What the labelers read above every item.")
    demonstrations: bool = Field(False, description="Ask labelers to also write the response they would want.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", v):
            raise ValueError(f"batch name {v!r}: use 1-64 letters, digits, '-' or '_'")
        return v


class PolicySpec(BaseModel):
    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def parse_policy(spec: str) -> PolicySpec:
    """``name@alias`` or ``name/version`` (a bare name means ``@champion``)."""
    spec = spec.strip()
    if m := re.fullmatch(r"([A-Za-z0-9._-]+)@([A-Za-z0-9_-]+)", spec):
        return PolicySpec(name=m[1], alias=m[2])
    if m := re.fullmatch(r"([A-Za-z0-9._-]+)/(\d+)", spec):
        return PolicySpec(name=m[1], version=m[2])
    if re.fullmatch(r"[A-Za-z0-9._-]+", spec):
        return PolicySpec(name=spec, alias="champion")
    raise BatchInputError(f"policy {spec!r}: expected name@alias (e.g. alignflow-policy@champion) or name/version")


def read_prompt_file(path: Path) -> list[dict]:
    """``[{prompt_id, prompt}]`` from a JSONL file; a bad line is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    out, seen = [], set()
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise BatchInputError(f"{path}:{n}: not JSON ({exc.msg})") from exc
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise BatchInputError(f"{path}:{n}: needs a non-empty string field 'prompt'")
            pid = str(obj.get("prompt_id") or hashlib.sha256(prompt.encode()).hexdigest()[:16])
            if pid in seen:
                raise BatchInputError(f"{path}:{n}: prompt_id {pid!r} appears twice")
            seen.add(pid)
            out.append({"prompt_id": pid, "prompt": prompt, "question_id": pid, "site": "prompts-file",
                        "source": "human", "split": "test"})
    if not out:
        raise BatchInputError(f"{path}: no prompts")
    return out


def spread_samples(k: int, n_policies: int) -> list[int]:
    """Samples per policy so that they sum to ``k`` (earlier policies take the remainder)."""
    if n_policies < 1:
        raise BatchInputError("at least one policy is needed")
    return [k // n_policies + (1 if i < k % n_policies else 0) for i in range(n_policies)]


def sample_seed(seed: int, policy: str, sample: int) -> int:
    """The recorded seed of one sampling pass: stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x1f{policy}\x1f{sample}".encode()).digest()[:4], "big")


def comparison_rows(prompts: Sequence[dict], generations: Sequence[dict]) -> list[dict]:
    """Rows of the ``comparisons`` dataset: one per (prompt, generated response).

    ``generations``: ``{"policy", "model", "version", "sample", "seed", "settings", "texts"}`` with ``texts[i]``
    the answer to ``prompts[i]``.
    """
    rows = []
    for g in generations:
        for i, p in enumerate(prompts):
            rows.append({"response_id": f"{p['prompt_id']}:{g['policy']}:{g['sample']}",
                         "item_id": str(p["prompt_id"]), "prompt_id": str(p["prompt_id"]), "prompt": p["prompt"],
                         "response": g["texts"][i], "policy": g["policy"], "model": g["model"],
                         "version": str(g["version"]), "sample": int(g["sample"]), "seed": int(g["seed"]),
                         "sampling": json.dumps(g["settings"], sort_keys=True),
                         "question_id": str(p.get("question_id") or p["prompt_id"]), "site": p.get("site") or "",
                         "source": p.get("source") or "human", "split": p.get("split") or "test"})
    return rows


def items_from_rows(rows: Sequence[dict], *, seed: int) -> tuple[list[dict], int]:
    """Store items (responses ``r0..`` in a seeded order that hides the policy) and how many items were dropped
    for having fewer than two valid responses."""
    import random

    by_item: dict[str, list[dict]] = {}
    for r in rows:
        by_item.setdefault(r["item_id"], []).append(r)
    items, dropped = [], 0
    for item_id, rs in by_item.items():
        if len(rs) < 2:
            dropped += 1
            continue
        rs = sorted(rs, key=lambda r: r["response_id"])
        random.Random(f"{seed}\x1f{item_id}").shuffle(rs)
        items.append({"item_id": item_id, "prompt_id": rs[0]["prompt_id"], "prompt": rs[0]["prompt"],
                      "responses": [{"id": f"r{j}", "text": r["response"], "policy": r["policy"],
                                     "provenance": {"response_id": r["response_id"], "model": r["model"],
                                                    "version": r["version"], "sample": r["sample"],
                                                    "seed": r["seed"], "sampling": json.loads(r["sampling"])}}
                                    for j, r in enumerate(rs)]})
    return items, dropped


def gold_items(pair_rows: Sequence[dict], n: int, seed: int) -> list[dict]:
    """``n`` held-out pairs with the largest vote margin as K = 2 gold items (chosen above rejected)."""
    import random

    if n <= 0:
        return []
    pool = sorted(pair_rows, key=lambda r: (-(r.get("margin") or 0), str(r.get("pair_id"))))[: max(4 * n, n)]
    random.Random(seed).shuffle(pool)
    out = []
    for r in pool[:n]:
        out.append({"item_id": f"gold-{r['pair_id']}", "prompt_id": f"gold-{r['pair_id']}", "prompt": r["prompt"],
                    "responses": [{"id": "r0", "text": r["chosen"], "policy": "gold:chosen"},
                                  {"id": "r1", "text": r["rejected"], "policy": "gold:rejected"}],
                    "gold": [["r0"], ["r1"]]})
    return out


def sample_policy(model: Any, tokenizer: Any, prompts: Sequence[str], *, seed: int, temperature: float,
                  max_new_tokens: int, max_prompt_tokens: int, batch_size: int = 8) -> list[str]:
    """One sampling pass (``top_k=0, top_p=1``, tempered) over the prompts, seeded."""
    import torch

    from alignflow.tasks.train.lm import generate_greedy

    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        out += generate_greedy(model, tokenizer, list(prompts[start : start + batch_size]),
                               max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, sampling=sampling)
    return out
