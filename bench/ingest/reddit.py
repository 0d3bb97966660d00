"""Reddit ingest throughput: ``alignflow ingest RS_ RC_`` against a zstd + ``json.loads`` floor.

Generates (or reuses) a synthetic Pushshift month (``tasks/ingest/synthetic_reddit.py``):
``RC_2015-01.zst`` whose comments are ``--mb`` MiB uncompressed, and its
``RS_2015-01.zst`` submissions, so SHP pairs come out. Then, in one run:

  floor   a subprocess that decompresses both files as a stream
          (``zstandard``, the same 2 GiB window limit) and ``json.loads`` every
          line, nothing else;
  ingest  ``alignflow ingest RS_… RC_… --workdir <scratch>/work --set
          ingest.reddit_reply_pairs=true`` (the console script next to this
          interpreter) as a subprocess, as a user runs it (Prefect, MLflow,
          contracts on every batch).

The floor runs before the ingest and again after it; the ratio is against
the mean of the two walls (the speed of a shared host drifts in between).

Both figures are MiB of uncompressed input (RS_ + RC_) per second of the
subprocess's wall time; peak RSS is that of the subprocess's whole process tree
(psutil, every 0.2 s, RSS of the process and all its descendants summed).
Results: a table on stdout and ``bench/ingest/results/reddit.json``.

    .venv/bin/python bench/ingest/reddit.py              # 1024 MiB of comments
    .venv/bin/python bench/ingest/reddit.py --quick      # 40 MiB
    .venv/bin/python bench/ingest/reddit.py --mb 200 --no-reply-pairs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from measure import MIB, cpu_model, mean_floor, run_measured, tail

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = HERE / "results"
TARGET_RATIO = 0.3
TARGET_RSS_MIB = 1024
MONTH = "2015-01"

FLOOR_CODE = r"""
import io, json, resource, sys, time
import zstandard
t = time.perf_counter()
rows = 0
raw = 0
for path in sys.argv[1:]:
    with open(path, "rb") as fh:
        stream = io.BufferedReader(zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(fh), 1 << 20)
        for line in stream:
            raw += len(line)
            if line.strip():
                json.loads(line)
                rows += 1
