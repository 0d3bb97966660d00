"""Registered models are loaded as data: a tampered artifact is refused and none of its code runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from alignflow.models import UnsafeArtifactError, check_builtin_artifact, load_builtin_artifact
from alignflow.tasks import registry
import _ppo_models as tiny
from flowkit import tracking_restored

EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("code from the artifact ran")
from transformers import GPT2Config, GPT2LMHeadModel
class EvilConfig(GPT2Config):
    model_type = "evil"
class EvilForCausalLM(GPT2LMHeadModel):
    config_class = EvilConfig
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny GPT-2 registered in a fresh SQLite store, and the store's artifact folder."""
    root = tmp_path_factory.mktemp("registry")
    with tracking_restored():
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        exp = mlflow.create_experiment("security", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            version = registry.register_transformers(tiny.policy(), tiny.tokenizer(), name="tiny-policy")
        yield root, version


def _artifact_model_dir(root: Path) -> Path:
    configs = [p for p in (root / "artifacts").rglob("config.json") if p.parent.name == "model"]
    assert len(configs) == 1, configs
    return configs[0].parent


def _local_copy(root: Path, dst: Path) -> tuple[Path, Path]:
    model_dir = _artifact_model_dir(root)
    shutil.copytree(model_dir.parent, dst)
    return dst / "model", dst / "components" / "tokenizer"


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_untampered_registered_model_loads(registered):
    model, tok, version = registry.load_transformers_components("tiny-policy")
    assert version == registered[1]
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_tampered_registry_artifact_is_refused_and_runs_nothing(registered, tmp_path):
    """The attack: auto_map + custom architecture + a .py file that writes a marker, in the artifact store."""
    root, _ = registered
    model_dir = _artifact_model_dir(root)
    backup = tmp_path / "backup"
    shutil.copytree(model_dir, backup)
    marker = tmp_path / "pwned"
    try:
        (model_dir / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
        _edit_json(model_dir / "config.json", model_type="evil", architectures=["EvilForCausalLM"],
                   auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
        with pytest.raises(UnsafeArtifactError) as err:
            registry.load_transformers_components("tiny-policy")
        assert "evil.py" in str(err.value) and "\n" not in str(err.value)
        assert not marker.exists()
    finally:
        shutil.rmtree(model_dir)
        shutil.copytree(backup, model_dir)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("auto_map", "auto_map"),
        ("tokenizer_auto_map", "auto_map"),
        ("custom_architecture", "not a causal LM or sequence classifier"),
        ("unknown_model_type", "model_type 'evil'"),
        ("pickle_weights", "pytorch_model.bin"),
        ("no_safetensors", "no safetensors"),
        ("symlink", "symbolic link"),
        ("tokenizer_class", "tokenizer_class"),
    ],
)
def test_each_tampering_is_refused(registered, tmp_path, case, expected):
    model_dir, tok_dir = _local_copy(registered[0], tmp_path / "copy")
    marker = tmp_path / "pwned"
    if case == "auto_map":  # an auto_map alone, with the architecture left as shipped
        _edit_json(model_dir / "config.json", auto_map={"AutoModelForCausalLM": "modeling.Evil"})
    elif case == "tokenizer_auto_map":
        _edit_json(tok_dir / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tok.Evil", None]})
    elif case == "custom_architecture":
        _edit_json(model_dir / "config.json", architectures=["EvilForCausalLM"])
    elif case == "unknown_model_type":
        _edit_json(model_dir / "config.json", model_type="evil")
    elif case == "pickle_weights":
        (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    elif case == "no_safetensors":
        (model_dir / "model.safetensors").unlink()
    elif case == "symlink":
        (model_dir / "extra.json").symlink_to("/etc/hostname")
    elif case == "tokenizer_class":
        _edit_json(tok_dir / "tokenizer_config.json", tokenizer_class="EvilTokenizer")
    with pytest.raises(UnsafeArtifactError, match=expected):
        load_builtin_artifact(model_dir, tok_dir)
    assert not marker.exists()


def test_check_names_the_class_of_a_clean_artifact(registered, tmp_path):
    model_dir, tok_dir = _local_copy(registered[0], tmp_path / "copy")
    assert check_builtin_artifact(model_dir, tok_dir) == "GPT2LMHeadModel"
