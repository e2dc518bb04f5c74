"""Learning-rate schedules as a multiplier of the base rate, as a function of (fractional) epochs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from recallk.registry import SCHEDULES


def lr_multiplier(
    schedule: str,
    total_epochs: int,
    warmup_epochs: int = 0,
    step_epochs: Sequence[int] = (),
    gamma: float = 0.3,
) -> Callable[[float], float]:
    """``f(epoch) -> multiplier`` for ``schedule`` in ``none``, ``cosine``, ``step``, after a linear warm-up.

    ``cosine`` decays from 1 to 0 over ``total_epochs``; ``step`` multiplies by ``gamma`` at each epoch in
    ``step_epochs``. ``epoch`` may be fractional (step-wise updates).
    """
    if schedule not in SCHEDULES:
        raise ValueError(SCHEDULES.unknown(schedule))

    def multiplier(epoch: float) -> float:
        warm = min(1.0, (epoch + 1e-12) / warmup_epochs) if warmup_epochs > 0 else 1.0
        if schedule == "cosine":
            progress = min(1.0, epoch / max(total_epochs, 1))
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "step":
            return warm * gamma ** sum(epoch >= s for s in step_epochs)
        return warm

    return multiplier


def step_warmup(warmup_steps: int) -> Callable[[int], float]:
    """``f(step) -> multiplier``: a linear warm-up over the first ``warmup_steps`` optimiser steps (0: none).

    Step ``s`` (0-based) trains at ``min(1, (s + 1) / warmup_steps)`` of the rate, so no step is taken at lr 0 and
    step ``warmup_steps - 1`` is the first at the full rate; it multiplies the epoch schedule of :func:`lr_multiplier`.
    """
    if warmup_steps <= 0:
        return lambda step: 1.0
    return lambda step: min(1.0, (step + 1) / warmup_steps)
