"""The stage registry: every stage of alignflow declared once.

A :class:`Stage` says what the stage is called, which flow runs it, which
config section it reads, which datasets and registered models it starts from,
which model it registers and under which promotion gate, which figures the
pipeline's summary table shows for it, and which stages it runs after. The
rest of alignflow is derived from :data:`REGISTRY`:

* ``alignflow <stage>``: one CLI command per stage (``flows/cli.py``);
* ``alignflow pipeline``: the order, the branches that may run side by side,
  the cache key and the summary table (``flows/pipeline.py``);
* ``pipeline.stages`` and ``promote.models`` in the config (``alignflow/config.py``);
* the promotion gate of each registered model (``tasks/promotion.py``).

Adding a stage is one flow module plus one entry here (``docs/stages.md``).
This module imports nothing of alignflow: every layer may read it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# -- registered model names ----------------------------------------------------------------------
BASE_MODEL = "alignflow-base"
PMP_MODEL = "alignflow-pmp"
REWARD_MODEL = "alignflow-reward"
SFT_MODEL = "alignflow-policy-sft"
POLICY_MODEL = "alignflow-policy"

#: ``after=EVERY_STAGE``: the stage runs after every other pipeline stage (promotion).
EVERY_STAGE = "*"
#: ``reads_models=EVERY_MODEL``: the stage reads every registered model (promotion).
EVERY_MODEL = "*"


@dataclass(frozen=True)
class Stage:
    """One stage of alignflow (see the module docstring for what is derived from it)."""

    name: str  #: CLI command and ``alignflow.stage`` tag, e.g. ``sft``
    module: str  #: module of its Prefect flow, e.g. ``alignflow.flows.sft``
    function: str  #: the flow in that module: ``fn(workdir=, config=, resume=) -> summary dict``
    help: str  #: one line: what it does (CLI help)
    section: str | None = None  #: config section it reads (``AlignflowConfig`` attribute or a plugin section)
    reads: tuple[str, ...] = ()  #: datasets of the latest ingest it reads (cache key: content digests)
    reads_models: tuple[str, ...] | str = ()  #: registered models it may start from (cache key: versions)
    model: str | None = None  #: registered model it produces (alias ``challenger``)
    gate: str | None = None  #: promotion gate kind of that model: ``lm``, ``preference``, ``policy``
    key_metrics: tuple[str, ...] = ()  #: figures of its summary shown in the pipeline's table
    after: tuple[str, ...] | str = ()  #: stages it runs after (those absent from a run are skipped over)
    key_config: tuple[str, ...] = ()  #: other config values (dotted) that change its result (cache key)
    pipeline: bool = True  #: a step of ``alignflow pipeline``
    default: bool = True  #: in the pipeline's default stage list (else only when ``pipeline.stages`` names it)
    command: bool = True  #: the generic CLI command (workdir, config, --set, --resume)
    distributed: bool = False  #: trains under ``--processes N`` / ``--launch accelerate``
    config_model: Any = None  #: pydantic model of ``section`` when it is not a field of ``AlignflowConfig``

    def section_model(self) -> Any:
        """``config_model``, imported when it is given as ``"module:Class"``."""
        if isinstance(self.config_model, str):
            module, _, attr = self.config_model.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.config_model

    def load_flow(self) -> Callable[..., dict]:
        return getattr(importlib.import_module(self.module), self.function)

    @property
    def flow_path(self) -> str:
        return f"{self.module}.{self.function}"


REGISTRY: dict[str, Stage] = {}


def register(stage: Stage, *, replace: bool = False) -> Stage:
    """Add a stage (a plugin, or a test's toy stage); its ``after`` stages must already be registered."""
    if stage.name in REGISTRY and not replace:
        raise ValueError(f"stage {stage.name!r} is already registered")
    missing = [s for s in _after(stage) if s not in REGISTRY]
    if missing:
        raise ValueError(f"stage {stage.name!r} runs after unknown stage(s) {missing}")
    if stage.gate is not None and stage.model is None:
        raise ValueError(f"stage {stage.name!r} has a gate but registers no model")
    REGISTRY[stage.name] = stage
    return stage


def get(name: str) -> Stage:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(REGISTRY)}") from None


def _after(stage: Stage) -> tuple[str, ...]:
    if stage.after == EVERY_STAGE:
        return tuple(n for n, s in REGISTRY.items() if s.pipeline and n != stage.name and s.after != EVERY_STAGE)
    return tuple(stage.after)


def order() -> list[str]:
    """Every stage, each after the stages it runs after (ties: registration order)."""
    done: list[str] = []
    pending = list(REGISTRY)
    while pending:
        ready = next((n for n in pending if all(a in done for a in _after(REGISTRY[n]))), None)
        if ready is None:
            raise ValueError(f"the stages {pending} run after each other in a cycle")
        done.append(ready)
        pending.remove(ready)
    return done


def pipeline_stages() -> list[str]:
    """The stages ``alignflow pipeline`` can run, in order."""
    return [n for n in order() if REGISTRY[n].pipeline]


def default_pipeline_stages() -> list[str]:
    """The stages ``alignflow pipeline`` runs when ``pipeline.stages`` is not set, in order."""
    return [n for n in order() if REGISTRY[n].pipeline and REGISTRY[n].default]


def models() -> list[str]:
    """Registered model names, in stage order."""
    return [REGISTRY[n].model for n in order() if REGISTRY[n].model]


