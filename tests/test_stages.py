"""The stage registry: a stage declared once is picked up by the CLI, the config, the pipeline, its summary
table and promotion; the layers import downwards only."""

from __future__ import annotations

import ast
from pathlib import Path

import mlflow
import pytest
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from alignflow import stages
from alignflow.config import AlignflowConfig, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TOY_MODEL = "alignflow-toy"


class ToyConfig(BaseModel):
    """The toy stage's own config section."""

    model_config = ConfigDict(extra="forbid")
    scale: float = Field(1.0, description="What the toy stage reports as its score.")


def toy_flow(workdir: str = "./alignflow-work", config: AlignflowConfig | None = None, resume: bool = False) -> dict:
    """A stage as small as one can be: one MLflow run with one metric."""
    from alignflow.tasks import tracking

    cfg = config or AlignflowConfig()
    tracking.configure(Path(workdir), cfg.experiment)
    section = cfg.section("toy")
    with tracking.stage_run("toy", {"toy": section.model_dump(mode="json")}) as run:
        mlflow.log_metric("toy/score", section.scale)
        return {"stage": "toy", "run_id": run.info.run_id, "model": TOY_MODEL, "version": None,
                "toy/score": section.scale, "ignored": 1.0}


@pytest.fixture
def toy():
    stage = stages.register(stages.Stage(
        "toy", __name__, "toy_flow", help="A toy stage that reports a score.", section="toy",
        config_model=f"{__name__}:ToyConfig", reads=("posts",), reads_models=(stages.BASE_MODEL,), model=TOY_MODEL, gate="lm",
        key_metrics=("toy/score",), after=("base",)))
    try:
        yield stage
    finally:
        stages.REGISTRY.pop("toy")


def test_the_builtin_registry():
    assert stages.default_pipeline_stages() == ["ingest", "base", "pmp", "pm", "sft", "ppo", "promote"]
    # pmp-transfer is a pipeline stage that runs only when pipeline.stages names it (the demo does)
    assert stages.pipeline_stages() == ["ingest", "base", "pmp", "pm", "sft", "ppo", "pmp-transfer", "promote"]
    assert stages.schedule(stages.pipeline_stages())[2] == [["pmp", "pm", "pmp-transfer"], ["sft"]]
    assert stages.models() == [stages.BASE_MODEL, stages.PMP_MODEL, stages.REWARD_MODEL, stages.SFT_MODEL,
                               stages.POLICY_MODEL]
    assert stages.schedule(stages.default_pipeline_stages()) == [
        [["ingest"]], [["base"]], [["pmp", "pm"], ["sft"]], [["ppo"]], [["promote"]]]
    # without pmp, pm waits for base only; without ingest, base starts first
    assert stages.schedule(["base", "pm", "sft", "ppo"]) == [[["base"]], [["pm"], ["sft"]], [["ppo"]]]
    # a stage that trains under --processes has the function its other processes call
    import importlib

    launched = [n for n, st in stages.REGISTRY.items() if st.distributed]
    assert launched == ["base", "pmp", "pm", "sft", "ppo"]
    assert all(callable(getattr(importlib.import_module(stages.get(n).module), "train_shard", None)) for n in launched)
    assert AlignflowConfig().pipeline.stages == stages.default_pipeline_stages()
    assert AlignflowConfig().promote.models == stages.models()


def test_a_registration_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        stages.register(stages.get("sft"))
    with pytest.raises(ValueError, match="unknown stage"):
        stages.register(stages.Stage("x", "m", "f", help="", after=("nope",)))
    with pytest.raises(ValueError, match="registers no model"):
        stages.register(stages.Stage("x", "m", "f", help="", gate="lm"))
    assert "x" not in stages.REGISTRY
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(None, ["pipeline.stages=[ingest,dpo]"])


