"""The build's handling of the garbage collector: batch garbage freed at once, the libraries' objects frozen."""

import gc
import weakref

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
