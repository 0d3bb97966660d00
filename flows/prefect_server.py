"""The app of Prefect's temporary server, which :func:`alignflow.flows.environment.start_prefect_server` runs:
Prefect's own ``create_app``, loaded and built with the garbage collector off (:mod:`alignflow.startup`),
which takes ~1 CPU-s off the server's start, the part of the command's start-up everything else waits for;
what the imports loaded is frozen before the app is built."""

from __future__ import annotations

import gc
from typing import Any

# how the server's command line names its app (uvicorn --factory); the reaper finds the server by it
APP = "alignflow.flows.prefect_server:create_app"


def create_app() -> Any:
    from alignflow.startup import imports_without_gc

    with imports_without_gc():
        from prefect.server.api.server import create_app as prefect_app

        # Built as Prefect's temporary server (PREFECT__SERVER_FINAL), the app ends with a full collection, to
        # free the routers FastAPI copied. Frozen first, the imported modules' objects are not part of it:
        # create_app 0.53 -> 0.18-0.21 CPU-s (2-core machine, 2026-12-04).
        gc.freeze()
        return prefect_app()
