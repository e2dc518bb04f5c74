"""RS@k computed over chunks of queries, forward and backward, without ever holding an N x M matrix.

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

The computation walks over chunks Q of ``query_chunk`` queries: ``S_Q = E_Q R^T``, then the chunk's
(query, positive) pairs ``query_chunk`` at a time, once for H and once more (recomputing the sigmoids) for
``G_Q``, which is immediately turned into ``dE_Q += G_Q R`` and ``dR += G_Q^T E_Q``. All of a query's pairs lie
in its chunk, so ``G_Q`` is exact there. When the inputs need a gradient this happens during the forward pass
(the loss is a scalar: backward only scales dE and dR by the incoming gradient), which costs three
N x M x D matrix products instead of the four of recomputing ``S_Q`` in backward. No N x M matrix is ever
stored: extra memory is about ``4 * query_chunk * M`` floats (``S_Q``, one pair block, ``G_Q``, the positive
mask) plus the (N + M) x D embedding gradients, whatever N is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

DEFAULT_QUERY_CHUNK = 256


@dataclass(frozen=True)
class RankSettings:
    """The loss's hyper-parameters, as the kernel needs them."""

    k: tuple[int, ...]
    tau_rank: float
    tau_k: tuple[float, ...]
    rank_includes_query: bool
    query_chunk: int


@dataclass
class QuerySide:
    """Per-query constants: labels (N), own column c (N, -1 for none), excluded column e (N), positive count
    |P| (N), kappa = min(k, |D|) (N x K) and the recall normaliser min(kappa, |P|) (N x K)."""

    labels: Tensor
    self_col: Tensor
    excluded: Tensor
    num_pos: Tensor
    kappa: Tensor
    norm: Tensor

    def rows(self, start: int, stop: int) -> QuerySide:
        return QuerySide(*(t[start:stop] for t in (
            self.labels, self.self_col, self.excluded, self.num_pos, self.kappa, self.norm)))


def positive_counts(labels: Tensor, ref_labels: Tensor, self_col: Tensor) -> Tensor:
    """|P(i)|: database items with query i's label, its own column excepted (N, long); O(N + M) memory."""
    ref_sorted = torch.sort(ref_labels.long()).values
    query = labels.long()
    count = torch.searchsorted(ref_sorted, query, right=True) - torch.searchsorted(ref_sorted, query)
    own = (self_col >= 0) & (ref_labels.long()[self_col.clamp(min=0)] == query)
    return count - own.long()


def query_side(
    labels: Tensor, ref_labels: Tensor, self_col: Tensor, settings: RankSettings, dtype: torch.dtype
) -> QuerySide:
    """The per-query constants of the formulas in the module docstring."""
    excluded = torch.full_like(self_col, -1) if settings.rank_includes_query else self_col
    num_pos = positive_counts(labels, ref_labels, self_col)
    db_size = len(ref_labels) - (excluded >= 0).long()
    k = torch.tensor(settings.k, dtype=dtype, device=labels.device)
    kappa = torch.minimum(k[None, :], db_size[:, None].to(dtype))
    norm = torch.minimum(kappa, num_pos[:, None].to(dtype))
    return QuerySide(labels, self_col, excluded, num_pos, kappa, norm)


