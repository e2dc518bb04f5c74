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
(query, positive) pairs in blocks of at most ``query_chunk`` pairs that hold whole queries. A block's sigmoids
sigmoid(t_iz - t_ix) (pairs x M) are evaluated once: their row sums give r and then H, a and g of the block's
queries, and the same block, turned in place into g_ix sigmoid'(t_iz - t_ix) / tau_rank, is added into ``G_Q``.
Only a query with more than ``query_chunk`` positives spans several blocks; its sigmoids are evaluated twice,
for H and then for the gradient. Terms of ``G_Q`` below the float's smallest normal number (1.2e-38 in float32)
are set to zero: such subnormal operands make the CPU's matrix products several times slower, and they are far
below the precision of dE and dR. ``G_Q`` is then turned into ``dE_Q += G_Q R`` and ``dR += G_Q^T E_Q``. All
of a query's pairs lie in its chunk, so ``G_Q`` is exact there. When the inputs need a gradient this happens
during the forward pass (the loss is a scalar: backward only scales dE and dR by the incoming gradient), which
costs three N x M x D matrix products instead of the four of recomputing ``S_Q`` in backward.

Work whose result is exactly zero is skipped: a positive ranked more than about 85 tau_k places past k (in
float32; about 700 tau_k in float64) has h (1 - h) = 0, so g_ix and every term of its row vanish. Such pairs
get no sigmoid' work, and queries whose pairs all vanish drop out of the two gradient products (the other
rows of sparse chunks are gathered over chunks until they fill a product). Early in training, when most
positives rank far down a large batch, this removes most of the gradient's cost; it changes no value.

No N x M matrix is ever stored: extra memory is about ``3.5 * query_chunk * M`` floats (``S_Q``, one pair
block, ``G_Q``, and up to a quarter chunk each of gathered rows of G and of a pair block's rows that have a
gradient) and the (row, column) indices of the chunk's pairs, plus the (N + M) x D embedding gradients,
whatever N is.
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
    """(row, column) of every (query, positive) pair of a chunk, row-major with ascending columns.

    From the database sorted by label (stable, so equal labels keep ascending columns): O(pairs + M log M)
    instead of comparing every query with every column."""
    ref_sorted, order = torch.sort(ref_labels.long(), stable=True)
    query = side.labels.long()
    first = torch.searchsorted(ref_sorted, query)
    count = torch.searchsorted(ref_sorted, query, right=True) - first
    row = torch.repeat_interleave(torch.arange(len(query), device=query.device), count)
    rank_in_class = torch.arange(len(row), device=row.device) - (torch.cumsum(count, 0) - count)[row]
    col = order[first[row] + rank_in_class]
    keep = col != side.self_col[row]
    return row[keep], col[keep]


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


@dataclass
class _PairBlock:
    """The sigmoids of a block of B (query, positive) pairs (row i, column x): ``sig`` (B x M) =
    sigmoid(t_i - t_ix), ``excluded_sig`` (B) = sigmoid(t_ie - t_ix) at the excluded column e_i (``excluded``;
    column 0 and a sigmoid of 0 for queries without one) and the soft hits h (B x K)."""

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
    scaled: Tensor, side: QuerySide, row: Tensor, col: Tensor, tau_k: Tensor, buffer: Tensor
) -> _PairBlock:
    """The sigmoids and soft hits of the pairs (row, col), ``sig`` written into ``buffer`` (B x M)."""
    anchor = scaled[row, col]  # B: t_ix
    sig = torch.index_select(scaled, 0, row, out=buffer).sub_(anchor[:, None]).sigmoid_()
    excluded = side.excluded[row].clamp(min=0)
    excluded_sig = torch.sigmoid(scaled[row, excluded] - anchor) * (side.excluded[row] >= 0)
    rank = 0.5 + sig.sum(1) - excluded_sig  # B
    hits = torch.sigmoid((side.kappa[row] - rank[:, None]) / tau_k)  # B x K
    return _PairBlock(row, col, excluded, sig, excluded_sig, hits)


def pair_weights(block: _PairBlock, dsoft: Tensor, tau_k: Tensor, tau_rank: float) -> tuple[Tensor, Tensor]:
    """g_ix / tau_rank of the block's pairs (B), given dsoft = dterms/dH of its rows, and which pairs have a
    gradient (B, bool): a weight below 4x the float's smallest normal number has every term g_ix sigmoid'
    (sigmoid' <= 1/4) of its row flushed to zero."""
    weight = -(dsoft[block.row] * block.hits * (1.0 - block.hits) / tau_k).sum(1) / tau_rank
    return weight, weight >= 4.0 * torch.finfo(weight.dtype).tiny


