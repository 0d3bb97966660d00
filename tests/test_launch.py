"""How a launched process leaves once its process group is closed (tasks/launch.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import atexit, sys
from alignflow.tasks import launch
atexit.register(lambda: print("exit handler ran"))
print("buffered output", end=" ")  # a pipe: block-buffered, lost unless flushed before os._exit
launch.exit_without_finalization({code})
print("never reached")
"""


@pytest.mark.parametrize("code, status", [(None, 0), (0, 0), (3, 3), ("'bad things'", 1)])
def test_exit_without_finalization_runs_exit_handlers_flushes_and_keeps_the_status(code, status):
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(code=code)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == status, done.stderr
    assert done.stdout == "buffered output exit handler ran\n"
    assert ("bad things" in done.stderr) == (status == 1)


def test_a_process_that_never_closed_a_group_says_so():
    from alignflow.tasks import launch

    assert launch.group_closed() is False
    launch.finish()  # not launched: nothing to close
    assert launch.group_closed() is False


THREADED = """
import atexit, sys, threading, time
from alignflow.tasks import launch
atexit.register(lambda: print("exit handler ran"))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", end=" "))).start()  # not a daemon
launch.exit_without_finalization(0)
"""


def test_exit_without_finalization_waits_for_threads_before_the_exit_handlers():
    """As the interpreter does on exit: a thread that is not a daemon finishes first, then the handlers run
    (Prefect's log worker drains there while its server is up; the server stops in a handler)."""
    done = subprocess.run([sys.executable, "-c", THREADED], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "thread done exit handler ran\n"
