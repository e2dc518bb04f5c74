"""An annealed recall temperature for RS@k: tau_k from a large start value down to the loss's own.

RS@k counts a positive x of query q as "within k" through ``sigmoid((k - r(q, x)) / tau_k)``. At the paper's
tau_k = 1 a positive ranked more than a few dozen places beyond k gets no gradient, which is every positive of an
untrained network in a batch of thousands. With tau_k near the rank range of the batch (its size), the same term
is nearly linear in the rank, so every positive is pulled up; annealing brings the loss back to the paper's
recall@k surrogate:

    tau_k(t) = start * (end / start)^(t / T)   for step t < T (geometric, per k),   end for t >= T

with ``end`` the loss's tau_k (one value per k) and T the annealing steps. The schedule depends on the step only,
so a resumed run continues it exactly.
"""

from __future__ import annotations

from recallk.losses.input_checks import check_temperature
from recallk.losses.recall_at_k import RecallAtKLoss


class TauKAnnealing:
    """Sets ``loss.tau_k`` for each step: geometric from ``start`` to the loss's tau_k (as given at construction)
    over ``steps`` steps, then that tau_k.

    Args:
        loss: the :class:`RecallAtKLoss` whose temperature to anneal (or a wrapper holding it as ``.loss``).
        start: the first step's tau_k for every k (e.g. the batch size).
        steps: annealing steps (T); 0 keeps the loss's tau_k throughout.
    """

    def __init__(self, loss: RecallAtKLoss, start: float, steps: int) -> None:
        loss = getattr(loss, "loss", loss)
        if not isinstance(loss, RecallAtKLoss):
            raise ValueError(f"tau_k annealing applies to RS@k (RecallAtKLoss), not {type(loss).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        self.loss, self.start, self.steps = loss, check_temperature(start, "start"), steps
        self.end = loss.tau_k

    def value(self, step: int) -> tuple[float, ...]:
        """tau_k (one per k) at optimiser step ``step`` (0-based)."""
        if step >= self.steps:
            return self.end
        fraction = step / self.steps
        return tuple(self.start * (end / self.start) ** fraction for end in self.end)

    def set_step(self, step: int) -> tuple[float, ...]:
        """Give the loss the temperature of ``step``; returns it."""
        self.loss.tau_k = self.value(step)
        return self.loss.tau_k
