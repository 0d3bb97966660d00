"""Every benchmark in one run, one report: ``bench/report.json`` and the generated section of ``bench/REPORT.md``.

Stages, each its own script (run as a subprocess, in this order):

    ingest   bench/ingest/run.py   alignflow ingest       vs  the lxml iterparse floor      MiB/s of Posts.xml
    reddit   bench/ingest/reddit.py  alignflow ingest     vs  zstd + json.loads floor       MiB/s of RS_ + RC_ (uncompressed)
    base     bench/base/run.py     train_loop (causal LM)  vs  TRL SFTTrainer (LM)           non-pad tokens/s
    sft      bench/sft/run.py      train_sft               vs  TRL SFTTrainer                non-pad tokens/s
    reward   bench/reward/run.py   train_reward            vs  TRL RewardTrainer             pairs/s (+ accuracy)
    ppo      bench/ppo/run.py      train_ppo               vs  trl==0.29.1 PPOTrainer        episodes/s

(ppo runs when ``bench/ppo/run.py`` exists.) Per stage the report holds our
figure, the peer's (measured in the same run, same data/model/batch), the ratio
and its target, peak memory of both, versions and the machine. A stage that
fails is reported as failed with the tail of its output; the others still run.

    .venv/bin/python bench/run_all.py            # full figures (an hour or more on a 2-core CPU)
    .venv/bin/python bench/run_all.py --quick    # every stage in its quick mode (< 10 minutes on a quiet 2-core CPU)
    .venv/bin/python bench/run_all.py --only sft reward --threads 1

With ``--only``, the stages not run keep their rows from the previous ``bench/report.json``: every row
says when it was measured and in which mode (quick or full), so a refreshed stage never hides how old
the others are. ``make bench`` / ``make bench-quick`` call it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

STAGES = ("ingest", "reddit", "base", "sft", "reward", "ppo")
# A stage's script: bench/<stage>/run.py unless named here.
SCRIPTS = {"reddit": BENCH / "ingest" / "reddit.py"}


def script_of(stage: str) -> Path:
    return SCRIPTS.get(stage, BENCH / stage / "run.py")
TRAINING = ("base", "sft", "reward", "ppo")
BEGIN, END = "<!-- bench:run_all:begin -->", "<!-- bench:run_all:end -->"
SHARED_SCRATCH = BENCH / "sft" / "results" / "scratch"  # base/sft/reward share one asset cache (same dump/model)


def _get(d: dict | None, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def extract(stage: str, data: dict) -> dict:
    """Our figure, the peer's, ratio, target, memory: one row of the report."""
    if stage == "ingest":
        ours, floor = data.get("ingest") or {}, data.get("floor") or {}
        return {"unit": "MiB/s (Posts.xml)", "peer": "lxml iterparse floor", "ours": ours.get("mib_per_s"),
                "peer_value": floor.get("mib_per_s"), "ratio": data.get("ratio_ours_over_floor"),
                "target": _get(data, "targets", "ratio_min"), "ours_peak_mib": ours.get("peak_rss_mib"),
                "peer_peak_mib": floor.get("peak_rss_mib"),
                "detail": {"posts_mib": _get(data, "input", "posts_mib"),
                           "peak_rss_target_mib": _get(data, "targets", "peak_rss_max_mib"),
                           "meets_targets": data.get("meets_targets"),
                           "ratio_most_over_one_worker": data.get("ratio_most_over_one_worker"),
                           "ratio_most_over_one_worker_ceiling": data.get("ratio_most_over_one_worker_ceiling"),
                           "cores": data.get("cores"),
                           "by_workers": {w: {"mib_per_s": v.get("mib_per_s"), "peak_rss_mib": v.get("peak_rss_mib"),
                                              "cpu_seconds": v.get("cpu_seconds")}
                                          for w, v in (data.get("ingest_by_workers") or {}).items()},
                           "profile": _get(data, "ingest", "profile", "seconds")},
                "versions": data.get("versions")}
    if stage == "reddit":
        ours, floor = data.get("ingest") or {}, data.get("floor") or {}
        return {"unit": "MiB/s (RS_ + RC_)", "peer": "zstd + json.loads floor", "ours": ours.get("mib_per_s"),
                "peer_value": floor.get("mib_per_s"), "ratio": data.get("ratio_ours_over_floor"),
                "target": _get(data, "targets", "ratio_min"), "ours_peak_mib": ours.get("peak_rss_mib"),
                "peer_peak_mib": floor.get("peak_rss_mib"),
                "detail": {"input_mib": _get(data, "input", "input_mib"), "load_avg": data.get("load_avg_start"),
                           "peak_rss_target_mib": _get(data, "targets", "peak_rss_max_mib"),
                           "meets_targets": data.get("meets_targets"), "pairs": ours.get("pairs"),
                           "profile": _get(data, "ingest", "profile", "seconds")},
                "versions": data.get("versions")}
    if stage in ("base", "sft"):
        s = data["summary"]
        return {"unit": "non-pad tokens/s", "peer": f"TRL {s.get('trl_version')} SFTTrainer",
                "ours": s["ours"]["tokens_per_s"], "peer_value": s["trl"]["tokens_per_s"],
                "ratio": s["ratio_tokens_per_s"], "target": s.get("target_ratio"),
                "ours_peak_mib": s["ours"]["peak_rss_mib"], "peer_peak_mib": s["trl"]["peak_rss_mib"],
                "detail": {"ratio_best_steps": s.get("ratio_tokens_per_s_best_steps"),
                           "ratio_per_cpu_second": s.get("ratio_tokens_per_cpu_s"),
                           "final_loss": [s["ours"]["final_loss"], s["trl"]["final_loss"]],
                           "setup": data.get("setup"), "load_avg": _get(data, "machine", "load_avg")},
                "versions": _get(data, "sides", "ours", "versions")}
    if stage == "reward":
        s = data["summary"]
        return {"unit": "pairs/s", "peer": f"TRL {s.get('trl_version')} RewardTrainer",
                "ours": s["ours"]["pairs_per_s"], "peer_value": s["trl"]["pairs_per_s"],
                "ratio": s["ratio_pairs_per_s"], "target": s.get("target_ratio"),
                "ours_peak_mib": s["ours"]["peak_rss_mib"], "peer_peak_mib": s["trl"]["peak_rss_mib"],
                "detail": {"accuracy": [s["accuracy_ours"], s["accuracy_trl"]],
                           "equal_accuracy": s["equal_accuracy"],
                           "ratio_best_steps": s.get("ratio_pairs_per_s_best_steps"),
                           "ratio_per_cpu_second": s.get("ratio_pairs_per_cpu_s"),
                           "final_loss": [s["ours"]["final_loss"], s["trl"]["final_loss"]],
                           "setup": data.get("setup"), "load_avg": _get(data, "machine", "load_avg")},
                "versions": _get(data, "sides", "ours", "versions")}
    if stage == "ppo":
        ours, trl = data.get("ours") or {}, data.get("trl") or {}
        return {"unit": "episodes/s", "peer": "trl 0.29.1 PPOTrainer", "ours": ours.get("episodes_per_s"),
                "peer_value": trl.get("episodes_per_s"), "ratio": data.get("ratio_episodes_per_s"),
                "target": data.get("target_ratio"), "ours_peak_mib": ours.get("ru_maxrss_mib"),
                "peer_peak_mib": trl.get("ru_maxrss_mib"), "detail": {"hparams": data.get("hparams")},
                "versions": ours.get("versions")}
    raise ValueError(stage)


