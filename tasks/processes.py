"""Whether the process that left something behind (a temporary folder, a RUNNING run) is still there."""

from __future__ import annotations

import os
import socket


def process_alive(pid: int) -> bool:
    """True while a process with this id exists on this host (a reused id counts as alive: nothing is lost)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_tags() -> dict[str, str]:
    """Tags naming this process, so a later process can tell a run whose process was killed."""
    return {"alignflow.host": socket.gethostname(), "alignflow.pid": str(os.getpid())}