def _add_gradient(
    grad: Tensor, block: _PairBlock, dsoft: Tensor, tau_k: Tensor, tau_rank: float, active_rows: Tensor
) -> None:
    """grad += the block's part of G_Q = dterms/dS_Q, given dsoft = dterms/dH of its rows; overwrites block.sig.

    A pair without gradient (:func:`pair_weights`) is left out when such pairs are more than three quarters of
    the block (else its weight is set to zero), so that the copy of the others stays below a quarter of the
    block. The rows of ``grad`` with a pair that has a gradient are marked in ``active_rows`` (n, bool)."""
    weight, active = pair_weights(block, dsoft, tau_k, tau_rank)
    tiny = torch.finfo(weight.dtype).tiny
    num_active = int(active.sum())
    if num_active == 0:
        return
    active_rows[block.row[active]] = True
    if 4 * num_active < len(active):
        keep = active.nonzero().squeeze(1)
        block, weight = block.select(keep), weight[keep]
    else:
        weight = weight.masked_fill_(~active, 0.0)
    # Subnormal numbers (below the float's smallest normal, ``tiny``) make the CPU's arithmetic and matrix
    # products several times slower. So on the CPU the sigmoids s whose terms g_ix s (1 - s) / tau_rank would
    # fall below tiny in every row of the block, or whose square would (s < sqrt(tiny): terms below 1e-19
    # g_ix / tau_rank, nothing next to the precision of dE and dR), are set to zero before any product (GPUs
    # handle subnormals in hardware, and the cut would cost a host sync there); on every device the terms
    # still below tiny are set to zero after it.
    sig = block.sig
    if sig.device.type == "cpu":
        sig = torch.nn.functional.threshold_(sig, max(tiny**0.5, tiny / float(weight.max())), 0.0)
    slope = sig.addcmul_(sig, sig, value=-1.0)  # sigmoid' = s (1 - s), in place
    excluded_slope = block.excluded_sig * (1.0 - block.excluded_sig)
    rank_slope = slope.sum(1) - 0.25 - excluded_slope  # sum over D(i) without x
    terms = torch.nn.functional.threshold_(slope.mul_(weight[:, None]), tiny, 0.0)  # g_ix sigmoid' >= 0
    grad.index_add_(0, block.row, terms)
    # undo the z = x (sigmoid'(0) = 1/4) and z = e_i terms added above (the latter is -0.0 without e_i)
    flat, num_db = grad.view(-1), grad.shape[1]
    flat.index_add_(0, block.row * num_db + block.col, -weight * (0.25 + rank_slope))
    flat.index_add_(0, block.row * num_db + block.excluded, -weight * excluded_slope)


def _query_groups(num_pos: list[int], pair_block: int) -> list[tuple[int, int, int, int]]:
    """Consecutive queries whose pairs fit in ``pair_block``: (first row, end row, first pair, end pair) each.

    A query with more pairs than ``pair_block`` is a group of its own (its pairs then go in several blocks)."""
    groups, first_row, first_pair, pairs = [], 0, 0, 0
    for row, count in enumerate(num_pos):
        if pairs + count > pair_block and row > first_row:
            groups.append((first_row, row, first_pair, first_pair + pairs))
            first_row, first_pair, pairs = row, first_pair + pairs, 0
        pairs += count
    groups.append((first_row, len(num_pos), first_pair, first_pair + pairs))
    return groups


@dataclass
class _ChunkGradient:
    """G_Q = dterms/dS_Q of a chunk (n x M) and its rows that are not all zero (``rows``, n, bool)."""

    values: Tensor
    rows: Tensor


