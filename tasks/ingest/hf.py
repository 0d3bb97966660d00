"""Hugging Face datasets on disk: a ``save_to_disk`` folder, or SHP-style Parquet -> pairs.

A ``Dataset.save_to_disk`` folder holds ``state.json`` (naming its Arrow
files under ``_data_files``), ``dataset_info.json`` and the Arrow files (IPC
stream format); a ``DatasetDict`` folder holds ``dataset_dict.json`` and one
such folder per split. Both are read here without the ``datasets`` library,
record batch by record batch. Three row schemas are understood:

- ``prompt`` / ``chosen`` / ``rejected`` (strings), as in pairs files;
- Anthropic HH: ``chosen`` / ``rejected`` whole dialogues (the prompt is their
  shared ``"\\n\\nHuman: ... \\n\\nAssistant:"`` prefix);
- Stanford SHP: ``history`` (the prompt), ``human_ref_A`` / ``human_ref_B``
  (the responses), ``labels`` (1 when A is preferred), ``score_A`` /
  ``score_B``, ``post_id`` and ``domain`` (kept as question id and site).

SHP-style Parquet files are read here too (other Parquet pairs are the
``pairs`` reader's). Every row goes through the pairs reader's rules: same
checks, same quarantine reasons, rows numbered from 1 within each Arrow file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import BadRow, IngestError
from .sources import SourceReader

SHP_COLUMNS = {"history", "human_ref_A", "human_ref_B", "labels"}
BATCH_ROWS = 4096


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _is_shp_parquet(path: Path) -> bool:
    if not (path.is_file() and path.name.lower().endswith(".parquet")):
        return False
    try:
        return SHP_COLUMNS <= set(pq.read_schema(path).names)
    except (pa.ArrowException, OSError):
        return False


def arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a saved Dataset or DatasetDict, in their saved order."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (ValueError, KeyError, TypeError) as exc:
            raise IngestError(f"unreadable dataset_dict.json: {exc}", path=str(folder)) from None
        return [f for split in splits for f in arrow_files(folder / split)]
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = [d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IngestError(f"not a saved Hugging Face dataset (state.json: {exc})", path=str(folder)) from None
    files = [folder / n for n in names]
    for f in files:
        if not f.is_file() or f.resolve().parent != folder.resolve():
            raise IngestError(f"state.json names {f.name!r}, which is not a file of this folder", path=str(folder))
    if not files:
        raise IngestError("the saved dataset has no data files", path=str(folder))
    return files


def _batches(path: Path) -> Iterator[pa.RecordBatch]:
    if path.name.lower().endswith(".parquet"):
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
        return
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def shp_row(row: dict) -> dict:
    """An SHP row as a pairs row: the preferred reference is ``chosen``."""
    label = row.get("labels")
    if label not in (0, 1) or isinstance(label, bool):
        raise BadRow("bad_value", f"`labels` is {label!r}, expected 0 or 1", "labels")
    a, b = ("A", "B") if label == 1 else ("B", "A")
    out = {"prompt": row.get("history"), "chosen": row.get(f"human_ref_{a}"),
           "rejected": row.get(f"human_ref_{b}"), "chosen_score": row.get(f"score_{a}"),
           "rejected_score": row.get(f"score_{b}")}
    if row.get("post_id") is not None:
        out["question_id"] = row["post_id"]
    if row.get("domain") is not None:
        out["site"] = row["domain"]
    return out


def read_dataset_file(path: Path, sink, *, site: str, default_license: str, on_bad_row: str) -> None:
    """Every row of one Arrow or Parquet file into ``sink`` under the pairs reader's rules."""
    from .paired import _Reader

    reader = _Reader(path, sink, site, default_license, on_bad_row)
    line = 0
    try:
        for batch in _batches(path):
            shp = SHP_COLUMNS <= set(batch.schema.names)
            if not shp and not {"chosen", "rejected"} <= set(batch.schema.names):
                raise IngestError(f"no pairs schema: columns {batch.schema.names[:12]} have neither "
                                  "prompt/chosen/rejected, chosen/rejected (HH) nor SHP's history/human_ref_A/"
                                  "human_ref_B/labels", path=str(path))
            for row in batch.to_pylist():
                line += 1
                sink.count(str(path), "rows")
                try:
                    reader.row(shp_row(row) if shp else row, line)
                except BadRow as exc:
                    reader.bad(exc, line)
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"cannot read Arrow data: {exc}", path=str(path), line=line + 1) from None


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        extra = [p for p in (path / "state.json", path / "dataset_info.json", path / "dataset_dict.json")
                 if p.is_file()]
        return [*extra, *arrow_files(path)]
    return [path]


def _read(sources, store, cfg, phases) -> dict[str, str]:
    for src in sources:
        path = Path(src.path)
        files = arrow_files(path) if path.is_dir() else [path]
        for f in files:
            read_dataset_file(f, store, site=path.name.removesuffix(".parquet"),
                              default_license=cfg.default_license, on_bad_row=cfg.on_bad_row)
    return {}


READER = SourceReader(
    "hf",
    "Hugging Face dataset saved with save_to_disk (prompt/chosen/rejected, HH or SHP rows), or SHP-style Parquet",
    lambda p: _is_saved_dataset(p) or _is_shp_parquet(p),
    _files,
    _read,
)
