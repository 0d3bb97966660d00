"""Load and save pretrained models and tokenizers, safely and offline-friendly.

* Weights come from ``safetensors`` files; a checkpoint that only has pickled
  ``.bin`` weights is still loaded (transformers reads them with
  ``weights_only=True``), with a warning.
* ``trust_remote_code`` is off unless the caller turns it on.
* A tokenizer without a padding token, or whose padding token is its eos
  token, gets a dedicated ``<|pad|>`` token (``tok.alignflow_added_pad`` says
  so); the model loaders grow the embedding matrix to the tokenizer's length
  and set ``config.pad_token_id`` from it.
* :func:`load_builtin_artifact` loads a model stored as an artifact (a
  registered model) as data only: safetensors weights and a config naming an
  architecture transformers ships; anything that could run code from the
  artifact (``auto_map``, a custom class, ``.py`` files, pickled weights) is
  refused with :class:`UnsafeArtifactError` before transformers sees it.
* With ``HF_HUB_OFFLINE=1`` (this platform's default), a name that is neither
  a local folder nor in the Hugging Face cache fails at once with
  :class:`ModelLoadError` instead of retrying the network.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .tokenizer import PAD_TOKEN, portable_tokenizer_class

logger = logging.getLogger(__name__)

__all__ = [
    "ModelLoadError",
    "UnsafeArtifactError",
    "check_builtin_artifact",
    "load_builtin_artifact",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "save_pretrained",
]

_SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class ModelLoadError(OSError):
    """A model or tokenizer could not be loaded (missing, no hub access, bad files)."""


class UnsafeArtifactError(ModelLoadError):
    """A stored model that would run code of its own when loaded (custom architecture, auto_map, pickle)."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or Path(name).exists()
    )


def _load_error(what: str, name: str, err: BaseException) -> ModelLoadError:
    """A clear message for why ``name`` did not load."""
    path = Path(name).expanduser()
    if path.is_dir():
        msg = f"could not load the {what} from the local folder {str(path)!r}: {err}"
    elif _looks_like_path(name):
        msg = f"could not load the {what} {name!r}: no such folder. Pass a folder written by save_pretrained."
    elif not isinstance(err, OSError):
        msg = f"could not load the {what} {name!r}: {type(err).__name__}: {err}"
    else:
        hub = (
            "there is no Hugging Face hub access here (HF_HUB_OFFLINE=1)"
            if _offline()
            else "the Hugging Face hub could not be reached or does not have it"
        )
        msg = (
            f"could not load the {what} {name!r}: it is not a local folder and not in the Hugging Face cache, "
            f"and {hub}. Pass a local folder (written by save_pretrained, or a downloaded model) instead. "
            f"Underlying error: {type(err).__name__}: {err}"
        )
    return ModelLoadError(msg)


