"""Ingest throughput benchmark: ``alignflow ingest`` against a bare lxml iterparse floor.

Generates (or reuses) a synthetic Stack Exchange dump whose Posts.xml has the
requested size, then measures in one run

  floor   a subprocess that does nothing but ``lxml.etree.iterparse(Posts.xml,
          events=("end",), tag="row")`` with ``elem.clear()`` and deletion of
          preceding siblings;
  ingest  ``alignflow ingest <site folder> --workdir <scratch>/work --set
          ingest.workers=N`` (the console script next to this interpreter) as
          a subprocess, once per worker count (default: 1 and every core), so
          the ratio of the two is measured in the same run.

The floor runs once before the ingest runs and once after them, and the
ratios are taken against the mean of its two walls: the speed of a shared
host drifts over the minutes in between (both passes are in the results).

Both figures are MiB of Posts.xml per second of the subprocess's wall time, and
the peak RSS of the subprocess tree (psutil, polled every 0.2 s, RSS of the
process and all its children summed). Results go to a table on stdout and to
``bench/ingest/results/ingest.json``.

Usage::

    .venv/bin/python bench/ingest/run.py            # 1024 MiB Posts.xml
    .venv/bin/python bench/ingest/run.py --quick    # 50 MiB
    .venv/bin/python bench/ingest/run.py --mb 200 --floor-only
    .venv/bin/python bench/ingest/run.py --quick --ingest-arg=--some-flag   # note the "="
    .venv/bin/python bench/ingest/run.py --site /data/dumps/cooking.stackexchange.com   # a dump you have

``--site`` measures an existing site folder (``Posts.xml``, and ``Votes.xml`` if present; not
a .7z archive) instead of a generated one: the same floor and the same command on that file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from measure import MIB, cpu_model, mean_floor, run_measured, tail, workers_ratio_ceiling

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = HERE / "results"
TARGET_RATIO = 0.3
TARGET_WORKER_RATIO = 1.7
TARGET_RSS_MIB = 1024
SITE = "synthetic.stackexchange.com"

FLOOR_CODE = r"""
import json, resource, sys, time
from lxml import etree
t = time.perf_counter()
n = 0
for _, elem in etree.iterparse(sys.argv[1], events=("end",), tag="row"):
    n += 1
    elem.clear()
    while elem.getprevious() is not None:
        del elem.getparent()[0]
