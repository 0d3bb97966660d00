"""Great Expectations 1.x data contracts for the ingest datasets.

One suite per dataset kind (``posts``, ``pairs``, ``demos``, ``prompts``),
built from the plain-Python specs in :func:`expectations_for`. Every
expectation is either

* **row-level** - its failing rows are quarantined (``ContractResult.rejected``)
  and the rest is kept (``ContractResult.valid``); not fatal, or
* **table-level** - a failure fails the whole validation
  (``ContractResult.passed is False``, ``ContractResult.table_failures``).

great_expectations is imported inside the functions only (its import takes
~2-3 s). Without ``docs_dir`` a call validates in an ephemeral GX context that
holds its suite: built on the first call for that suite and reused by every
later call in the process (building it costs more than checking a small
batch); with ``docs_dir`` it uses a file context under ``docs_dir`` and writes
HTML Data Docs there (``add_or_update`` everywhere, so re-runs never hit
"already exists").

This module must not import anything else from alignflow: the column lists
below mirror ``tasks/ingest/schema.py`` on purpose.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

KINDS: tuple[str, ...] = ("posts", "pairs", "demos", "prompts", "comparisons")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
POST_KINDS: tuple[str, ...] = ("question", "answer")
SOURCES: tuple[str, ...] = ("stackexchange", "reddit", "pairs", "human")  # human: rankings from the labeling app
DEFAULT_MAX_CHARS = 20_000
MAX_EXAMPLES = 5
EXAMPLE_CHARS = 200  # longest text an error message or report example shows

#: Required columns per dataset kind (mirrors tasks/ingest/schema.py).
COLUMNS: dict[str, tuple[str, ...]] = {
    "posts": (
        "site", "source", "post_id", "kind", "question_id", "title", "body", "tags",
        "score", "upvotes", "accepted", "pm_score", "author", "license",
        "created_at", "split",
    ),
    "pairs": (
        "pair_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score",
        "margin", "question_id", "site", "source", "split", "chosen_id",
        "rejected_id", "chosen_author", "rejected_author", "license",
    ),
    "demos": (
        "demo_id", "prompt", "response", "question_id", "answer_id", "site",
        "source", "split", "pm_score", "author", "license",
    ),
    "prompts": ("prompt_id", "prompt", "question_id", "site", "source", "split"),
    # A labeling batch: one row per sampled response, with its provenance.
    "comparisons": ("response_id", "item_id", "prompt_id", "prompt", "response", "policy", "model", "version",
                    "sample", "seed", "sampling", "question_id", "site", "source", "split"),
}

#: Columns whose values must be unique (one column) or unique together.
ID_COLUMNS: dict[str, tuple[str, ...]] = {
    "posts": ("site", "post_id"),
    "pairs": ("pair_id",),
    "demos": ("demo_id",),
    "prompts": ("prompt_id",),
    "comparisons": ("response_id",),
}

#: Free-text columns: cast to ``str`` dtype before validation, length-bounded.
TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "posts": ("title", "body"),
    "pairs": ("prompt", "chosen", "rejected"),
    "demos": ("prompt", "response"),
    "prompts": ("prompt",),
    "comparisons": ("prompt", "response"),
}

#: Key that assigns a question to a split.
QUESTION_KEY: tuple[str, ...] = ("site", "question_id")
SPLIT_RULE = "expect_question_ids_in_one_split"
#: At least one non-whitespace character (== non-empty after ``str.strip()``). Python's ``\S``, spelled as
#: the class of every character outside ``str.isspace()``: with ``\S`` itself pandas hands the match to
#: Python's ``re`` row by row (RE2's ``\s`` misses some whitespace), with this class to pyarrow's RE2
#: over the whole column, about 10x faster on long texts. Anchored (``^`` then whitespace, then one
#: character outside it), RE2 decides at the text's first characters instead of searching: 15 against
#: 20-36 ms on 200,000 bodies. tests/test_contracts.py checks that it agrees with ``\S`` on every code point.
_SPACE_CLASS = "\\t-\\r\\x1c- \\x85\\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_EMPTY_REGEX = f"^[{_SPACE_CLASS}]*[^{_SPACE_CLASS}]"


# --------------------------------------------------------------------------- specs


def _snake(class_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower()


@dataclass(frozen=True)
class ExpectationSpec:
    """One expectation of a suite, GX-free (built into a GX object lazily).

    ``condition`` = ``(column, value)`` restricts the expectation to rows where
    ``column == value`` (a GX ``row_condition``).
    """

    level: str  # "row" | "table"
    gx_class: str  # e.g. "ExpectColumnValuesToNotBeNull"
    kwargs: dict[str, Any]
    condition: tuple[str, str] | None = None

    @property
    def expectation_type(self) -> str:
        return _snake(self.gx_class)

    @property
    def columns(self) -> tuple[str, ...]:
        """Columns this expectation reads (incl. its condition)."""
        kw = self.kwargs
        cols: list[str] = []
        if "column" in kw:
            cols.append(kw["column"])
        if "column_A" in kw:
            cols += [kw["column_A"], kw["column_B"]]
        cols += list(kw.get("column_list", ()))
        cols += list(kw.get("question_columns", ()))
        if "split_column" in kw:
            cols.append(kw["split_column"])
        if self.condition:
            cols.append(self.condition[0])
        return tuple(dict.fromkeys(cols))

    @property
    def name(self) -> str:
        """``expect_...(col, ...)``; bare type for table-wide expectations."""
        kw = self.kwargs
        if "column" in kw:
            args = [kw["column"]]
        elif "column_A" in kw:
            args = [kw["column_A"], kw["column_B"]]
        elif "column_list" in kw:
            args = list(kw["column_list"])
        else:
            return self.expectation_type
        return f"{self.expectation_type}({', '.join(args)})"

    @property
    def description(self) -> str:
        if self.condition:
            return f"{self.name} where {self.condition[0]} == {self.condition[1]!r}"
        return self.name


def _row(gx_class: str, condition: tuple[str, str] | None = None, **kwargs: Any) -> ExpectationSpec:
    return ExpectationSpec("row", gx_class, kwargs, condition)


def _table(gx_class: str, **kwargs: Any) -> ExpectationSpec:
    return ExpectationSpec("table", gx_class, kwargs)


def _non_empty_text(col: str, max_chars: int, condition: tuple[str, str] | None = None) -> list[ExpectationSpec]:
    return [
        _row("ExpectColumnValuesToNotBeNull", condition, column=col),
        _row("ExpectColumnValuesToMatchRegex", condition, column=col, regex=NON_EMPTY_REGEX),
        _row("ExpectColumnValueLengthsToBeBetween", column=col, max_value=max_chars),
    ]


def expectations_for(kind: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[ExpectationSpec]:
    """The suite of dataset ``kind``, table-level expectations first."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    if not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be a positive int, got {max_chars!r}")
    ids = ID_COLUMNS[kind]
    specs: list[ExpectationSpec] = [
        _table("ExpectTableColumnsToMatchSet", column_set=list(COLUMNS[kind]), exact_match=False),
        (
            _table("ExpectColumnValuesToBeUnique", column=ids[0])
            if len(ids) == 1
            else _table("ExpectCompoundColumnsToBeUnique", column_list=list(ids))
        ),
        _table(
            "ExpectQuestionIdsInOneSplit",
            question_columns=list(QUESTION_KEY),
            split_column="split",
        ),
    ]
    # Keys and categorical columns.
    for col in dict.fromkeys((*ids, "site", "question_id", "source", "split")):
        specs.append(_row("ExpectColumnValuesToNotBeNull", column=col))
    specs.append(_row("ExpectColumnValuesToBeInSet", column="split", value_set=list(SPLITS)))
    specs.append(_row("ExpectColumnValuesToBeInSet", column="source", value_set=list(SOURCES)))
    # Texts.
    if kind == "posts":
        specs.append(_row("ExpectColumnValuesToNotBeNull", column="kind"))
        specs.append(_row("ExpectColumnValuesToBeInSet", column="kind", value_set=list(POST_KINDS)))
        # A question's body may legitimately be empty on some sites: require
        # the title for questions and the body for answers.
        specs += _non_empty_text("title", max_chars, ("kind", "question"))
        specs += _non_empty_text("body", max_chars, ("kind", "answer"))
    else:
        for col in TEXT_COLUMNS[kind]:
            specs += _non_empty_text(col, max_chars)
    if kind == "pairs":
        specs += [
            _row("ExpectColumnPairValuesToNotBeEqual", column_A="chosen", column_B="rejected"),
            _row(
                "ExpectColumnPairValuesAToBeGreaterThanB",
                column_A="chosen_score",
                column_B="rejected_score",
                or_equal=False,
                ignore_row_if="either_value_is_missing",
            ),
            _row("ExpectColumnValuesToBeBetween", column="margin", min_value=0),
        ]
    return specs


