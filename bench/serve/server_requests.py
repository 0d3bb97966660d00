"""Latency of requests to the temporary Prefect server a command starts, against Prefect's own temporary server.

    .venv/bin/python bench/serve/server_requests.py [--requests 40] [--out FILE.json]

Every flow and task run of an ``alignflow`` command talks to Prefect's API; without a configured server that
is the temporary server :func:`alignflow.flows.environment.start_prefect_server` starts on a loopback socket
it binds itself. The peer, in the same run, is the temporary server Prefect starts by itself
(``SubprocessASGIServer``, which lets uvicorn bind its port). Each server runs in a process of its own started
here, with a fresh Prefect home; after one warm-up request per kind, ``--requests`` requests of each kind are
timed from a client on the same machine (median and 90th percentile, milliseconds):

* ``GET /health``: the smallest reply;
* ``GET /admin/version``: what a flow run asks first;
* ``POST /flows/filter``: a read with a JSON body;
* ``POST /flows/``: a write (the same flow name: an upsert).

The ratio is ours over Prefect's (lower is faster). Needs nothing but the main venv; servers listen on
127.0.0.1 only and are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = (("GET", "/health", None), ("GET", "/admin/version", None), ("POST", "/flows/filter", {}),
         ("POST", "/flows/", {"name": "bench-probe"}))


def _time_requests(url: str, n: int) -> dict[str, dict[str, float]]:
    import httpx

    out = {}
    with httpx.Client(timeout=30) as client:
        for method, path, body in KINDS:
            client.request(method, url + path, json=body).raise_for_status()  # warm-up (routes built on first use)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                client.request(method, url + path, json=body).raise_for_status()
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            out[f"{method} {path}"] = {"median_ms": statistics.median(times),
                                       "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))]}
    return out


def _worker(mode: str, home: str, n: int) -> None:
    """One server and its timings, as JSON on stdout (run in a process of its own)."""
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if mode == "alignflow":
        from alignflow.flows.environment import prepare, wait_for_prefect_server

        prepare(home, server=True)
        wait_for_prefect_server()
        url = os.environ["PREFECT_API_URL"]
        stop = None
    else:
        os.environ["PREFECT_HOME"] = str(Path(home) / "prefect")
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start(timeout=120)
        url, stop = server.api_url, server.stop
    try:
        print(json.dumps(_time_requests(url, n)))
    finally:
        if stop is not None:
            stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40, help="timed requests of each kind per server")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--worker", choices=("alignflow", "prefect"), help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.home, args.requests)
        return 0

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
    figures = {}
    for mode in ("alignflow", "prefect"):
        with tempfile.TemporaryDirectory(prefix=f"server-requests-{mode}-") as home:
            done = subprocess.run([sys.executable, __file__, "--worker", mode, "--home", home,
                                   "--requests", str(args.requests)], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                print(f"error: the {mode} server's run failed (exit {done.returncode})", file=sys.stderr)
                return 1
            figures[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'request':24s} {'alignflow ms':>13s} {'Prefect ms':>11s} {'ratio':>6s}   (median; p90 in the JSON)")
    for kind in figures["alignflow"]:
        ours, peer = figures["alignflow"][kind]["median_ms"], figures["prefect"][kind]["median_ms"]
        print(f"{kind:24s} {ours:13.1f} {peer:11.1f} {ours / peer:6.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"requests": args.requests, "servers": figures}, indent=1) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
