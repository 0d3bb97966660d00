"""Build the datasets from the staging store: score, pair, split, validate, write.

The walk goes over the questions in a fixed order, so every output is
deterministic, and memory is bounded by one chunk of questions plus one batch
per dataset. Stack Exchange questions are built a chunk at a time as Arrow
columns (:mod:`.columnar`), the others one question at a time as rows. Each
batch is checked against its data contract before it is written; rows a
contract rejects are quarantined with the expectation's name, and a
table-level failure stops the build. Everything is written under a
temporary folder that the caller renames into place only when all succeeded.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alignflow.config import IngestConfig

from . import schema
from .columnar import COLUMNAR_SOURCES, add_questions, chunk_source
from .contract_service import KeptBatch, kept_table
from .heap import trim_heap
from .ids import splits
from .scoring import (Candidate, configured_split, best_answer, combined_license, pm_score, rank_pairs, render_prompt,
                      short_id)
from .store import StagingStore, StoredPost, stored_groups

DATASETS = ("posts", "pairs", "demos", "prompts")
_IS_STR = str.__instancecheck__  # isinstance(v, str), called from C by filter()


def utf8_bytes(text: str) -> int:
    """The bytes of ``text`` in UTF-8: its length when it is ASCII (a flag CPython keeps), else its encoding's."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


@dataclass
class BuildSummary:
    rows: dict[str, int] = field(default_factory=dict)  # rows written per dataset
    kept_by_file: Counter = field(default_factory=Counter)  # (source_file, key) -> n
    pair_stats: Counter = field(default_factory=Counter)
    contract_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    docs: dict[str, str] = field(default_factory=dict)  # kind -> Data Docs index