dt = time.perf_counter() - t
print(json.dumps({"rows": n, "parse_seconds": dt,
                  "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _is_prefect_server(cmd: str) -> bool:
    """The temporary Prefect API server a flow run starts (not part of the ingest's own work): Prefect's app,
    or the same built by alignflow.flows.prefect_server."""
    return "prefect.server" in cmd or "prefect_server:" in cmd or ("prefect" in cmd and " server" in cmd)


def warm_cache(path: Path) -> None:
    """Read the file once so that neither measured pass pays for cold disk reads."""
    with open(path, "rb") as f:
        while f.read(16 * MIB):
            pass


def measure_floor(posts: Path, logs: Path, name: str) -> dict:
    """One pass of the lxml floor over ``posts`` in a subprocess: its wall and parse seconds, rows, memory."""
    run = run_measured([sys.executable, "-c", FLOOR_CODE, str(posts)], logs, name)
    if run["returncode"] != 0:
        return {"error": f"floor pass failed (exit {run['returncode']}):\n{tail(run['stderr'])}"}
    out = json.loads(run["stdout"].read_text().strip().splitlines()[-1])
    return {"wall_seconds": run["wall_seconds"], "parse_seconds": out["parse_seconds"],
            "peak_rss_mib": run["peak_rss_bytes"] / MIB, "ru_maxrss_mib": out["ru_maxrss_kib"] / 1024,
            "rows": out["rows"]}


def combined_floor(runs: list[dict], size_mib: float) -> dict:
    """The floor the ratios are taken against: the mean wall and parse seconds of its passes."""
    floor = mean_floor(runs, size_mib, means=("wall_seconds", "parse_seconds"), maxima=("peak_rss_mib", "ru_maxrss_mib"))
    floor["parse_mib_per_s"] = size_mib / floor["parse_seconds"]
    return floor


def prepare_dump(scratch: Path, mb: int, seed: int) -> dict:
    from alignflow.tasks.ingest.synthetic import generate_dump, target_questions_for_bytes

    questions = target_questions_for_bytes(mb * MIB)
    site = scratch / SITE
    marker = scratch / "generated.json"
    posts, votes = site / "Posts.xml", site / "Votes.xml"
    if marker.exists() and posts.exists() and votes.exists():
        info = json.loads(marker.read_text())
        if (info.get("mb"), info.get("seed"), info.get("questions")) == (mb, seed, questions) and info.get(
            "posts_bytes"
        ) == posts.stat().st_size:
            info["reused"] = True
            return info
    need = int(mb * MIB * 1.9)
    free = shutil.disk_usage(scratch).free
    if free < need:
        sys.exit(f"not enough disk space in {scratch}: need about {need / MIB:.0f} MiB, {free / MIB:.0f} MiB free")
    print(f"generating {questions:,} questions (~{mb} MiB Posts.xml, seed {seed}) into {scratch} ...", flush=True)
    t0 = time.perf_counter()
    generate_dump(scratch, questions=questions, seed=seed, site=SITE)
    seconds = time.perf_counter() - t0
    info = {
        "mb": mb,
        "seed": seed,
        "questions": questions,
        "posts_bytes": posts.stat().st_size,
        "votes_bytes": votes.stat().st_size,
        "generate_seconds": seconds,
        "generate_posts_mib_per_s": posts.stat().st_size / MIB / seconds,
    }
    marker.write_text(json.dumps(info, indent=2))
    info["reused"] = False
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="size of Posts.xml in MiB (default 1024)")
    ap.add_argument("--quick", action="store_true", help="50 MiB instead of --mb")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch", type=Path, default=None, help="where the dump and ingest workdir go")
    ap.add_argument("--out", type=Path, default=RESULTS / "ingest.json")
    ap.add_argument("--site", type=Path, default=None,
                    help="an existing Stack Exchange site folder to measure instead of a generated dump")
    ap.add_argument("--floor-only", action="store_true", help="measure the lxml floor only (harness check)")
    ap.add_argument("--ingest-arg", action="append", default=[], help="extra argument for alignflow ingest")
    ap.add_argument("--workers", type=lambda t: [int(x) for x in t.split(",")], default=[1, os.cpu_count() or 1],
                    help="worker counts to measure, comma-separated (default: 1 and every core)")
    args = ap.parse_args(argv)
    mb = 50 if args.quick else args.mb
    if args.site is not None:
        site = args.site.resolve()
        if not (site / "Posts.xml").is_file():
            print(f"--site {args.site}: no Posts.xml in that folder (a .7z archive must be extracted first)",
                  file=sys.stderr)
            return 2
        scratch = (args.scratch or RESULTS / f"scratch-site-{site.name}").resolve()
    else:
        scratch = (args.scratch or RESULTS / f"scratch-{mb}mb-seed{args.seed}").resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)

    if args.site is not None:
        info = {"questions": None, "reused": True, "given": True}
    else:
        info = prepare_dump(scratch, mb, args.seed)
        site = scratch / SITE
    posts = site / "Posts.xml"
    size = posts.stat().st_size
    size_mib = size / MIB
    warm_cache(posts)

    # (a) floor, before the ingest runs and again after them (below): the host's speed drifts over the minutes
    # between, and the ratio is taken against the mean of the two
    floor_runs = [measure_floor(posts, logs, "floor")]
    if "error" in floor_runs[0]:
        print(floor_runs[0]["error"], file=sys.stderr)
        return 1
    floor = combined_floor(floor_runs, size_mib)

    # (b) alignflow ingest, with 1 worker and with every core (same run, same file)
    ingest: dict = {"skipped": True}
    by_workers: dict[str, dict] = {}
    error = None
    load_before = os.getloadavg()
    if not args.floor_only:
        exe = Path(sys.executable).parent / "alignflow"
        workdir = scratch / "work"
        if not exe.exists():
            error = f"console script not found: {exe} (is the project installed in this venv?)"
        for workers in ([] if error else args.workers):
            cmd = [str(exe), "ingest", str(site), "--workdir", str(workdir), "--set", f"ingest.workers={workers}",
                   *args.ingest_arg]
            if workdir.exists():
                shutil.rmtree(workdir)
            print(f"ingest with {workers} worker(s) ...", flush=True)
            run = run_measured(cmd, logs, f"ingest-w{workers}")
            one = {
                "command": " ".join(cmd),
                "workers": workers,
                "returncode": run["returncode"],
                "wall_seconds": run["wall_seconds"],
                "mib_per_s": size_mib / run["wall_seconds"],
                "peak_rss_mib": run["peak_rss_bytes"] / MIB,
                "peak_rss_processes": run["peak_rss_processes"],
                "load_avg_1m_after": os.getloadavg()[0],
                "cpu_seconds": run["cpu_seconds"],
                "cores_busy": run["cpu_seconds"] / run["wall_seconds"],  # on average over the command
            }
            profiles = sorted((workdir / "data" / "ingest").glob("*/profile.json"))
            if profiles:
                one["profile"] = json.loads(profiles[0].read_text())
                work = one["profile"].get("seconds", {}).get("total")
                if work:
                    # the ingest itself (read, build, contracts, Parquet), without the command's fixed costs:
                    # interpreter and imports, Prefect's temporary server, the MLflow run
                    one["work_seconds"] = work
                    one["work_mib_per_s"] = size_mib / work
                    one["fixed_seconds"] = run["wall_seconds"] - work
            one["peak_rss_without_prefect_server_mib"] = sum(
                p["rss_mib"] for p in one["peak_rss_processes"] if not _is_prefect_server(p["cmd"]))
            if run["returncode"] != 0:
                error = (
                    f"`{' '.join(cmd)}` failed with exit code {run['returncode']}; "
                    f"stderr tail ({run['stderr']}):\n{tail(run['stderr'])}"
                )
                one["error"] = tail(run["stderr"], 20)
                ingest = one
                break
            by_workers[str(workers)] = one
            ingest = one  # the last (most workers) is the headline figure
        # children_ru_maxrss: largest single descendant process (floor included), from the kernel
        if isinstance(ingest, dict) and not ingest.get("skipped"):
            ingest["children_ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    if not args.floor_only:
        after = measure_floor(posts, logs, "floor-after")
        if "error" in after:
            print(after["error"], file=sys.stderr)
            return 1
        floor_runs.append(after)
        floor = combined_floor(floor_runs, size_mib)

    ok_ingest = error is None and not ingest.get("skipped")
    ratio = ingest["mib_per_s"] / floor["mib_per_s"] if ok_ingest else None
    for one in by_workers.values():
        one["ratio_over_floor"] = one["mib_per_s"] / floor["mib_per_s"]
        if "work_mib_per_s" in one:
            one["work_ratio_over_floor"] = one["work_mib_per_s"] / floor["mib_per_s"]
    work_ratio = ingest.get("work_ratio_over_floor") if ok_ingest else None
    w_lo, w_hi = (by_workers.get(str(w)) for w in (min(args.workers), max(args.workers)))
    worker_ratio = (w_hi["mib_per_s"] / w_lo["mib_per_s"]) if ok_ingest and w_lo and w_hi and w_lo is not w_hi \
        else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    worker_ceiling = workers_ratio_ceiling(w_lo["wall_seconds"], w_hi["cpu_seconds"], cores) \
        if worker_ratio is not None else None
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {
            "posts_bytes": size,
            "posts_mib": size_mib,
            "votes_bytes": (site / "Votes.xml").stat().st_size if (site / "Votes.xml").exists() else 0,
            "questions": info["questions"],
            "seed": args.seed,
            "site_folder": str(site),
            "generated": {k: info[k] for k in ("generate_seconds", "generate_posts_mib_per_s") if k in info},
            "reused": info["reused"],
            "given": bool(info.get("given")),  # --site: a dump not made by the generator
        },
        "floor": floor,
        "ingest": ingest,
        "ratio_ours_over_floor": ratio,
        "work_ratio_ours_over_floor": work_ratio,
        "ingest_by_workers": by_workers,
        "ratio_most_over_one_worker": worker_ratio,
        "work_ratio_most_over_one_worker": (w_hi["work_mib_per_s"] / w_lo["work_mib_per_s"])
        if worker_ratio is not None and "work_mib_per_s" in w_hi and "work_mib_per_s" in w_lo else None,
        # the most "most against one" could be on this machine's cores with the CPU the run with most workers used
        "ratio_most_over_one_worker_ceiling": worker_ceiling,
        "cores": cores,
        "load_avg_after": os.getloadavg(),
        "load_avg_before": load_before,
        "targets": {"ratio_min": TARGET_RATIO, "peak_rss_max_mib": TARGET_RSS_MIB,
                    "workers_ratio_min": TARGET_WORKER_RATIO},
        "meets_targets": None
        if ratio is None
        else {"ratio": ratio >= TARGET_RATIO, "peak_rss": ingest["peak_rss_mib"] < TARGET_RSS_MIB,
              "workers_ratio": None if worker_ratio is None else worker_ratio >= TARGET_WORKER_RATIO},
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "memory_total_mib": psutil.virtual_memory().total / MIB,
        },
        "versions": _versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result, error)
    print(f"\nwritten: {args.out}")
    if error:
        print(f"\nERROR: alignflow ingest did not complete: {error}", file=sys.stderr)
        return 1
    return 0