# --------------------------------------------------------------------------- results


@dataclass
class TableFailure:
    """A failed table-level expectation."""

    expectation: str  # e.g. "expect_column_values_to_be_unique(pair_id)"
    examples: list[dict[str, Any]]  # up to 5 offending rows / values
    message: str
    unexpected_count: int | None = None

    def __str__(self) -> str:
        lines = [f"{self.expectation}: {self.message}"]
        lines += [f"      {ex}" for ex in self.examples]
        return "\n".join(lines)


class ContractViolation(Exception):
    """A dataset failed a table-level expectation of its contract."""

    def __init__(self, message: str, result: "ContractResult | None" = None):
        super().__init__(message)
        self.result = result


@dataclass
class ContractResult:
    kind: str
    passed: bool
    valid: pd.DataFrame
    rejected: pd.DataFrame
    table_failures: list[TableFailure] = field(default_factory=list)
    statistics: dict[str, Any] = field(default_factory=dict)
    result_json: dict[str, Any] = field(default_factory=dict)
    docs_index: Path | None = None
    batch_name: str = "batch"
    deferred_docs: "_DeferredDocs | None" = None  # validate(defer_docs=True): the Data Docs still to write

    def failure_message(self) -> str:
        head = (
            f"{self.kind} data contract failed for batch {self.batch_name!r}: "
            f"{len(self.table_failures)} table-level expectation(s) failed"
        )
        return "\n".join([head] + [f"  - {f}" for f in self.table_failures])

    def raise_for_table_failures(self) -> None:
        """Raise :class:`ContractViolation` if any table-level expectation failed."""
        if self.table_failures:
            raise ContractViolation(self.failure_message(), self)


# --------------------------------------------------------------------------- validation


_DOCS_LOCK = threading.Lock()