class DatasetWriter:
    """Buffers rows of one dataset, validates each batch, writes Parquet row groups."""

    def __init__(
        self,
        kind: str,
        path: Path,
        store: StagingStore,
        summary: BuildSummary,
        *,
        batch_rows: int,
        batch_bytes: int,
        max_chars: int,
        docs_dir: Path,
        validate: Callable[..., Any],
        contract_rows: int | None = None,
        contract_bytes: int | None = None,
        contracts: Any = None,
    ) -> None:
        self.kind = kind
        self.path = path
        self.store = store
        self.summary = summary
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes
        # Contracts check many row groups at once: a validation has a fixed cost
        # (~0.1 s) that would dominate if paid per row group.
        self.contract_rows = max(contract_rows or batch_rows, batch_rows)
        self.contract_bytes = max(contract_bytes or batch_bytes, batch_bytes)
        self.max_chars = max_chars
        self.docs_dir = docs_dir
        self.validate = validate
        self.schema = schema.SCHEMAS[kind]
        # the rows as they wait for their check: the dataset's columns, then where each row came from (for the
        # quarantine: not written, and not counted in a row group's text, or the files would depend on the input's
        # path, whose length moved the row groups' cuts)
        self.batch_schema = self.schema.append(pa.field("_source_file", pa.string())).append(
            pa.field("_line", pa.int64()))
        # The row group being filled: whole tables of rows (add_table), then rows one at a time (add). Full
        # groups wait for their contract check as Arrow tables, about their text's size (a row dict is ~4x).
        self.pieces: list[pa.Table] = []
        self.rows: list[dict] = []
        self.group_rows = 0
        self.group_bytes = 0
        self.groups: list[pa.Table] = []
        self.waiting_rows = 0
        self.waiting_bytes = 0
        # A ContractService: checks run on another process, one batch behind; that process also writes the
        # checked rows of the datasets not in WRITTEN_BY_THE_BUILDER.
        self.contracts = contracts
        self.pending: tuple | None = None  # the batch submitted last, its verdict not collected yet
        self.submitted = 0
        self.batches = 0
        self.written = 0
        # Which process writes the checked rows: this one keeps a submitted batch until its verdict is back
        self.write_here = contracts is None or kind in WRITTEN_BY_THE_BUILDER
        self.writer = dataset_writer(path, self.schema) if self.write_here else None
        self.stats = Counter()

    def add(self, row: dict) -> None:
        """One row (keys: ``batch_schema``'s names); :meth:`maybe_flush` after the rows of one question."""
        self.rows.append(row)
        self.group_rows += 1
        # the text of the row, in bytes: the dataset's columns, not where the row was read (_source_file)
        source = row.get("_source_file")
        self.group_bytes += sum(map(utf8_bytes, filter(_IS_STR, row.values()))) - (
            utf8_bytes(source) if isinstance(source, str) else 0)

    def maybe_flush(self) -> None:
        # A row group is bounded by rows and by text size: a batch of long answers must not grow memory.
        if self.group_rows >= self.batch_rows or self.group_bytes >= self.batch_bytes:
            self._close_group()
            if self.waiting_rows >= self.contract_rows or self.waiting_bytes >= self.contract_bytes:
                self.flush()

    def add_table(self, table: pa.Table, ends: np.ndarray) -> None:
        """The rows of several questions at once, as a table of ``batch_schema``; ``ends[k]``: the row where the
        k-th question's rows end (ascending, the last one ``table.num_rows``; a question without rows here
        repeats the end before it). Row groups and contract batches are cut exactly where :meth:`add` and
        :meth:`maybe_flush` per question would cut them, so the files do not depend on the path the rows took."""
        n = table.num_rows
        if n == 0:
            return
        # The text of each row in UTF-8 bytes, as add() counts it: from the strings' offsets, without reading a
        # character (counting characters read all 1.9 GB of the datasets' text at 1 GiB of input: 1.5 CPU-s).
        text_bytes = np.zeros(n, dtype=np.int64)
        for column, f in zip(table.columns, self.batch_schema):
            if pa.types.is_string(f.type) and f.name != "_source_file":
                text_bytes += pc.binary_length(column).fill_null(0).to_numpy()
        total = np.concatenate(([0], np.cumsum(text_bytes)))  # total[i]: the text of rows [0, i)
        start = 0
        while start < n:
            self._rows_to_piece()
            # the first row at which the open group is full, by rows or by text
            by_rows = start + self.batch_rows - self.group_rows - 1
            by_text = int(np.searchsorted(total, self.batch_bytes - self.group_bytes + total[start])) - 1
            full = max(min(by_rows, by_text), start)
            end = n if full >= n else int(ends[np.searchsorted(ends, full, side="right")])  # its question's end
            self.pieces.append(table.slice(start, end - start))
            self.group_rows += end - start
            self.group_bytes += int(total[end] - total[start])
            start = end
            if full < n:
                self.maybe_flush()

    def _rows_to_piece(self) -> None:
        if self.rows:
            self.pieces.append(rows_to_table(self.rows, self.batch_schema))
            self.rows = []

    def _close_group(self) -> None:
        self._rows_to_piece()
        if self.pieces:
            self.groups.append(pa.concat_tables(self.pieces).combine_chunks())
            self.waiting_rows += self.group_rows
            self.waiting_bytes += self.group_bytes
            self.pieces, self.group_rows, self.group_bytes = [], 0, 0

    def flush(self, final: bool = False) -> None:
        """Send the waiting row groups to their contract check; write the previous batch once it is checked."""
        self._close_group()
        if self.groups or (final and self.submitted == 0):
            sizes = [g.num_rows for g in self.groups]
            # Arrow is what is written; GX gets it as a pandas frame
            table = (pa.concat_tables(self.groups).combine_chunks() if self.groups
                     else self.batch_schema.empty_table())
            self.groups, self.waiting_rows, self.waiting_bytes = [], 0, 0
            origin = (table.column("_source_file"), table.column("_line"))
            table = pa.Table.from_arrays(table.columns[: len(self.schema)], schema=self.schema)
            kwargs = dict(docs_dir=self.docs_dir / self.kind if self.submitted == 0 else None,
                          batch_name=f"{self.kind}-{self.submitted:05d}", max_chars=self.max_chars,
                          with_json=False)
            only_batch = self.submitted == 0 and final
            if self.contracts is not None:  # the contract process makes the pandas frame GX needs (and writes)
                write = None if self.write_here else CheckedWrite(str(self.path), sizes, only_batch)
                # kept for writing here: as the shared-memory file the worker reads, once it is there
                table = KeptBatch(table) if self.write_here else table
                ticket = self.contracts.submit(table, self.kind, write=write, **kwargs)
                outcome = lambda: self.contracts.result(ticket)  # noqa: E731
                if not self.write_here:
                    table = None
            else:
                result = self.validate(table.to_pandas(), self.kind, **kwargs)
                outcome = lambda: result  # noqa: E731
            self._write_checked()
            self.pending = (table, origin, sizes, outcome, only_batch)
            self.submitted += 1
        if final or self.contracts is None:
            self._write_checked()

    def _write_checked(self) -> None:
        """Quarantine the rows the pending batch's contract rejected; write the others (here, or the contract
        process already did)."""
        if self.pending is None:
            return
        table, (sources, lines), sizes, outcome, only_batch = self.pending
        self.pending = None
        result = outcome()
        table = kept_table(table)
        result.raise_for_table_failures()
        if result.docs_index is not None:
            self.summary.docs[self.kind] = str(result.docs_index)
        for key, value in result.statistics.items():
            if isinstance(value, (int, float)) and not key.endswith("percent"):
                self.stats[key] += value
        if len(result.rejected):
            positions = list(result.rejected.index)
            fields = rejected_fields(table, positions, self.kind) if table is not None else result.rejected_fields
            for pos, expectation in result.rejected["expectation"].items():
                row = fields[pos]
                src = sources[pos].as_py()
                # An input row (a post, a pair read from a pairs file) moves from kept to quarantined;
                # a row derived from input rows (a Stack Exchange pair, a demo, a prompt) is quarantined
                # without being an input row of its own, so it stays out of the per-file accounting.
                if self.kind == "posts":
                    kept_key = f"kept:{row['kind']}"
                elif self.kind == "pairs" and row["source"] == "pairs":
                    kept_key = "kept:pair"
                else:
                    kept_key = None
                self.store.quarantine(
                    source_file=src, reason=f"contract:{self.kind}", line=lines[pos].as_py(),
                    row_id=str(row["id"]), site=str(row["site"]), detail=str(expectation),
                    dataset=self.kind, input_row=kept_key is not None,
                )
                if kept_key is not None:
                    self.summary.kept_by_file[(src, kept_key)] -= 1
        if table is not None:
            self.written += write_valid(self.writer, table, result.valid.index.to_numpy(), sizes, only_batch)
        else:
            self.written += result.written
        first = self.batches == 0
        self.batches += 1
        del table, result
        if self.contracts is None:  # validated here: GX's garbage is this process's
            collect_batch_garbage(new_objects_stay=first)
        else:
            release_memory()

    def close(self) -> None:
        self.flush(final=True)
        if self.writer is not None:
            self.writer.close()
        else:  # the contract process closes the file it wrote, once every batch before is written
            self.contracts.result(self.contracts.close_file(str(self.path), self.schema))
        self.summary.rows[self.kind] = self.written
        self.summary.contract_stats[self.kind] = {"batches": self.batches, **dict(self.stats)}


