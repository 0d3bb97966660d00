"""Giving freed memory back to the OS (glibc's ``malloc_trim``), where the C library can."""

from __future__ import annotations


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def trim_heap() -> None:
    """Return the free memory of every malloc arena to the OS (a no-op without glibc).

    A process that frees large buffers made on several threads (each thread allocates from an arena of
    its own) otherwise keeps each arena's high-water mark as RSS.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