def parse_ppo_log(text: str) -> dict | None:
    """The ppo stage's printed table: episodes/s and peak RSS of both sides, the ratio and its target."""
    import re

    sides = {}
    for name in ("alignflow", "TRL"):
        m = re.search(rf"^{name}\S*(?: [\d.]+)?\s+([\d.]+)\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+(\d+)", text,
                      re.M)
        if m:
            sides[name] = (float(m.group(1)), float(m.group(2)), float(m.group(3)))
    ratio = re.search(r"ratio ours/TRL episodes/s: ([\d.]+)x \(target >= ([\d.]+)x", text)
    cpu = re.search(r"per CPU-second ([\d.]+)x", text)
    if len(sides) != 2 or not ratio:
        return None
    return {"unit": "episodes/s", "peer": "trl 0.29.1 PPOTrainer", "ours": sides["alignflow"][0],
            "peer_value": sides["TRL"][0], "ratio": float(ratio.group(1)), "target": float(ratio.group(2)),
            "ours_peak_mib": sides["alignflow"][2], "peer_peak_mib": sides["TRL"][2],
            "detail": {"ratio_per_cpu_second": float(cpu.group(1)) if cpu else None,
                       "episodes_per_cpu_s": [sides["alignflow"][1], sides["TRL"][1]]}, "versions": None}


