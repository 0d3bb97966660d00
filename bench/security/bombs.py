"""Peak memory of `alignflow ingest` on decompression and size bombs, with the default limits.

    .venv/bin/python bench/security/bombs.py [--out DIR]

Each bomb is a few KB to a few MB on disk. Every case runs the installed
`alignflow ingest` in a fresh process with its own temporary Prefect server and
reports the exit code, the peak resident memory of the largest process of the
run (ru_maxrss of the children), the wall time and what the run left on disk
beyond its quarantine. The bar: every case exits 0 or 2, under 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import py7zr
import zstandard

MiB = 1 << 20


def zst_line(path: Path, line_bytes: int, template: bytes) -> Path:
    """A .zst with ordinary JSON lines around one JSON line of ``line_bytes`` bytes."""
    head, tail = template.split(b"FILL")
    with open(path, "wb") as fh, zstandard.ZstdCompressor(level=19).stream_writer(fh, closefd=False) as w:
        w.write(template.replace(b"FILL", b"first") + b"\n")
        w.write(head)
        block = b"x" * MiB
        left = line_bytes - len(head) - len(tail)
        while left > 0:
            w.write(block[:left])
            left -= len(block)
        w.write(tail + b"\n")
        w.write(template.replace(b"FILL", b"last") + b"\n")
    return path


def seven_zip(path: Path, parts: list[bytes], repeat_middle: int) -> Path:
    """A .7z whose Posts.xml is parts[0] + parts[1] * repeat_middle + parts[2] (written as a stream)."""
    folder = Path(tempfile.mkdtemp())
    posts = folder / "Posts.xml"
    with open(posts, "wb") as fh:
        fh.write(parts[0])
        for _ in range(repeat_middle):
            fh.write(parts[1])
        fh.write(parts[2])
    with py7zr.SevenZipFile(path, "w") as z:
        z.write(posts, "Posts.xml")
    shutil.rmtree(folder)
    return path


def cases(root: Path) -> dict[str, Path]:
    comment = (b'{"id": "c1", "parent_id": "t3_p", "link_id": "t3_p", "subreddit": "s", "score": 3, '
               b'"created_utc": 1400000000, "author": "a", "body": "FILL"}')
    pair = b'{"prompt": "p?", "chosen": "FILL", "rejected": "no"}'
    row = b'<row Id="2" PostTypeId="2" ParentId="1" Score="1" Body="'
    return {
        "zst line 256 MiB (reddit)": zst_line(root / "RC_2015-01.zst", 256 * MiB, comment),
        "zst line 1 GiB (reddit)": zst_line(root / "RC_2015-02.zst", 1024 * MiB, comment),
        "zst line 256 MiB (pairs)": zst_line(root / "pairs.jsonl.zst", 256 * MiB, pair),
        "7z attribute 512 MiB": seven_zip(root / "attr.stackexchange.com.7z", [
            b'<posts>\n<row Id="1" PostTypeId="1" Score="2" Title="t" Body="q" />\n' + row,
            b"x" * MiB, b'" />\n</posts>\n'], 512),
        "7z DTD then 2 GiB": seven_zip(root / "dtd.stackexchange.com.7z", [
            b'<!-- x --><!DOCTYPE posts [<!ENTITY e "E">]>\n<posts>\n', b" " * MiB, b"</posts>\n"], 2048),
    }


def run(source: Path, work: Path) -> dict:
    """One ingest in a fresh measuring process: ru_maxrss of its children covers the command and its workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
    env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = [str(Path(sys.executable).parent / "alignflow"), "ingest", str(source), "--workdir", str(work),
           "--allow-empty"]  # a bomb alone gives no pairs: measure a completed ingest, exit 0
    probe = ("import json, resource, subprocess, sys\n"
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "print(json.dumps({'exit': p.returncode, 'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN)"
             ".ru_maxrss, 'stderr': p.stderr.strip().splitlines()[-1:]}))\n")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout)
    data = work / "data" / "ingest"
    kept = sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) if data.exists() else 0
    return {"exit": res["exit"], "peak_rss_mib": round(res["peak_kib"] / 1024, 1),
            "seconds": round(time.perf_counter() - t0, 1), "bytes_on_disk_under_data": kept,
            "stderr": res["stderr"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="alignflow-bombs-"))
    results = {}
    try:
        for name, path in cases(root).items():
            work = root / ("work-" + path.stem)
            res = run(path, work)
            res["input_bytes"] = path.stat().st_size
            results[name] = res
            print(f"{name:28} exit {res['exit']}  peak RSS {res['peak_rss_mib']:7.1f} MiB  "
                  f"{res['seconds']:6.1f} s  input {res['input_bytes']:>9} B  {res['stderr']}", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