@contextlib.contextmanager
def _docs_lock(docs_dir: Path) -> Iterator[None]:
    """Serialise file-context use of one docs_dir (threads and processes)."""
    with _DOCS_LOCK:
        docs_dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        with open(docs_dir / ".alignflow-contracts.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _prepare(df: pd.DataFrame, kind: str, max_chars: int = DEFAULT_MAX_CHARS) -> pd.DataFrame:
    """Frame handed to GX: text columns as ``str`` dtype, a GX-friendly index.

    A unique int or str index is kept (GX then reports the caller's labels);
    anything else (duplicates, MultiIndex, timestamps) is replaced by
    positions. Texts longer than ``max_chars`` are cut to ``max_chars + 1``
    characters plus ``…``: still too long for the length rule, but a failing
    value copied into the results and Data Docs stays small whatever the
    input held. Never modifies ``df``.
    """
    work = df
    idx = df.index
    simple_index = isinstance(idx, pd.RangeIndex) or (
        not isinstance(idx, pd.MultiIndex)
        and (pd.api.types.is_integer_dtype(idx.dtype) or pd.api.types.is_string_dtype(idx))
        and idx.is_unique
    )
    if not simple_index:
        work = work.reset_index(drop=True)
    text_cols = set(TEXT_COLUMNS[kind]) | {
        c for c in ("site", "source", "split", "kind", "question_id", *ID_COLUMNS[kind])
        if c in COLUMNS[kind]
    }
    casts = {c: "str" for c in text_cols if c in work.columns and work[c].dtype != "str"}
    if casts:
        work = work.astype(casts)
    for col in TEXT_COLUMNS[kind]:
        if col in work.columns:
            text = _arrow_text(work[col])
            if text is not None and (pc.max(pc.binary_length(text)).as_py() or 0) <= max_chars + 1:
                continue  # no value has more characters than bytes: none is too long, without counting them
            too_long = work[col].str.len() > max_chars + 1
            if too_long.any():
                if work is df:
                    work = df.copy()
                work.loc[too_long, col] = work.loc[too_long, col].str.slice(0, max_chars + 1) + "…"
    return work


_TEXT_RULES = ("ExpectColumnValuesToMatchRegex", "ExpectColumnValueLengthsToBeBetween")


def _arrow_text(col: pd.Series):
    """The Arrow strings behind a ``str`` column (no copy), or None for any other column."""
    if not isinstance(col.dtype, pd.StringDtype) or getattr(col.dtype, "storage", None) != "pyarrow":
        return None
    try:
        text = col.array.__arrow_array__()
    except Exception:
        return None
    return text if pa.types.is_string(text.type) or pa.types.is_large_string(text.type) else None


def _text_rule_may_fail(text, cls: str, kw: dict[str, Any], rows: np.ndarray | None = None) -> bool:
    """Whether a non-null value of ``text`` (Arrow strings; with ``rows``, only where it is True) breaks a
    text rule, as GX's pandas rule decides it.

    The rule is computed over the whole column and then masked: filtering first would copy the texts. A
    string has at most as many characters as bytes, so a column whose longest value has no more bytes than
    ``max_value`` has no value too long, without counting characters; a minimum is counted."""
    if not len(text) or text.null_count == len(text):
        return False
    if cls == "ExpectColumnValuesToMatchRegex":
        bad = pc.invert(pc.match_substring_regex(text, kw["regex"]))
    else:
        lo, hi = kw.get("min_value"), kw.get("max_value")
        if hi is not None and lo is None and (pc.max(pc.binary_length(text)).as_py() or 0) <= hi:
            return False
        chars = pc.utf8_length(text)
        bounds = [pc.greater(chars, hi)] if hi is not None else []
        bounds += [pc.less(chars, lo)] if lo is not None else []
        if not bounds:
            return False
        bad = bounds[0] if len(bounds) == 1 else pc.or_(*bounds)
    if rows is None:
        return bool(pc.any(bad).as_py())  # nulls (null texts) skipped
    return bool((bad.fill_null(False).to_numpy(zero_copy_only=False) & rows).any())


def _arrow_column(col: pd.Series):
    """The values of ``col`` as Arrow, missing values (``None``, ``NaN``) as nulls: the strings behind a ``str``
    column (no copy) or a numeric column's values; None for any other column."""
    text = _arrow_text(col)
    if text is not None:
        return text
    if col.dtype.kind in "iuf":
        return pa.array(col.to_numpy(), from_pandas=True)
    return None


def _arrow_rule_bad(cls: str, kw: dict[str, Any], arrays: list):
    """Where a row breaks the row rule ``cls`` (Arrow booleans; null or False where it does not), or None for a
    rule without an Arrow version here. The rules mirror GX's pandas implementations, missing values left out
    as GX leaves them out."""
    if cls == "ExpectColumnValuesToNotBeNull":
        return pc.is_null(arrays[0])
    if cls == "ExpectColumnValuesToBeInSet":
        (a,) = arrays
        return pc.and_(pc.is_valid(a), pc.invert(pc.is_in(a, value_set=pa.array(kw["value_set"], a.type))))
    if cls == "ExpectColumnValuesToBeBetween":
        (a,) = arrays
        if not pa.types.is_integer(a.type) and not pa.types.is_floating(a.type):
            return None
        bounds = [pc.less(a, kw["min_value"])] if kw.get("min_value") is not None else []
        bounds += [pc.greater(a, kw["max_value"])] if kw.get("max_value") is not None else []
        if not bounds:
            return pa.array([False] * len(a))
        return bounds[0] if len(bounds) == 1 else pc.or_(*bounds)
    if cls == "ExpectColumnPairValuesToNotBeEqual":
        return pc.equal(*arrays)  # null where either is missing
    if cls == "ExpectColumnPairValuesAToBeGreaterThanB":
        return pc.invert((pc.greater_equal if kw.get("or_equal") else pc.greater)(*arrays))
    return None


def _may_fail_a_row(work: pd.DataFrame, specs: list[ExpectationSpec]) -> bool:
    """Whether some row of ``work`` looks like it breaks a row-level expectation (a vectorised guess).

    Only chooses how GX is asked (a batch that looks clean is validated in GX's pass/fail mode first),
    never what is kept or quarantined: GX decides that either way. The rules mirror GX's pandas
    implementations; anything unexpected (an unknown expectation, a value the comparison cannot
    handle) answers True, which sends the batch straight to the full GX run. Columns held as Arrow
    (texts) or numbers are checked with Arrow's kernels (a posts batch of 15,000 rows: 6.7 ms, 13.4 ms
    through pandas); any other column goes through pandas (:func:`_pandas_rule_may_fail`).
    """
    try:
        conditions: dict[tuple[str, str], Any] = {}
        for spec in specs:
            if spec.level != "row":
                continue
            kw, cls = spec.kwargs, spec.gx_class
            names = [kw[k] for k in ("column", "column_A", "column_B") if k in kw]
            arrays = [_arrow_column(work[name]) for name in names]
            rows = None
            if spec.condition is not None:
                if spec.condition not in conditions:
                    column = _arrow_column(work[spec.condition[0]])
                    conditions[spec.condition] = None if column is None else \
                        pc.equal(column, pa.scalar(spec.condition[1], column.type)).fill_null(False)
                rows = conditions[spec.condition]
            if any(a is None for a in arrays) or (spec.condition is not None and rows is None):
                if _pandas_rule_may_fail(work, spec):
                    return True
                continue
            if cls in _TEXT_RULES:
                mask = None if rows is None else rows.to_numpy(zero_copy_only=False)
                if _text_rule_may_fail(arrays[0], cls, kw, mask):
                    return True
                continue
            if cls == "ExpectColumnValuesToNotBeNull" and rows is None:
                if arrays[0].null_count:
                    return True
                continue
            bad = _arrow_rule_bad(cls, kw, arrays)
            if bad is None:
                return True
            if rows is not None:
                bad = pc.and_(bad, rows)
            if pc.any(bad).as_py():  # nulls (a missing value) are not failures
                return True
    except Exception:
        return True
    return False


def _pandas_rule_may_fail(work: pd.DataFrame, spec: ExpectationSpec) -> bool:
    """:func:`_may_fail_a_row` for one rule, through pandas (columns that are neither Arrow texts nor numbers)."""
    kw = spec.kwargs
    rows = pd.Series(True, index=work.index)
    if spec.condition is not None:
        rows = work[spec.condition[0]] == spec.condition[1]
        rows = rows.fillna(False).astype(bool)
    cls = spec.gx_class
    if cls == "ExpectColumnValuesToNotBeNull":
        bad = work[kw["column"]].isna()
    elif cls in ("ExpectColumnPairValuesToNotBeEqual", "ExpectColumnPairValuesAToBeGreaterThanB"):
        a, b = work[kw["column_A"]], work[kw["column_B"]]
        rows &= a.notna() & b.notna()
        if cls == "ExpectColumnPairValuesToNotBeEqual":
            bad = a == b
        else:
            bad = ~((a >= b) if kw.get("or_equal") else (a > b))
    else:
        col = work[kw["column"]]
        rows &= col.notna()
        if cls == "ExpectColumnValuesToMatchRegex":
            bad = ~col.astype(str).str.contains(kw["regex"]).fillna(False).astype(bool)
        elif cls == "ExpectColumnValueLengthsToBeBetween":
            n = col.astype(str).str.len()
            bad = pd.Series(False, index=work.index)
            if kw.get("max_value") is not None:
                bad |= n > kw["max_value"]
            if kw.get("min_value") is not None:
                bad |= n < kw["min_value"]
        elif cls == "ExpectColumnValuesToBeInSet":
            bad = ~col.isin(kw["value_set"])
        elif cls == "ExpectColumnValuesToBeBetween":
            if not pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
                return True
            bad = pd.Series(False, index=work.index)
            if kw.get("min_value") is not None:
                bad |= col < kw["min_value"]
            if kw.get("max_value") is not None:
                bad |= col > kw["max_value"]
        else:
            return True
    return bool((rows & bad.fillna(True).astype(bool)).any())


def _jsonable(v: Any) -> Any:
    if v is None:
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (str, int, float, bool)):
        return v
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


