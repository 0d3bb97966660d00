"""Already-paired preference data (``prompt`` / ``chosen`` / ``rejected``) -> :class:`PairRecord`.

Formats (by suffix): JSON lines ``.jsonl`` / ``.json`` / ``.ndjson``, optionally
compressed as ``.zst`` or ``.gz`` (``pairs.jsonl.zst``), one object per line;
and Parquet ``.parquet``, read in bounded batches (never whole).

Columns: ``prompt``, ``chosen``, ``rejected`` (strings) are required;
``chosen_score``, ``rejected_score`` (numbers), ``question_id``, ``site``,
``license`` are optional. Texts are kept as written (not cleaned): a user's
own labelled set is trusted to be in the form they want to train on.

Anthropic HH-RLHF style rows have no ``prompt``: ``chosen`` and ``rejected``
are whole dialogues (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) that share every
turn but the last answer. Then the prompt is the longest common prefix of the
two texts cut after its last ``"\\n\\nAssistant:"`` (that marker included),
and the responses are the rest of each text with surrounding whitespace
stripped, so ``prompt + " " + response`` gives back the dialogue. A row
without ``prompt`` whose texts share no such prefix is a missing ``prompt``.

Defaults: ``question_id`` is a stable hash of the prompt (``sha256`` of its
UTF-8, first 16 hex digits), so every pair of one prompt lands in the same
split; ``site`` is the row's ``site`` column, else the ``site`` argument, else
the file name without its suffixes (``hh.jsonl.zst`` -> ``hh``); ``license``
is the row's column, else ``default_license``.

Each row is counted once as ``rows`` and ends in ``add_pair`` or
``quarantine``: ``empty_prompt``, ``empty_text`` (chosen or rejected empty,
null or whitespace), ``identical_texts`` (chosen == rejected after stripping),
and with ``on_bad_row="quarantine"`` also ``not_json``, ``not_object``,
``missing_field``, ``bad_value``; with ``on_bad_row="error"`` (default) those
raise :class:`~.errors.IngestError` naming file, line (Parquet: row number,
1-based) and field. A Parquet file missing a required column fails up front,
before any row is read.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import BadRow, IngestError
from .records import PairRecord, RecordSink, has_lone_surrogate
from .reddit import JSON_SUFFIXES, MAX_LINE_BYTES, RAW_KEEP_CHARS, OversizedLine, iter_text_lines, quarantine_oversized_line

__all__ = ["ASSISTANT_MARKER", "prompt_hash", "read_pairs_file", "split_hh_dialogue"]

REQUIRED = ("prompt", "chosen", "rejected")
OPTIONAL = ("chosen_score", "rejected_score", "question_id", "site", "license")
ASSISTANT_MARKER = "\n\nAssistant:"
PARQUET_BATCH_ROWS = 4096


def prompt_hash(prompt: str) -> str:
    """The default ``question_id`` of a pair: stable across runs and machines."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split HH-RLHF dialogues into ``(prompt, chosen_response, rejected_response)``.

    The prompt is the longest common prefix of both texts up to and including
    its last ``"\\n\\nAssistant:"``; ``None`` when they share no such prefix.
    """
    n = min(len(chosen), len(rejected))
    i = 0
    while i < n and chosen[i] == rejected[i]:
        i += 1
    cut = chosen.rfind(ASSISTANT_MARKER, 0, i)
    if cut < 0 or cut + len(ASSISTANT_MARKER) > i:
        return None
    end = cut + len(ASSISTANT_MARKER)
    return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def _site_from_name(path: Path) -> str:
    name = path.name
    for suffix in (".zst", ".gz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    for suffix in (*JSON_SUFFIXES, ".parquet"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow("bad_value", f"`{key}` is a {type(value).__name__}, not a string", key)
    return value


def _number(row: dict, key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRow("bad_value", f"`{key}` is a bool, not a number", key)
    try:
        f = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise BadRow("bad_value", f"`{key}` is not a number: {value!r}", key) from None
    if math.isinf(f):
        raise BadRow("bad_value", f"`{key}` is not a finite number: {value!r}", key)
    return None if math.isnan(f) else f


def _opt_str(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRow("bad_value", f"`{key}` is a {type(value).__name__}, not a string", key)
    return str(value).strip()


class _Reader:
    def __init__(self, path: Path, sink: RecordSink, site: str | None, default_license: str, on_bad_row: str,
                 max_line_bytes: int = MAX_LINE_BYTES):
        self.max_line_bytes = max_line_bytes
        self.path = path
        self.file = str(path)
        self.sink = sink
        self.site = site or _site_from_name(path)
        self.default_license = default_license
        self.on_bad_row = on_bad_row

    def row(self, row: dict, line: int, raw: str = "") -> None:
        """One row (already a dict) -> add_pair or quarantine; bad rows raise BadRow."""
        site = _opt_str(row, "site") or self.site
        if "prompt" in row:
            prompt = _text(row, "prompt")
            chosen = _text(row, "chosen")
            rejected = _text(row, "rejected")
        else:
            chosen = _text(row, "chosen")
            rejected = _text(row, "rejected")
            split = split_hh_dialogue(chosen, rejected)
            if split is None:
                raise BadRow(
                    "missing_field",
                    "missing required field `prompt`, and `chosen`/`rejected` are not dialogues sharing a "
                    f"prefix that ends in {ASSISTANT_MARKER!r}",
                    "prompt",
                )
            prompt, chosen, rejected = split
        question_id = _opt_str(row, "question_id")
        license = _opt_str(row, "license") or self.default_license
        chosen_score = _number(row, "chosen_score")
        rejected_score = _number(row, "rejected_score")

        def quarantine(reason: str, detail: str = "") -> None:
            self.sink.quarantine(
                source_file=self.file, reason=reason, line=line, row_id=question_id or None, site=site,
                detail=detail, raw=raw[:RAW_KEEP_CHARS],
            )

        if not prompt.strip():
            return quarantine("empty_prompt")
        if not chosen.strip() or not rejected.strip():
            which = [k for k, v in (("chosen", chosen), ("rejected", rejected)) if not v.strip()]
            return quarantine("empty_text", "empty " + " and ".join(which))
        if chosen.strip() == rejected.strip():
            return quarantine("identical_texts")
        self.sink.add_pair(
            PairRecord(
                prompt=prompt,
                chosen=chosen,
                rejected=rejected,
                site=site,
                source="pairs",
                question_id=question_id or prompt_hash(prompt),
                chosen_score=chosen_score,
                rejected_score=rejected_score,
                license=license,
                source_file=self.file,
                line=line,
            )
        )

    def bad(self, exc: BadRow, line: int, raw: str = "") -> None:
        if self.on_bad_row == "error":
            raise IngestError(exc.message, path=self.file, line=line, field=exc.field) from None
        self.sink.quarantine(
            source_file=self.file, reason=exc.reason, line=line, site=self.site, detail=exc.message,
            raw=raw[:RAW_KEEP_CHARS],
        )

    def jsonl(self) -> None:
        for line, text in iter_text_lines(self.path, self.max_line_bytes):
            self.sink.count(self.file, "rows")
            if isinstance(text, OversizedLine):
                quarantine_oversized_line(self.sink, self.file, line, text, self.max_line_bytes)
                continue
            try:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise BadRow("not_json", f"not JSON: {exc.msg} at column {exc.colno}") from None
                if not isinstance(obj, dict):
                    raise BadRow(
                        "not_object",
                        f"JSON value is a {type(obj).__name__}, not an object (expected one object per line)",
                    )
                if "\\u" in text and has_lone_surrogate(obj):
                    raise BadRow("bad_value", "a string holds an unpaired surrogate escape (\\ud800-\\udfff): not text")
                need = ("chosen", "rejected") if "prompt" not in obj else REQUIRED
                missing = [k for k in need if k not in obj]
                if missing:
                    raise BadRow(
                        "missing_field",
                        "missing required field(s): " + ", ".join(missing),
                        ",".join(missing),
                    )
                self.row(obj, line, text)
            except BadRow as exc:
                self.bad(exc, line, text)

    def parquet(self) -> None:
        try:
            if self.path.stat().st_size == 0:
                raise IngestError("empty file", path=self.file)
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise IngestError(f"not a readable Parquet file: {exc}", path=self.file) from exc
        schema = pf.schema_arrow
        names = set(schema.names)
        need = REQUIRED if "prompt" in names else ("chosen", "rejected")
        missing = [k for k in need if k not in names]
        if missing:
            have = ", ".join(schema.names)
            raise IngestError(
                f"missing required column(s): {', '.join(missing)} (columns: {have})",
                path=self.file,
                field=",".join(missing),
            )
        for key in need:
            t = schema.field(key).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
                    or getattr(pa.types, "is_string_view", lambda _t: False)(t)):
                raise IngestError(f"column `{key}` has type {t}, expected string", path=self.file, field=key)
        columns = [c for c in (*REQUIRED, *OPTIONAL) if c in names]
        if pf.metadata.num_rows == 0:
            raise IngestError("empty file (no rows)", path=self.file)
        line = 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    line += 1
                    self.sink.count(self.file, "rows")
                    try:
                        self.row(row, line)
                    except BadRow as exc:
                        self.bad(exc, line)
        except pa.ArrowException as exc:
            raise IngestError(f"cannot read Parquet data: {exc}", path=self.file, line=line + 1) from exc


def read_pairs_file(
    path: Path,
    sink: RecordSink,
    *,
    site: str | None = None,
    default_license: str = "unknown",
    on_bad_row: str = "error",
    max_line_bytes: int = MAX_LINE_BYTES,
) -> None:
    """Read one already-paired file into ``sink.add_pair`` (see the module docstring)."""
    if on_bad_row not in ("error", "quarantine"):
        raise ValueError(f"on_bad_row must be 'error' or 'quarantine', got {on_bad_row!r}")
    path = Path(path)
    reader = _Reader(path, sink, site, default_license, on_bad_row, max_line_bytes)
    suffixes = [s.lower() for s in path.suffixes]
    last = suffixes[-1] if suffixes else ""
    if last == ".parquet":
        return reader.parquet()
    inner = suffixes[-2] if last in (".zst", ".gz") and len(suffixes) >= 2 else last
    if inner in JSON_SUFFIXES:
        return reader.jsonl()
    raise IngestError(
        f"unsupported file type {''.join(path.suffixes)!r}: expected .jsonl/.json/.ndjson "
        "(optionally .zst or .gz) or .parquet",
        path=str(path),
    )
