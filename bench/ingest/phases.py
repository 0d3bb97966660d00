"""CPU seconds per phase of one ingest of a generated Stack Exchange site, without the command's fixed costs.

Generates (or reuses) a site whose Posts.xml has about ``--mb`` MiB (``generate_dump``, seed 0), or takes
the site folder ``--site``, then
runs ``plan_ingest`` + ``execute_ingest`` in a child process with ``ingest.workers=N`` and a fresh work
directory, and reports

* the child's wall seconds and the CPU seconds of its whole process tree (the child, its reading
  workers and the contract process: ``getrusage(RUSAGE_CHILDREN)`` once it has exited),
* the peak RSS of the tree (psutil, every 0.2 s),
* ``profile.json`` (wall seconds per phase, the parent's CPU seconds per phase),
* the dataset digests and row counts, and the report (accounting per file, pairs, contract statistics).

Everything goes to ``--out`` (JSON) and a short table on stdout. ``--compare A.json B.json`` says
whether two such results have the same digests and the same accounting, and prints CPU side by side.

    nice -n 10 .venv/bin/python bench/ingest/phases.py --mb 48 --workers 1 --out /tmp/before.json
    .venv/bin/python bench/ingest/phases.py --compare /tmp/before.json /tmp/after.json
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
import threading
import time
from pathlib import Path

import psutil

MIB = 1 << 20

CHILD = r"""
import json, sys
from pathlib import Path
from alignflow.config import load_config
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
sources, workdir, workers, cprofile = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
cfg = load_config(None, [f"ingest.workers={workers}", *sys.argv[5:]]).ingest
plan = plan_ingest(sources, workdir, cfg)
if cprofile:
    import cProfile
    prof = cProfile.Profile()
    res = prof.runcall(execute_ingest, plan, cfg)
    prof.dump_stats(cprofile)
else:
    res = execute_ingest(plan, cfg)
profile = json.loads((Path(res.out_dir) / "profile.json").read_text())
print(json.dumps({"datasets": res.datasets, "report": res.report, "profile": profile, "seconds": res.seconds}))
"""

ACCOUNTING = ("files", "pairs", "datasets", "score_source", "adds_up", "warnings")


def site_for(mb: int, scratch: Path, seed: int = 0) -> Path:
    from alignflow.tasks.ingest.synthetic import generate_dump, target_questions_for_bytes

    questions = target_questions_for_bytes(mb * MIB)
    site = scratch / f"site-{mb}mb-seed{seed}" / "synthetic.stackexchange.com"
    marker = site.parent / "generated.json"
    if marker.exists() and json.loads(marker.read_text()).get("questions") == questions:
        return site
    if site.parent.exists():
        shutil.rmtree(site.parent)
    site.parent.mkdir(parents=True)
    generate_dump(site.parent, questions=questions, seed=seed, site=site.name)
    marker.write_text(json.dumps({"questions": questions, "seed": seed}))
    return site


def sources_of(site: Path) -> list[str]:
    """What ``--site`` names as the ingest's sources: a Stack Exchange site folder itself, else the files in the
    folder (e.g. a Pushshift month's ``RS_``/``RC_`` files side by side)."""
    if site.is_file() or (site / "Posts.xml").exists():
        return [str(site)]
    return sorted(str(p) for p in site.iterdir() if p.is_file() and not p.name.startswith("."))


def _role(p: psutil.Process) -> str:
    """Which part of the ingest a process of the tree is: the parent, a reading worker, the contract process."""
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "?"
    if "contract_service" in cmd:
        return "contracts"
    if "reply_walker" in cmd:
        return "reply walker"
    if "serve()" in cmd:
        return "reading workers"
    return "parent" if "execute_ingest" in cmd else "other"


def measure(site: Path, workers: int, overrides: list[str], cprofile: Path | None = None,
            src: Path | None = None, keep: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="af-phases-") as tmp:
        cmd = [sys.executable, "-c", CHILD, json.dumps(sources_of(site)), str(Path(tmp) / "work"), str(workers),
               str(cprofile or ""), *overrides]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        env = dict(os.environ)
        if src is not None:  # another tree of the package first on the path (e.g. the code before a change)
            env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
        # cwd outside the repository: `python -c` puts the cwd first on sys.path, and the repository's
        # top-level `alignflow/` folder would shadow the --src tree
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(Path(tmp) / "stderr", "wb"), env=env,
                                 cwd=tmp)
        proc = psutil.Process(popen.pid)
        peak = 0
        out = b""

        def read() -> None:
            nonlocal out
            out = popen.stdout.read()

        reader = threading.Thread(target=read)
        reader.start()
        at_peak: dict[str, float] = {}  # MiB per process when the tree peaked
        started_at = time.perf_counter()
        while popen.poll() is None:
            rss = 0
            each: dict[str, float] = {}
            try:
                for p in [proc, *proc.children(recursive=True)]:
                    try:
                        one = p.memory_info().rss
                        rss += one
                        role = _role(p)
                        each[role] = each.get(role, 0) + one / MIB
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            if rss > peak:
                peak, at_peak = rss, {**each, "at_second": time.perf_counter() - started_at}
            time.sleep(0.2)
        reader.join()
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if popen.returncode != 0:
            sys.exit(f"ingest failed (exit {popen.returncode}):\n{(Path(tmp) / 'stderr').read_text()[-4000:]}")
        result = json.loads(out.decode().strip().splitlines()[-1])
        if keep is not None:
            out_dir = Path(next(iter(result["datasets"].values()))["path"]).parent
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(out_dir, keep)
    result.update({
        "workers": workers,
        "overrides": overrides,
        "src": str(src) if src else None,
        "wall_seconds": wall,
        "tree_cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "peak_rss_mib": peak / MIB,
        "peak_rss_by_process_mib": at_peak,
        "posts_mib": (site / "Posts.xml").stat().st_size / MIB if (site / "Posts.xml").exists() else 0.0,
        "votes_mib": (site / "Votes.xml").stat().st_size / MIB if (site / "Votes.xml").exists() else 0.0,
        "load_avg_after": psutil.getloadavg(),
    })
    return result


