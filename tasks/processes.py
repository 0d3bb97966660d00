"""Processes: whether the one that left something behind (a temporary folder, a RUNNING run) is still there, the
priority and process group of the helpers a command starts, and file locks."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path


# Popen keywords for a helper process the command starts and stops itself (Prefect's temporary server, its
# reaper, an ingest's reading workers, contract process and reply walker): a process group of its own. Ctrl-C
# in a terminal sends SIGINT to the whole foreground group: the helpers died at once, the server with them,
# while the command still needed it to report the interrupted run, and the command then hung in Prefect's
# exit (its log worker waiting on the dead server). In their own group they get no signal from the terminal;
# the command handles the interrupt and stops them in order (each also ends when the command dies: see
# each one's docstring).
OWN_PROCESS_GROUP = {"process_group": 0}


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


def lower_priority(pid: int, niceness: int) -> bool:
    """Give a process (one of ours) at least ``niceness`` (Unix nice value), so the others get the cores first
    when all want them; it still gets any core they leave. Raising a nice value needs no privilege, and the
    process keeps it until it exits. False where that cannot be done (not Unix, the process is gone)."""
    try:
        if os.getpriority(os.PRIO_PROCESS, pid) < niceness:
            os.setpriority(os.PRIO_PROCESS, pid, niceness)
        return True
    except (AttributeError, OSError):  # no setpriority (Windows), or no such process
        return False


def lower_thread_priority(niceness: int) -> bool:
    """Give the calling thread at least ``niceness`` (on Linux a nice value is a thread's own: the process's
    other threads keep theirs). Raising it needs no privilege; the thread keeps it until it ends. False where
    that cannot be done for one thread alone (not Linux) or is refused."""
    return sys.platform.startswith("linux") and lower_priority(threading.get_native_id(), niceness)


# CAP_SYS_NICE (linux/capability.h): lets a process make any process more favoured (a lower nice value)
_CAP_SYS_NICE = 23


def may_raise_priority() -> bool:
    """Whether this process may give one of its processes back a lower nice value (as low as its own) after
    raising it: with an RLIMIT_NICE that reaches its own nice value, or CAP_SYS_NICE (root outside a
    container, usually; a container's root often lacks it). Raising a nice value needs neither. False where
    neither can be told (not Linux)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
        if soft == resource.RLIM_INFINITY or 20 - soft <= os.getpriority(os.PRIO_PROCESS, 0):
            return True
    except (ImportError, AttributeError, OSError, ValueError):  # no RLIMIT_NICE (not Linux)
        pass
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


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
