"""Stops the Prefect temporary server of a command that was killed.

Prefect's temporary server is a child process (``uvicorn ...
prefect.server.api.server:create_app``, or ``alignflow.flows.prefect_server:create_app``
when the command starts it early) stopped by an ``atexit`` hook, which
a SIGKILL skips: the server would run on forever. :func:`watch` starts this
module as a small process that notes the servers its parent starts and
terminates them once the parent is gone, then exits.

    python -m alignflow.flows.reaper PARENT_PID
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from alignflow.tasks.processes import OWN_PROCESS_GROUP, process_alive

from .prefect_server import APP as SERVER_APP

POLL_SECONDS = 0.5
# the app in a temporary server's command line: Prefect's own, or the same built by alignflow.flows.prefect_server
_SERVER_MARKS = (b"prefect.server.api.server:create_app", SERVER_APP.encode())


def _children_servers(parent: int) -> dict[int, bytes]:
    """Temporary Prefect servers whose parent is ``parent``: pid -> start time (to recognise the process later)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_bytes()
            fields = stat[stat.rindex(b")") + 2:].split()
            if int(fields[1]) != parent:
                continue
            cmdline = (proc / "cmdline").read_bytes()
            if not any(mark in cmdline for mark in _SERVER_MARKS):
                continue
            found[int(proc.name)] = fields[19]
        except (OSError, ValueError, IndexError):
            continue
    return found


def _start_time(pid: int) -> bytes | None:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_bytes()
        return stat[stat.rindex(b")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def run(parent: int) -> None:
    servers: dict[int, bytes] = {}
    while process_alive(parent) and os.getppid() == parent:
        servers.update(_children_servers(parent))
        time.sleep(POLL_SECONDS)
    for pid, started in servers.items():
        if _start_time(pid) == started:  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def watch() -> subprocess.Popen | None:
    """Start the reaper for this process (Linux only; elsewhere nothing happens)."""
    if not Path("/proc/self/stat").exists():
        return None
    return subprocess.Popen([sys.executable, "-m", "alignflow.flows.reaper", str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            **OWN_PROCESS_GROUP)


if __name__ == "__main__":  # pragma: no cover - run as a process
    run(int(sys.argv[1]))
