"""Where a training process spends its time: seconds per phase of the loop, summed into ``summary.json``.

Phases: ``data`` (waiting for the next batch), ``forward_backward`` (inputs to the device, forward passes, loss
and backward, up to the loss value, which waits for the device), ``optimizer`` (clipping, the optimiser and EMA
updates, the schedule; on CUDA it ends with a device synchronisation so that its kernels are counted here and not
in the next phase) and ``evaluation`` (validation and the final tests). The process's first step is counted whole
as ``first_step`` (loader start-up, ``torch.compile``, autotuning) and kept out of the other phases, so that they
describe the steady state. The stages inside ``forward_backward`` of the multistage engine are measured by
``benchmarks/train_loop.py``'s bare step.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

Item = TypeVar("Item")


class PhaseClock:
    """Seconds since the last mark, added to a phase by :meth:`lap`; ``seconds`` holds the sums; ``steps`` counts
    the steps ended by :meth:`step_done`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.steps = 0
        self._mark = time.perf_counter()

    def mark(self) -> None:
        self._mark = time.perf_counter()

    def lap(self, phase: str, sync: bool = False) -> None:
        """Add the time since the last mark (or lap) to ``phase`` (to ``first_step`` during the first step, except
        evaluation); ``sync``: wait for the CUDA device first."""
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.steps == 0 and phase != "evaluation":
            phase = "first_step"
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._mark
        self._mark = now

    def step_done(self) -> None:
        """End a training step: its optimiser phase (after a device synchronisation on CUDA) is lapped."""
        self.lap("optimizer", sync=True)
        self.steps += 1

    def timed(self, items: Iterable[Item], phase: str) -> Iterator[Item]:
        """``items``, the time spent waiting for each added to ``phase``."""
        iterator = iter(items)
        while True:
            self.mark()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.lap(phase)
            yield item

    def summary(self) -> dict[str, float]:
        """The sums in seconds, rounded to milliseconds."""
        return {phase: round(seconds, 3) for phase, seconds in self.seconds.items()}
