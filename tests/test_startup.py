"""Process start-up: imports run without the cyclic garbage collector, which is back on afterwards."""

from __future__ import annotations

import gc

import pytest

from alignflow.startup import imports_without_gc


def test_the_collector_is_off_inside_and_on_after_with_what_was_made_frozen():
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with imports_without_gc():
            assert not gc.isenabled()
            kept = [[i] for i in range(1000)]  # noqa: F841  long-lived container objects, as a module's
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + 1000  # skipped by every later pass
    finally:
        gc.unfreeze()


def test_an_error_inside_still_turns_the_collector_back_on():
    with pytest.raises(ImportError):
        with imports_without_gc():
            import alignflow_no_such_module  # noqa: F401
    assert gc.isenabled()
    gc.unfreeze()


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    try:
        with imports_without_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
