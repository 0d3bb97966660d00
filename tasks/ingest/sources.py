"""Source readers: which formats ``alignflow ingest`` reads, how it recognises them, how it reads them.

A reader is a :class:`SourceReader`: a name (what ``--format`` takes), a way
to recognise a SOURCE by its name or shape (``claims``) and, for JSON lines,
by the keys of its first object (``claims_keys``), the files whose bytes
fingerprint a SOURCE (``files``, for the cache key) and ``read``, which
streams every SOURCE of that format into the staging sink. Readers never
pair, split or validate: that happens after, the same for every format.

Built in: ``stackexchange`` (Posts.xml / Votes.xml, site folders, .7z),
``reddit`` (Pushshift RS_/RC_ months) and ``pairs`` (prompt/chosen/rejected
JSON lines or Parquet). Any other module of this package that defines a
module-level ``READER = SourceReader(...)`` is registered too, ahead of the
built-in ones, so a new source is one file (see ``hf.py``).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import IngestError

_JSON_NAMES = tuple(ext + comp for ext in (".jsonl", ".json", ".ndjson") for comp in ("", ".zst", ".gz"))


@dataclass(frozen=True)
class SourceReader:
    name: str
    description: str
    # (path) -> True when the path is this format by its name or shape (may peek at the file)
    claims: Callable[[Path], bool]
    # (path) -> the files whose contents identify the SOURCE (hashed into the cache key)
    files: Callable[[Path], list[Path]]
    # (sources, store, cfg, phases) -> {site: score source} (Stack Exchange) or {}
    read: Callable[..., dict[str, str]]
    # (keys of the first JSON object) -> True when a JSON-lines SOURCE is this format
    claims_keys: Callable[[set[str]], bool] | None = None


# -- built-in readers ------------------------------------------------------------------
def _se_claims(path: Path) -> bool:
    name = path.name.lower()
    return path.is_dir() or name.endswith((".7z", ".xml"))


def _se_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.name.lower() in ("posts.xml", "votes.xml"))
    if path.name.lower() == "posts.xml":
        return sorted(p for p in path.parent.iterdir() if p.name.lower() in ("posts.xml", "votes.xml"))
    return [path]


def _se_read(sources, store, cfg, phases) -> dict[str, str]:
    from .run import read_stackexchange

    return read_stackexchange([Path(s.path) for s in sources], store, cfg, phases)


REDDIT_WORKERS_MIN_BYTES = 4 << 20  # Reddit files at least this large are parsed on worker processes


def _reddit_read(sources, store, cfg, phases) -> dict[str, str]:
    from .reddit import read_reddit

    replies = None
    if cfg.reddit_reply_pairs:  # comments and submissions also go to an on-disk store beside the staging one
        from .reddit_replies import ReplyStore

        replies = ReplyStore(ReplyStore.beside(store.path))
    from .ranges import default_workers

    workers = cfg.workers or default_workers()
    try:
        for src in sources:
            for f in src.files:
                # a file too small to repay starting worker processes is read here
                big = Path(f).stat().st_size >= REDDIT_WORKERS_MIN_BYTES
                read_reddit(Path(f), store, default_license=cfg.default_license, on_bad_row=cfg.on_bad_row,
                            max_line_bytes=cfg.max_row_bytes, replies=replies, workers=workers if big else 1)
    finally:
        if replies is not None:
            replies.close()
    return {}


def _pairs_read(sources, store, cfg, phases) -> dict[str, str]:
    from .paired import read_pairs_file

    for src in sources:
        for f in src.files:
            read_pairs_file(Path(f), store, default_license=cfg.default_license, on_bad_row=cfg.on_bad_row,
                            max_line_bytes=cfg.max_row_bytes)
    return {}


def _single_file(path: Path) -> list[Path]:
    if path.is_dir():
        raise IngestError("a folder is not a file of this format", path=str(path))
    return [path]


BUILT_IN = (
    SourceReader("stackexchange", "Stack Exchange dump: Posts.xml (+ Votes.xml), a site folder or <site>.7z",
                 _se_claims, _se_files, _se_read),
    SourceReader("reddit", "Reddit Pushshift month: RS_ submissions, RC_ comments (.zst or JSON lines)",
                 lambda p: p.name.lower().startswith(("rc_", "rs_")), _single_file, _reddit_read,
                 claims_keys=lambda keys: bool(keys & {"parent_id", "link_id", "subreddit", "selftext"})),
    SourceReader("pairs", "Paired preferences: prompt/chosen/rejected (or HH dialogues) as JSON lines or Parquet",
                 lambda p: p.name.lower().endswith(".parquet"), _single_file, _pairs_read,
                 claims_keys=lambda keys: {"chosen", "rejected"} <= keys),
)


# -- the registry ------------------------------------------------------------------------
_REGISTRY: tuple[SourceReader, ...] | None = None


def readers() -> tuple[SourceReader, ...]:
    """Every reader: those defined by other modules of this package first, then the built-in ones."""
    global _REGISTRY
    if _REGISTRY is None:
        found: list[SourceReader] = []
        for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]),
                           key=lambda m: m.name):
            if info.name in ("sources", "run", "build", "synthetic") or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__package__}.{info.name}")
            reader = getattr(module, "READER", None)
            if isinstance(reader, SourceReader):
                found.append(reader)
        _REGISTRY = (*found, *BUILT_IN)
    return _REGISTRY


def format_names() -> tuple[str, ...]:
    return tuple(r.name for r in readers())


def reader(name: str) -> SourceReader:
    for r in readers():
        if r.name == name:
            return r
    raise IngestError(f"unknown format {name!r}; known: auto, {', '.join(format_names())}")


def _first_json_object(path: Path) -> dict:
    from .lines import OversizedLine, iter_text_lines

    for lineno, line in iter_text_lines(path):
        if isinstance(line, OversizedLine):
            raise IngestError("the first line is too long to tell the format; pass --format", path=str(path),
                              line=lineno)
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise IngestError(f"not JSON: {exc.msg}", path=str(path), line=lineno) from None
            if not isinstance(obj, dict):
                raise IngestError("a JSON line must be an object", path=str(path), line=lineno)
            return obj
    raise IngestError("empty file", path=str(path))


def detect_format(path: Path) -> str:
    """Format of one SOURCE: by its name or shape, else (JSON lines) by the keys of its first object."""
    path = Path(path)
    for r in readers():
        if r.claims(path):
            return r.name
    name = path.name.lower()
    if name.endswith(_JSON_NAMES) or name.endswith(".zst"):
        if path.stat().st_size == 0:
            raise IngestError("empty file", path=str(path))
        keys = set(_first_json_object(path))
        for r in readers():
            if r.claims_keys is not None and r.claims_keys(keys):
                return r.name
        raise IngestError(
            f"cannot tell the format from the keys {sorted(keys)[:12]}: pairs files need prompt/chosen/rejected, "
            "Reddit dumps parent_id/link_id/subreddit; pass --format",
            path=str(path),
        )
    raise IngestError(f"unknown input format; pass --format {'|'.join(format_names())}", path=str(path))


def read_all(sources: list[Any], store, cfg, phases) -> dict[str, str]:
    """Stream every SOURCE into the store, format by format in registry order (Stack Exchange sites first)."""
    score_sources: dict[str, str] = {}
    order = ["stackexchange", *(n for n in format_names() if n != "stackexchange")]
    for name in order:
        mine = [s for s in sources if s.format == name]
        if mine:
            score_sources.update(reader(name).read(mine, store, cfg, phases) or {})
    return score_sources
