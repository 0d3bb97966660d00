"""bench/ingest/server_start.py: the temporary Prefect server's time to answer, with and without alignflow's
server settings, each in a fresh interpreter and work directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_one_round_reports_both_settings():
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "ingest" / "server_start.py"), "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    seconds = {}
    for line in out.stdout.splitlines():
        m = re.fullmatch(r"\s*(with|without) alignflow's server settings: \[([\d.]+)\] s \(min ([\d.]+)\)", line)
        if m:
            seconds[m.group(1)] = float(m.group(2))
            assert m.group(2) == m.group(3)
    assert set(seconds) == {"with", "without"}, out.stdout
    # a server answered: a positive time, and well inside the child's timeout
    assert all(0 < s < 300 for s in seconds.values()), seconds