@dataclass(frozen=True)
class CheckedWrite:
    """How the contract process writes a batch once checked: into ``path``, one row group per filled group
    (``sizes``), its valid rows only; ``only_batch``: the dataset's one batch, written even when empty."""

    path: str
    sizes: list[int]
    only_batch: bool


# The columns of long text (bodies, prompts, responses) and of ids nearly unique per row: a dictionary of their
# values is built only to be dropped once it outgrows its page, and their min/max statistics help no reader.
# Without either, the four datasets of 1 GiB of generated input (the same row groups written both ways, pyarrow
# 25) took 4.34 CPU-s to write instead of 4.74, into 253 MiB of files instead of 266.
_TEXT_COLUMNS = frozenset({"body", "prompt", "chosen", "rejected", "response"})
_UNIQUE_COLUMNS = frozenset({"post_id", "pair_id", "demo_id", "prompt_id", "question_id", "answer_id", "chosen_id",
                             "rejected_id", "created_at"})


def dataset_writer(path: str | Path, arrow_schema: pa.Schema) -> pq.ParquetWriter:
    """The Parquet writer of a dataset file: one set of options wherever the file is written (this process
    or the contract process), so the bytes do not depend on the number of workers."""
    names = arrow_schema.names
    return pq.ParquetWriter(
        path, arrow_schema, compression="zstd",
        use_dictionary=[c for c in names if c not in _TEXT_COLUMNS | _UNIQUE_COLUMNS],
        write_statistics=[c for c in names if c not in _TEXT_COLUMNS],
    )


