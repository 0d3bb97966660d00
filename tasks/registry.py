"""MLflow model registry conventions: log, register, alias.

Registered names: the constants of :mod:`alignflow.stages` (``alignflow-base``,
``alignflow-pmp``, ``alignflow-reward``, ``alignflow-policy-sft``,
``alignflow-policy``), one per stage that registers a model. A new version gets the alias
``challenger``; only a promotion gate moves ``champion``. Everywhere a model is
loaded by reference it is ``models:/<name>@<alias>``.

Registered models are loaded as data, never as code: the artifact's weights
(safetensors) and JSON configs are read by a transformers class chosen by
alignflow (:func:`alignflow.models.load_builtin_artifact`), so a model whose
artifact was tampered with (``auto_map``, custom code, pickles) is refused.
``mlflow.transformers.load_model`` is not used here: it loads configs with
``trust_remote_code=True``.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

CHALLENGER = "challenger"
CHAMPION = "champion"

# What a served copy of a model needs; pinned to the versions it was trained with.
# (MLflow's inferred requirements add torchvision for torch models, which does not
# import beside the CPU torch wheel; see known pitfalls.)
_RUNTIME_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")


def pip_requirements() -> list[str]:
    reqs = []
    for pkg in _RUNTIME_PACKAGES:
        try:
            version = importlib.metadata.version(pkg).split("+")[0]
            reqs.append(f"{pkg}=={version}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return reqs


def register_transformers(
    model: Any,
    tokenizer: Any,
    *,
    name: str,
    task: str = "text-generation",
    alias: str = CHALLENGER,
    tags: dict[str, str] | None = None,
) -> str:
    """Log a Hugging Face model + tokenizer in the active run, register it, set ``alias``; return the version."""
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task=task,
        registered_model_name=name,
        pip_requirements=pip_requirements(),
        await_registration_for=60,
    )
    client = MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, str(value))
    replaced = replace_killed_attempts(client, name, version)
    if replaced:
        client.set_model_version_tag(name, version, "alignflow.replaces", ",".join(replaced))
        print(f"{name}: version {version} replaces version {', '.join(replaced)} of the killed attempt it resumed")
    return version


def resumed_attempts(client: MlflowClient, run_id: str) -> list[str]:
    """The unfinished runs this run resumed, nearest first (tags ``alignflow.resumed_from``)."""
    chain: list[str] = []
    current = client.get_run(run_id).data.tags.get("alignflow.resumed_from")
    while current and current not in chain and current != run_id:
        try:
            run = client.get_run(current)
        except mlflow.exceptions.MlflowException:
            break
        if run.info.status == "FINISHED":
            break
        chain.append(current)
        current = run.data.tags.get("alignflow.resumed_from")
    return chain


def replace_killed_attempts(client: MlflowClient, name: str, version: str) -> list[str]:
    """Delete the versions of ``name`` that the killed attempts resumed by the active run registered (a kill
    after registering, before the run ended), unless an alias other than ``challenger`` points at them; the
    resumed attempt's ``version`` is their replacement. Returns the deleted version numbers."""
    active = mlflow.active_run()
    if active is None:
        return []
    attempts = set(resumed_attempts(client, active.info.run_id))
    if not attempts:
        return []
    deleted = []
    for old in client.search_model_versions(f"name='{name}'"):
        if str(old.version) != version and old.run_id in attempts and set(old.aliases or ()) <= {CHALLENGER}:
            client.delete_model_version(name, str(old.version))
            deleted.append(str(old.version))
    return sorted(deleted, key=int)


def model_uri(name: str, alias: str = CHALLENGER) -> str:
    return f"models:/{name}@{alias}"


def resolve_version(name: str, alias: str = CHALLENGER) -> str | None:
    """The version behind an alias, or None when the model or alias does not exist."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def load_transformers_components(name: str, alias: str = CHALLENGER) -> tuple[Any, Any, str]:
    """(model, tokenizer, version) of a registered transformers model."""
    version = resolve_version(name, alias)
    if version is None:
        raise LookupError(
            f"no registered model {name}@{alias} in {mlflow.get_tracking_uri()}; run the stage that produces it first"
        )
    model, tokenizer = load_version_components(name, version)
    return model, tokenizer, version


def load_version_components(name: str, version: str) -> tuple[Any, Any]:
    """(model, tokenizer) of one registered version, loaded as weights + configs only (see the module doc)."""
    from alignflow.models import load_builtin_artifact

    with tempfile.TemporaryDirectory(prefix="alignflow-model-") as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        model, tokenizer = load_builtin_artifact(root / "model", root / "components" / "tokenizer")
    model.eval()
    return model, tokenizer


def download_model_dir(name: str, alias: str = CHALLENGER, dst: Path | None = None) -> Path:
    """Local folder of a registered model's files (MLflow layout)."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri(name, alias),
                                                     dst_path=str(dst) if dst else None))


def resolve_start_model(name_or_path: str | None, registered: str, *,
                        trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """``(model, tokenizer, source)`` a causal-LM stage starts from: the named model (hub id or folder) when
    given, else ``registered@challenger``; ``source`` is the path or ``models:/<name>/<version>``."""
    if name_or_path:
        model, tok = load_start_lm(name_or_path, trust_remote_code=trust_remote_code)
        return model, tok, name_or_path
    model, tok, version = load_transformers_components(registered, CHALLENGER)
    return model, tok, f"models:/{registered}/{version}"


def load_start_lm(source: str, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a ``source`` from :func:`resolve_start_model` (the same weights again, e.g. on
    another process of a launched stage)."""
    if source.startswith("models:/"):
        name, _, version = source.removeprefix("models:/").partition("/")
        return load_version_components(name, version)
    from alignflow.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(source, trust_remote_code=trust_remote_code)
    return load_causal_lm(source, trust_remote_code=trust_remote_code, tokenizer=tok), tok


# -- writes of the promotion gates (aliases and tags); every registry write of alignflow is in this module --
def model_tags(name: str) -> dict[str, str]:
    """The registered model's tags; LookupError when it is not registered."""
    try:
        return dict(MlflowClient().get_registered_model(name).tags)
    except mlflow.exceptions.MlflowException:
        raise LookupError(f"no registered model {name} in {mlflow.get_tracking_uri()}; run its stage first") from None


def set_model_tags(name: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_registered_model_tag(name, key, value)


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)


def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