def _shown(v: Any, limit: int = EXAMPLE_CHARS) -> Any:
    """A value as an error message or report shows it: long texts cut, with their length."""
    v = _jsonable(v)
    if isinstance(v, str) and len(v) > limit:
        return f"{v[:limit]}… ({len(v)} chars)"
    return v


def _example_rows(df: pd.DataFrame, positions: list[int], columns: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for pos in positions[:MAX_EXAMPLES]:
        row = {"index": _shown(df.index[pos])}
        row.update({c: _shown(df[c].iloc[pos]) for c in columns if c in df.columns})
        out.append(row)
    return out


def _positions(work: pd.DataFrame, labels: list[Any]) -> list[int]:
    if not labels:
        return []
    pos = work.index.get_indexer(labels)
    return [int(p) for p in pos if p >= 0]


def _exception_message(info: Any) -> str | None:
    """The error of a GX result's ``exception_info``, else None.

    GX 1.x gives either ``{"raised_exception": bool, "exception_message": ...}``
    or, when metrics failed, ``{"<MetricConfigurationID>": {...same keys...}}``.
    """
    if not isinstance(info, dict) or not info:
        return None
    if "raised_exception" in info:
        if info.get("raised_exception"):
            return str(info.get("exception_message") or "exception")
        return None
    for sub in info.values():
        if isinstance(sub, dict) and (sub.get("raised_exception") or sub.get("exception_message")):
            msg = str(sub.get("exception_message") or "exception")
            return msg.strip().splitlines()[-1] if msg.strip() else msg
    return None


def _table_failure(
    spec: ExpectationSpec, res: dict[str, Any], work: pd.DataFrame, df: pd.DataFrame
) -> TableFailure:
    name = spec.name
    error = _exception_message(res.get("exception_info"))
    if error is not None:
        return TableFailure(name, [], f"could not be evaluated: {error}")
    r = res.get("result") or {}
    if spec.expectation_type == "expect_table_columns_to_match_set":
        missing = sorted((r.get("details") or {}).get("mismatched", {}).get("missing") or [])
        return TableFailure(
            name,
            [{"missing_column": c} for c in missing[:MAX_EXAMPLES]],
            f"missing required column(s) {missing}; present: {list(df.columns)}",
            len(missing),
        )
    if spec.gx_class == "ExpectQuestionIdsInOneSplit":
        n_q, n_rows = r.get("observed_value"), r.get("unexpected_count")
        examples = [dict(e) for e in (r.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]]
        return TableFailure(
            SPLIT_RULE,
            examples,
            f"{n_q} question id(s) ({', '.join(QUESTION_KEY)}) appear in more than one split "
            f"({n_rows} rows)",
            n_rows,
        )
    count = r.get("unexpected_count")
    positions = _positions(work, list(r.get("unexpected_index_list") or []))
    if positions:
        examples = _example_rows(df, positions, spec.columns)
    else:
        examples = [
            {k: _shown(x) for k, x in v.items()} if isinstance(v, dict) else {"value": _shown(v)}
            for v in (r.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]
        ]
    if spec.gx_class in ("ExpectColumnValuesToBeUnique", "ExpectCompoundColumnsToBeUnique"):
        msg = f"{count} row(s) share a duplicated {' + '.join(spec.columns)} value"
    else:
        msg = f"{count} unexpected row(s)"
    return TableFailure(name, examples, msg, count)


def _result_json(vr: Any, work_index_is_original: bool) -> dict[str, Any]:
    """``vr.to_json_dict()`` without the per-row lists (they can hold every failing row).

    ``partial_unexpected_list`` / ``partial_unexpected_index_list`` (<= 20
    each) stay; the latter is renamed ``partial_unexpected_index_positions``
    when the caller's index was replaced by positions. Mutates ``vr``'s
    result dicts: call after everything else has read them.
    """
    for res in vr.results:
        r = res.result or {}
        for key in ("unexpected_list", "unexpected_index_list", "unexpected_index_query"):
            r.pop(key, None)
        if not work_index_is_original and "partial_unexpected_index_list" in r:
            r["partial_unexpected_index_positions"] = r.pop("partial_unexpected_index_list")
    return vr.to_json_dict()


def _build_gx(spec: ExpectationSpec, order: int):
    import great_expectations.expectations as gxe

    from . import _gx_custom

    cls = getattr(_gx_custom, spec.gx_class, None) or getattr(gxe, spec.gx_class)
    kwargs = dict(spec.kwargs)
    if spec.condition is not None:
        from great_expectations.expectations.row_conditions import Column

        kwargs["row_condition"] = Column(spec.condition[0]) == spec.condition[1]
    meta = {"alignflow_level": spec.level, "alignflow_name": spec.name, "alignflow_order": order}
    if spec.condition is not None:
        meta["alignflow_condition"] = f"{spec.condition[0]} == {spec.condition[1]!r}"
    return cls(meta=meta, **kwargs)


class _EphemeralSuite:
    """An ephemeral GX context holding one suite and its validation definition, built once per process.

    Building a context, data source, suite and validation definition costs more than validating a
    small batch, so each (kind, expectations) pair gets one, reused by every later batch. Runs of one
    suite are serialised (``lock``); after each run the data source drops its execution engine, so no
    batch data or computed metric of one batch is ever seen by the next (GX keys both by the batch id,
    which is the same for every batch of an asset), and no result is kept in the context's results store.
    """

    def __init__(self, kind: str, expectations: list) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        suite_name = f"alignflow_{kind}"
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.datasource = self.context.data_sources.add_pandas("alignflow")
        bd = self.datasource.add_dataframe_asset(kind).add_batch_definition_whole_dataframe(kind)
        suite = self.context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
        self.definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=bd, suite=suite)
        )
        self.lock = threading.Lock()
        self.graphs: dict = {}  # this suite's metric graphs, kept across its runs (see _memoize_metric_graphs)

    def run(self, work: pd.DataFrame, result_format: dict[str, Any], run_id: Any):
        """What ``ValidationDefinition.run`` does for a batch, less its two per-run costs that buy nothing here.

        ``run`` first checks that the definition, suite and batch definition are saved unchanged in the
        context (``is_fresh``), then stores the result in the context's results store (a serialisation of
        the whole result); together a sixth of a small batch's validation. This context is built once,
        holds exactly these objects and is never changed, and no one reads its results store. The batch
        is loaded once, by the same ``Validator``, and the result carries the same ``meta`` entries.
        """
        from great_expectations.validator.v1_validator import Validator

        try:
            from great_expectations.constants import DATAFRAME_REPLACEMENT_STR
        except ImportError:  # older 1.x: the same placeholder, spelled out
            DATAFRAME_REPLACEMENT_STR = "<DATAFRAME>"

        definition = self.definition
        validator = Validator(batch_definition=definition.batch_definition, batch_parameters={"dataframe": work},
                              result_format=result_format)
        vr = validator.validate_expectation_suite(definition.suite)
        vr.meta.update(validation_id=definition.id, checkpoint_id=None, run_id=run_id,
                       validation_time=run_id.run_time, batch_parameters={"dataframe": DATAFRAME_REPLACEMENT_STR})
        return vr

    def forget_batch(self) -> None:
        # A fresh PandasExecutionEngine (empty metric cache, no batch data) for the next run.
        self.datasource._execution_engine = None