def write_valid(writer: pq.ParquetWriter, table: pa.Table, valid_positions: np.ndarray, sizes: list[int],
                only_batch: bool) -> int:
    """Write the valid rows of a checked batch, one Parquet row group per filled group (as if each had been
    checked alone); returns the rows written. The same bytes wherever it runs."""
    valid = np.zeros(table.num_rows, dtype=bool)
    valid[valid_positions] = True
    keep = None if valid.all() else pa.array(valid)  # most batches: every row, written without a filtered copy
    start = written = 0
    wrote = False
    for size in sizes or [0]:
        part = table.slice(start, size)
        if keep is not None:
            part = part.filter(keep.slice(start, size))
        start += size
        if part.num_rows or (not wrote and only_batch and start >= table.num_rows):
            writer.write_table(part)
            wrote = True
        written += part.num_rows
    return written


def rejected_fields(table: pa.Table, positions: list[int], kind: str) -> dict[int, dict[str, Any]]:
    """What the quarantine of a rejected row needs from it: its id, site, kind (posts) and source."""
    fields = table.select([c for c in (_ID_COLUMN[kind], "site", "kind", "source") if c in table.column_names])
    out = {}
    for pos in positions:
        row = fields.slice(pos, 1).to_pylist()[0]
        row["id"] = row.pop(_ID_COLUMN[kind])
        out[pos] = row
    return out


# A batch's freed malloc memory is given back to the OS only once the arenas hold this much free: trimming
# after every batch gave back a few MB each time, to be faulted in again by the next batch (at 1 GiB with 2
# workers: 2.6 million page faults and 13.9 s of system time; 2.1 million and 11.0 s with this threshold;
# 1.9 million and 10.1 s without trimming; peak RSS the same in all three).
TRIM_MIN_FREE = 16 << 20


def release_memory() -> None:
    """Give freed batch memory back to the OS, so peak RSS stays flat across batches.

    Each batch churns tens of MB of short-lived strings, frames and Arrow
    buffers; without this glibc and Arrow's allocator keep the high-water mark.

    Which allocator Arrow uses: see :func:`use_arrow_allocator`.
    """
    pa.default_memory_pool().release_unused()
    trim_heap(min_free=TRIM_MIN_FREE)


# The allocator of a Stack Exchange build's Arrow buffers (this process and the contract process). The command runs
# Arrow on the C library's allocator (flows/cli.py: a Pushshift month of 1 GiB peaks higher on the others, 957 MiB
# on jemalloc and 999 on mimalloc, Arrow's own default, against 936-941). A Stack Exchange build of 1 GiB with 2
# workers took 12.3-12.8 s on it against 10.2-11.0 s on jemalloc (mimalloc 11.8 s), 3-4 CPU-s more, most of it in
# Parquet writes and takes, for 20-35 MiB less at the tree's peak (bench/REPORT.md).
FAST_ARROW_ALLOCATOR = "jemalloc"


def use_arrow_allocator(name: str = FAST_ARROW_ALLOCATOR) -> str:
    """Make ``name`` (jemalloc, mimalloc, system) the pool of the Arrow buffers this process allocates from now on;
    buffers allocated before stay with their pool. A pyarrow built without it keeps its pool. Returns the
    backend in use."""
    try:
        pa.set_memory_pool(getattr(pa, f"{name}_memory_pool")())
    except (AttributeError, NotImplementedError, pa.ArrowException):
        pass
    return pa.default_memory_pool().backend_name


@contextmanager
def arrow_allocator(name: str | None) -> Iterator[None]:
    """Within the block, Arrow buffers come from the pool ``name`` (None: unchanged); after it, from the pool
    before."""
    before = pa.default_memory_pool()
    if name is not None:
        use_arrow_allocator(name)
    try:
        yield
    finally:
        pa.set_memory_pool(before)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects alive on entry out of the cyclic garbage collector's passes while the block runs.

    An ingest allocates millions of short-lived objects (rows, frames, GX results), so the collector
    runs full passes over everything the process holds, its libraries' objects included (Prefect,
    MLflow, GX: hundreds of MB of objects that never become garbage). Frozen, they are skipped;
    on exit they go back to the oldest generation.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def collect_batch_garbage(new_objects_stay: bool = False) -> None:
    """Free one batch's reference cycles now and give the memory back to the OS.

    GX leaves each validation's objects in reference cycles. Left to the collector, they pile up
    until the next full pass, which comes only when they reach a quarter of the objects the process
    holds: over a gigabyte of input that is 150 MB more at the peak. ``new_objects_stay``: what is
    still alive after the pass (a suite built for the first batch of a dataset) is frozen, so later
    passes skip it.
    """
    gc.collect()
    if new_objects_stay:
        gc.freeze()
    release_memory()


