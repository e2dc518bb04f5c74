"""Training-health checks: warn once when the first steps neither move the loss nor produce a gradient, and when
RS@k starts on its gradient plateau.

A network whose embeddings all start nearly identical (cosine similarities 0.99-1.0, e.g. black-on-white images fed
to a small CNN from scratch with GroupNorm or frozen BatchNorm) saturates the rank sigmoids of RS@k: the loss sits
at its maximum and the gradient is ~1e-17, so training runs to the end and learns nothing without an error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)

STUCK_ADVICE = (
    "likely causes: the embeddings are collapsed at initialisation (all similarities near 1 saturate the rank "
    "sigmoids: try model.layernorm=true, model.norm=batch without model.freeze_batchnorm, or a larger loss.tau_rank); "
    "the input needs inverting or normalising (dark strokes on white: data.options.invert=true, and "
    "data.options.mean/std); a pretrained backbone without its weights or transform (model.pretrained, "
    "data.transform); or a batch so large that every positive ranks far below k (raise loss.tau_k, e.g. 10)"
)


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """The L2 norm of all gradients of ``parameters`` together (0.0 when none has a gradient)."""
    squares = [p.grad.detach().float().pow(2).sum() for p in parameters if p.grad is not None]
    return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0


class StuckTrainingCheck:
    """Watches the first ``steps`` optimiser steps; if every loss stays within ``loss_tolerance`` of the first one
    and every gradient norm is below ``grad_tolerance``, logs one warning with the likely causes and fixes."""

    def __init__(self, steps: int = 5, loss_tolerance: float = 1e-4, grad_tolerance: float = 1e-6) -> None:
        self.steps, self.loss_tolerance, self.grad_tolerance = steps, loss_tolerance, grad_tolerance
        self.first_loss: float | None = None
        self.largest_grad = 0.0
        self.seen = 0
        self.stuck = True

    @property
    def watching(self) -> bool:
        """True while the check still needs steps (the trainer computes gradient norms only then)."""
        return self.seen < self.steps and self.stuck

    def observe(self, loss: float, grad_norm: float) -> bool:
        """Record one step; returns True when this step completes a stuck start (the warning is then logged)."""
        if not self.watching or not math.isfinite(loss):
            return False
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.largest_grad = max(self.largest_grad, grad_norm)
        self.stuck = abs(loss - self.first_loss) <= self.loss_tolerance and grad_norm < self.grad_tolerance
        self.seen += 1
        if self.stuck and self.seen == self.steps:
            logger.warning(
                "the model is not training: over the first %d steps the loss stayed at %.4f (within %g) with a "
                "gradient norm of at most %.1e; %s", self.steps, self.first_loss, self.loss_tolerance,
                self.largest_grad, STUCK_ADVICE,
            )
            return True
        return False


# Below this share of (query, positive) pairs with a gradient in the first batch, RS@k starts on its plateau (issue
# 30: 0.1 % at batch 4,096 from scratch). With temperatures below tau_k = k it collapsed from there; tau_k = k and
# tau_k annealed from the batch size both trained (BENCHMARKS.md, "The recall temperature").
PLATEAU_SHARE = 0.01
PLATEAU_EVIDENCE = (
    "from such a start RS@k with tau_k=1 reached 26.9 % recall@1 at batch 4,096 from scratch, against 56.6 % with "
    "tau_k=k and 60.0 % annealed (BENCHMARKS.md, 'The recall temperature')"
)


def plateau_warning(
    census: dict[str, float], batch_size: int, k: tuple[int, ...], tau_k: tuple[float, ...]
) -> str | None:
    """The warning for RS@k whose first batch's census (:func:`recallk.losses.census.positive_pair_census`) shows
    its plateau (fewer than ``PLATEAU_SHARE`` of the pairs with a gradient) while its temperatures are below
    tau_k = k (``tau_k[i] < k[i]`` for the largest k), else None."""
    share = census["pairs_with_gradient"]
    if share >= PLATEAU_SHARE or tau_k[-1] >= k[-1]:
        return None
    return (
        f"RS@k starts on its gradient plateau: {100 * share:.1f} % of the (query, positive) pairs of the first "
        f"batch have a gradient, since the positives rank {census['mean_rank']:,.0f} of {batch_size - 1:,} on "
        f"average, far beyond k={k[-1]} at tau_k={tau_k[-1]:g}; "
        + PLATEAU_EVIDENCE
        + f": set loss.tau_k=k (the default) or loss.tau_k_start={batch_size} (tau_k annealed from the batch size), "
        "or start from pretrained weights"
    )
