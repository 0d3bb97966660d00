"""The parts of a Pushshift month's read, each against the code path it replaces, in one run.

  lines   ``reddit_parallel.parse_chunk`` (a reading worker's whole job on a chunk: parse, check, clean, the
          SQLite images) on chunks from the month's middle, with the C path (``_fastreddit``: the checks, and
          the rows written into the images) and without it (every line through ``reddit.read_line``, the
          images made by Python's sqlite3, as a build without a C compiler reads it), alternating;
  stream  the parent's decompression of the comments file: ``lines.open_binary`` (zstandard's stream reader
          for whole frames) against ``lines.ZstdFramesReader`` (the frame-by-frame reader it keeps for
          anything else), alternating.

CPU seconds (``time.process_time``), best of ``--rounds``. Input: the month of ``bench/ingest/reddit.py``
(``--scratch``, generated there when missing) or any ``RC_*.zst`` (``--file``).

    .venv/bin/python bench/ingest/pushshift_read.py --scratch SCRATCH
    .venv/bin/python bench/ingest/pushshift_read.py --file RC_2015-01.zst --chunks 3 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from alignflow.tasks.ingest import reddit_parallel
from alignflow.tasks.ingest.lines import ZstdFramesReader, open_binary

MIB = 1 << 20


def middle_chunks(path: Path, count: int, size: int, skip: int) -> list[bytes]:
    """``count`` runs of whole lines of about ``size`` bytes, each ``skip`` bytes after the one before."""
    chunks = []
    with open_binary(path) as stream:
        for _ in range(count):
            stream.read(skip)
            data = stream.read(size)
            if not data:
                break
            chunks.append(data[data.find(b"\n") + 1 : data.rfind(b"\n")])
    if not chunks:
        sys.exit(f"{path}: fewer lines than --skip-mb")
    return chunks


def parse_seconds(chunks: list[bytes], fast: bool) -> float:
    """``parse_chunk`` over the chunks: with the C module, or as a build without it (no C checks, the images
    made by Python's sqlite3)."""
    saved = reddit_parallel._comment_fields, reddit_parallel._Image
    if not fast:
        reddit_parallel._comment_fields = reddit_parallel._Image = None
    try:
        started = time.process_time()
        for i, chunk in enumerate(chunks):
            reddit_parallel.parse_chunk(("RC_bench.zst", "comment", 1000 + i, [chunk], "cc", "quarantine", 1 << 24,
                                         True, True))
        return time.process_time() - started
    finally:
        reddit_parallel._comment_fields, reddit_parallel._Image = saved


def read_seconds(stream) -> tuple[float, int]:
    started = time.process_time()
    total = 0
    with stream:
        while block := stream.read1(MIB):
            total += len(block)
    return time.process_time() - started, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", type=Path, help="the folder of bench/ingest/reddit.py's month")
    ap.add_argument("--file", type=Path, help="an RC_*.zst file instead")
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--chunk-mb", type=int, default=8)
    ap.add_argument("--skip-mb", type=int, default=200, help="MiB skipped before each chunk (200)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.file is None:
        if args.scratch is None:
            ap.error("give --scratch or --file")
        path = args.scratch / "RC_2015-01.zst"
        if not path.exists():
            sys.exit(f"{path} is missing: bench/ingest/reddit.py --scratch {args.scratch} --floor-only makes it")
    else:
        path = args.file
    if reddit_parallel._comment_fields is None:
        sys.exit("alignflow.tasks.ingest._fastreddit is not built: nothing to compare")

    chunks = middle_chunks(path, args.chunks, args.chunk_mb * MIB, args.skip_mb * MIB)
    lines = sum(c.count(b"\n") + 1 for c in chunks)
    python, c_path = [], []
    frames, stream = [], []
    size = 0
    for _ in range(args.rounds):
        python.append(parse_seconds(chunks, False))
        c_path.append(parse_seconds(chunks, True))
        seconds, size = read_seconds(io.BufferedReader(ZstdFramesReader(open(path, "rb")), buffer_size=MIB))
        frames.append(seconds)
        stream.append(read_seconds(open_binary(path))[0])
    result = {
        "file": str(path),
        "lines": lines,
        "parse_chunk_us_per_line": {"python_reader": min(python) / lines * 1e6, "c_path": min(c_path) / lines * 1e6},
        "parse_chunk_ratio": min(python) / min(c_path),
        "decompress_cpu_seconds": {"frame_reader": min(frames), "open_binary": min(stream)},
        "decompressed_mib": size / MIB,
        "decompress_ratio": min(frames) / min(stream),
        "rounds": args.rounds,
    }
    print(f"{'part':40s} {'replaced path':>14s} {'this path':>10s} {'ratio':>6s}")
    print(f"{'parse_chunk, us a line':40s} {min(python) / lines * 1e6:14.2f} {min(c_path) / lines * 1e6:10.2f} "
          f"{result['parse_chunk_ratio']:5.2f}x")
    print(f"{f'decompression of {size / MIB:,.0f} MiB, CPU-s':40s} {min(frames):14.2f} {min(stream):10.2f} "
          f"{result['decompress_ratio']:5.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