def _pairs(side: QuerySide, ref_labels: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of every (query, positive) pair of a chunk, row-major."""
    positives = side.labels[:, None] == ref_labels[None, :]
    own = torch.nonzero(side.self_col >= 0).squeeze(1)
    positives[own, side.self_col[own]] = False
    return positives.nonzero(as_tuple=True)


def _chunk(
    scaled: Tensor, side: QuerySide, ref_labels: Tensor, settings: RankSettings,
    soft: Tensor | None = None, dsoft: Tensor | None = None,
) -> Tensor:
    """One chunk of queries, ``scaled = S_Q / tau_rank`` (n x M).

    Without ``dsoft``: returns H (n x K). With ``dsoft`` = dterms/dH (n x K) and ``soft`` = H of the forward
    pass: returns G_Q = dterms/dS_Q (n x M).
    """
    n, num_db = scaled.shape
    tau_k = torch.tensor(settings.tau_k, dtype=scaled.dtype, device=scaled.device)
    pair_row, pair_col = _pairs(side, ref_labels)
    out = scaled.new_zeros(n, len(settings.k)) if dsoft is None else torch.zeros_like(scaled)
    flat = out.view(-1)
    for start in range(0, len(pair_row), settings.query_chunk):
        row, col = pair_row[start : start + settings.query_chunk], pair_col[start : start + settings.query_chunk]
        anchor = scaled[row, col]  # B: t_ix
        block = scaled.index_select(0, row).sub_(anchor[:, None]).sigmoid_()  # B x M
        excluded = side.excluded[row]
        has_excluded = excluded >= 0
        excluded_sig = torch.sigmoid(scaled[row, excluded.clamp(min=0)] - anchor) * has_excluded
        rank = 0.5 + block.sum(1) - excluded_sig  # B
        hits = torch.sigmoid((side.kappa[row] - rank[:, None]) / tau_k)  # B x K
        if dsoft is None:
            out.index_add_(0, row, hits)
            continue
        weight = -(dsoft[row] * hits * (1.0 - hits) / tau_k).sum(1) / settings.tau_rank  # g_ix / tau_rank
        slope = block.addcmul_(block, block, value=-1.0)  # sigmoid' = s (1 - s), in place
        excluded_slope = excluded_sig * (1.0 - excluded_sig)
        rank_slope = slope.sum(1) - 0.25 - excluded_slope  # sum over D(i) without x
        out.index_add_(0, row, slope.mul_(weight[:, None]))
        # undo the z = x (sigmoid'(0) = 1/4) and z = e_i terms added above; the positive's own column
        flat.index_add_(0, row * num_db + col, -weight * (0.25 + rank_slope))
        flat.index_add_(
            0, (row * num_db + excluded.clamp(min=0))[has_excluded], -(weight * excluded_slope)[has_excluded]
        )
    return out


def _terms_from_soft(soft: Tensor, side: QuerySide, num_valid: int) -> Tensor:
    """sum_{i valid} (1 - mean_k recall_ik) / num_valid for a set of queries."""
    valid = side.num_pos > 0
    recall = torch.minimum(soft, side.kappa)[valid] / side.norm[valid]
    return (valid.sum() - recall.mean(1).sum()) / num_valid


def _dsoft(soft: Tensor, side: QuerySide, num_valid: int, grad: Tensor) -> Tensor:
    """dterms/dH (n x K) times the incoming gradient; zero for queries without positives."""
    valid = (side.num_pos > 0)[:, None]
    active = (soft <= side.kappa) & valid
    return torch.where(active, -grad / (soft.shape[1] * num_valid * side.norm.clamp(min=1.0)), 0.0)


def _chunk_soft_and_grad(
    scaled: Tensor, side: QuerySide, ref_labels: Tensor, settings: RankSettings, num_valid: int, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """H (n x K) of one chunk and, when ``need_grad``, G_Q = dterms/dS_Q (n x M; None if no query has a positive)."""
    soft = _chunk(scaled, side, ref_labels, settings)
    if not need_grad or not bool((side.num_pos > 0).any()):
        return soft, None
    dsoft = _dsoft(soft, side, num_valid, torch.ones((), dtype=soft.dtype, device=soft.device))
    return soft, _chunk(scaled, side, ref_labels, settings, soft, dsoft)


class _EmbeddingTerms(torch.autograd.Function):
    """terms(E_Q R^T), chunk by chunk; the gradient is accumulated during the forward pass (no N x M is kept)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, queries: Tensor, database: Tensor, ref_labels: Tensor, side: QuerySide,
        settings: RankSettings, num_valid: int,
    ) -> Tensor:
        need_queries, need_database = ctx.needs_input_grad[:2]
        same = queries is database  # a batch ranked against itself: one gradient buffer for both roles
        grad_queries = torch.zeros_like(queries) if need_queries else None
        grad_database = grad_queries if same else torch.zeros_like(database) if need_database else None
        soft = queries.new_empty(len(queries), len(settings.k))
        for start in range(0, len(queries), settings.query_chunk):
            stop = min(start + settings.query_chunk, len(queries))
            rows = queries[start:stop]
            scaled = (rows / settings.tau_rank) @ database.T
            soft[start:stop], chunk_grad = _chunk_soft_and_grad(
                scaled, side.rows(start, stop), ref_labels, settings, num_valid, need_queries or need_database
            )
            if chunk_grad is None:
                continue
            if grad_queries is not None:
                grad_queries[start:stop].addmm_(chunk_grad, database)
            if grad_database is not None:
                grad_database.addmm_(chunk_grad.T, rows)
        ctx.grads = grad_queries, None if same else grad_database  # the tensor passed twice gets it once
        return _terms_from_soft(soft, side, num_valid)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad_queries, grad_database = (None if g is None else g * grad for g in ctx.grads)
        return grad_queries, grad_database, None, None, None, None


class _SimilarityTerms(torch.autograd.Function):
    """terms(S) for a given similarity matrix S (N x M), chunk by chunk over its rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, sim: Tensor, ref_labels: Tensor, side: QuerySide, settings: RankSettings, num_valid: int
    ) -> Tensor:
        grad_sim = torch.zeros_like(sim) if ctx.needs_input_grad[0] else None
        soft = sim.new_empty(len(sim), len(settings.k))
        for start in range(0, len(sim), settings.query_chunk):
            stop = min(start + settings.query_chunk, len(sim))
            soft[start:stop], chunk_grad = _chunk_soft_and_grad(
                sim[start:stop] / settings.tau_rank, side.rows(start, stop), ref_labels, settings, num_valid,
                grad_sim is not None,
            )
            if chunk_grad is not None:
                grad_sim[start:stop] = chunk_grad
        ctx.grad_sim = grad_sim
        return _terms_from_soft(soft, side, num_valid)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return ctx.grad_sim * grad, None, None, None, None


def embedding_terms(
    queries: Tensor, database: Tensor, ref_labels: Tensor, side: QuerySide, settings: RankSettings, num_valid: int
) -> Tensor:
    """The loss terms of ``queries`` (N x D) against ``database`` (M x D), differentiable w.r.t. both.

    ``side`` holds the queries' constants (:func:`query_side`); ``num_valid`` divides the sum (see the module
    docstring). Pass the same tensor as queries and database for a batch ranked against itself (one gradient
    buffer then serves both).
    """
    return _EmbeddingTerms.apply(queries, database, ref_labels, side, settings, num_valid)


def similarity_terms(
    sim: Tensor, ref_labels: Tensor, side: QuerySide, settings: RankSettings, num_valid: int
) -> Tensor:
    """The loss terms of the rows of ``sim`` (N x M), differentiable w.r.t. ``sim``."""
    return _SimilarityTerms.apply(sim, ref_labels, side, settings, num_valid)
