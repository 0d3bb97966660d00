"""Content digests of the files and folders a stage's config names.

A config names inputs by path: a user's pairs file (``pm.pairs_file``), a pair
source's data (``pmp.sources[].data``), a local start model
(``*.model.name_or_path``). The path alone does not say what the stage reads: a
file edited in place keeps its name. The pipeline's cache key therefore holds
the digest of what each named path holds now (:func:`named_file_digests`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Config fields whose value is a path to an input (besides every field ending in ``_file``).
PATH_FIELDS = frozenset({"pairs_file", "data", "name_or_path", "policy_model", "reward_model"})
_CHUNK = 1 << 20


def named_paths(config: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted field, path)`` of every non-empty path field in a dumped config (dicts and lists)."""
    if isinstance(config, dict):
        for key, value in config.items():
            field = f"{where}.{key}" if where else str(key)
            if isinstance(value, str) and value and (key in PATH_FIELDS or str(key).endswith("_file")):
                yield field, value
            else:
                yield from named_paths(value, field)
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            yield from named_paths(value, f"{where}[{i}]")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def path_digest(path: str | os.PathLike) -> str | None:
    """sha256 of a file's bytes; of a folder, over its files' relative paths and digests (symlinked folders
    are not followed); None when nothing is there (a hub model id, a file not written yet)."""
    path = Path(path)
    if path.is_file():
        return _file_digest(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            member = Path(root) / name
            if member.is_file():
                h.update(f"{member.relative_to(path).as_posix()}\0{_file_digest(member)}\n".encode())
    return h.hexdigest()


def named_file_digests(config: Any) -> dict[str, str | None]:
    """``{"field=path": digest}`` for every path a dumped config names (see :func:`path_digest`)."""
    return {f"{field}={value}": path_digest(value) for field, value in named_paths(config)}
