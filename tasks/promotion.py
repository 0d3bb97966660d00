"""Promotion gates: whether a registered model's ``challenger`` may become its ``champion``.

Pure logic, no MLflow and no models: figures in, a :class:`Decision` out. The
flow ``promote`` measures the figures (challenger and champion on the same
held-out evaluation), asks :func:`decide`, and moves the alias.

Gate kinds (by registered model name, :func:`gate_kind`; each stage of
``alignflow.stages`` names the gate of the model it registers):

* ``preference`` (``alignflow-pmp``, ``alignflow-reward``): held-out pairwise
  accuracy. The challenger needs ``accuracy >= min_pairwise_accuracy`` and
  ``accuracy >= champion accuracy + min_accuracy_gain``.
* ``policy`` (``alignflow-policy``): mean reward under the reward model, KL to
  the reference policy, and win rate against the champion (share of held-out
  prompts where the challenger's answer gets the higher reward; ties count
  1/2). The challenger needs ``kl <= max_kl``, ``reward_mean >= champion
  reward_mean + min_reward_gain`` and ``win_rate >= min_win_rate``.
* ``lm`` (``alignflow-base``, ``alignflow-policy-sft``): held-out loss; the
  challenger needs ``loss <= champion loss + max_loss_increase``.

With no champion yet, only the absolute bounds apply (first champion). A failed
gate moves nothing unless ``override`` is given, and an override is recorded as
such. Rollback uses the alias history kept as a stack of champions.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, Sequence

from alignflow import stages

Kind = Literal["preference", "policy", "lm"]
Action = Literal["promoted", "first_champion", "rejected", "overridden", "already_champion"]

KINDS: tuple[Kind, ...] = ("preference", "policy", "lm")

# The figure each kind's gate is about (what a summary table shows first).
KEY_FIGURE: dict[Kind, str] = {"preference": "pairwise_accuracy", "policy": "reward_mean", "lm": "loss"}

HISTORY_TAG = "alignflow.champion_history"
EVENTS_TAG = "alignflow.champion_events"
MAX_HISTORY = 30  # registered-model tag values are limited in size


def gate_kinds() -> dict[str, Kind]:
    """Registered model -> gate kind, from the stage registry."""
    out = stages.gate_kinds()
    bad = {m: k for m, k in out.items() if k not in KINDS}
    if bad:
        raise ValueError(f"unknown gate kind(s) {bad}; kinds are {', '.join(KINDS)}")
    return out  # type: ignore[return-value]


def gate_kind(model_name: str) -> Kind:
    kinds = gate_kinds()
    try:
        return kinds[model_name]
    except KeyError:
        raise ValueError(f"no promotion gate for {model_name!r}; known models: {', '.join(kinds)}") from None


@dataclass(frozen=True)
class Thresholds:
    min_pairwise_accuracy: float = 0.5
    min_accuracy_gain: float = 0.0
    min_reward_gain: float = 0.0
    max_kl: float = 10.0
    min_win_rate: float = 0.5
    max_loss_increase: float = 0.0
    max_judged_drop: float = 0.1

    @classmethod
    def from_config(cls, cfg: Any) -> "Thresholds":
        return cls(**{k: float(getattr(cfg, k)) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    bound: float
    op: Literal[">=", "<="]
    passed: bool

    def describe(self) -> str:
        value = "missing" if self.value is None else f"{self.value:.4g}"
        return f"{self.name} = {value} {'ok' if self.passed else 'FAILS'} ({self.op} {self.bound:.4g})"


@dataclass(frozen=True)
class Decision:
    kind: Kind
    action: Action
    passed: bool  # the gate itself (an override does not make it pass)
    move_champion: bool
    checks: tuple[Check, ...] = field(default_factory=tuple)
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checks"] = [asdict(c) for c in self.checks]
        return out


def _check(name: str, value: float | None, bound: float, op: Literal[">=", "<="]) -> Check:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Check(name, None, bound, op, False)
    ok = value >= bound if op == ">=" else value <= bound
    return Check(name, float(value), float(bound), op, bool(ok))


def gate_checks(kind: Kind, challenger: Mapping[str, float], champion: Mapping[str, float] | None,
                t: Thresholds) -> list[Check]:
    """The checks of one gate (figures without prefix: ``pairwise_accuracy``, ``reward_mean``, ...)."""
    checks: list[Check] = []
    if kind == "preference":
        acc = challenger.get("pairwise_accuracy")
        checks.append(_check("pairwise_accuracy", acc, t.min_pairwise_accuracy, ">="))
        if champion is not None:
            checks.append(_check("pairwise_accuracy vs champion", acc,
                                 champion["pairwise_accuracy"] + t.min_accuracy_gain, ">="))
    elif kind == "policy":
        checks.append(_check("kl_to_reference", challenger.get("kl_to_reference"), t.max_kl, "<="))
        if "judged_rate_reference" in challenger:  # the data has a judge: its rate must not fall much below SFT's
            checks.append(_check("judged_rate vs reference", challenger.get("judged_rate"),
                                 challenger["judged_rate_reference"] - t.max_judged_drop, ">="))
        if champion is not None:
            checks.append(_check("reward_mean vs champion", challenger.get("reward_mean"),
                                 champion["reward_mean"] + t.min_reward_gain, ">="))
            checks.append(_check("win_rate vs champion", challenger.get("win_rate"), t.min_win_rate, ">="))
    elif kind == "lm":
        loss = challenger.get("loss")
        checks.append(_check("loss is finite", loss, math.inf, "<="))
        if champion is not None:
            checks.append(_check("loss vs champion", loss, champion["loss"] + t.max_loss_increase, "<="))
    else:
        raise ValueError(f"unknown gate kind {kind!r}")
    return checks


def decide(kind: Kind, challenger: Mapping[str, float], champion: Mapping[str, float] | None, t: Thresholds, *,
           override: bool = False, same_version: bool = False) -> Decision:
    """Whether ``champion`` moves to the challenger.

    ``champion`` is None when the model has no champion yet. ``same_version``:
    the challenger already is the champion (nothing to do, whatever the figures).
    """
    if same_version:
        return Decision(kind, "already_champion", True, False, (), "the challenger already is the champion")
    checks = tuple(gate_checks(kind, challenger, champion, t))
    passed = all(c.passed for c in checks)
    failed = "; ".join(c.describe() for c in checks if not c.passed)
    if passed:
        action: Action = "first_champion" if champion is None else "promoted"
        reason = "no champion yet; absolute bounds hold" if champion is None else "gate passed"
        return Decision(kind, action, True, True, checks, reason)
    if override:
        return Decision(kind, "overridden", False, True, checks, f"gate failed ({failed}); overridden by request")
    return Decision(kind, "rejected", False, False, checks, f"gate failed: {failed}")


# -- alias history ---------------------------------------------------------------------------
def parse_history(text: str | None) -> list[dict[str, Any]]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [e for e in value if isinstance(e, dict) and "version" in e] if isinstance(value, list) else []


def dump_history(history: Sequence[Mapping[str, Any]], limit: int = MAX_HISTORY) -> str:
    return json.dumps(list(history)[-limit:], separators=(",", ":"))


def push_champion(history: Sequence[Mapping[str, Any]], version: str, **info: Any) -> list[dict[str, Any]]:
    """The champion stack after ``version`` became champion (a repeat of the top is not pushed twice)."""
    out = [dict(e) for e in history]
    if out and str(out[-1]["version"]) == str(version):
        return out
    out.append({"version": str(version), **info})
    return out[-MAX_HISTORY:]


class RollbackError(LookupError):
    """There is no previous champion to go back to."""


def rollback_target(history: Sequence[Mapping[str, Any]], current: str | None) -> tuple[str, list[dict[str, Any]]]:
    """(version to restore, champion stack after the rollback).

    The top entries equal to the current champion are popped; the next entry is
    the previous champion. With no current champion, the top entry is restored.
    """
    stack = [dict(e) for e in history]
    if current is not None:
        while stack and str(stack[-1]["version"]) == str(current):
            stack.pop()
    if not stack:
        raise RollbackError(f"no previous champion recorded (current: {current}); nothing to roll back to")
    return str(stack[-1]["version"]), stack
