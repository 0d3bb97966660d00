"""Where an ingest spends its time: seconds per phase, written to ``profile.json`` beside the datasets."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Phases:
    """Accumulates seconds per named phase (wall time of this process, or seconds reported by workers)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds of this process, per phase timed here

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        return call

    def table(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}

    def cpu_table(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.cpu.items()}