# With contracts on a second process, the datasets whose checked rows the builder writes itself; the contract
# process writes the others. This balances the two processes' CPU in the build. At 1 GiB with 2 workers
# (bench/REPORT.md), the contract process writing all four took 25.5 CPU-s against the builder's 19.6, and the
# build took 26.7 s; with the builder writing posts and pairs, 20.8 and 21.8, and 23.6 s. Once each suite's
# metric graphs were built once (data_contracts), the contract process needed less: with the builder writing
# posts and pairs it took 20.4-21.1 CPU-s against the builder's 19.3-19.5 (build 21.7-22.1 s), with the builder
# writing posts only 22.0-22.9 against 17.2-17.3 (build 21.1-21.3 s), alternating runs in the same hour. Once the
# walk hashed its ids a column at a time (.ids) and Data Docs got cheaper, posts only left the contract process
# with 1.30-1.31x the builder's CPU in two runs (the builder waiting 4.7-7.0 s on it); posts and pairs, 0.98x
# (waiting 2.2 s). The host's speed varied too much between runs to compare their walls; the ratio within a
# run does not depend on it.
WRITTEN_BY_THE_BUILDER = frozenset({"posts", "pairs"})

_ID_COLUMN = {"posts": "post_id", "pairs": "pair_id", "demos": "demo_id", "prompts": "prompt_id"}


def rows_to_table(rows: list[dict], arrow_schema: pa.Schema) -> pa.Table:
    """Row dicts -> an Arrow table of ``arrow_schema`` (other keys ignored, missing ones null).

    One conversion in Arrow's C++ (the rows as a struct array), several times faster than
    reading the dicts column by column in Python or building a pandas frame first.
    """
    struct = pa.array(rows, type=pa.struct(list(arrow_schema)))
    return pa.Table.from_arrays(struct.flatten(), schema=arrow_schema)


def score_answer(answer: StoredPost, accepted: bool, score_source: str) -> tuple[int, int | None]:
    """(pm_score, upvotes) of an answer, from Votes.xml counts or from Score."""
    if score_source == "votes" and answer.upvotes is not None:
        return pm_score(answer.upvotes, answer.upvotes - (answer.downvotes or 0), accepted), answer.upvotes
    return pm_score(max(answer.score, 0), answer.score, accepted), answer.upvotes


# Text per contract batch (MiB) when ``ingest.contract_mb`` is 0: larger batches pay GX's fixed cost per validation
# less often, and hold more memory. A Pushshift month gains no speed from 12 MiB and peaks 20-40 MiB higher
# (bench/REPORT.md, "Text bounded in bytes; two malloc arenas; contract batches of 12 MiB").
CONTRACT_MB = 12
CONTRACT_MB_PUSHSHIFT = 8


def contract_mb(cfg: IngestConfig, pushshift: bool) -> int:
    """The text per contract batch (MiB) of a build: ``ingest.contract_mb``, or by its input when that is 0."""
    return cfg.contract_mb or (CONTRACT_MB_PUSHSHIFT if pushshift else CONTRACT_MB)


