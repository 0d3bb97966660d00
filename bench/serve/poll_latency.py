"""How long one check of `flows/serve.py`'s trigger wait takes: a read of a deployment's flow runs.

    .venv/bin/python bench/serve/poll_latency.py [--reads 30]

Starts Prefect's test server, registers a deployment and times ``_train_runs_since`` (median and max).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=30)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from alignflow.flows.serve import _train_runs_since

    @flow(name="train-probe")
    def probe() -> int:
        return 1

    with prefect_test_harness(server_startup_timeout=120):
        probe.to_deployment(name="train-after-ingest").apply()
        since = dt.datetime.now(dt.timezone.utc)
        times = []
        for _ in range(args.reads):
            start = time.perf_counter()
            _train_runs_since("train-probe/train-after-ingest", since)
            times.append(time.perf_counter() - start)
    times.sort()
    print(f"_train_runs_since: median {times[len(times) // 2] * 1e3:.1f} ms, max {times[-1] * 1e3:.1f} ms "
          f"over {len(times)} reads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