def _no_batch_fingerprint() -> None:
    """Stop GX hashing every batch it loads (``pandas_data_fingerprint``, a batch marker shown in Data Docs).

    ``pd.util.hash_pandas_object`` over every cell is about a fifth of validating a batch; no result, verdict
    or count of alignflow's depends on the marker (Data Docs list the batch markers without it). GX skips it for
    frames of ``HASH_THRESHOLD`` bytes or more, so a threshold of 0 skips it always.
    """
    try:
        from great_expectations.execution_engine import pandas_execution_engine
    except ImportError:  # pragma: no cover - a GX without the module: nothing to turn off
        return
    if hasattr(pandas_execution_engine, "HASH_THRESHOLD"):
        pandas_execution_engine.HASH_THRESHOLD = 0


class _DeferredModule(types.ModuleType):
    """A module that imports itself on first use of one of its attributes (see :func:`defer_unused_imports`)."""

    def __getattr__(self, name: str) -> Any:  # called only for attributes the stub does not have
        import importlib

        real = self.__dict__.get("_alignflow_real")
        if real is None:
            with _DEFER_LOCK:
                real = self.__dict__.get("_alignflow_real")
                if real is None:
                    if sys.modules.get(self.__name__) is self:
                        del sys.modules[self.__name__]
                    real = importlib.import_module(self.__name__)
                    self.__dict__["_alignflow_real"] = real
        return getattr(real, name)


_DEFER_LOCK = threading.Lock()
# Imported by Great Expectations for what alignflow's contracts do not use: scipy.stats for KL divergence and
# Kolmogorov-Smirnov tests (61 MiB and 0.7 s per process that validates); altair for the charts of
# profiling renderers; socks (SOCKS proxies of HTTP clients) and psycopg2 (PostgreSQL data sources). The last
# three: 27 MiB and ~0.4 CPU-s more, with or without Data Docs.
_UNUSED_BY_CONTRACTS = ("scipy.stats", "altair", "socks", "psycopg2")


def defer_unused_imports() -> None:
    """Let Great Expectations import ``scipy.stats`` without loading it, until something uses it.

    GX's ``import great_expectations`` runs ``from scipy import stats`` in three modules whose
    expectations no alignflow contract has; loading it costs every validating process 61 MiB (the
    contract worker peaks at ~235 MiB with GX). Call before GX is first imported: ``scipy.stats`` is then
    a stub in ``sys.modules`` that imports the real module on the first access to one of its
    attributes and hands that on, so code that does use it behaves the same. A module already
    imported, or absent, is left alone.
    """
    import importlib.util

    for name in _UNUSED_BY_CONTRACTS:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:
            continue
        if spec is None:
            continue
        stub = _DeferredModule(name)
        stub.__spec__, stub.__loader__, stub.__file__ = spec, spec.loader, spec.origin
        stub.__package__ = name
        if spec.submodule_search_locations is not None:
            stub.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = stub


# Integrations of Great Expectations that no contract uses: its SQL data sources (SQLAlchemy) and Google Cloud
# (Storage, BigQuery, Secret Manager). GX treats both as optional (its ``compatibility`` modules fall back to
# placeholders when an import fails) and loads them whenever they are installed, as they are beside MLflow and
# Prefect.
_UNUSED_INTEGRATIONS = ("sqlalchemy", "google.cloud", "google.auth", "google.oauth2", "google.api_core")


def hide_unused_integrations() -> None:
    """Make the imports of :data:`_UNUSED_INTEGRATIONS` fail in this process, so that Great Expectations loads
    without them.

    For the ingest's contract worker (:mod:`alignflow.tasks.ingest.contract_service`), a process that only
    validates pandas frames and writes Parquet: GX's import then loads ~150 modules fewer and takes 0.65 CPU-s
    (median of ten pairs) and 30 MiB less. Call it before GX is imported, and only in a process that needs
    neither SQL nor Google Cloud: MLflow's and Prefect's stores need SQLAlchemy. A module already imported is left
    alone.
    """
    for name in _UNUSED_INTEGRATIONS:
        sys.modules.setdefault(name, None)  # None in sys.modules: the import raises ImportError


_RUN = threading.local()  # memos of one of alignflow's validation runs, on its thread (see _memoized_run)


def _memoize_configurations() -> None:
    """Within one of alignflow's validation runs, make each expectation's ``configuration`` once.

    GX's ``Expectation.configuration`` is a property that rebuilds an ``ExpectationConfiguration`` from the
    pydantic model on every access, and building the metric graph reads it ~1,200 times per validation of a
    posts batch (a third of GX's time on a 4 MiB batch). The memo lives only for the length of one ``_run_gx``
    call, on its thread (:func:`_memoized_run`), where no expectation changes: elsewhere the property is GX's
    own. The memo keeps each expectation alive (so an id is never reused within the run).
    """
    from great_expectations.expectations.expectation import Expectation

    if getattr(Expectation, "_alignflow_memoized", False):
        return
    build = Expectation.configuration.fget

    def configuration(self):
        memo = getattr(_RUN, "configurations", None)
        if memo is None:
            return build(self)
        entry = memo.get(id(self))
        if entry is None or entry[0] is not self:
            entry = memo[id(self)] = (self, build(self))
        return entry[1]

    Expectation.configuration = property(configuration, doc=Expectation.configuration.__doc__)
    Expectation._alignflow_memoized = True


