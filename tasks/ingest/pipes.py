"""The worker processes' ends of their pipes: tasks in on stdin, results (pickles) out on stdout.

A result is written with ``pickle.dump``, which ignores the count its ``write`` calls return: it relies on a
stream that writes everything it is given, as a ``BufferedWriter`` does. Python's ``sys.stdout.buffer`` is
one, except when ``PYTHONUNBUFFERED`` is set (or ``python -u``; common in container images and CI machines):
then it is the raw ``FileIO``, whose ``write`` on a pipe returns a short count when a signal interrupts it
part way. A worker stopped and continued while it writes a result (Ctrl-Z then ``fg`` on the command, a
debugger or a sampling profiler attaching) then left the rest of the result unwritten: measured, a 64 MiB
pickle came through as 131,106 bytes and the parent failed with ``UnpicklingError: invalid load key``.
"""

from __future__ import annotations

import io
import sys
from typing import BinaryIO


def worker_streams() -> tuple[BinaryIO, BinaryIO]:
    """(stdin, stdout) of a worker as buffered binary streams, whatever ``PYTHONUNBUFFERED`` says; from now on
    anything printed goes to stderr, so it cannot corrupt the result stream. The caller flushes stdout after
    each result."""
    stdout = sys.stdout.buffer
    if not isinstance(stdout, io.BufferedWriter):
        stdout = io.BufferedWriter(io.FileIO(sys.stdout.fileno(), "wb", closefd=False))
    sys.stdout = sys.stderr
    return sys.stdin.buffer, stdout  # stdin is buffered even under -u