def run_stage(stage: str, args) -> dict:
    script = script_of(stage)
    suffix = "-quick" if args.quick else ""
    out = script.parent / "results" / f"{stage}{suffix}-run_all.json"
    cmd = [sys.executable, str(script), "--out", str(out)]
    if args.quick:
        cmd.append("--quick")
    if args.threads and stage in TRAINING:
        cmd += ["--threads", str(args.threads)]
    if stage in ("base", "sft", "reward"):
        cmd += ["--scratch", str(SHARED_SCRATCH)]
    shown = " ".join([".venv/bin/python", str(script.relative_to(ROOT)), *cmd[2:]]).replace(str(ROOT) + "/", "")
    print(f"\n=== {stage}: {shown}", flush=True)
    t0 = time.perf_counter()
    log = script.parent / "results" / f"{stage}{suffix}-run_all.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - t0
    row = {"stage": stage, "command": shown, "seconds": round(seconds, 1), "log": str(log.relative_to(ROOT))}
    if proc.returncode == 0 and not out.is_file() and stage == "ppo":
        parsed = parse_ppo_log(log.read_text(errors="replace"))
        if parsed:  # bench/ppo/run.py names its own --quick output; the log holds the figures of this run
            row.update(parsed)
            row.update({"status": "ok", "result_file": None,
                        "note": "figures read from the stage's log (its --quick JSON is shared with other runs)"})
            row["target_met"] = row["ratio"] >= row["target"]
            return row
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        print(f"  FAILED (exit {proc.returncode}); see {log}", flush=True)
        return {**row, "status": "failed", "error": "\n".join(tail)}
    data = json.loads(out.read_text())
    try:
        row.update(extract(stage, data))
    except (KeyError, TypeError) as err:
        return {**row, "status": "failed", "error": f"could not read {out}: {err!r}"}
    row.update({"status": "ok", "result_file": str(out.relative_to(ROOT))})
    if row.get("ratio") is not None and row.get("target") is not None:
        row["target_met"] = row["ratio"] >= row["target"]
        if stage == "reward":
            row["target_met"] = row["target_met"] and bool(row["detail"]["equal_accuracy"])
    print(f"  ours {row.get('ours')}, peer {row.get('peer_value')}, ratio {row.get('ratio')} ({seconds:.0f} s)",
          flush=True)
    return row


def merge_rows(new_rows: list[dict], previous: dict | None, when: str, quick: bool) -> list[dict]:
    """The report's rows in stage order: those just measured (stamped ``when`` / ``quick``), then, for each
    stage not run, its row from ``previous`` (an earlier ``report.json``), stamped with that run's date and
    mode when the row has none of its own, and marked ``carried``."""
    rows = {r["stage"]: {**r, "when": when, "quick": quick} for r in new_rows}
    for old in (previous or {}).get("stages") or []:
        stage = old.get("stage")
        if stage in STAGES and stage not in rows:
            rows[stage] = {**old, "when": old.get("when") or previous.get("when"),
                           "quick": old.get("quick", previous.get("quick")), "carried": True}
    return [rows[s] for s in STAGES if s in rows]