def show(r: dict) -> None:
    print(f"Posts.xml {r['posts_mib']:.1f} MiB, Votes.xml {r['votes_mib']:.1f} MiB, workers {r['workers']}")
    print(f"child wall {r['wall_seconds']:.1f} s, tree CPU {r['tree_cpu_seconds']:.1f} s, "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB, load after {r['load_avg_after'][0]:.1f}")
    wall, cpu = r["profile"]["seconds"], r["profile"]["parent_cpu_seconds"]
    for k, v in wall.items():
        print(f"  {k:<64} wall {v:>8.2f}  parent CPU {cpu.get(k, ''):>8}")
    for k, d in r["datasets"].items():
        print(f"  {k:<10} rows {d['rows']:>9}  {d['digest']}")


def compare(a: dict, b: dict) -> int:
    same_digests = {k: v["digest"] for k, v in a["datasets"].items()} == \
        {k: v["digest"] for k, v in b["datasets"].items()}
    same_accounting = {k: a["report"].get(k) for k in ACCOUNTING} == {k: b["report"].get(k) for k in ACCOUNTING}
    rows = lambda r: {k: {s: v.get(s) for s in ("rows_in", "rows_valid", "rows_rejected")}  # noqa: E731
                      for k, v in r["report"]["contracts"].items()}
    same_contract_rows = rows(a) == rows(b)
    print(f"digests identical: {same_digests}; accounting identical: {same_accounting}; "
          f"contract rows in/valid/rejected identical: {same_contract_rows}")
    print(f"{'':<64} {'A':>8} {'B':>8}")
    print(f"{'tree CPU':<64} {a['tree_cpu_seconds']:>8.1f} {b['tree_cpu_seconds']:>8.1f}")
    print(f"{'child wall':<64} {a['wall_seconds']:>8.1f} {b['wall_seconds']:>8.1f}")
    print(f"{'peak RSS MiB':<64} {a['peak_rss_mib']:>8.0f} {b['peak_rss_mib']:>8.0f}")
    for role in sorted({*a.get("peak_rss_by_process_mib", {}), *b.get("peak_rss_by_process_mib", {})}):
        ra, rb = (r.get("peak_rss_by_process_mib", {}).get(role, float("nan")) for r in (a, b))
        label = "  peak reached at second" if role == "at_second" else f"  at the peak, MiB: {role}"
        print(f"{label:<64} {ra:>8.0f} {rb:>8.0f}")
    ca, cb = a["profile"]["parent_cpu_seconds"], b["profile"]["parent_cpu_seconds"]
    for k in dict.fromkeys([*ca, *cb]):
        print(f"{'parent CPU: ' + k:<64} {ca.get(k, float('nan')):>8.2f} {cb.get(k, float('nan')):>8.2f}")
    wa, wb = a["profile"]["seconds"], b["profile"]["seconds"]
    for k in dict.fromkeys([*wa, *wb]):
        if k not in ca and k not in cb:
            print(f"{'seconds: ' + k:<64} {wa.get(k, float('nan')):>8.2f} {wb.get(k, float('nan')):>8.2f}")
    return 0 if same_digests and same_accounting and same_contract_rows else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=48, help="size of Posts.xml in MiB (default 48)")
    ap.add_argument("--site", type=Path, help="an existing site folder (Posts.xml, maybe Votes.xml), or a folder of "
                    "other inputs (e.g. a Pushshift month's RS_/RC_ files), instead of a "
                    "generated one, e.g. a real dump")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "alignflow-bench-phases")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. ingest.contract_mb=32")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--src", type=Path, help="a folder holding another `alignflow` package tree, imported instead")
    ap.add_argument("--keep", type=Path, help="copy the built datasets folder here")
    ap.add_argument("--cprofile", type=Path, help="write cProfile stats of the ingest process here (slower)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = ap.parse_args(argv)
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        return compare(a, b)
    site = args.site.resolve() if args.site else site_for(args.mb, args.scratch)
    r = measure(site, args.workers, args.overrides, args.cprofile and args.cprofile.resolve(), args.src,
                args.keep)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=2) + "\n")
    show(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