def _chunk_soft_and_grad(
    scaled: Tensor, side: QuerySide, ref_labels: Tensor, settings: RankSettings, num_valid: int, need_grad: bool
) -> tuple[Tensor, _ChunkGradient | None]:
    """H (n x K) of one chunk, ``scaled = S_Q / tau_rank`` (n x M), and, when ``need_grad``, G_Q = dterms/dS_Q
    (None if no query has a positive).

    The pairs go in blocks of at most ``query_chunk`` pairs holding whole queries, so that a block's H, and
    then its gradient, come from one evaluation of its sigmoids; only a query with more pairs than a block
    (its pairs span several blocks) has them evaluated twice, once for H and once for the gradient.
    """
    n, num_db = scaled.shape
    tau_k = torch.tensor(settings.tau_k, dtype=scaled.dtype, device=scaled.device)
    pair_row, pair_col = _pairs(side, ref_labels)
    soft = scaled.new_zeros(n, len(settings.k))
    grad = torch.zeros_like(scaled) if need_grad and bool((side.num_pos > 0).any()) else None
    size = settings.query_chunk  # pairs per block
    buffer = scaled.new_empty(min(size, len(pair_row)), num_db)
    one = torch.ones((), dtype=scaled.dtype, device=scaled.device)
    dsoft = torch.zeros_like(soft)
    active_rows = torch.zeros(n, dtype=torch.bool, device=scaled.device)
    for first_row, end_row, first_pair, end_pair in _query_groups(side.num_pos.tolist(), size):
        starts = range(first_pair, end_pair, size)

        def block(start: int, end_pair: int = end_pair) -> _PairBlock:
            stop = min(start + size, end_pair)
            rows, cols = pair_row[start:stop], pair_col[start:stop]
            return _pair_block(scaled, side, rows, cols, tau_k, buffer[: stop - start])

        for start in starts:
            kept = block(start)
            soft.index_add_(0, kept.row, kept.hits)
        if grad is None:
            continue
        dsoft[first_row:end_row] = _dsoft(soft[first_row:end_row], side.rows(first_row, end_row), num_valid, one)
        for start in starts:  # the kept block when the group is one block, else recomputed block by block
            pairs = kept if len(starts) == 1 else block(start)
            _add_gradient(grad, pairs, dsoft, tau_k, settings.tau_rank, active_rows)
    return soft, None if grad is None else _ChunkGradient(grad, active_rows)


class _GradientProducts:
    """dE += G R and dR += G^T E over the nonzero rows of the chunks' G_Q, in matrix products of about
    ``rows_per_product`` rows.

    A query whose positives all lie far down its ranking has an all-zero row of G_Q (every term flushed, see
    :func:`_add_gradient`); leaving it out is exact. A chunk whose rows are all nonzero goes straight into the
    products, and so do the nonzero rows of a chunk with more than ``rows_per_product`` of them; those of the
    others are copied into a buffer (``rows_per_product`` x M) until it is full, so that sparse chunks do not
    pay one pass over dR each."""

    def __init__(
        self, queries: Tensor, database: Tensor, grad_queries: Tensor | None, grad_database: Tensor | None,
        rows_per_product: int,
    ) -> None:
        self.queries, self.database = queries, database
        self.grad_queries, self.grad_database = grad_queries, grad_database
        self.rows_per_product = rows_per_product
        self.values: Tensor | None = None  # the gathered rows of G (allocated when first needed)
        self.index = torch.empty(rows_per_product, dtype=torch.long, device=queries.device)  # their query rows
        self.num_pending = 0

    def add(self, chunk_grad: _ChunkGradient, start: int) -> None:
        """The products of a chunk whose first query is row ``start``."""
        if bool(chunk_grad.rows.all()):
            self._products(chunk_grad.values, slice(start, start + len(chunk_grad.values)))
            return
        index = chunk_grad.rows.nonzero().squeeze(1)
        if len(index) == 0:
            return
        if len(index) > self.rows_per_product:
            self._products(chunk_grad.values[index], index + start)
            return
        if self.num_pending + len(index) > self.rows_per_product:
            self.flush()
        if self.values is None:
            self.values = chunk_grad.values.new_empty(self.rows_per_product, chunk_grad.values.shape[1])
        first, stop = self.num_pending, self.num_pending + len(index)
        torch.index_select(chunk_grad.values, 0, index, out=self.values[first:stop])
        self.index[first:stop] = index + start
        self.num_pending = stop

    def flush(self) -> None:
        """The products of the gathered rows."""
        if self.values is not None and self.num_pending:
            count, self.num_pending = self.num_pending, 0
            self._products(self.values[:count], self.index[:count])

    def _products(self, values: Tensor, rows: slice | Tensor) -> None:
        if self.grad_queries is not None:
            if isinstance(rows, slice):
                self.grad_queries[rows].addmm_(values, self.database)
            else:
                self.grad_queries.index_add_(0, rows, values @ self.database)
        if self.grad_database is not None:
            self.grad_database.addmm_(values.T, self.queries[rows])


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
        products = _GradientProducts(
            queries, database, grad_queries, grad_database, max(1, settings.query_chunk // 4)
        )
        for start in range(0, len(queries), settings.query_chunk):
            stop = min(start + settings.query_chunk, len(queries))
            scaled = (queries[start:stop] / settings.tau_rank) @ database.T
            soft[start:stop], chunk_grad = _chunk_soft_and_grad(
                scaled, side.rows(start, stop), ref_labels, settings, num_valid, need_queries or need_database
            )
            del scaled  # freed before the products, so the gathered rows of G take its place
            if chunk_grad is not None:
                products.add(chunk_grad, start)
        products.flush()
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
                grad_sim[start:stop] = chunk_grad.values
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
