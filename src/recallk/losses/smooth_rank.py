"""Smoothed ranks of positives, computed in bounded memory with a hand-written backward.

For a similarity matrix ``S`` (N x M, queries x database) and P (query, positive) pairs ``(q_p, x_p)``, the
smoothed rank of pair p is

    r_p = 1 + sum_{z in D_p} sigmoid((S[q_p, z] - S[q_p, x_p]) / tau)

where the database ``D_p`` is every column except ``x_p`` and, when ``self_col[q_p] >= 0``, except the column
``self_col[q_p]`` (the query itself). Autograd over this expression would keep the P x M tensor of all
(query, positive, item) triples alive until the backward pass. Here forward and backward both walk over blocks
of queries that have the same number p of positives, materialising at most ``chunk_elements`` entries of a
(queries x p x M) block at a time, so the extra memory is O(chunk) on top of S and its gradient:

    dr_p / dS[q_p, z]   =  sigmoid'(d_pz) / tau                  for z in D_p
    dr_p / dS[q_p, x_p] = -sum_{z in D_p} sigmoid'(d_pz) / tau
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_ELEMENTS = 1 << 22


@dataclass
class _Block:
    """Queries with the same number of positives: rows (n), positive columns (n x p), pair ids (n x p)."""

    rows: torch.Tensor
    positives: torch.Tensor
    pair_ids: torch.Tensor


def _blocks(query: torch.Tensor, positive: torch.Tensor, num_rows: int, num_cols: int, chunk_elements: int) -> Iterator[_Block]:
    """Split the pairs into blocks of queries with equal positive counts, each under ``chunk_elements``."""
    order = torch.argsort(query, stable=True)
    counts = torch.bincount(query, minlength=num_rows)
    starts = torch.cumsum(counts, 0) - counts
    for p in torch.unique(counts[counts > 0]).tolist():
        rows = torch.nonzero(counts == p).squeeze(1)
        pair_ids = order[starts[rows, None] + torch.arange(p, device=query.device)]
        step = max(1, chunk_elements // (p * max(num_cols, 1)))
        for i in range(0, len(rows), step):
            ids = pair_ids[i : i + step]
            yield _Block(rows[i : i + step], positive[ids], ids)


def _sigmoid_block(sim: torch.Tensor, tau: float, block: _Block, self_col: torch.Tensor) -> torch.Tensor:
    """sigmoid((S[q, z] - S[q, x]) / tau) for a block (n x p x M), zero at z = x and at z = self_col[q] >= 0."""
    rows = sim.index_select(0, block.rows).div_(tau)  # n x M
    sig = (rows[:, None, :] - rows.gather(1, block.positives)[:, :, None]).sigmoid_()
    sig.scatter_(2, block.positives[:, :, None], 0.0)
    own = self_col[block.rows]
    keep = torch.nonzero(own >= 0).squeeze(1)
    sig[keep, :, own[keep]] = 0.0
    return sig


class _SmoothRank(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        sim: torch.Tensor,
        query: torch.Tensor,
        positive: torch.Tensor,
        self_col: torch.Tensor,
        tau: float,
        chunk_elements: int,
    ) -> torch.Tensor:
        ranks = torch.empty(len(query), dtype=sim.dtype, device=sim.device)
        for block in _blocks(query, positive, sim.shape[0], sim.shape[1], chunk_elements):
            ranks[block.pair_ids] = 1.0 + _sigmoid_block(sim, tau, block, self_col).sum(2)
        ctx.save_for_backward(sim, query, positive, self_col)
        ctx.tau = tau
        ctx.chunk_elements = chunk_elements
        return ranks

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_ranks: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        sim, query, positive, self_col = ctx.saved_tensors
        grad = torch.zeros_like(sim)
        for block in _blocks(query, positive, sim.shape[0], sim.shape[1], ctx.chunk_elements):
            sig = _sigmoid_block(sim, ctx.tau, block, self_col)
            slope = sig.mul_(1.0 - sig)  # sigmoid', zero outside each pair's database
            g = grad_ranks[block.pair_ids]  # n x p
            rows = torch.bmm(g[:, None, :], slope).squeeze(1)  # n x M: sum_p g_p sigmoid'_pz
            rows.scatter_add_(1, block.positives, -g * slope.sum(2))
            grad.index_add_(0, block.rows, rows)
        return grad.div_(ctx.tau), None, None, None, None, None


def smooth_rank(
    sim: torch.Tensor,
    query: torch.Tensor,
    positive: torch.Tensor,
    self_col: torch.Tensor,
    tau: float,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Smoothed rank of each (query, positive) pair; differentiable w.r.t. ``sim``.

    Args:
        sim: N x M similarities, queries by database items.
        query: P row indices into ``sim`` (long); a (query, positive) pair appears at most once.
        positive: P column indices of the positive of each pair (long).
        self_col: N column indices, one per row of ``sim``: the column to leave out of that query's rank sums
            (the query itself), or -1 for none.
        tau: temperature of the sigmoid that replaces the step function.
        chunk_elements: at most this many (query x positive x database) entries are materialised at once.

    Returns:
        P ranks, ``1 + sum_z sigmoid((sim[q, z] - sim[q, x]) / tau)`` over each pair's database.
    """
    return _SmoothRank.apply(sim, query, positive, self_col, tau, chunk_elements)