def load_previous(path: Path) -> dict | None:
    """An earlier ``report.json``, or None when there is none or it cannot be read (then nothing is carried)."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return previous if isinstance(previous, dict) else None


def _measured(row: dict) -> str:
    mode = {True: "quick", False: "full"}.get(row.get("quick"), "?")
    return f"{str(row.get('when') or '?')[:10]} {mode}"


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        BEGIN,
        "## All stages (generated by `bench/run_all.py`)",
        "",
        f"Last run {report['when']} ({'quick' if report['quick'] else 'full'}) on {m.get('cpu_count')} × "
        f"{m.get('cpu_model') or m.get('platform')}, "
        f"{m.get('memory_gib')} GiB, Python {m.get('python')}; load average at the start "
        f"{m.get('load_avg')} (other people's jobs share this machine). Versions: "
        + ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items()) + ". "
        f"Torch threads per side: {report['threads'] or 'default'}. Raw figures: `bench/report.json`.",
        "",
        "| stage | measured | unit | alignflow | peer | peer figure | ratio | per CPU-s | target | met "
        "| peak memory ours / peer (MiB) | s |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in report["stages"]:
        if r["status"] != "ok":
            lines.append(f"| {r['stage']} | {_measured(r)} | - | failed | - | - | - | - | - | - | - "
                         f"| {r['seconds']:.0f} |")
            continue
        met = {True: "yes", False: "**no**", None: "-"}[r.get("target_met")]
        lines.append(
            f"| {r['stage']} | {_measured(r)} | {r['unit']} | {_num(r['ours'], ',.2f')} | {r['peer']} | {_num(r['peer_value'], ',.2f')} "
            f"| {_num(r['ratio'], '.2f')}× | {_num(r['detail'].get('ratio_per_cpu_second'), '.2f')} "
            f"| {_num(r.get('target'), '.1f')}× | {met} "
            f"| {_num(r.get('ours_peak_mib'), ',.0f')} / {_num(r.get('peer_peak_mib'), ',.0f')} | {r['seconds']:.0f} |")
    lines.append("")
    for r in report["stages"]:
        if r["status"] == "ok" and r["stage"] == "reward":
            acc = r["detail"]["accuracy"]
            lines.append(f"- reward: held-out pairwise accuracy ours {acc[0]:.4f}, TRL {acc[1]:.4f} "
                         f"(equal within 1 point: {r['detail']['equal_accuracy']}).")
        if r["status"] == "ok" and r["stage"] == "ingest":
            d = r["detail"]
            per = ", ".join(f"{w} worker(s) {_num(v.get('mib_per_s'), '.1f')} MiB/s / {_num(v.get('peak_rss_mib'), ',.0f')} MiB"
                            for w, v in (d.get("by_workers") or {}).items())
            ceiling = d.get("ratio_most_over_one_worker_ceiling")
            # the most that ratio could be on this machine's cores with the CPU the most-workers run used
            bound = "" if ceiling is None else (
                f"; at most {ceiling:.2f}× on {d.get('cores')} cores with the CPU the runs used: "
                + ", ".join(f"{w} worker(s) {_num(v.get('cpu_seconds'), '.1f')} CPU-s"
                            for w, v in (d.get("by_workers") or {}).items()))
            lines.append(f"- ingest: most / one worker {_num(d.get('ratio_most_over_one_worker'), '.2f')}× "
                         f"(target 1.7×{bound}); {per}; peak RSS target < "
                         f"{_num(d.get('peak_rss_target_mib'), ',.0f')} MiB; "
                         f"seconds by phase in `bench/ingest/results/` (`profile`).")
        if r["status"] == "ok" and r["stage"] in ("base", "sft", "reward"):
            d = r["detail"]
            lines.append(f"- {r['stage']}: best-step ratio {_num(d.get('ratio_best_steps'), '.2f')}×, per CPU-second "
                         f"{_num(d.get('ratio_per_cpu_second'), '.2f')}×; final loss ours / peer "
                         f"{d['final_loss'][0]:.4f} / {d['final_loss'][1]:.4f}.")
        if r["status"] != "ok":
            lines.append(f"- {r['stage']} failed: `{r.get('error', '').splitlines()[-1] if r.get('error') else '?'}` "
                         f"(log: `{r['log']}`).")
    carried = [r["stage"] for r in report["stages"] if r.get("carried")]
    if carried:
        lines += ["", f"Not run this time, kept from earlier runs (their dates above): {', '.join(carried)}."]
    lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in report["stages"]), "", END]
    return "\n".join(lines)


def write_report_md(section: str, path: Path) -> None:
    text = path.read_text() if path.is_file() else "# Benchmark report\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:  # first time: right after the title
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{section}\n{body}"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every stage in its quick mode")
    ap.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per side in the training stages")
    ap.add_argument("--json", type=Path, default=BENCH / "report.json")
    ap.add_argument("--markdown", type=Path, default=BENCH / "REPORT.md")
    args = ap.parse_args()
    started = time.perf_counter()
    stages = [s for s in STAGES if (not args.only or s in args.only) and script_of(s).is_file()]
    skipped = [s for s in STAGES if s not in stages and (not args.only or s in args.only)]
    machine = common.machine_info()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    previous = load_previous(args.json) if args.only else None
    rows = merge_rows([run_stage(stage, args) for stage in stages], previous, when, args.quick)
    fresh_first = sorted(rows, key=lambda r: bool(r.get("carried")))  # this run's versions before earlier runs'
    versions = next((r["versions"] for r in fresh_first if r.get("status") == "ok" and r.get("versions")
                     and r["stage"] in TRAINING), None) or next(
        (r["versions"] for r in fresh_first if r.get("status") == "ok" and r.get("versions")), None)
    report = {"when": when, "quick": args.quick,
              "threads": args.threads, "machine": {**machine, "load_avg_at_end": [round(x, 2) for x in
                                                                                  os.getloadavg()]},
              "python": platform.python_version(), "versions": versions,
              "trl_versions": {"base/sft/reward": common.TRL_VERSION, "ppo": "0.29.1"},
              "stages": rows, "not_run": skipped, "seconds": round(time.perf_counter() - started, 1)}
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_report_md(markdown(report), args.markdown)
    print(f"\nreport: {args.json} and the generated section of {args.markdown} "
          f"({report['seconds'] / 60:.1f} min)")
    table = [[r["stage"], r.get("unit", "-"), _num(r.get("ours"), ",.2f") if r["status"] == "ok" else "failed",
              _num(r.get("peer_value"), ",.2f"), _num(r.get("ratio"), ".2f"), _num(r.get("target"), ".1f"),
              str(r.get("target_met", "-"))] for r in rows]
    common.print_table(table, ["stage", "unit", "ours", "peer", "ratio", "target", "met"])


if __name__ == "__main__":
    main()
