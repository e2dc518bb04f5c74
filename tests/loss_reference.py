"""Brute-force references for RS@k, written as plain loops straight from the formulas (float64, slow), and a probe
of the largest tensor a computation creates (the losses' memory tests)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def clamped_sigmoid(x: torch.Tensor, temp: float) -> torch.Tensor:
    """The authors' sigmoid: the exponent is clamped to [-50, 50] before exponentiation."""
    return 1.0 / (1.0 + torch.exp(torch.clamp(-x / temp, min=-50, max=50)))


def rsk_loop(
    sim: torch.Tensor,
    labels: list[int],
    ref_labels: list[int] | None = None,
    self_index: list[int] | None = None,
    k: tuple[int, ...] = (1, 2, 4, 8, 16),
    tau_rank: float = 0.01,
    tau_k: float | tuple[float, ...] | None = None,
    rank_includes_query: bool = False,
    sigmoid=None,
) -> torch.Tensor:
    """RS@k with one Python loop per query, positive, database item and k (``tau_k``: one value, one per k, or
    None for tau_k = k, RecallAtKLoss's default).

    ``sim`` is queries x database; ``self_index[q]`` is the database column of query q (None: the square case,
    column q). Differentiable through autograd.
    """
    sig = sigmoid or (lambda x, t: torch.sigmoid(x / t))
    num_q, num_db = sim.shape
    ref_labels = labels if ref_labels is None else ref_labels
    if self_index is None:
        self_index = list(range(num_q)) if num_q == num_db and ref_labels is labels else [-1] * num_q
    taus = tuple(map(float, k)) if tau_k is None else tau_k if isinstance(tau_k, (tuple, list)) else (tau_k,) * len(k)
    total, used = 0.0, 0
    for q in range(num_q):
        own = self_index[q]
        positives = [x for x in range(num_db) if x != own and ref_labels[x] == labels[q]]
        if not positives:
            continue
        database = [z for z in range(num_db) if rank_includes_query or z != own]
        recalls = []
        for kk, tau in zip(k, taus):
            k_eff = min(kk, len(database))
            soft_hits = 0.0
            for x in positives:
                rank = 1.0
                for z in database:
                    if z != x:
                        rank = rank + sig(sim[q, z] - sim[q, x], tau_rank)
                soft_hits = soft_hits + sig(k_eff - rank, tau)
            recalls.append(torch.clamp(soft_hits, max=k_eff) / min(k_eff, len(positives)))
        total = total + sum(recalls) / len(recalls)
        used += 1
    return 1.0 - total / used


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation creates (forward and backward, temporaries included)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out
