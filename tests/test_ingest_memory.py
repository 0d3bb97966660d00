"""The build's handling of memory: batch garbage freed at once, the libraries' objects frozen, malloc arenas shared."""

import gc
import os
import subprocess
import sys
import weakref

import pytest

from alignflow.tasks.ingest.build import collect_batch_garbage, frozen_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_collect_batch_garbage_frees_a_batch_s_cycles_now():
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic pass may free it in between
    try:
        node = _Node()
        alive = weakref.ref(node)
        del node
        assert alive() is not None
        collect_batch_garbage()
        assert alive() is None
    finally:
        if was_enabled:
            gc.enable()


def test_collect_batch_garbage_freezes_what_stays_when_asked():
    before = gc.get_freeze_count()
    keep = [_Node() for _ in range(10)]
    try:
        collect_batch_garbage(new_objects_stay=True)
        assert gc.get_freeze_count() >= before + 10
    finally:
        gc.unfreeze()
        del keep


def test_frozen_heap_freezes_for_the_block_only_and_unfreezes_on_error():
    gc.unfreeze()
    held = [_Node() for _ in range(10)]
    with frozen_heap():
        assert gc.get_freeze_count() >= 10
    assert gc.get_freeze_count() == 0
    try:
        with frozen_heap():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.get_freeze_count() == 0
    del held


class _FakeLibc:
    def __init__(self) -> None:
        self.trims = 0

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


def test_trim_heap_gives_memory_back_only_past_its_threshold(monkeypatch):
    from alignflow.tasks.ingest import heap

    libc = _FakeLibc()
    free = {"bytes": 4 << 20}
    monkeypatch.setattr(heap, "_LIBC", libc)
    monkeypatch.setattr(heap, "_MALLINFO2", lambda: heap._MallInfo2(fordblks=free["bytes"]))
    heap.trim_heap(min_free=16 << 20)
    assert libc.trims == 0  # 4 MiB free: kept for the next batch
    free["bytes"] = 16 << 20
    heap.trim_heap(min_free=16 << 20)
    assert libc.trims == 1
    heap.trim_heap()  # no threshold: always
    assert libc.trims == 2
    monkeypatch.setattr(heap, "_MALLINFO2", None)  # a glibc without statistics: every trim is done
    heap.trim_heap(min_free=16 << 20)
    assert libc.trims == 3


def test_the_heap_statistics_are_read_from_glibc():
    import ctypes

    import pytest

    from alignflow.tasks.ingest import heap

    if heap._MALLINFO2 is None:
        pytest.skip("this C library has no mallinfo2 (glibc before 2.33, or not glibc)")
    libc = heap._LIBC
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(32 << 10) for _ in range(256)]  # 8 MiB in blocks below the mmap threshold
    guard = libc.malloc(32 << 10)  # keeps the freed blocks inside the heap, not at its top
    before = heap.free_heap_bytes()
    for block in blocks:
        libc.free(block)
    try:
        assert heap.free_heap_bytes() - before >= 8 << 20
    finally:
        libc.free(guard)


def test_the_builds_arrow_allocator_holds_for_the_block_only():
    import pyarrow as pa
    import pytest

    from alignflow.tasks.ingest.build import arrow_allocator, use_arrow_allocator

    before = pa.default_memory_pool().backend_name
    other = "system" if before != "system" else "mimalloc"
    with pytest.raises(RuntimeError):
        with arrow_allocator(other):
            assert pa.default_memory_pool().backend_name == other
            assert pa.array(["x" * 100]).buffers()[2] is not None  # allocated from it
            raise RuntimeError("a failed build")
    assert pa.default_memory_pool().backend_name == before
    with arrow_allocator(None):
        assert pa.default_memory_pool().backend_name == before
    with arrow_allocator("no-such-allocator"):  # a pyarrow without it keeps its pool
        assert pa.default_memory_pool().backend_name == before
    assert use_arrow_allocator(before) == before


