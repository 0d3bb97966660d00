"""Flow `promote`: move a registered model's `champion` alias to its `challenger` only when a gate passes.

    alignflow promote alignflow-reward [--workdir DIR] [--config FILE] [--set promote.min_win_rate=0.55]
    alignflow promote alignflow-policy --override        # move it even though the gate fails (recorded)
    alignflow promote alignflow-policy --rollback        # restore the previous champion

Challenger and champion are measured on the same held-out evaluation
(``alignflow.tasks.promotion_eval``), the gate (``alignflow.tasks.promotion``)
decides, and the decision with its figures is recorded three times: as tags of
the challenger's model version (``alignflow.gate.*``), as a Prefect artifact,
and as an MLflow run (``alignflow.stage=promote``). Every move of `champion`
is pushed onto a stack kept in the registered model's tag
``alignflow.champion_history``; a rollback pops it.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from alignflow.config import AlignflowConfig
from alignflow.stages import REWARD_MODEL
from alignflow.tasks import registry, tracking
from alignflow.tasks.promotion import (
    EVENTS_TAG,
    HISTORY_TAG,
    Thresholds,
    decide,
    dump_history,
    gate_kind,
    parse_history,
    push_champion,
    rollback_target,
)
from alignflow.tasks.promotion_eval import Evaluator, GateFigures, default_evaluator

TAG_PREFIX = "alignflow.gate."


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _record_event(name: str, tags: dict[str, str], stack: list[dict], event: dict) -> None:
    events = parse_history(tags.get(EVENTS_TAG))
    registry.set_model_tags(name, {HISTORY_TAG: dump_history(stack), EVENTS_TAG: dump_history([*events, event])})


def _figures_markdown(name: str, figs: GateFigures | None, decision: dict, challenger: str, champion: str | None) -> str:
    lines = [f"# Promotion of `{name}`: **{decision['action']}**", "",
             f"challenger version {challenger}, champion version {champion or '(none)'}", "",
             f"gate `{decision['kind']}`: {decision['reason']}", ""]
    if decision["checks"]:
        lines += ["| check | value | bound | passed |", "|---|---:|---:|---|"]
        for c in decision["checks"]:
            value = "missing" if c["value"] is None else f"{c['value']:.4g}"
            lines.append(f"| {c['name']} | {value} | {c['op']} {c['bound']:.4g} | {c['passed']} |")
    if figs is not None:
        keys = sorted(set(figs.challenger) | set(figs.champion or {}))
        lines += ["", "| figure | challenger | champion |", "|---|---:|---:|"]
        for k in keys:
            ch = figs.challenger.get(k)
            cp = (figs.champion or {}).get(k)
            lines.append(f"| {k} | {'' if ch is None else f'{ch:.4g}'} | {'' if cp is None else f'{cp:.4g}'} |")
        if figs.info:
            lines += ["", *(f"- {k}: `{v}`" for k, v in figs.info.items())]
    return "\n".join(lines) + "\n"


@flow(name="promote", log_prints=True)
def promote(
    workdir: str = "./alignflow-work",
    config: AlignflowConfig | None = None,
    model_name: str = REWARD_MODEL,
    override: bool = False,
    rollback: bool = False,
    resume: bool = False,
    evaluator: Any = None,
) -> dict[str, Any]:
    """Gate `challenger` against `champion` (or roll `champion` back); returns the decision and its figures.

    ``evaluator``: ``fn(model_name, challenger_version, champion_version) -> GateFigures``;
    default: the held-out evaluation of :func:`alignflow.tasks.promotion_eval.default_evaluator`.
    ``resume`` is accepted for the common stage signature (a promotion has nothing to resume).
    """
    cfg = config or AlignflowConfig()
    tracking.configure(Path(workdir), cfg.experiment)
    kind = gate_kind(model_name)
    rm_tags = registry.model_tags(model_name)
    if rollback:
        return _rollback(cfg, model_name, rm_tags)

    challenger = registry.resolve_version(model_name, registry.CHALLENGER)
    if challenger is None:
        raise LookupError(f"{model_name} has no '{registry.CHALLENGER}' version to promote")
    champion = registry.resolve_version(model_name, registry.CHAMPION)
    thresholds = Thresholds.from_config(cfg.promote)
    params = {"promote": cfg.promote.model_dump(mode="json"), "model": model_name, "challenger_version": challenger,
              "champion_version": champion or "", "override": override}
    with tracking.stage_run("promote", params, run_name=f"promote {model_name}",
                            tags={"alignflow.model": model_name}) as run:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(run), link_text="MLflow run of this promotion")
        figs: GateFigures | None = None
        if champion == challenger:
            decision = decide(kind, {}, None, thresholds, same_version=True)
        else:
            evaluate: Evaluator = evaluator or default_evaluator(Path(workdir), cfg.promote)
            figs = evaluate(model_name, challenger, champion)
            decision = decide(kind, figs.challenger, figs.champion, thresholds, override=override)
        at = _now()
        if figs is not None:
            mlflow.log_metrics({f"challenger/{k}": v for k, v in figs.challenger.items()})
            if figs.champion is not None:
                mlflow.log_metrics({f"champion/{k}": v for k, v in figs.champion.items()})
            if figs.info:
                mlflow.log_params({f"eval.{k}": v for k, v in figs.info.items()})
            if figs.examples:
                import pandas as pd

                mlflow.log_table(pd.DataFrame(figs.examples), artifact_file="promote/examples.json")
        d = decision.as_dict()
        mlflow.log_dict(d, "promote/decision.json")
        mlflow.set_tags({"alignflow.decision": decision.action, "alignflow.gate_passed": str(decision.passed).lower(),
                         "alignflow.override": str(override).lower()})
        if decision.move_champion:
            registry.set_alias(model_name, registry.CHAMPION, challenger)
            stack = push_champion(parse_history(rm_tags.get(HISTORY_TAG)), challenger, action=decision.action,
                                  at=at, run_id=run.info.run_id)
            _record_event(model_name, rm_tags, stack,
                          {"version": challenger, "action": decision.action, "from": champion, "at": at,
                           "run_id": run.info.run_id})
        if decision.action != "already_champion":
            vtags = {"decision": decision.action, "passed": str(decision.passed).lower(),
                     "override": str(override).lower(), "reason": decision.reason[:4000],
                     "champion_version": champion or "", "run_id": run.info.run_id, "at": at}
            if figs is not None:
                vtags.update({f"challenger.{k}": f"{v:.6g}" for k, v in figs.challenger.items()})
                vtags.update({f"champion.{k}": f"{v:.6g}" for k, v in (figs.champion or {}).items()})
            registry.tag_version(model_name, challenger, {TAG_PREFIX + k: v for k, v in vtags.items()})
        now_champion = registry.resolve_version(model_name, registry.CHAMPION)
        create_markdown_artifact(key=f"promote-{model_name}", markdown=_figures_markdown(
            model_name, figs, d, challenger, champion), description=f"Promotion gate of {model_name}")
        print(f"{model_name}: {decision.action} (challenger v{challenger}, champion was "
              f"{'v' + champion if champion else 'none'}, is {'v' + now_champion if now_champion else 'none'}); "
              f"{decision.reason}")
        return {"stage": "promote", "run_id": run.info.run_id, "model": model_name, "version": challenger,
                "decision": decision.action, "passed": decision.passed, "champion_before": champion,
                "champion": now_champion, "challenger_figures": figs.challenger if figs else {},
                "champion_figures": (figs.champion or {}) if figs else {}, "reason": decision.reason}


def _rollback(cfg: AlignflowConfig, model_name: str, rm_tags: dict[str, str]) -> dict[str, Any]:
    current = registry.resolve_version(model_name, registry.CHAMPION)
    target, stack = rollback_target(parse_history(rm_tags.get(HISTORY_TAG)), current)
    params = {"model": model_name, "champion_version": current or "", "restored_version": target}
    with tracking.stage_run("promote", params, run_name=f"rollback {model_name}",
                            tags={"alignflow.model": model_name, "alignflow.decision": "rolled_back"}) as run:
        create_link_artifact(key="mlflow-run", link=tracking.run_url(run), link_text="MLflow run of this rollback")
        at = _now()
        registry.set_alias(model_name, registry.CHAMPION, target)
        _record_event(model_name, rm_tags, stack,
                      {"version": target, "action": "rolled_back", "from": current, "at": at,
                       "run_id": run.info.run_id})
        if current is not None:
            registry.tag_version(model_name, current, {TAG_PREFIX + "rolled_back": json.dumps(
                {"at": at, "run_id": run.info.run_id, "restored": target})})
        registry.tag_version(model_name, target, {TAG_PREFIX + "restored": json.dumps(
            {"at": at, "run_id": run.info.run_id, "replaced": current})})
        create_markdown_artifact(
            key=f"promote-{model_name}",
            markdown=f"# Rollback of `{model_name}`\n\nchampion v{current} -> v{target} (previous champion)\n",
            description=f"Rollback of {model_name}")
        print(f"{model_name}: rolled back champion v{current} -> v{target}")
        return {"stage": "promote", "run_id": run.info.run_id, "model": model_name, "version": target,
                "decision": "rolled_back", "passed": True, "champion_before": current, "champion": target}


@flow(name="promote-all", log_prints=True)
def promote_all(workdir: str = "./alignflow-work", config: AlignflowConfig | None = None,
                resume: bool = False) -> dict[str, Any]:
    """Gate every model of ``promote.models`` that has a challenger (the pipeline's promote stage)."""
    cfg = config or AlignflowConfig()
    tracking.configure(Path(workdir), cfg.experiment)
    results = []
    for name in cfg.promote.models:
        if registry.resolve_version(name, registry.CHALLENGER) is None:
            print(f"{name}: no challenger registered, nothing to gate")
            continue
        results.append(promote(workdir=workdir, config=cfg, model_name=name))
    aliases = {r["model"]: {"challenger": r["version"], "champion": r["champion"], "decision": r["decision"]}
               for r in results}
    return {"stage": "promote", "run_id": results[-1]["run_id"] if results else "", "model": ",".join(aliases),
            "version": "", "results": results, "aliases": aliases}


if __name__ == "__main__":  # `python -m alignflow.flows.promote [options]`: the CLI command
    from alignflow.flows.cli import run_module

    run_module("promote")