def _memoize_row_filters() -> None:
    """Within one of alignflow's validation runs, filter the batch by each row condition once.

    GX's pandas engine applies an expectation's ``row_condition`` with ``DataFrame.query`` for every metric
    it computes on that domain: a posts batch has two conditions (``kind == 'question'`` / ``'answer'``)
    and was filtered eight times, each a parse of the expression and a copy of the whole batch (a fifth
    of a posts validation). Inside a run (:func:`_memoized_run`) the filtered frame of one (frame,
    condition) is made once and shared by the metrics that ask for it; GX only reads it. Elsewhere
    the method is GX's own.
    """
    from great_expectations.execution_engine.pandas_execution_engine import PandasExecutionEngine

    apply = getattr(PandasExecutionEngine, "_apply_row_condition_filter", None)
    if apply is None or getattr(PandasExecutionEngine, "_alignflow_memoized", False):
        return  # a GX that filters elsewhere (older 1.x): left as it is

    def _apply_row_condition_filter(self, data, row_condition, domain_kwargs):
        memo = getattr(_RUN, "filters", None)
        if memo is None:
            return apply(self, data, row_condition, domain_kwargs)
        key = (id(data), repr(row_condition), repr(domain_kwargs.get("condition_parser")))
        entry = memo.get(key)
        if entry is None or entry[0] is not data:
            entry = memo[key] = (data, apply(self, data, row_condition, domain_kwargs))
        return entry[1]

    PandasExecutionEngine._apply_row_condition_filter = _apply_row_condition_filter
    PandasExecutionEngine._alignflow_memoized = True


def _memoize_metric_graphs() -> None:
    """Across the runs of one ephemeral suite, build each expectation's metric graph once.

    Before it computes anything, GX's validator builds, for every expectation of the suite, the graph of
    metrics it needs (``get_validation_dependencies``, then each metric's own dependencies), and makes a
    new ``Expectation`` object from each configuration; about half of a small batch's validation. None of
    it reads the batch's data: it depends on the suite (an :class:`_EphemeralSuite` never changes), the
    batch id (the same for every batch of the suite's asset), the engine's class and the run's
    ``result_format``. Inside a run of a suite (:func:`_memoized_run` with the suite's ``graphs``), the
    graphs and expectation objects built on that suite's first run with this key are handed out again,
    each graph bound to the new run's engine; the metrics are computed afresh by that engine, on that
    batch. A build that failed for some expectation (an error result) is never remembered. Elsewhere the
    method is GX's own.
    """
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
    from great_expectations.validator.validation_graph import ExpectationValidationGraph, ValidationGraph
    from great_expectations.validator.validator import Validator

    generate = getattr(Validator, "_generate_metric_dependency_subgraphs_for_each_expectation_configuration", None)
    if generate is None or getattr(Validator, "_alignflow_memoized", False):
        return  # a GX that builds its graphs elsewhere: left as it is
    to_domain_obj = ExpectationConfiguration.to_domain_obj

    def _generate(self, expectation_configurations, processed_configurations, catch_exceptions,
                  runtime_configuration=None):
        memo = getattr(_RUN, "graphs", None)
        if memo is None or processed_configurations:
            return generate(self, expectation_configurations, processed_configurations, catch_exceptions,
                            runtime_configuration)
        key = (self.active_batch_id, type(self._execution_engine), repr(runtime_configuration), catch_exceptions,
               len(expectation_configurations))
        built = memo.get(key)
        if built is None:
            graphs, evrs, processed = generate(self, expectation_configurations, processed_configurations,
                                               catch_exceptions, runtime_configuration)
            if evrs:
                return graphs, evrs, processed
            built = memo[key] = [(g.configuration, list(g.graph.edges), to_domain_obj(g.configuration))
                                 for g in graphs]
            memo.setdefault("expectations", {}).update((id(c), (c, e)) for c, _, e in built)
            memo.setdefault("remembered", {}).update((id(e), e) for _, _, e in built)
            for _, _, expectation in built:
                _memoize_dependencies(type(expectation))
            return graphs, evrs, processed
        processed_configurations.extend(c for c, _, _ in built)
        graphs = [ExpectationValidationGraph(configuration=c, graph=ValidationGraph(self._execution_engine, list(edges)))
                  for c, edges, _ in built]
        return graphs, [], processed_configurations

    def _to_domain_obj(self):
        memo = getattr(_RUN, "graphs", None)
        entry = memo.get("expectations", {}).get(id(self)) if memo is not None else None
        if entry is None or entry[0] is not self:
            return to_domain_obj(self)
        return entry[1]

    def _memoize_dependencies(cls) -> None:
        # The expectation objects above are asked for their metrics again when their results are made
        # (``metrics_validate``): the same answer, remembered per object. Only the class's outermost
        # method is wrapped, so its own ``super()`` calls stay GX's.
        if "_alignflow_dependencies" in cls.__dict__:
            return
        dependencies = cls.get_validation_dependencies

        def get_validation_dependencies(self, execution_engine=None, runtime_configuration=None, **kwargs):
            memo = getattr(_RUN, "graphs", None)
            remembered = memo.get("remembered", {}).get(id(self)) if memo is not None and not kwargs else None
            if remembered is not self:
                return dependencies(self, execution_engine=execution_engine,
                                    runtime_configuration=runtime_configuration, **kwargs)
            key = ("dependencies", id(self), type(execution_engine), repr(runtime_configuration))
            if key not in memo:
                memo[key] = dependencies(self, execution_engine=execution_engine,
                                         runtime_configuration=runtime_configuration)
            return memo[key]

        cls.get_validation_dependencies = get_validation_dependencies
        cls._alignflow_dependencies = True

    Validator._generate_metric_dependency_subgraphs_for_each_expectation_configuration = _generate
    ExpectationConfiguration.to_domain_obj = _to_domain_obj
    Validator._alignflow_memoized = True


