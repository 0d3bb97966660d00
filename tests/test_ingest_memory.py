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