print(json.dumps({"rows": rows, "bytes": raw, "seconds": time.perf_counter() - t,
                  "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def prepare(scratch: Path, mb: float, seed: int) -> dict:
    from alignflow.tasks.ingest.synthetic_reddit import generate_month

    marker = scratch / "generated.json"
    rs, rc = scratch / f"RS_{MONTH}.zst", scratch / f"RC_{MONTH}.zst"
    if marker.exists() and rs.exists() and rc.exists():
        info = json.loads(marker.read_text())
        if (info.get("mb"), info.get("seed")) == (mb, seed) and info.get("rc_zst_bytes") == rc.stat().st_size:
            return {**info, "reused": True}
    print(f"generating a Pushshift month with {mb} MiB of comments (seed {seed}) into {scratch} ...", flush=True)
    t0 = time.perf_counter()
    m = generate_month(scratch, rc_bytes=int(mb * MIB), seed=seed, month=MONTH)
    info = {"mb": mb, "seed": seed, "rs_bytes": m.rs_bytes, "rc_bytes": m.rc_bytes, "submissions": m.submissions,
            "comments": m.comments, "rs_zst_bytes": rs.stat().st_size, "rc_zst_bytes": rc.stat().st_size,
            "generate_seconds": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(info, indent=2))
    return {**info, "reused": False}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=1024, help="uncompressed size of the comments file in MiB (1024)")
    ap.add_argument("--quick", action="store_true", help="40 MiB instead of --mb")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch", type=Path, default=None, help="where the month and the ingest workdir go")
    ap.add_argument("--out", type=Path, default=RESULTS / "reddit.json")
    ap.add_argument("--no-reply-pairs", action="store_true", help="leave ingest.reddit_reply_pairs off")
    ap.add_argument("--floor-only", action="store_true")
    ap.add_argument("--ingest-arg", action="append", default=[], help="extra argument for alignflow ingest")
    args = ap.parse_args(argv)
    mb = 40 if args.quick else args.mb
    scratch = (args.scratch or RESULTS / f"reddit-scratch-{mb:g}mb-seed{args.seed}").resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    info = prepare(scratch, mb, args.seed)
    rs, rc = scratch / f"RS_{MONTH}.zst", scratch / f"RC_{MONTH}.zst"
    input_mib = (info["rs_bytes"] + info["rc_bytes"]) / MIB
    for f in (rs, rc):  # warm the page cache: neither pass pays for cold reads
        with open(f, "rb") as fh:
            while fh.read(16 * MIB):
                pass

    load_start = os.getloadavg()

    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def floor_pass(name: str) -> dict | None:
        run = run_measured([sys.executable, "-c", FLOOR_CODE, str(rs), str(rc)], logs, name, env)
        if run["returncode"] != 0:
            print(f"floor failed:\n{tail(run['stderr'])}", file=sys.stderr)
            return None
        fo = json.loads(run["stdout"].read_text().strip().splitlines()[-1])
        return {"wall_seconds": run["wall_seconds"], "mib_per_s": input_mib / run["wall_seconds"],
                "loop_mib_per_s": input_mib / fo["seconds"], "peak_rss_mib": run["peak_rss_mib"],
                "rows": fo["rows"], "load_avg_1m_after": os.getloadavg()[0]}

    # the floor runs before the ingest and again after it: the ratio is against the mean of the two, as the
    # speed of a shared host drifts meanwhile
    passes = [floor_pass("floor")]
    if passes[0] is None:
        return 1
    floor = mean_floor(passes, input_mib)

    ingest: dict = {"skipped": True}
    error = None
    if not args.floor_only:
        exe = Path(sys.executable).parent / "alignflow"
        work = scratch / "work"
        shutil.rmtree(work, ignore_errors=True)
        sets = [] if args.no_reply_pairs else ["--set", "ingest.reddit_reply_pairs=true"]
        cmd = [str(exe), "ingest", str(rs), str(rc), "--workdir", str(work), *sets, *args.ingest_arg]
        print("ingest ...", flush=True)
        run = run_measured(cmd, logs, "ingest", env)
        ingest = {"command": " ".join(cmd), "returncode": run["returncode"], "wall_seconds": run["wall_seconds"],
                  "mib_per_s": input_mib / run["wall_seconds"], "peak_rss_mib": run["peak_rss_mib"],
                  "peak_rss_processes": run["peak_rss_processes"], "load_avg_1m_after": os.getloadavg()[0]}
        built = sorted((work / "data" / "ingest").glob("*/profile.json"))
        if built:
            ingest["profile"] = json.loads(built[0].read_text())
            report = json.loads((built[0].parent / "ingest_report.json").read_text()) \
                if (built[0].parent / "ingest_report.json").exists() else {}
            ingest["datasets"] = report.get("datasets")
            ingest["pairs"] = {k: v for k, v in (report.get("pairs") or {}).items()
                               if k in ("kept", "reply:kept", "reply:prompts", "candidates")}
        if run["returncode"] != 0:
            error = f"exit {run['returncode']}:\n{tail(run['stderr'])}"
            ingest["error"] = tail(run["stderr"], 20)
        after = floor_pass("floor-after")
        if after is None:
            return 1
        floor = mean_floor([*passes, after], input_mib)
    ok = error is None and not ingest.get("skipped")
    ratio = ingest["mib_per_s"] / floor["mib_per_s"] if ok else None
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {**info, "input_mib": input_mib, "rc": str(rc), "rs": str(rs)},
        "floor": floor,
        "ingest": ingest,
        "ratio_ours_over_floor": ratio,
        "reply_pairs": not args.no_reply_pairs,
        "load_avg_start": list(load_start),
        "targets": {"ratio_min": TARGET_RATIO, "peak_rss_max_mib": TARGET_RSS_MIB},
        "meets_targets": None if ratio is None else {"ratio": ratio >= TARGET_RATIO,
                                                     "peak_rss": ingest["peak_rss_mib"] < TARGET_RSS_MIB},
        "machine": {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
                    "memory_total_mib": psutil.virtual_memory().total / MIB},
        "versions": {"python": platform.python_version(), "zstandard": __import__("zstandard").__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\ninput: {input_mib:,.1f} MiB uncompressed ({info['comments']:,} comments, {info['submissions']:,} "
          f"submissions; .zst {(info['rs_zst_bytes'] + info['rc_zst_bytes']) / MIB:,.1f} MiB); load average at "
          f"the start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
          f"{result['machine']['cpu_count']} × {result['machine']['cpu_model'] or 'CPU'}")
    print(f"{'pass':<8} {'MiB/s':>8} {'wall s':>8} {'peak RSS MiB':>13}")
    print(f"{'floor':<8} {floor['mib_per_s']:>8.1f} {floor['wall_seconds']:>8.1f} {floor['peak_rss_mib']:>13.0f}"
          + ("   the mean of: " + ", ".join(f"{p['mib_per_s']:.1f} MiB/s ({p['wall_seconds']:.1f} s)"
                                           for p in floor["passes"]) if len(floor["passes"]) > 1 else ""))
    if ok:
        print(f"{'ingest':<8} {ingest['mib_per_s']:>8.1f} {ingest['wall_seconds']:>8.1f} "
              f"{ingest['peak_rss_mib']:>13.0f}")
        print(f"ratio ours/floor {ratio:.3f} (target >= {TARGET_RATIO}); peak RSS target < {TARGET_RSS_MIB} MiB; "
              f"load average 1 min after: {ingest['load_avg_1m_after']:.2f}")
        for phase, s in ((ingest.get("profile") or {}).get("seconds") or {}).items():
            print(f"  {phase:<50} {s:>8.1f} s")
    print(f"written: {args.out}")
    if error:
        print(f"ERROR: alignflow ingest failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
