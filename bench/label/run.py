"""Labeling app under load: 50 simulated labelers submitting as fast as they can against `alignflow label serve`.

    .venv/bin/python bench/label/run.py              # 50 labelers, 60 s (the target)
    .venv/bin/python bench/label/run.py --quick      # 50 labelers, 10 s

The server is the real command (`alignflow label serve`, one uvicorn process, SQLite in a scratch work
directory). Each labeler is a thread with its own HTTP connection that asks for its next item and submits a
ranking (Plackett-Luce over 4 responses), and sends 10% of its submissions twice with the same idempotency key
(double clicks). Two floors are measured in the same run, on the same machine and load:

* HTTP floor: the same number of client threads calling `GET /healthz` on the same server (no database);
  a submission costs two requests (next item + submit), so `2 x submissions/s / floor` is the share of the bare
  request rate the app reaches;
* database floor: one thread committing one-row transactions into a fresh SQLite file with the store's settings
  (WAL, synchronous=NORMAL, BEGIN IMMEDIATE); `submissions/s / floor` is the share of the commit rate.

Checks (exit 1 on failure): every accepted submission id is in the database exactly once, no duplicate row for a
(item, labeler), no item over its overlap, every double click answered with the stored submission.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parents[1]
sys.path.insert(0, str(REPO / "tests"))


def http_floor(url: str, threads: int, seconds: float) -> dict:
    import httpx

    lat: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def work() -> None:
        mine = []
        with httpx.Client(base_url=url, timeout=30) as c:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                c.get("/healthz").raise_for_status()
                mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    lat.sort()
    return {"requests_per_s": len(lat) / dt, "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))], "requests": len(lat)}


def db_floor(path: Path, seconds: float) -> dict:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v TEXT)")
    n, stop_at, t0 = 0, time.monotonic() + seconds, time.perf_counter()
    while time.monotonic() < stop_at:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (k, v) VALUES (?, ?)", (f"k{n}", "[[\"r0\"],[\"r1\"],[\"r2\"],[\"r3\"]]"))
        conn.execute("COMMIT")
        n += 1
    dt = time.perf_counter() - t0
    conn.close()
    return {"commits_per_s": n / dt, "commits": n}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labelers", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--quick", action="store_true", help="10 s instead of 60 s")
    ap.add_argument("--items", type=int, default=6000)
    ap.add_argument("--overlap", type=int, default=3)
    ap.add_argument("--scratch", type=Path, default=BENCH / "results" / "scratch")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "label.json")
    args = ap.parse_args()
    seconds = 10.0 if args.quick else args.seconds

    from _servers import BIN, clean_env, free_port, spawn, stop, wait_http

    from alignflow.tasks.label.simulate import LabelerModel, run_labelers
    from alignflow.tasks.label.store import LabelStore

    scratch = args.scratch
    if scratch.exists():
        import shutil

        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    store = LabelStore(f"sqlite:///{scratch / 'label.db'}")
    items = [{"item_id": f"i{i}", "prompt_id": f"p{i}", "prompt": f"Question {i}: how do I sort a list?",
              "responses": [{"id": f"r{j}", "text": f"answer {j} " + "words " * (10 + 5 * j), "policy": f"policy-{j % 2}"}
                            for j in range(4)]} for i in range(args.items)]
    store.create_batch("bench", "bench", items, overlap=args.overlap)
    tokens = [store.invite(f"labeler-{i}") for i in range(args.labelers)]
    store.close()

    port = free_port()
    log = scratch / "serve.log"
    proc = spawn([str(BIN / "alignflow"), "label", "serve", "--workdir", str(scratch), "--port", str(port)],
                 clean_env(), log)
    url = f"http://127.0.0.1:{port}"
    load_before = load_average()
    try:
        wait_http(f"{url}/healthz", 60, proc, log)
        floor_http = http_floor(url, args.labelers, min(5.0, seconds))
        floor_db = db_floor(scratch / "floor.db", 3.0)
        model = LabelerModel(strength=lambda p, t: len(t) / 100.0, noise=1.0)
        stats = run_labelers(url, tokens, "bench", model=model, seconds=seconds, seed=0, repeat_rate=0.1)
    finally:
        stop(proc)
    load_after = load_average()

    store = LabelStore(f"sqlite:///{scratch / 'label.db'}")
    rows = store.export("bench")
    counts = store.counts("bench")
    store.close()
    stored = [r["submission_id"] for r in rows]
    per_item: dict[str, int] = {}
    pairs = set()
    for r in rows:
        per_item[r["item_id"]] = per_item.get(r["item_id"], 0) + 1
        pairs.add((r["item_id"], r["labeler"]))
    checks = {
        "every_accepted_in_db_once": sorted(stats.accepted) == sorted(stored) and len(set(stored)) == len(stored),
        "no_duplicate_item_labeler": len(pairs) == len(rows),
        "no_item_over_overlap": max(per_item.values(), default=0) <= args.overlap,
        "no_refusals": not stats.refused,
    }
    s = stats.summary()
    result = {
        "labelers": args.labelers, "seconds": seconds, "items": args.items, "overlap": args.overlap,
        **s, "stored_rows": len(rows), "complete_items": counts["complete_items"],
        "http_floor": floor_http, "db_floor": floor_db,
        "share_of_http_floor": 2 * s["submissions_per_s"] / floor_http["requests_per_s"],
        "share_of_db_floor": s["submissions_per_s"] / floor_db["commits_per_s"],
        "checks": checks, "load_average_before": load_before, "load_average_after": load_after,
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"\n{s['submissions']} submissions in {s['seconds']:.1f} s = {s['submissions_per_s']:.1f}/s, "
          f"p95 {s['p95_latency_ms']:.0f} ms; HTTP floor {floor_http['requests_per_s']:.0f} req/s "
          f"(share {result['share_of_http_floor']:.2f}); SQLite floor {floor_db['commits_per_s']:.0f} commits/s "
          f"(share {result['share_of_db_floor']:.3f}); checks: {'all pass' if all(checks.values()) else checks}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