def _versions() -> dict:
    from lxml import etree

    return {
        "python": platform.python_version(),
        "lxml": etree.__version__,
        "libxml2": ".".join(map(str, etree.LIBXML_VERSION)),
        "psutil": psutil.__version__,
    }


def _print_table(r: dict, error: str | None) -> None:
    inp, fl, ing = r["input"], r["floor"], r["ingest"]
    gen = inp["generated"]
    if inp.get("given"):
        print(f"\nPosts.xml: {inp['posts_mib']:.1f} MiB, {fl['rows']:,} rows (given: {inp['site_folder']})")
    else:
        how = "reused" if inp["reused"] else f"generated at {gen['generate_posts_mib_per_s']:.1f} MiB/s"
        print(f"\nPosts.xml: {inp['posts_mib']:.1f} MiB, {inp['questions']:,} questions ({how})")
    print(f"{'pass':<10} {'MiB/s':>9} {'wall s':>9} {'peak RSS MiB':>13}   target")
    print(
        f"{'floor':<10} {fl['mib_per_s']:>9.1f} {fl['wall_seconds']:>9.2f} {fl['peak_rss_mib']:>13.1f}"
        f"   (ru_maxrss {fl['ru_maxrss_mib']:.1f} MiB; parse loop alone {fl['parse_mib_per_s']:.1f} MiB/s)"
    )
    passes = fl.get("passes", [])
    if len(passes) > 1:
        print(f"{'':<10} the mean of {len(passes)} passes, before and after the ingest runs: "
              + ", ".join(f"{p['mib_per_s']:.1f} MiB/s ({p['wall_seconds']:.2f} s)" for p in passes))
    if ing.get("skipped"):
        print(f"{'ingest':<10} {'(skipped: --floor-only)':>33}")
    elif "mib_per_s" not in ing or ing.get("returncode"):
        print(f"{'ingest':<10} {'FAILED':>9}")
    else:
        rss_ok = "ok" if ing["peak_rss_mib"] < TARGET_RSS_MIB else "MISSED"
        print(
            f"{'ingest':<10} {ing['mib_per_s']:>9.1f} {ing['wall_seconds']:>9.2f} {ing['peak_rss_mib']:>13.1f}"
            f"   peak RSS < {TARGET_RSS_MIB} MiB: {rss_ok}"
        )
        for w, one in r["ingest_by_workers"].items():
            print(f"{'  ' + w + ' worker(s)':<10} {one['mib_per_s']:>9.1f} {one['wall_seconds']:>9.2f} "
                  f"{one['peak_rss_mib']:>13.1f}   load after {one['load_avg_1m_after']:.1f}; "
                  f"ratio {one['ratio_over_floor']:.3f}; without Prefect's server "
                  f"{one['peak_rss_without_prefect_server_mib']:.0f} MiB")
            if "work_seconds" in one:
                print(f"{'    work':<10} {one['work_mib_per_s']:>9.1f} {one['work_seconds']:>9.2f} {'':>13}   "
                      f"ratio {one['work_ratio_over_floor']:.3f} (the ingest itself; the command's fixed "
                      f"{one['fixed_seconds']:.1f} s of start-up, Prefect and MLflow left out)")
        ratio = r["ratio_ours_over_floor"]
        print(f"ratio ours/floor: {ratio:.3f}   target >= {TARGET_RATIO}: {'ok' if ratio >= TARGET_RATIO else 'MISSED'}")
        if r.get("work_ratio_ours_over_floor") is not None:
            print(f"ratio ours/floor, the ingest itself: {r['work_ratio_ours_over_floor']:.3f}")
        wr = r.get("ratio_most_over_one_worker")
        if wr is not None:
            print(f"ratio most/one worker: {wr:.2f}   target >= {TARGET_WORKER_RATIO}: "
                  f"{'ok' if wr >= TARGET_WORKER_RATIO else 'MISSED'}")
            if r.get("work_ratio_most_over_one_worker") is not None:
                print(f"ratio most/one worker, the ingest itself: {r['work_ratio_most_over_one_worker']:.2f}")
            ceiling = r.get("ratio_most_over_one_worker_ceiling")
            if ceiling is not None:
                lo, hi = (r["ingest_by_workers"][w] for w in (min(r["ingest_by_workers"], key=int),
                                                              max(r["ingest_by_workers"], key=int)))
                print(f"ratio most/one worker at most {ceiling:.2f} on {r['cores']} cores: the run with most workers "
                      f"used {hi['cpu_seconds']:.1f} CPU-s ({hi['cores_busy']:.2f} cores busy on average), the "
                      f"one-worker run {lo['cpu_seconds']:.1f} CPU-s ({lo['cores_busy']:.2f} cores busy)")
        for w, one in r["ingest_by_workers"].items():
            prof = (one.get("profile") or {}).get("seconds") or {}
            cpu = (one.get("profile") or {}).get("parent_cpu_seconds") or {}
            if prof:
                print(f"profile, {w} worker(s) (wall seconds; worker seconds summed over workers; "
                      f"parent CPU seconds):")
                for k, v in prof.items():
                    print(f"  {k:<62} {v:>8.2f} {cpu[k] if k in cpu else '':>8}")
    print(f"load average before {r['load_avg_before'][0]:.1f}, after {r['load_avg_after'][0]:.1f}")
    m, v = r["machine"], r["versions"]
    print(f"machine: {m['cpu_count']} × {m.get('cpu_model') or 'CPU'}, {m['platform']}; python {v['python']}, "
          f"lxml {v['lxml']}")


if __name__ == "__main__":
    sys.exit(main())