def gate_kinds() -> dict[str, str]:
    """Registered model -> its promotion gate kind."""
    return {REGISTRY[n].model: REGISTRY[n].gate for n in order() if REGISTRY[n].model and REGISTRY[n].gate}


def stage_of_model(model: str) -> Stage | None:
    return next((s for s in REGISTRY.values() if s.model == model), None)


def models_read(stage: Stage) -> tuple[str, ...]:
    return tuple(models()) if stage.reads_models == EVERY_MODEL else tuple(stage.reads_models)


def dependencies(name: str, present: Iterable[str]) -> set[str]:
    """The stages of ``present`` that ``name`` waits for (through absent stages too)."""
    present = set(present)
    out: set[str] = set()
    todo = list(_after(get(name)))
    seen: set[str] = set()
    while todo:
        s = todo.pop()
        if s in seen:
            continue
        seen.add(s)
        if s in present:
            out.add(s)
        else:
            todo.extend(_after(get(s)))
    return out


def schedule(run: list[str]) -> list[list[list[str]]]:
    """Steps of branches, e.g. ``[[ingest]], [[base]], [[pmp, pm], [sft]], [[ppo]], [[promote]]``.

    Every stage of a step waits for the steps before it; the branches of one
    step are independent of each other and may run side by side; a branch runs
    its stages in order.
    """
    deps = {s: dependencies(s, run) for s in run}
    done: set[str] = set()
    steps: list[list[list[str]]] = []
    while len(done) < len(run):
        ready = [s for s in run if s not in done and deps[s] <= done]
        if not ready:
            raise ValueError(f"stages {sorted(set(run) - done)} wait for each other")
        branches = [[s] for s in ready]
        claimed = set(ready)
        if len(branches) > 1:
            for branch in branches:  # a branch takes the stages that wait only for itself and what is done
                for s in run:
                    if s not in done and s not in claimed and deps[s] & set(branch) and deps[s] <= done | set(branch):
                        branch.append(s)
                        claimed.add(s)
        steps.append(branches)
        done |= claimed
    return steps


# -- the stages of alignflow -----------------------------------------------------------------------
INGEST = register(Stage(
    "ingest", "alignflow.flows.ingest", "ingest", section="ingest", command=False,
    help="Turn upvote dumps into contracted preference datasets (one MLflow run)."))
register(Stage(
    "base", "alignflow.flows.base", "base", section="base", reads=("posts",),
    model=BASE_MODEL, gate="lm", key_metrics=("final_loss", "eval/loss"), after=("ingest",), distributed=True,
    help=f"Pretrain the small LM on the ingested text (or adopt a named model); register {BASE_MODEL}."))
register(Stage(
    "pmp", "alignflow.flows.pmp", "pmp", section="pmp", reads=("pairs",), reads_models=(BASE_MODEL,),
    model=PMP_MODEL, gate="preference", key_metrics=("final_loss", "eval/pairwise_accuracy"), after=("base",),
    distributed=True,
    help=f"Preference-model pretraining on a weighted mixture of generic pairs; register {PMP_MODEL}."))
register(Stage(
    "pm", "alignflow.flows.pm", "pm", section="pm", reads=("pairs", "demos"),
    reads_models=(PMP_MODEL, BASE_MODEL), key_config=("pmp.enabled",),
    model=REWARD_MODEL, gate="preference", key_metrics=("final_loss", "eval/pairwise_accuracy"),
    after=("pmp", "base"), distributed=True,
    help=f"Fine-tune the reward model on task pairs, evaluate, centre on demos; register {REWARD_MODEL}."))
register(Stage(
    "sft", "alignflow.flows.sft", "sft", section="sft", reads=("demos", "posts"), reads_models=(BASE_MODEL,),
    model=SFT_MODEL, gate="lm", key_metrics=("final_loss", "eval/loss", "eval/perplexity", "planted_rate"),
    after=("base",), distributed=True,
    help=f"Fine-tune the base LM on demos (loss on responses); register {SFT_MODEL}."))
register(Stage(
    "ppo", "alignflow.flows.ppo", "ppo", section="ppo", reads=("prompts", "demos"),
    reads_models=(SFT_MODEL, REWARD_MODEL), model=POLICY_MODEL, gate="policy",
    key_metrics=("ppo/reward_mean", "ppo/kl", "eval/reward_mean", "eval/win_rate", "eval/kl"),
    after=("pm", "sft"), distributed=True,
    help=f"Optimise the SFT policy against the reward model with PPO; register {POLICY_MODEL}."))
register(Stage(
    "pmp-transfer", "alignflow.flows.pmp_transfer", "pmp_transfer", section="pmp_transfer", default=False,
    reads=("pairs",), reads_models=(PMP_MODEL, BASE_MODEL), after=("pmp",),
    key_config=("pm.model.max_length", "pm.use_margin", "pm.centering", "pm.site", "pm.pairs_file"),
    key_metrics=("n_pairs", "pmp_accuracy", "base_accuracy", "head_start"),
    help="Accuracy vs number of task pairs, fine-tuned from the PMP model and from the base LM."))
register(Stage(
    "promote", "alignflow.flows.promote", "promote_all", section="promote", command=False,
    reads=("pairs", "prompts", "demos", "posts"), reads_models=EVERY_MODEL, after=EVERY_STAGE,
    help="Gate every challenger against its champion on held-out data; move `champion` when it passes."))
