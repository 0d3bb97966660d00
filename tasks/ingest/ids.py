"""Ids and splits of whole Arrow columns: the values :func:`.scoring.short_id` and :func:`.scoring.assign_split`
give row by row, hashed in one call per column.

The walk names ~1.3 million prompts, pairs and demonstrations per GiB of Posts.xml and splits ~0.4 million
questions, each a SHA-256 of a few joined strings; through ``hashlib`` one at a time that was 3.4-4.5 CPU-s of the
build (1.0-2.0 now), most of it Python's per-call overhead. Here the parts are joined by Arrow and hashed by
``_fastids`` (C, libcrypto), with ``hashlib`` row by row as the fallback when the extension is not built or
a part is null (``short_id`` then spells it ``None``, as before).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .scoring import SPLITS, assign_split, short_id

try:
    from . import _fastids
except ImportError:  # built without a C compiler or libcrypto's headers: hashlib, row by row
    _fastids = None

_MAX_BYTES = (1 << 31) - 1  # an Arrow ``string`` array holds at most this many bytes


def _column(part, n: int) -> pa.Array:
    if isinstance(part, pa.ChunkedArray):
        part = part.combine_chunks()
    return pa.array([part] * n, pa.string()) if isinstance(part, str) else part


def _is_text(column: pa.Array) -> bool:
    return pa.types.is_string(column.type) or pa.types.is_large_string(column.type)


def _joined(parts: tuple, separator: str) -> pa.Array | None:
    """The parts joined row by row (as ``separator.join(map(str, row))``), or None when a part is null or
    not text (Arrow would spell a number otherwise than ``str``): those go row by row."""
    n = max((len(p) for p in parts if not isinstance(p, str)), default=1)
    columns = [_column(p, n) for p in parts]
    if any(not _is_text(c) or c.null_count for c in columns):
        return None
    if any(pa.types.is_large_string(c.type) for c in columns):  # one string type for the join
        columns = [c.cast(pa.large_string()) for c in columns]
        separator = pa.scalar(separator, pa.large_string())
    joined = pc.binary_join_element_wise(*columns, separator)
    return pa.concat_arrays([joined]) if joined.offset else joined


def _buffers(strings: pa.Array) -> tuple[object, object, int]:
    _, offsets, data = strings.buffers()
    width = 8 if pa.types.is_large_string(strings.type) else 4
    return (data if data is not None else b""), offsets, width


def _rows(parts: tuple) -> list[tuple]:
    n = max((len(p) for p in parts if not isinstance(p, str)), default=1)
    columns = [[p] * n if isinstance(p, str) else _column(p, n).to_pylist() for p in parts]
    return list(zip(*columns))


def short_ids(*parts, length: int = 20) -> pa.Array:
    """``short_id(*row, length=length)`` of every row of the parts (Arrow string columns of one length, or
    a ``str`` for a value shared by every row), as an Arrow string array."""
    joined = _joined(parts, "\x1f") if _fastids is not None else None
    if joined is None:
        return pa.array([short_id(*row, length=length) for row in _rows(parts)], pa.string())
    return _hex_digests(joined, length)


def _hex_digests(joined: pa.Array, length: int) -> pa.Array:
    n = len(joined)
    if n * length > _MAX_BYTES:  # more digits than one array's offsets address: in halves
        return pa.concat_arrays([_hex_digests(pa.concat_arrays([joined.slice(0, n // 2)]), length),
                                 _hex_digests(pa.concat_arrays([joined.slice(n // 2)]), length)])
    data, offsets, width = _buffers(joined)
    digits = _fastids.hex_digests(data, offsets, width, length)
    ends = np.arange(0, (n + 1) * length, length, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(ends), pa.py_buffer(digits)])


def splits(site, question_id, *, train: float, validation: float, salt: str) -> pa.Array:
    """``assign_split(site, question_id, ...)`` of every row of two Arrow string columns, as an Arrow string
    array: the same unit in [0, 1) (the first 8 bytes of the SHA-256, over 2**64) against the same bounds."""
    joined = _joined((salt, site, question_id), ":") if _fastids is not None else None
    if joined is None:
        return pa.array([assign_split(s, q, train=train, validation=validation, salt=salt)
                         for _, s, q in _rows((salt, site, question_id))], pa.string())
    data, offsets, width = _buffers(joined)
    units = np.frombuffer(_fastids.first_words(data, offsets, width), dtype=np.uint64).astype(np.float64) / 2.0**64
    which = np.where(units < train, 0, np.where(units < train + validation, 1, 2))
    return pa.array(np.asarray(SPLITS, dtype=object)[which], pa.string())
