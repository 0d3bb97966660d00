"""How long Prefect's temporary server takes to answer in a new work directory, with alignflow's server
settings (``flows/environment.SERVER_SETTINGS``) and without them, alternating.

Each measurement is a fresh interpreter that calls ``prepare(workdir, server=True)`` on an empty work
directory (the database seeded from its template, the server started) and then polls ``/api/health`` until
it answers; it reports the seconds from the server's start to that answer.

    .venv/bin/python bench/ingest/server_start.py --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys, time, urllib.request
from alignflow.flows import environment
if sys.argv[2] == "without":
    environment.SERVER_SETTINGS = {}
environment.prepare(sys.argv[1], server=True)
started = time.perf_counter()
url = os.environ[environment.TEMPORARY_API_ENV]  # the server this process started
while True:
    try:
        urllib.request.urlopen(url + "/health", timeout=1).read()
        break
    except Exception:
        time.sleep(0.02)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def measure(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    with tempfile.TemporaryDirectory(prefix="af-server-start-") as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, os.path.join(tmp, "work"), mode], env=env,
                             capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.rounds):
        for mode in seconds:
            seconds[mode].append(round(measure(mode), 2))
    for mode, values in seconds.items():
        print(f"{mode:>7} alignflow's server settings: {values} s (min {min(values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
