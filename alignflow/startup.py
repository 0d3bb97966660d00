"""Process start-up: imports without the cyclic garbage collector.

Importing Prefect, MLflow, pandas and Great Expectations allocates millions of objects that live as long as
the process. While they load, the collector keeps running full passes over them and finds nothing to free:
importing what ``alignflow ingest`` needs before its flow starts took 6.0-7.0 CPU-s with the collector on and
4.5-4.8 with it off, and Prefect's server app 3.3-3.5 against 2.4-2.6 (2-core machine, 2026-12-03).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def imports_without_gc() -> Iterator[None]:
    """Run the block (imports, building long-lived objects) with the collector off. Afterwards whatever is
    alive is frozen (``gc.freeze``: later passes skip it; a few import-time cycles, if any, stay) and the
    collector is on again if it was on before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