class Builder:
    # Stack Exchange questions and Reddit submissions are built a chunk at a time as columns (.columnar), the
    # others (and chunks of mixed sources) one question at a time as rows (add_question). Off: every question
    # as rows, the reference the columns are tested against.
    columnar = True

    def __init__(self, store: StagingStore, out_dir: Path, cfg: IngestConfig, *, validate: Callable[..., Any],
                 shp_pairs: Callable[..., Any] | None = None, contracts: Any = None, pushshift: bool = False) -> None:
        self.store = store
        self.cfg = cfg
        self.summary = BuildSummary()
        self.shp_pairs = shp_pairs
        prompt_budget = 2 * cfg.max_text_chars + len(cfg.prompt_template) + 1000
        self.writers = {
            kind: DatasetWriter(
                kind, out_dir / f"{kind}.parquet", store, self.summary, batch_rows=cfg.batch_rows,
                batch_bytes=cfg.batch_mb << 20, max_chars=prompt_budget, docs_dir=out_dir / "contracts", validate=validate,
                contract_rows=cfg.contract_rows, contract_bytes=contract_mb(cfg, pushshift) << 20, contracts=contracts,
            )
            for kind in DATASETS
        }
        self.sites_with_votes = store.sites_with_votes()
        # More groups a source builds itself after the questions (Reddit reply pairs): callables of the builder
        self.extra_steps: list[Callable[[Builder], None]] = []

    def score_source_for(self, site: str) -> str:
        if self.cfg.score_source == "score":
            return "score"
        if self.cfg.score_source == "votes" and site not in self.sites_with_votes:
            raise ValueError(f"ingest.score_source=votes but site {site} has no Votes.xml")
        return "votes" if site in self.sites_with_votes else "score"

    def split_of(self, site: str, question_id: str) -> str:
        return configured_split(self.cfg.split, site, question_id)

    def splits_of(self, site: pa.Array, question_id: pa.Array) -> pa.Array:
        """:meth:`split_of` of every row of two string columns at once."""
        s = self.cfg.split
        return splits(site, question_id, train=s.train, validation=s.validation, salt=s.salt)

    # -- one question -------------------------------------------------------------
    def add_question(self, rows: list[StoredPost]) -> None:
        stats = self.summary.pair_stats
        question = rows[0] if rows[0].kind == "question" else None
        answers = rows[1:] if question is not None else rows
        if question is None:
            for a in answers:
                self.store.quarantine(
                    source_file=a.source_file, reason="orphan_answer", line=a.line, row_id=a.post_id, site=a.site,
                    detail=f"question {a.question_id} is not in the input (deleted, or in another file)",
                )
            return
        site, qid = question.site, question.post_id
        split = self.split_of(site, qid)
        prompt = render_prompt(self.cfg.prompt_template, title=question.title, body=question.body, site=site,
                               tags=question.tags)
        kept = self.summary.kept_by_file
        kept[(question.source_file, "kept:question")] += 1
        self.writers["posts"].add(self._post_row(question, split, None, None, False))
        self.writers["prompts"].add(
            dict(prompt_id=short_id(site, qid), prompt=prompt, question_id=qid, site=site, source=question.source,
                 split=split, _source_file=question.source_file, _line=question.line)
        )
        accepted = [
            (a.post_id == question.accepted_answer_id) or a.accept_votes > 0 for a in answers
        ]
        source = self.score_source_for(site) if question.source == "stackexchange" else "score"
        scored = [score_answer(a, acc, source) for a, acc in zip(answers, accepted)]
        for a, acc, (pm, up) in zip(answers, accepted, scored):
            kept[(a.source_file, "kept:answer")] += 1
            self.writers["posts"].add(self._post_row(a, split, pm, up, acc, title=question.title))

        # Pairs: Stack Exchange by pm_score; Reddit by the SHP rules.
        pair_idx: list[tuple[int, int]]
        if question.source == "reddit":
            if self.shp_pairs is None:
                raise RuntimeError("Reddit input needs the SHP pairing rules")
            chosen_rejected, drops = self.shp_pairs(question, answers, self.cfg.reddit, seed=self.cfg.pair_seed)
            index = {id(a): i for i, a in enumerate(answers)}
            pair_idx = [(index[id(c)], index[id(r)]) for c, r in chosen_rejected]
            stats.update({f"dropped:{k}": v for k, v in drops.items()})
            stats["candidates"] += len(answers) * (len(answers) - 1) // 2
            pair_scores = [float(a.score) for a in answers]
        elif len(answers) >= self.cfg.min_answers:
            candidates = [Candidate(a.post_id, pm) for a, (pm, _) in zip(answers, scored)]
            pair_idx, ps = rank_pairs(candidates, max_pairs=self.cfg.max_pairs_per_question,
                                      seed=self.cfg.pair_seed, key=f"{site}:{qid}")
            stats["candidates"] += ps.candidates
            stats["dropped:tie"] += ps.ties
            stats["dropped:capped"] += ps.capped
            pair_scores = [float(pm) for pm, _ in scored]
        else:
            pair_idx, pair_scores = [], []
        for ci, ri in pair_idx:
            c, r = answers[ci], answers[ri]
            self.writers["pairs"].add(
                dict(
                    pair_id=short_id(site, qid, c.post_id, r.post_id), prompt=prompt, chosen=c.body,
                    rejected=r.body, chosen_score=pair_scores[ci], rejected_score=pair_scores[ri],
                    margin=pair_scores[ci] - pair_scores[ri], question_id=qid, site=site, source=question.source,
                    split=split, chosen_id=c.post_id, rejected_id=r.post_id, chosen_author=c.author,
                    rejected_author=r.author, license=combined_license(c.license, r.license),
                    _source_file=question.source_file, _line=question.line,
                )
            )
        stats["kept"] += len(pair_idx)

        if question.source == "stackexchange" and answers:
            best = best_answer([Candidate(a.post_id, pm) for a, (pm, _) in zip(answers, scored)], accepted,
                               self.cfg.min_demo_pm_score)
            if best is not None:
                a = answers[best]
                self.writers["demos"].add(
                    dict(demo_id=short_id(site, qid, a.post_id), prompt=prompt, response=a.body, question_id=qid,
                         answer_id=a.post_id, site=site, source=question.source, split=split,
                         pm_score=scored[best][0], author=a.author, license=a.license,
                         _source_file=a.source_file, _line=a.line)
                )
        for w in self.writers.values():
            w.maybe_flush()

    def _post_row(self, p: StoredPost, split: str, pm: int | None, up: int | None, accepted: bool,
                  title: str | None = None) -> dict:
        return dict(
            site=p.site, source=p.source, post_id=p.post_id, kind=p.kind, question_id=p.question_id,
            title=p.title if title is None else title, body=p.body, tags=p.tags, score=p.score, upvotes=up,
            accepted=accepted, pm_score=pm, author=p.author, license=p.license, created_at=p.created_at,
            split=split, _source_file=p.source_file, _line=p.line,
        )

    # -- already-paired input -------------------------------------------------------
    def add_input_pairs(self) -> None:
        seen: set[str] = set()
        current = None
        for (site, source, qid, _qkey, prompt, chosen, rejected, cs, rs, lic, src, line) in self.store.input_pairs():
            if (site, qid) != current:
                current, seen = (site, qid), set()
                split = self.split_of(site, qid)
                self.summary.pair_stats["questions_from_pairs_files"] += 1
                self.writers["prompts"].add(
                    dict(prompt_id=short_id(site, qid), prompt=prompt, question_id=qid, site=site, source=source,
                         split=split, _source_file=src, _line=line)
                )
            pid = short_id(site, qid, prompt, chosen, rejected)
            if pid in seen:
                self.store.quarantine(source_file=src, reason="duplicate_pair", line=line, site=site,
                                      detail="same prompt, chosen and rejected as an earlier row")
                continue
            seen.add(pid)
            self.summary.kept_by_file[(src, "kept:pair")] += 1
            margin = None if cs is None or rs is None else cs - rs
            self.writers["pairs"].add(
                dict(pair_id=pid, prompt=prompt, chosen=chosen, rejected=rejected, chosen_score=cs,
                     rejected_score=rs, margin=margin, question_id=qid, site=site, source=source, split=split,
                     chosen_id="", rejected_id="", chosen_author="", rejected_author="", license=lic,
                     _source_file=src, _line=line)
            )
            for w in self.writers.values():
                w.maybe_flush()

    def run(self) -> BuildSummary:
        for chunk in self.store.walk_chunks(self.cfg.batch_rows, self.cfg.batch_mb << 20):
            if self.columnar and (source := chunk_source(chunk)) in COLUMNAR_SOURCES:
                add_questions(self, chunk, source)
            else:
                for _key, rows in stored_groups(chunk):
                    self.add_question(rows)
        self.add_input_pairs()
        for step in self.extra_steps:
            step(self)
        for w in self.writers.values():
            w.close()
        return self.summary


def write_quarantine(store: StagingStore, path: Path, batch_rows: int) -> int:
    """Write every quarantined row (readers' and builder's) as one sorted Parquet file."""
    writer = pq.ParquetWriter(path, schema.QUARANTINE, compression="zstd")
    n = 0
    buf: list[tuple] = []

    def flush() -> None:
        nonlocal buf
        if buf:
            cols = list(zip(*buf))
            writer.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, schema.QUARANTINE)],
                                                    schema=schema.QUARANTINE))
            buf = []

    for row in store.quarantined():
        buf.append(row)
        n += 1
        if len(buf) >= batch_rows:
            flush()
    flush()
    if n == 0:
        writer.write_table(schema.QUARANTINE.empty_table())
    writer.close()
    return n


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
