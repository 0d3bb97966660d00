"""Simulated labelers: they rank by a known rule, with noise and biases, through the app's HTTP API.

A labeler's utility for a response is ``strength(prompt, response)`` (by
default the planted rule of the generated dumps: 1 when the answer mentions
the question's key term and has a code block, else 0) plus
``length_bias * len(text) / 1000`` plus ``position_bias`` times the number of
responses shown after it (a taste for whatever comes first) plus Gumbel noise
of scale ``noise``; the ranking sorts by utility (Plackett-Luce when only noise
is present). Equal utilities tie. For two responses the utility difference
maps onto the A/B scale: under ``same_below`` it is "about the same", under 4x
that strength 1, under 8x strength 2, else 3.

:func:`run_labelers` runs many such labelers at once against a server (each
one a thread with its own HTTP connection), retrying failed requests with the
same idempotency key, and returns every accepted submission id with its
latency, so callers can check each is stored exactly once.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["LabelerModel", "RunStats", "planted_strength", "run_labelers", "simulated_answer"]

StrengthFn = Callable[[str, str], float]


def planted_strength(prompt: str, response: str) -> float:
    """1.0 when ``response`` has the generated dumps' planted property for the question in ``prompt``, else 0."""
    from alignflow.tasks.ingest.synthetic import has_planted_property

    first, _, body = prompt.partition("\n")
    title = first.split(":", 1)[1].strip() if first.lower().startswith("question:") else first
    return 1.0 if has_planted_property(title, body, response) else 0.0


@dataclass
class LabelerModel:
    """How one simulated labeler judges: the rule, its noise and its biases."""

    strength: StrengthFn = planted_strength
    noise: float = 0.3
    position_bias: float = 0.0
    length_bias: float = 0.0
    same_below: float = 0.25

    def utilities(self, prompt: str, texts: Sequence[str], rng: random.Random) -> list[float]:
        k = len(texts)
        out = []
        for pos, text in enumerate(texts):
            u = self.strength(prompt, text) + self.length_bias * len(text) / 1000 + self.position_bias * (k - 1 - pos)
            if self.noise > 0:
                u += -self.noise * math.log(-math.log(max(rng.random(), 1e-300)))  # Gumbel(0, noise)
            out.append(u)
        return out


def simulated_answer(model: LabelerModel, prompt: str, responses: Sequence[dict], rng: random.Random) -> dict:
    """The submission body (``ranking`` as tie groups, or ``ab`` for two responses) for responses as shown."""
    u = model.utilities(prompt, [r["text"] for r in responses], rng)
    if len(responses) == 2:
        d = u[1] - u[0]  # > 0: B better
        if abs(d) < model.same_below:
            return {"ab": 0}
        strength = 1 if abs(d) < 4 * model.same_below else (2 if abs(d) < 8 * model.same_below else 3)
        return {"ab": strength if d > 0 else -strength}
    order = sorted(range(len(responses)), key=lambda i: -u[i])
    groups: list[list[str]] = []
    last = None
    for i in order:
        if last is not None and u[i] == last:
            groups[-1].append(responses[i]["id"])
        else:
            groups.append([responses[i]["id"]])
        last = u[i]
    return {"ranking": groups}


@dataclass
class RunStats:
    """What a simulation run saw: accepted submissions, latencies (s), refusals, transport errors."""

    accepted: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    errors: int = 0
    duplicates: int = 0  # repeated sends answered with the stored submission (not counted as accepted)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def p(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(math.ceil(q * len(xs))) - 1)]

    def summary(self) -> dict:
        return {"submissions": len(self.accepted), "seconds": round(self.seconds, 3),
                "submissions_per_s": len(self.accepted) / self.seconds if self.seconds else float("nan"),
                "p50_latency_ms": 1000 * self.p(0.5), "p95_latency_ms": 1000 * self.p(0.95),
                "refused": len(self.refused), "duplicates_answered": self.duplicates,
                "transport_errors": self.errors}


def _labeler_loop(base_url: str, token: str, batch_id: str, model: LabelerModel, seed: int, stats: RunStats,
                  deadline: float | None, max_items: int | None, retries: int, repeat_rate: float) -> None:
    import httpx

    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    done = 0
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        while (deadline is None or time.monotonic() < deadline) and (max_items is None or done < max_items):
            item = _with_retries(lambda: client.get(f"/api/batches/{batch_id}/next"), retries, stats)
            if item is None:
                return
            if item.status_code != 200:
                with stats.lock:
                    stats.refused.append(f"next item: {item.status_code} {item.text[:200]}")
                return
            data = item.json()
            if data.get("done"):
                return
            body = {"item_id": data["item_id"], "idempotency_key": uuid.uuid4().hex,
                    **simulated_answer(model, data["prompt"], data["responses"], rng)}
            if data.get("demonstrations"):
                body["demonstration"] = max(data["responses"], key=lambda r: model.strength(data["prompt"],
                                                                                            r["text"]))["text"]
            t0 = time.perf_counter()
            resp = _with_retries(lambda: client.post("/api/submissions", json=body), retries, stats)
            dt = time.perf_counter() - t0
            if resp is None:
                return
            again = None
            if repeat_rate and rng.random() < repeat_rate:  # a double click: the same request once more
                again = _with_retries(lambda: client.post("/api/submissions", json=body), retries, stats)
            with stats.lock:
                if resp.status_code in (200, 201):
                    stats.accepted.append(int(resp.json()["submission_id"]))
                    stats.latencies.append(dt)
                else:
                    stats.refused.append(f"{resp.status_code} {resp.text[:200]}")
                if again is not None:
                    if again.status_code == 200 and again.json().get("duplicate"):
                        stats.duplicates += 1
                    else:
                        stats.refused.append(f"repeat: {again.status_code} {again.text[:200]}")
            if resp.status_code not in (200, 201):
                return
            done += 1


def _with_retries(call: Callable, retries: int, stats: RunStats):  # noqa: ANN202
    import httpx

    for attempt in range(retries + 1):
        try:
            return call()
        except httpx.TransportError:
            with stats.lock:
                stats.errors += 1
            time.sleep(min(2.0, 0.1 * 2**attempt))
    return None


def run_labelers(base_url: str, tokens: Sequence[str], batch_id: str, *, model: LabelerModel | None = None,
                 models: Sequence[LabelerModel] | None = None, seconds: float | None = None,
                 max_items: int | None = None, seed: int = 0, retries: int = 3, repeat_rate: float = 0.0) -> RunStats:
    """Every token labels ``batch_id`` in its own thread until the batch is done (or ``seconds`` pass).

    ``repeat_rate``: the share of submissions sent twice with the same idempotency key (double clicks)."""
    stats = RunStats()
    deadline = time.monotonic() + seconds if seconds else None
    per = list(models) if models else [model or LabelerModel()] * len(tokens)
    threads = [threading.Thread(target=_labeler_loop, daemon=True,
                                args=(base_url, tok, batch_id, per[i], seed * 1000 + i, stats, deadline, max_items,
                                      retries, repeat_rate)) for i, tok in enumerate(tokens)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats.seconds = time.perf_counter() - t0
    return stats
