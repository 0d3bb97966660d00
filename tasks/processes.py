"""Whether the process that left something behind (a temporary folder, a RUNNING run) is still there."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this machine (``flock`` on ``path``, created if missing)."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
