"""Giving freed memory back to the OS (glibc's ``malloc_trim``), where the C library can."""

from __future__ import annotations

import ctypes


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): the heap's statistics, summed over every arena."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _load_libc():
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None, None
    try:
        mallinfo2 = libc.mallinfo2
        mallinfo2.restype = _MallInfo2
    except AttributeError:  # glibc before 2.33: no statistics, so every trim is done
        mallinfo2 = None
    return libc, mallinfo2


_LIBC, _MALLINFO2 = _load_libc()


M_ARENA_MAX = -8  # mallopt's parameter for the most arenas (glibc's malloc.h)


def limit_arenas(arenas: int) -> bool:
    """Let the threads this process starts from now on share at most ``arenas`` malloc arenas (glibc's
    ``mallopt(M_ARENA_MAX)``; the default is 8 per core). Each arena keeps what its threads freed as RSS until
    it is trimmed; fewer arenas, less of it. The ``MALLOC_ARENA_MAX`` environment variable does the same for a
    process started with it. Returns whether the C library took it (False without glibc)."""
    if _LIBC is None or arenas < 1:
        return False
    return bool(_LIBC.mallopt(M_ARENA_MAX, int(arenas)))


def free_heap_bytes() -> int | None:
    """Bytes the malloc arenas hold free (``fordblks``), or None where glibc cannot say."""
    return None if _MALLINFO2 is None else int(_MALLINFO2().fordblks)


def trim_heap(min_free: int = 0) -> None:
    """Return the free memory of every malloc arena to the OS (a no-op without glibc).

    A process that frees large buffers made on several threads (each thread allocates from an arena of
    its own) otherwise keeps each arena's high-water mark as RSS. With ``min_free``, only when the arenas
    hold at least that much free: memory given back is faulted in again (zeroed by the kernel) by the next
    allocations, so a process that trims after every small batch spends its time in page faults.
    """
    if _LIBC is None:
        return
    if min_free > 0:
        free = free_heap_bytes()
        if free is not None and free < min_free:
            return
    _LIBC.malloc_trim(0)
