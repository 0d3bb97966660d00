"""Learning-rate schedules shared by the training loop and PPO: one multiplier function, one LambdaLR builder.

A schedule is a multiplier of the peak learning rate. :func:`decay_multiplier`
gives its shape over a fraction of the run; :func:`lr_multiplier` adds the
loop's warm-up; :func:`lambda_scheduler` turns any multiplier into a
``LambdaLR`` whose state_dict carries only the step count, so the schedule of
the config in use applies after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from alignflow.config import TrainConfig

SHAPES = ("cosine", "linear", "constant")


def decay_multiplier(progress: float, shape: str, floor: float = 0.0) -> float:
    """Multiplier at ``progress`` in [0, 1] of the decay: 1 at 0, ``floor`` at 1 (cosine or linear), or always 1."""
    if shape not in SHAPES:
        raise ValueError(f"schedule must be one of {', '.join(SHAPES)}, got {shape!r}")
    if shape == "constant":
        return 1.0
    progress = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Fraction of ``cfg.lr`` used by optimizer step ``step`` (1-based) of the training loop.

    Warm-up: ``step / warmup_steps`` for ``step <= warmup_steps`` (the first
    step already moves; step ``warmup_steps`` is at the peak). Then, over
    the remaining steps up to ``max_steps``: cosine or linear decay from 1 to
    ``min_lr_ratio`` (reached exactly at ``max_steps``), or constant 1.
    """
    warmup = cfg.warmup_steps
    if warmup > 0 and step <= warmup:
        return step / warmup
    span = cfg.max_steps - warmup
    progress = 1.0 if span <= 0 else (step - warmup) / span
    return decay_multiplier(progress, cfg.schedule, cfg.min_lr_ratio)


def lambda_scheduler(optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float]
                     ) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose value after ``k`` scheduler steps is ``lr × multiplier(k)``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