def _check_name(what: str, name_or_path: str | os.PathLike) -> str:
    name = os.fspath(name_or_path)
    if not name:
        raise ModelLoadError(f"no {what} given: name_or_path is empty")
    if _looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise _load_error(what, name, FileNotFoundError(name))
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    padding_side: str = "right",
) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` with a dedicated padding token.

    If the tokenizer has no pad token, or its pad token is its eos token, a
    ``<|pad|>`` special token is added and ``tok.alignflow_added_pad`` is True
    (then ``len(tok)`` may exceed the model's embedding rows: the model loaders
    here resize, other callers must ``model.resize_token_embeddings(len(tok))``).
    Otherwise ``tok.alignflow_added_pad`` is False.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    name = _check_name("tokenizer", name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error("tokenizer", name, err) from err
    tok.padding_side = padding_side
    added = False
    if tok.pad_token is None or (tok.eos_token is not None and tok.pad_token_id == tok.eos_token_id):
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
        added = True
        if tok.eos_token_id is not None and tok.pad_token_id == tok.eos_token_id:  # pragma: no cover - defensive
            raise ModelLoadError(f"tokenizer {name!r}: could not give padding an id distinct from eos")
        logger.info("tokenizer %s had no distinct pad token: added %s (id %d)", name, PAD_TOKEN, tok.pad_token_id)
    tok.alignflow_added_pad = added
    return tok


# --------------------------------------------------------------------------- models


def _weights_format(name: str) -> str | None:
    """'safetensors', 'bin' or None (unknown: not local and not cached) for ``name``."""
    path = Path(name)
    if path.is_dir():
        files = {p.name for p in path.iterdir()}
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
            return None
        try:
            files = {f for f in _SAFETENSORS_FILES + _PICKLE_FILES if isinstance(try_to_load_from_cache(name, f), str)}
        except ValueError:  # not a valid repo id: from_pretrained reports it
            return None
    if any(f in files for f in _SAFETENSORS_FILES):
        return "safetensors"
    if any(f in files for f in _PICKLE_FILES):
        return "bin"
    return None


def _dtype_kwargs(torch_dtype: Any) -> dict[str, Any]:
    if torch_dtype is None:
        return {}
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        torch_dtype = getattr(torch, torch_dtype)
    # transformers 5 renamed `torch_dtype` to `dtype` (the old name warns).
    return {("dtype" if _is_v5() else "torch_dtype"): torch_dtype}


def _is_v5() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def _from_pretrained(auto_cls, what: str, name_or_path, *, trust_remote_code: bool, **kwargs) -> PreTrainedModel:
    name = _check_name(what, name_or_path)
    fmt = _weights_format(name)
    use_safetensors = True
    if fmt == "bin":
        logger.warning(
            "%s %s has no safetensors weights: loading pickled pytorch_model.bin (weights_only). "
            "Re-save it with alignflow's save_pretrained to get safetensors.",
            what,
            name,
        )
        use_safetensors = False
    try:
        return auto_cls.from_pretrained(
            name, trust_remote_code=trust_remote_code, use_safetensors=use_safetensors, **kwargs
        )
    except (OSError, ValueError) as err:  # missing files; bad or unknown config (ValueError)
        raise _load_error(what, name, err) from err


def _fit_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedModel:
    if tokenizer is None:
        return model
    n = len(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if n > rows:
        logger.info("resizing token embeddings from %d to %d rows for the tokenizer", rows, n)
        model.resize_token_embeddings(n)
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.pad_token_id = tokenizer.pad_token_id
    return model


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    torch_dtype: torch.dtype | str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """A causal LM from a local folder (or the HF cache), safetensors first.

    With ``tokenizer``, the embeddings grow to ``len(tokenizer)`` if needed and
    ``config.pad_token_id`` becomes the tokenizer's pad id.
    """
    model = _from_pretrained(
        AutoModelForCausalLM,
        "causal LM",
        name_or_path,
        trust_remote_code=trust_remote_code,
        **_dtype_kwargs(torch_dtype),
    )
    return _fit_to_tokenizer(model, tokenizer)


def load_sequence_classifier(
    name_or_path: str | os.PathLike,
    *,
    num_labels: int = 1,
    trust_remote_code: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """A sequence classifier (``num_labels=1``: a reward model) from a folder.

    A causal-LM folder works: the transformer body is loaded, and the score
    head is newly initialised (transformers warns about it). The score is read
    at the last non-pad token, so ``config.pad_token_id`` is set from
    ``tokenizer`` (and must differ from eos).
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    model = _from_pretrained(
        AutoModelForSequenceClassification,
        "sequence classifier",
        name_or_path,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    return _fit_to_tokenizer(model, tokenizer)


# --------------------------------------------------------------------------- artifacts (data only)

_CODE_SUFFIXES = (".py", ".pyc", ".so", ".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnsafeArtifactError(f"{what} {path} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise UnsafeArtifactError(f"{what} {path} is not a JSON object")
    return data


def _has_key(obj: Any, key: str) -> bool:
    if isinstance(obj, dict):
        return key in obj or any(_has_key(v, key) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_key(v, key) for v in obj)
    return False


def _builtin_model_class(config: dict, where: Path) -> str:
    """The transformers class named by ``config`` if transformers ships it for its ``model_type``, else refuse."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise UnsafeArtifactError(f"{where}: model_type {model_type!r} is not an architecture transformers ships")
    archs = config.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)):
        raise UnsafeArtifactError(f"{where}: 'architectures' must name exactly one class, got {archs!r}")
    shipped = set()
    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        names = mapping.get(model_type, ())
        shipped.update([names] if isinstance(names, str) else names)
    if archs[0] not in shipped:
        raise UnsafeArtifactError(
            f"{where}: architecture {archs[0]!r} is not a causal LM or sequence classifier that transformers "
            f"ships for model_type {model_type!r}")
    return archs[0]


def check_builtin_artifact(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> str:
    """Refuse a stored model unless loading it runs no code from it; return its transformers class name.

    Allowed: ``config.json`` without ``auto_map`` whose ``model_type`` and
    single architecture transformers ships, safetensors weights, a tokenizer
    config without ``auto_map`` naming a transformers tokenizer class. Any
    Python, pickle or other executable-looking file in either folder is refused.
    """
    model_dir = Path(model_dir)
    folders = [model_dir] + ([Path(tokenizer_dir)] if tokenizer_dir is not None else [])
    for folder in folders:
        if not folder.is_dir():
            raise UnsafeArtifactError(f"{folder}: the stored model has no such folder")
        for f in folder.rglob("*"):
            if f.is_symlink() or (f.is_file() and f.name.lower().endswith(_CODE_SUFFIXES)):
                raise UnsafeArtifactError(
                    f"{f}: stored models are loaded as safetensors weights and JSON only; "
                    f"{'a symbolic link' if f.is_symlink() else 'code or pickled data'} is refused")
    config = _read_json(model_dir / "config.json", "model config")
    for folder in folders:
        for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
            if (folder / name).is_file() and _has_key(_read_json(folder / name, "config"), "auto_map"):
                raise UnsafeArtifactError(
                    f"{folder / name}: 'auto_map' refused (it makes transformers import code shipped "
                    "with the model); registered models must use an architecture transformers ships")
    arch = _builtin_model_class(config, model_dir / "config.json")
    if not any((model_dir / f).is_file() for f in _SAFETENSORS_FILES):
        raise UnsafeArtifactError(f"{model_dir}: no safetensors weights (model.safetensors)")
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        import transformers

        tok_cls = _read_json(Path(tokenizer_dir) / "tokenizer_config.json", "tokenizer config").get("tokenizer_class")
        if tok_cls is not None and not (isinstance(tok_cls, str) and hasattr(transformers, tok_cls)):
            raise UnsafeArtifactError(f"{tokenizer_dir}: tokenizer_class {tok_cls!r} is not one transformers ships")
    return arch


def load_builtin_artifact(
    model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model, tokenizer) of a stored model, after :func:`check_builtin_artifact`; no code from the folder runs."""
    import transformers

    arch = check_builtin_artifact(model_dir, tokenizer_dir)
    cls = getattr(transformers, arch)
    try:
        model = cls.from_pretrained(str(model_dir), trust_remote_code=False, use_safetensors=True)
        tok = (AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
               if tokenizer_dir is not None else None)
    except (OSError, ValueError) as err:
        raise _load_error("stored model", str(model_dir), err) from err
    return model, tok


# --------------------------------------------------------------------------- saving


def save_pretrained(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: str | os.PathLike
) -> Path:
    """Write model (safetensors) + config + tokenizer to the folder ``path``, atomically.

    Everything goes to ``<path>.tmp-<pid>`` first; then an existing ``path`` is
    moved aside, the new folder renamed into place and the old one deleted. A
    crash leaves either the old folder or the new one at ``path`` (plus, at
    worst, a stray ``.tmp-``/``.old-`` folder beside it), never a half-written one.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        save_kwargs: dict[str, Any] = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            save_kwargs["safe_serialization"] = True  # transformers 4; 5 always writes safetensors
        model.save_pretrained(str(tmp), **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            portable_tokenizer_class(tmp)
        if not any((tmp / f).is_file() for f in _SAFETENSORS_FILES):
            raise RuntimeError(f"save_pretrained wrote no safetensors file into {tmp}")
        if path.exists():
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
