"""Cost of one data-contract validation on ingest-sized batches, from an ingest's own outputs.

    .venv/bin/python bench/ingest/contracts.py WORKDIR/data/ingest/<key> [--batches 6] [--mb 4] [--no-memo]

For posts, pairs and prompts: batches of about ``--mb`` MiB of text (``ingest.contract_mb``), cut from the
dataset's first rows, validated as the ingest validates them (no Data Docs, no result JSON), after one warm-up
run that builds the suite. Prints milliseconds per validation. ``--no-memo`` turns off the per-run memos of GX's
expectation configurations and row filters (``data_contracts/contracts.py``), for an A/B in the same checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alignflow.data_contracts import contracts, validate


def text_bytes_per_row(table: pa.Table) -> float:
    text = [c for c in table.column_names if pa.types.is_string(table[c].type) or pa.types.is_large_string(table[c].type)]
    return sum(pc.sum(pc.binary_length(table[c])).as_py() or 0 for c in text) / max(1, len(table))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="an ingest's output folder (posts.parquet, pairs.parquet, ...)")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--mb", type=float, default=4.0, help="text per batch in MiB (ingest.contract_mb)")
    ap.add_argument("--no-memo", action="store_true", help="no per-run memos (GX configurations made on every access, the batch filtered per metric)")
    args = ap.parse_args()
    if args.no_memo:
        contracts._memoized_run = contextlib.nullcontext
    for kind in ("posts", "pairs", "prompts"):
        path = args.out_dir / f"{kind}.parquet"
        if not path.is_file():
            print(f"{kind:8s} no {path.name}")
            continue
        head = pq.read_table(path).slice(0, 50_000)
        rows = max(1, int(args.mb * (1 << 20) / max(1.0, text_bytes_per_row(head))))
        frame = head.to_pandas()
        batches = [frame.iloc[i * rows:(i + 1) * rows] for i in range(args.batches)]
        batches = [b for b in batches if len(b)]
        validate(batches[0].head(10), kind, with_json=False)  # builds the suite, loads GX's modules
        started = time.perf_counter()
        for batch in batches:
            validate(batch, kind, with_json=False)
        ms = (time.perf_counter() - started) / len(batches) * 1000
        print(f"{kind:8s} {len(batches)} batches of {rows:6d} rows  {ms:7.1f} ms per validation")


if __name__ == "__main__":
    main()