def _memoize_config_variables() -> None:
    """Within a scope of :func:`_config_variables_read_once`, read a file context's config variables once.

    A validation with Data Docs asks its file context for variables ~70 times (every store, site builder and
    data-context variable is substituted), and each time GX reads and parses ``config_variables.yml`` with
    ruamel: a sixth of such a validation. Inside the scope, the values of a file are read again only when
    the file changed (its size, time or inode; a missing file is asked every time), and each caller gets
    its own copy. Elsewhere the method is GX's own.
    """
    try:
        from great_expectations.core.config_provider import _ConfigurationVariablesConfigurationProvider as Provider
    except ImportError:  # pragma: no cover - a GX that reads its variables elsewhere: left as it is
        return
    if getattr(Provider, "_alignflow_memoized", False):
        return
    read = Provider.get_values

    def get_values(self):
        memo = getattr(_RUN, "config_variables", None)
        if memo is None:
            return read(self)
        try:  # the file GX reads: its path with ${VARIABLES} substituted, relative to the root
            path = self._substitutor.substitute_config_variable(self._config_variables_file_path, dict(os.environ))
            st = os.stat(path if os.path.isabs(path) else os.path.join(self._root_directory or os.curdir, path))
        except Exception:  # noqa: BLE001 - no such file, or a path GX itself cannot make: GX's own read decides
            return read(self)
        key = (self._config_variables_file_path, self._root_directory, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in memo:
            memo[key] = read(self)
        return dict(memo[key])

    Provider.get_values = get_values
    Provider._alignflow_memoized = True


@contextlib.contextmanager
def _config_variables_read_once() -> Iterator[None]:
    """The scope of :func:`_memoize_config_variables` (one validation with Data Docs, on this thread)."""
    _memoize_config_variables()
    outer = getattr(_RUN, "config_variables", None)
    _RUN.config_variables = {} if outer is None else outer
    try:
        yield
    finally:
        _RUN.config_variables = outer


_TEMPLATE_CODE: dict[type, Any] = {}  # a GX view class -> the Jinja bytecode cache its environments share


def _template_code_cache() -> Any:
    """A Jinja bytecode cache in memory (made on first use: jinja2 comes with GX, not with this module).
    Jinja files each template under its name and path and checks the source's checksum before using the
    code, so a changed template is compiled again."""
    import jinja2

    class TemplateCode(jinja2.BytecodeCache):
        def __init__(self) -> None:
            self.code: dict[str, tuple[str, Any]] = {}

        def load_bytecode(self, bucket) -> None:
            entry = self.code.get(bucket.key)
            if entry is not None and entry[0] == bucket.checksum:
                bucket.code = entry[1]

        def dump_bytecode(self, bucket) -> None:
            self.code[bucket.key] = (bucket.checksum, bucket.code)

    return TemplateCode()


def _cache_template_code() -> None:
    """Compile each Data Docs template once per process instead of once per page.

    GX makes a new view, with a new Jinja environment, for every page of Data Docs it renders, so every
    template (~50 for the pages of one run) is parsed and compiled again each time: about a third of a
    Data Docs run. Here each view's environment gets a bytecode cache (Jinja's own mechanism) shared by
    the views of its class, which are all made with the same environment settings; the templates are
    still loaded through each view's own loaders, rendered in its own environment with its own filters.
    """
    try:
        from great_expectations.render.view.view import DefaultJinjaView
    except ImportError:  # pragma: no cover - a GX without the view: nothing to cache
        return
    get_template = getattr(DefaultJinjaView, "_get_template", None)
    if get_template is None or getattr(DefaultJinjaView, "_alignflow_memoized", False):
        return

    def _get_template(self, template_str):
        if self.env.bytecode_cache is None:
            cache = _TEMPLATE_CODE.get(type(self))
            if cache is None:
                cache = _TEMPLATE_CODE.setdefault(type(self), _template_code_cache())
            self.env.bytecode_cache = cache
        return get_template(self, template_str)

    DefaultJinjaView._get_template = _get_template
    DefaultJinjaView._alignflow_memoized = True


@contextlib.contextmanager
def _memoized_run(graphs: dict | None = None) -> Iterator[None]:
    """The scope of one validation run: configurations and row filters made once (see the memos above);
    with ``graphs`` (a suite's, kept across its runs), metric graphs made once per suite. Data Docs
    templates are compiled once per process (:func:`_cache_template_code`)."""
    _memoize_configurations()
    _memoize_row_filters()
    _memoize_metric_graphs()
    _cache_template_code()
    _RUN.configurations, _RUN.filters, _RUN.graphs = {}, {}, graphs
    try:
        yield
    finally:
        _RUN.configurations = _RUN.filters = _RUN.graphs = None


_EPHEMERAL: dict[tuple[str, str], _EphemeralSuite] = {}
_EPHEMERAL_LOCK = threading.Lock()


def _ephemeral_suite(kind: str, specs: list[ExpectationSpec]) -> _EphemeralSuite:
    """The process's ephemeral suite for ``kind`` and exactly these expectations (built on first use)."""
    key = (kind, repr(specs))
    with _EPHEMERAL_LOCK:
        entry = _EPHEMERAL.get(key)
        if entry is None:
            entry = _EPHEMERAL[key] = _EphemeralSuite(kind, [_build_gx(s, i) for i, s in enumerate(specs)])
        return entry


def _run_gx(
    work: pd.DataFrame,
    kind: str,
    specs: list[ExpectationSpec],
    docs_dir: Path | None,
    batch_name: str,
    result_format: str = "COMPLETE",
):
    """Validate ``work`` with GX; returns (ExpectationSuiteValidationResult, docs index)."""
    from great_expectations.core.run_identifier import RunIdentifier

    from . import _gx_custom  # noqa: F401  registers the custom metric + expectation

    # GX announces every ephemeral context at INFO; one line per batch is noise in a flow's log.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    _no_batch_fingerprint()

    result_format = {"result_format": result_format, "return_unexpected_index_query": False}
    run_id = RunIdentifier(run_name=batch_name, run_time=_dt.datetime.now(_dt.timezone.utc))

    # Every batch is validated in the process's ephemeral suite (built once, its metric graphs kept);
    # the definition's Validator loads the batch once, where Batch.validate would load (and
    # fingerprint-hash) the dataframe a second time.
    entry = _ephemeral_suite(kind, specs)
    with entry.lock:
        try:
            with _memoized_run(entry.graphs):
                vr = entry.run(work, result_format, run_id)
        finally:
            entry.forget_batch()
    if docs_dir is None:
        return vr, None
    return vr, _write_docs(vr, kind, specs, docs_dir, run_id)


class _DeferredDocs:
    """The Data Docs of one validation, written when :meth:`write` is called (``validate(defer_docs=True)``)."""

    def __init__(self, vr: Any, kind: str, specs: list[ExpectationSpec], docs_dir: Path) -> None:
        self.vr, self.kind, self.specs, self.docs_dir = vr, kind, specs, Path(docs_dir)

    def write(self) -> Path:
        with _docs_lock(self.docs_dir):
            return _write_docs(self.vr, self.kind, self.specs, self.docs_dir, self.vr.meta["run_id"])


def _docs_index(docs_dir: Path) -> Path:
    """Where the Data Docs site under ``docs_dir`` has its index page."""
    return Path(docs_dir) / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"


def _write_docs(vr: Any, kind: str, specs: list[ExpectationSpec], docs_dir: Path, run_id: Any) -> Path:
    """Data Docs of a validation result: the result, with its suite, goes into the docs folder's file
    context, and the site is rebuilt for these two. (A checkpoint of that context would validate the batch
    a second time, there without the memos, and save its data source, definition and checkpoint first:
    twice the cost, a posts batch of 15,000 rows 0.91 CPU-s against 0.45, for the same pages.) Returns the
    site's index page."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.data_context.types.resource_identifiers import (ExpectationSuiteIdentifier,
                                                                            ValidationResultIdentifier)

    suite_name = f"alignflow_{kind}"
    with _config_variables_read_once():  # GX reads config_variables.yml once here, not ~70 times
        ctx = gx.get_context(mode="file", project_root_dir=str(docs_dir))
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        ctx.suites.add_or_update(
            gx.ExpectationSuite(name=suite_name, expectations=[_build_gx(s, i) for i, s in enumerate(specs)]))
        suite_id = ExpectationSuiteIdentifier(name=suite_name)
        result_id = ValidationResultIdentifier(expectation_suite_identifier=suite_id, run_id=run_id,
                                               batch_identifier=vr.batch_id)
        ctx.validation_results_store.store_validation_results(
            suite_validation_result=vr, suite_validation_result_identifier=result_id,
            expectation_suite_identifier=suite_id)
        with _memoized_run():  # the templates' compiled code, shared between pages
            ctx.build_data_docs(resource_identifiers=[result_id, suite_id], build_index=True)
    return _docs_index(docs_dir)


def validate(
    df: pd.DataFrame,
    kind: str,
    *,
    docs_dir: Path | None = None,
    batch_name: str = "batch",
    max_chars: int = DEFAULT_MAX_CHARS,
    with_json: bool = True,
    defer_docs: bool = False,
) -> ContractResult:
    """Validate ``df`` against the contract of dataset ``kind``.

    Rows failing a row-level expectation go to ``rejected`` (with the failing
    expectation names in column ``expectation``, joined by ``"; "``), the
    others to ``valid``; both keep ``df``'s index and order. Table-level
    failures set ``passed=False`` and are listed in ``table_failures``
    (``raise_for_table_failures()`` turns them into a ``ContractViolation``).
    With ``docs_dir``, HTML Data Docs are written under it
    (``docs_index`` = ``<docs_dir>/gx/uncommitted/data_docs/local_site/index.html``).
    ``defer_docs=True`` (with ``docs_dir``) validates as without Data Docs and leaves writing them to the
    caller: ``result.deferred_docs.write()`` (``docs_index`` is where they will be); a worker that checks
    batches for another process writes them when it has nothing else to do.
    ``with_json=False`` leaves ``result_json`` empty: callers that only need the verdicts (the
    ingest's batches) skip serialising GX's result, about a tenth of a small batch's cost.

    Without ``docs_dir``, a frame in which no row looks bad (``_may_fail_a_row``) is
    validated in GX's pass/fail mode (``BOOLEAN_ONLY``) first, about half the cost of
    listing failing rows; only if an expectation fails there is it validated again in
    full (``COMPLETE``). GX's verdict decides in both cases, so the result is the same.
    """
    t0 = time.perf_counter()
    if "great_expectations" not in sys.modules:
        defer_unused_imports()
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"validate() needs a pandas DataFrame, got {type(df).__name__}")
    all_specs = expectations_for(kind, max_chars)
    cols = set(df.columns)
    # Expectations on absent columns would only raise; the column-set
    # expectation already reports the missing columns.
    specs = [
        s for s in all_specs
        if s.gx_class == "ExpectTableColumnsToMatchSet" or set(s.columns) <= cols
    ]
    skipped = [s.name for s in all_specs if s not in specs]
    work = _prepare(df, kind, max_chars)
    index_is_original = work.index is df.index

    deferred_docs = None
    if docs_dir is not None and defer_docs:
        docs_dir = Path(docs_dir)
        vr, _ = _run_gx(work, kind, specs, None, batch_name)  # the full result, as the docs show it
        docs_index = _docs_index(docs_dir)
        deferred_docs = _DeferredDocs(vr, kind, specs, docs_dir)
    elif docs_dir is not None:
        docs_dir = Path(docs_dir)
        with _docs_lock(docs_dir):
            vr, docs_index = _run_gx(work, kind, specs, docs_dir, batch_name)
    else:
        vr = None
        if not _may_fail_a_row(work, specs):
            # Most batches pass every expectation: GX first only says whether each one passed, which
            # costs about half of listing the failing rows; any failure and the full run below decides.
            vr, _ = _run_gx(work, kind, specs, None, batch_name, result_format="BOOLEAN_ONLY")
            if not vr.success:
                vr = None
        if vr is None:
            vr, docs_index = _run_gx(work, kind, specs, None, batch_name)
        docs_index = None
    t_gx = time.perf_counter()

    n = len(df)
    table_failures: list[tuple[int, TableFailure]] = []
    row_failures: dict[int, list[tuple[int, str]]] = {}
    failed_row_expectations: list[tuple[int, str]] = []
    for res in vr.results:
        meta = res.expectation_config.meta or {}
        order = int(meta.get("alignflow_order", -1))
        spec = specs[order] if 0 <= order < len(specs) else None
        if spec is None or res.success:
            continue
        raised = _exception_message(res.exception_info) is not None
        # An expectation that raised (e.g. a numeric rule on a text column)
        # cannot say which rows are bad: that fails the table.
        if spec.level == "table" or raised:
            d = {"result": res.result, "exception_info": res.exception_info}
            table_failures.append((order, _table_failure(spec, d, work, df)))
            continue
        failed_row_expectations.append((order, spec.name))
        for pos in _positions(work, list(res.result.get("unexpected_index_list") or [])):
            row_failures.setdefault(pos, []).append((order, spec.name))

    mask = np.zeros(n, dtype=bool)
    if row_failures:
        mask[list(row_failures)] = True
    valid = df[~mask]
    rejected = df[mask].copy()
    labels = ["; ".join(nm for _, nm in sorted(row_failures[p])) for p in sorted(row_failures)]
    rejected["expectation"] = pd.Series(labels, index=rejected.index, dtype="str")

    failures = [f for _, f in sorted(table_failures, key=lambda t: t[0])]
    stats = dict(vr.statistics)
    stats.update(
        {
            "rows_in": n,
            "rows_valid": int(len(valid)),
            "rows_rejected": int(len(rejected)),
            "row_level_failed_expectations": [nm for _, nm in sorted(failed_row_expectations)],
            "table_level_failed_expectations": [f.expectation for f in failures],
            "skipped_expectations": skipped,
            "seconds_gx": round(t_gx - t0, 4),
        }
    )
    result_json = _result_json(vr, index_is_original) if with_json else {}
    stats["seconds"] = round(time.perf_counter() - t0, 4)
    return ContractResult(
        kind=kind,
        passed=not failures,
        valid=valid,
        rejected=rejected,
        table_failures=failures,
        statistics=stats,
        result_json=result_json,
        docs_index=docs_index if docs_index is not None and (deferred_docs or docs_index.exists()) else None,
        batch_name=batch_name,
        deferred_docs=deferred_docs,
    )