def test_a_registered_stage_is_picked_up_everywhere(toy, tmp_path):
    from alignflow.flows import cli, pipeline
    from alignflow.tasks import promotion, stage_cache

    # config: its own section (validated, unknown keys refused), the pipeline's stages, the gated models
    cfg = load_config(None, ["toy.scale=2.5"])
    assert cfg.section("toy").scale == 2.5
    with pytest.raises(ConfigError, match="toy"):
        load_config(None, ["toy.sclae=2"])
    assert cfg.pipeline.stages == ["ingest", "base", "pmp", "pm", "sft", "ppo", "toy", "promote"]
    assert cfg.promote.models[-1] == TOY_MODEL
    # pipeline: order, branches (beside pmp -> pm and sft), cache key (its section and what it reads)
    order = pipeline.stages_to_run(cfg)
    assert pipeline.schedule(order)[2] == [["pmp", "pm"], ["sft"], ["toy"]]
    key = pipeline.stage_key("toy", cfg, {"posts": "p1"}, {stages.BASE_MODEL: "1"})
    assert key != pipeline.stage_key("toy", load_config(None, ["toy.scale=3"]), {"posts": "p1"},
                                     {stages.BASE_MODEL: "1"})
    assert key != pipeline.stage_key("toy", cfg, {"posts": "p2"}, {stages.BASE_MODEL: "1"})
    assert key != pipeline.stage_key("toy", cfg, {"posts": "p1"}, {stages.BASE_MODEL: "2"})
    # summary table: its key metrics only
    assert stage_cache.key_metrics({"stage": "toy", "toy/score": 2.5, "ignored": 1.0}) == "toy/score=2.5"
    # promotion: its model's gate
    assert promotion.gate_kind(TOY_MODEL) == "lm"

    # CLI: `alignflow toy` with the common options, a user error is one line and exit 2
    app = cli.build_app()
    runner = CliRunner()
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "toy" in res.output and "A toy stage that reports a score." in res.output
    work = tmp_path / "w"
    res = runner.invoke(app, ["toy", "--workdir", str(work), "--set", "toy.scale=4", "--set",
                              "experiment=alignflow/toy"])
    assert res.exit_code == 0, res.output
    assert "toy/score" in res.output and "4" in res.output
    runs = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}").search_runs(
        [mlflow.get_experiment_by_name("alignflow/toy").experiment_id])
    assert [r.data.metrics["toy/score"] for r in runs] == [4.0]
    res = runner.invoke(app, ["toy", "--workdir", str(work), "--set", "toy.scale=big"])
    assert res.exit_code == 2 and res.output.startswith("error: invalid config") and "toy.scale" in res.output


@pytest.mark.slow
def test_the_pipeline_runs_a_registered_stage_and_tabulates_it(toy, tmp_path, prefect_harness):
    from alignflow.flows.pipeline import pipeline

    out = pipeline(workdir=str(tmp_path / "w"), config=load_config(None, ["toy.scale=1.5"]), stages=["toy"])
    assert [r["stage"] for r in out["stages"]] == ["toy"]
    row = out["stages"][0]
    assert row["status"] == "ran" and row["metrics"] == "toy/score=1.5" and row["model"] == TOY_MODEL
    assert "toy      ran" in out["table"] and TOY_MODEL in out["table"]


# -- layering ---------------------------------------------------------------------------------------
LAYERS = {"alignflow": 0, "data_contracts": 1, "models": 1, "tasks": 2, "flows": 3}
FOLDERS = {"alignflow": "alignflow", "data_contracts": "data_contracts", "models": "models", "tasks": "tasks",
           "flows": "flows"}


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "alignflow":
        return None
    if len(parts) == 1 or parts[1] not in LAYERS:
        return "alignflow"
    return parts[1]


def test_layers_import_downwards_only():
    """flows -> tasks -> models, data_contracts -> alignflow (config, stages); never the other way."""
    wrong = []
    for layer, folder in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    target = _layer_of(name)
                    if target is not None and LAYERS[target] > LAYERS[layer]:
                        wrong.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not wrong, "\n".join(wrong)