def test_an_ingest_leaves_the_process_on_its_arrow_allocator(fixtures_dir, tmp_path, monkeypatch):
    """The Stack Exchange build runs on the faster allocator; a later stage in the same process (the pipeline's
    flows) gets the pool it had, the one that keeps the tree's peak lower."""
    import pyarrow as pa

    from alignflow.config import load_config
    from alignflow.tasks.ingest import build
    from alignflow.tasks.ingest.run import execute_ingest, plan_ingest

    seen = []
    real = build.Builder.run

    def run(self):
        seen.append(pa.default_memory_pool().backend_name)
        return real(self)

    cfg = load_config(None, ["ingest.workers=1"]).ingest
    before = pa.default_memory_pool().backend_name
    monkeypatch.setattr(build.Builder, "run", run)
    execute_ingest(plan_ingest([fixtures_dir / "conlang.meta-2020"], tmp_path, cfg), cfg)
    assert seen == [build.FAST_ARROW_ALLOCATOR]
    assert pa.default_memory_pool().backend_name == before


_ARENAS = """
import sys, threading
from alignflow.tasks.ingest.heap import _LIBC, limit_arenas
if sys.argv[1] == "limit":
    assert limit_arenas(1)
barrier = threading.Barrier(5)
def work():
    keep = [bytearray(1000) for _ in range(2000)]  # from glibc's malloc: each thread's arena
    barrier.wait()
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
barrier.wait()
_LIBC.malloc_stats()  # one "Arena N:" paragraph per arena, on stderr
barrier.wait()
for t in threads:
    t.join()
"""


def test_limit_arenas_makes_threads_share_the_arenas():
    from alignflow.tasks.ingest.heap import _LIBC

    if _LIBC is None:
        pytest.skip("malloc arenas are glibc's: this C library has none to limit")
    counts = {}
    for how in ("limit", "default"):
        out = subprocess.run([sys.executable, "-c", _ARENAS, how], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        counts[how] = out.stderr.count("Arena ")
    assert counts["limit"] == 1
    assert counts["default"] > 1


def test_the_ingest_command_limits_its_processes_arenas_unless_told_otherwise(monkeypatch):
    from alignflow.flows import cli

    taken = []
    monkeypatch.setattr("alignflow.tasks.ingest.heap.limit_arenas", taken.append)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    cli._limit_malloc_arenas()
    assert os.environ["MALLOC_ARENA_MAX"] == str(cli.INGEST_MALLOC_ARENAS) and taken == [cli.INGEST_MALLOC_ARENAS]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "6")  # the user's: kept, and this process follows it
    cli._limit_malloc_arenas()
    assert os.environ["MALLOC_ARENA_MAX"] == "6" and taken[-1] == 6
    monkeypatch.setenv("MALLOC_ARENA_MAX", "many")  # not a number: left to glibc, which ignores it
    cli._limit_malloc_arenas()
    assert taken[-1] == 6


@pytest.mark.parametrize("users", [None, "dirty_decay_ms:500"])
def test_the_command_gives_arrows_jemalloc_its_options_before_pyarrow_loads(users):
    """The command's module sets the options of Arrow's jemalloc (no muzzy pages) before pyarrow is loaded, so
    jemalloc reads them when it starts, in the command and the processes it starts; a value the user set stays."""
    from alignflow.flows.cli import JEMALLOC_CONF, JEMALLOC_CONF_VAR

    env = {k: v for k, v in os.environ.items() if k != JEMALLOC_CONF_VAR}
    if users is not None:
        env[JEMALLOC_CONF_VAR] = users
    # what runs before the module's first line (its packages) has not loaded pyarrow; the module sets the options
    probe = ("import os, sys; import alignflow.flows; before = 'pyarrow' in sys.modules; "
             f"import alignflow.flows.cli; print(before, os.environ.get({JEMALLOC_CONF_VAR!r}))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", users or JEMALLOC_CONF]
