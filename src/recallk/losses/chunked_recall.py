"""RS@k's kernel for the query-chunked walk (:mod:`recallk.losses.chunked_walk`): its per-query soft hits and
their closed-form gradient, without ever holding an N x M matrix.

Queries i (N rows) are ranked against a database of M items. ``c_i`` is the database column of query i itself
(or -1), never a positive of i; ``e_i`` is the column left out of i's rank sums (``c_i``, or -1 when the query
counts in its own ranks). With ``s_i = e_i R^T`` the similarity row of query i and ``t = s / tau_rank``:

    P(i)     = {x : y_x = y_i, x != c_i},    D(i) = every column but e_i,    kappa_ik = min(k, |D(i)|)
    r_ix     = 1 + sum_{z in D(i), z != x} sigmoid(t_iz - t_ix)
             = 1/2 + sum_z sigmoid(t_iz - t_ix) - [e_i >= 0] sigmoid(t_ie - t_ix)
    H_ik     = sum_{x in P(i)} sigmoid((kappa_ik - r_ix) / tau_k)
    recall_ik = min(H_ik, kappa_ik) / min(kappa_ik, |P(i)|)
    terms    = sum_{i : |P(i)| > 0} (1 - mean_k recall_ik) / num_valid

``num_valid`` is given by the caller (the number of queries with a positive in the whole, possibly sharded,
batch), so terms of disjoint query sets add up to the loss. The gradient is written in closed form: with
a_ik = dterms/dH_ik = -[H_ik <= kappa_ik] / (K num_valid min(kappa_ik, |P(i)|)) and h = sigmoid((kappa - r)/tau_k),

    g_ix = dterms/dr_ix = -sum_k a_ik h_ixk (1 - h_ixk) / tau_k
    G_iz = dterms/ds_iz = sum_{x in P(i)} g_ix sigmoid'(t_iz - t_ix) / tau_rank      (z in D(i), z != x)
    G_ix -= g_ix sum_{z in D(i), z != x} sigmoid'(t_iz - t_ix) / tau_rank

The walk takes chunks Q of ``query_chunk`` queries: ``S_Q = E_Q R^T``, then the chunk's
(query, positive) pairs in blocks of at most ``query_chunk`` pairs that hold whole queries. A block's sigmoids
sigmoid(t_iz - t_ix) (pairs x M) are evaluated once: their row sums give r and then H, a and g of the block's
queries, and the same block, turned in place into g_ix sigmoid'(t_iz - t_ix) / tau_rank, is added into ``G_Q``.
Only a query with more than ``query_chunk`` positives spans several blocks; its sigmoids are evaluated twice,
for H and then for the gradient. Terms of ``G_Q`` below the float's smallest normal number (1.2e-38 in float32)
are set to zero: such subnormal operands make the CPU's matrix products several times slower, and they are far
below the precision of dE and dR. The walk then turns ``G_Q`` into ``dE_Q += G_Q R`` and ``dR += G_Q^T E_Q``.

In the compact walk (the CPU's default; :mod:`recallk.losses.chunked_walk`) work whose result is exactly zero
is skipped: a positive ranked more than about 85 tau_k places past k (in float32; about 700 tau_k in float64)
has h (1 - h) = 0, so g_ix and every term of its row vanish. Such pairs get no sigmoid' work, and queries
whose pairs all vanish drop out of the two gradient products (the other rows of sparse chunks are gathered
over chunks until they fill a product). Early in training, when most positives rank far down a large batch,
this removes most of the gradient's cost; it changes no value. The sync-free walk computes them (as zeros),
and gives the padded slots of the positive table zero soft hits, so they add nothing.

No N x M matrix is ever stored: extra memory is about ``3.5 * query_chunk * M`` floats (``S_Q``, one pair
block, ``G_Q``, and up to a quarter chunk each of gathered rows of G and of a pair block's rows that have a
gradient) and the (row, column) indices of the chunk's pairs, plus the (N + M) x D embedding gradients,
whatever N is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from recallk.losses.chunked_walk import (
    DEFAULT_QUERY_CHUNK,
    ChunkGradient,
    QuerySide,
    chunk_pairs,
    embedding_terms,
    pair_counts,
    pair_sigmoids,
    positive_index,
    query_groups,
    scatter_pair_terms,
    similarity_terms,
)

__all__ = ["DEFAULT_QUERY_CHUNK", "RankSettings", "embedding_terms", "query_side", "similarity_terms"]


@dataclass(frozen=True)
class RankSettings:
    """The loss's hyper-parameters, as the kernel needs them; RS@k's :class:`~recallk.losses.chunked_walk.ChunkKernel`
    (statistics: the soft hits H, N x K)."""

    k: tuple[int, ...]
    tau_rank: float
    tau_k: tuple[float, ...]
    rank_includes_query: bool
    query_chunk: int
    sync_free: bool = False

    @property
    def scale(self) -> float:
        return self.tau_rank

    def query_side(self, labels: Tensor, ref_labels: Tensor, self_col: Tensor, dtype: torch.dtype) -> QuerySide:
        return query_side(labels, ref_labels, self_col, self, dtype)

    def stats_width(self) -> int:
        return len(self.k)

    def chunk(
        self, scaled: Tensor, side: QuerySide, ref_labels: Tensor, num_valid: int, need_grad: bool
    ) -> tuple[Tensor, ChunkGradient | None]:
        return _chunk_soft_and_grad(scaled, side, self, num_valid, need_grad)

    def terms(self, stats: Tensor, side: QuerySide, num_valid: int) -> Tensor:
        return _terms_from_soft(stats, side, num_valid)


def query_side(
    labels: Tensor, ref_labels: Tensor, self_col: Tensor, settings: RankSettings, dtype: torch.dtype
) -> QuerySide:
    """The per-query constants of the formulas in the module docstring."""
    excluded = torch.full_like(self_col, -1) if settings.rank_includes_query else self_col
    positives = positive_index(labels, ref_labels, self_col)
    db_size = len(ref_labels) - (excluded >= 0).long()
    k = torch.tensor(settings.k, dtype=dtype, device=labels.device)
    kappa = torch.minimum(k[None, :], db_size[:, None].to(dtype))
    norm = torch.minimum(kappa, positives.num_pos[:, None].to(dtype))
    tau_k = torch.tensor(settings.tau_k, dtype=dtype, device=labels.device)
    return QuerySide(labels, self_col, excluded, positives.num_pos, kappa, norm, positives.class_start,
                     positives.own_slot, positives.index, tau_k)


def _terms_from_soft(soft: Tensor, side: QuerySide, num_valid: int) -> Tensor:
    """sum_{i valid} (1 - mean_k recall_ik) / num_valid for a set of queries (masked, not indexed: no sync)."""
    valid = side.num_pos > 0
    recall = (torch.minimum(soft, side.kappa) / side.norm.clamp(min=1.0)).mean(1)
    return (valid.sum() - (recall * valid).sum()) / num_valid


def _dsoft(soft: Tensor, side: QuerySide, num_valid: int, grad: Tensor) -> Tensor:
    """dterms/dH (n x K) times the incoming gradient; zero for queries without positives."""
    valid = (side.num_pos > 0)[:, None]
    active = (soft <= side.kappa) & valid
    return torch.where(active, -grad / (soft.shape[1] * num_valid * side.norm.clamp(min=1.0)), 0.0)


@dataclass
class _PairBlock:
    """The sigmoids of a block of B (query, positive) pairs (row i, column x): ``sig`` (B x M) =
    sigmoid(t_i - t_ix), ``excluded_sig`` (B) = sigmoid(t_ie - t_ix) at the excluded column e_i (``excluded``;
    column 0 and a sigmoid of 0 for queries without one) and the soft hits h (B x K; 0 for a padded slot)."""

    row: Tensor
    col: Tensor
    excluded: Tensor
    sig: Tensor
    excluded_sig: Tensor
    hits: Tensor

    def select(self, index: Tensor) -> _PairBlock:
        """The pairs at ``index`` (their sigmoids copied)."""
        return _PairBlock(*(t[index] for t in (
            self.row, self.col, self.excluded, self.sig, self.excluded_sig, self.hits)))


def _pair_block(
    scaled: Tensor, side: QuerySide, row: Tensor, col: Tensor, real: Tensor | None, buffer: Tensor
) -> _PairBlock:
    """The sigmoids and soft hits of the pairs (row, col), ``sig`` written into ``buffer`` (B x M); the hits
    of padded slots (``real`` False) are 0, so they add nothing to H and have no gradient."""
    sig, excluded_sig, rank = pair_sigmoids(scaled, side, row, col, buffer)
    excluded = side.excluded[row].clamp(min=0)
    hits = torch.sigmoid((side.kappa[row] - rank[:, None]) / side.tau_k)  # B x K
    if real is not None:
        hits = hits.mul_(real[:, None])
    return _PairBlock(row, col, excluded, sig, excluded_sig, hits)


def pair_weights(block: _PairBlock, dsoft: Tensor, tau_k: Tensor, tau_rank: float) -> tuple[Tensor, Tensor]:
    """g_ix / tau_rank of the block's pairs (B), given dsoft = dterms/dH of its rows, and which pairs have a
    gradient (B, bool): a weight below 4x the float's smallest normal number has every term g_ix sigmoid'
    (sigmoid' <= 1/4) of its row flushed to zero."""
    weight = -(dsoft[block.row] * block.hits * (1.0 - block.hits) / tau_k).sum(1) / tau_rank
    return weight, weight >= 4.0 * torch.finfo(weight.dtype).tiny


def _add_gradient(
    grad: Tensor, block: _PairBlock, dsoft: Tensor, tau_k: Tensor, tau_rank: float, active_rows: Tensor | None
) -> None:
    """grad += the block's part of G_Q = dterms/dS_Q, given dsoft = dterms/dH of its rows; overwrites block.sig.

    The weight of a pair without gradient (:func:`pair_weights`) is set to zero. In the compact walk
    (``active_rows`` given) such pairs are left out instead when they are more than three quarters of the
    block, so that the copy of the others stays below a quarter of the block, and the rows of ``grad`` with a
    pair that has a gradient are marked in ``active_rows`` (n, bool); the sync-free walk (None) never looks."""
    weight, active = pair_weights(block, dsoft, tau_k, tau_rank)
    tiny = torch.finfo(weight.dtype).tiny
    sig = block.sig
    if active_rows is not None:
        num_active = int(active.sum())
        if num_active == 0:
            return
        active_rows[block.row[active]] = True
        if 4 * num_active < len(active):
            keep = active.nonzero().squeeze(1)
            block, weight, active = block.select(keep), weight[keep], active[keep]
            sig = block.sig
        # Subnormal numbers (below the float's smallest normal, ``tiny``) make the CPU's arithmetic and matrix
        # products several times slower. So the sigmoids s whose terms g_ix s (1 - s) / tau_rank would fall
        # below tiny in every row of the block, or whose square would (s < sqrt(tiny): terms below 1e-19
        # g_ix / tau_rank, nothing next to the precision of dE and dR), are set to zero before any product
        # (GPUs handle subnormals in hardware); on every device the terms still below tiny are set to zero
        # after it.
        if sig.device.type == "cpu":
            sig = torch.nn.functional.threshold_(sig, max(tiny**0.5, tiny / float(weight.max())), 0.0)
    weight = weight.masked_fill_(~active, 0.0)
    slope = sig.addcmul_(sig, sig, value=-1.0)  # sigmoid' = s (1 - s), in place
    excluded_slope = block.excluded_sig * (1.0 - block.excluded_sig)
    rank_slope = slope.sum(1) - 0.25 - excluded_slope  # sum over D(i) without x
    terms = torch.nn.functional.threshold_(slope.mul_(weight[:, None]), tiny, 0.0)  # g_ix sigmoid' >= 0
    # the z = x (sigmoid'(0) = 1/4) and z = e_i terms are undone (the latter is -0.0 without e_i)
    scatter_pair_terms(grad, block.row, block.col, block.excluded, terms, -weight * (0.25 + rank_slope),
                       -weight * excluded_slope)


def _chunk_soft_and_grad(
    scaled: Tensor, side: QuerySide, settings: RankSettings, num_valid: int, need_grad: bool
) -> tuple[Tensor, ChunkGradient | None]:
    """H (n x K) of one chunk, ``scaled = S_Q / tau_rank`` (n x M), and, when ``need_grad``, G_Q = dterms/dS_Q
    (None if no query has a positive; the sync-free walk returns it anyway, zero).

    The pairs go in blocks of at most ``query_chunk`` pairs holding whole queries, so that a block's H, and
    then its gradient, come from one evaluation of its sigmoids; only a query with more pairs than a block
    (its pairs span several blocks) has them evaluated twice, once for H and once for the gradient.
    """
    n, num_db = scaled.shape
    padded = settings.sync_free
    pair_row, pair_col, pair_real = chunk_pairs(side, padded)
    soft = scaled.new_zeros(n, len(settings.k))
    grad = torch.zeros_like(scaled) if need_grad and (padded or bool((side.num_pos > 0).any())) else None
    size = settings.query_chunk  # pairs per block
    buffer = scaled.new_empty(min(size, len(pair_row)), num_db)
    one = torch.ones((), dtype=scaled.dtype, device=scaled.device)
    dsoft = torch.zeros_like(soft)
    active_rows = None if padded else torch.zeros(n, dtype=torch.bool, device=scaled.device)
    for first_row, end_row, first_pair, end_pair in query_groups(pair_counts(side, padded), size):
        starts = range(first_pair, end_pair, size)

        def block(start: int, end_pair: int = end_pair) -> _PairBlock:
            stop = min(start + size, end_pair)
            real = None if pair_real is None else pair_real[start:stop]
            return _pair_block(scaled, side, pair_row[start:stop], pair_col[start:stop], real,
                               buffer[: stop - start])

        for start in starts:
            kept = block(start)
            soft.index_add_(0, kept.row, kept.hits)
        if grad is None:
            continue
        dsoft[first_row:end_row] = _dsoft(soft[first_row:end_row], side.rows(first_row, end_row), num_valid, one)
        for start in starts:  # the kept block when the group is one block, else recomputed block by block
            pairs = kept if len(starts) == 1 else block(start)
            _add_gradient(grad, pairs, dsoft, side.tau_k, settings.tau_rank, active_rows)
    return soft, None if grad is None else ChunkGradient(grad, active_rows)
