"""The query-chunked walk shared by recallk's ranking losses (RS@k, Smooth-AP, FastAP), forward and backward,
without ever holding an N x M matrix.

Queries i (N rows, embeddings E) are ranked against a database of M items (embeddings R). ``c_i`` is the
database column of query i itself (or -1), never a positive of i; ``e_i`` is the column left out of i's
database (``c_i``, or -1 when the query counts in its own ranks). A loss is a sum of per-query terms given by a
:class:`ChunkKernel`; the walk takes chunks Q of ``query_chunk`` queries:

1. ``S_Q = (E_Q / scale) R^T`` (n x M; ``scale`` is the kernel's temperature, 1 for none);
2. the kernel turns ``S_Q`` into its per-query statistics (n x W) and, when a gradient is needed,
   ``G_Q = dterms/dS`` with respect to the unscaled similarities (n x M), in closed form. Losses that look at
   (query, positive) pairs read them from the chunk's positive table (:func:`positive_table`, n x P, P the
   largest |P(i)| of the batch) and take them in blocks of at most ``query_chunk`` pairs (:func:`chunk_pairs`,
   :func:`query_groups`, :func:`pair_sigmoids`, :func:`scatter_pair_terms`);
3. ``dE_Q += G_Q R`` and ``dR += G_Q^T E_Q`` (:class:`GradientProducts`), over the rows of ``G_Q`` that are not
   all zero, the nonzero rows of sparse chunks gathered over chunks until they fill a product.

Two ways to take the pairs, same values (:attr:`ChunkKernel.sync_free`):

- *compact* (the CPU's default): only real pairs, and work whose result is exactly zero is skipped (pairs
  without gradient, all-zero rows of ``G_Q``). Finding them reads values on the host, which is free on a CPU;
- *sync-free* (every other device's default): the padded table as it is (n x P pairs, padding masked to zero),
  every row of ``G_Q`` in the products, so every shape is fixed by the batch's N, M and P and nothing inside
  the walk waits for the device (no ``item``, ``nonzero``, ``tolist``, boolean indexing, host copies). On a GPU
  the host then queues the whole walk without waiting. The batch's one synchronisation is P itself, read
  when the query side is built (:func:`positive_index`), before the walk.

:func:`walk` is the walk of a batch; :func:`embedding_terms` runs it inside an autograd function, eagerly or
replayed from a CUDA graph (a :class:`Walker`, :mod:`recallk.losses.walk_graph`).

All of a query's terms come from its own row of S, so ``G_Q`` is exact within its chunk. When the inputs need a
gradient it is accumulated during the forward pass (the loss is a scalar: backward only scales dE and dR by the
incoming gradient), which costs three N x M x D matrix products instead of the four of recomputing ``S_Q`` in
backward. The terms are then ``kernel.terms`` of all statistics. Extra memory is a few ``query_chunk x M``
blocks plus the (N + M) x D embedding gradients, whatever N is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

DEFAULT_QUERY_CHUNK = 256  # on the CPU, where the chunk hardly changes the time (BENCHMARKS.md)
GPU_QUERY_CHUNK = 1024  # on a GPU: 2.7x faster than 256 at N = 65,536 on an H200, 1.3 GiB (BENCHMARKS.md)


def default_query_chunk(device: torch.device) -> int:
    """The ``query_chunk`` a loss uses when none is given: :data:`GPU_QUERY_CHUNK` on a GPU, where bigger
    products pay, else :data:`DEFAULT_QUERY_CHUNK`."""
    return GPU_QUERY_CHUNK if device.type == "cuda" else DEFAULT_QUERY_CHUNK


@dataclass(frozen=True)
class PositiveIndex:
    """The database sorted by label, shared by every chunk of a batch: ``order`` (M, long) the database
    columns sorted by label (stable: a class's columns ascending) and ``max_pos`` (a host int) P, the largest
    number of positives of a query of the batch: the width of :func:`positive_table`."""

    order: Tensor
    max_pos: int


@dataclass
class QuerySide:
    """Per-query constants: labels (N), own column c (N, -1 for none), excluded column e (N), positive count
    |P| (N); for RS@k also kappa = min(k, |D|) (N x K) and the recall normaliser min(kappa, |P|) (N x K), for
    the other losses N x 0 tensors; where the query's class starts in the label-sorted database
    (``class_start``, N) and the slot of its own column in that run (``own_slot``, N: the class's size when
    the query is not in it); and, shared by all queries, the database's :class:`PositiveIndex` and RS@k's
    recall temperatures ``tau_k`` (K, empty for the other losses)."""

    labels: Tensor
    self_col: Tensor
    excluded: Tensor
    num_pos: Tensor
    kappa: Tensor
    norm: Tensor
    class_start: Tensor
    own_slot: Tensor
    index: PositiveIndex
    tau_k: Tensor

    _PER_QUERY: ClassVar[tuple[str, ...]] = (
        "labels", "self_col", "excluded", "num_pos", "kappa", "norm", "class_start", "own_slot")

    def rows(self, start: int, stop: int) -> QuerySide:
        """The constants of queries ``start:stop`` (the shared ones as they are)."""
        return replace(self, **{name: getattr(self, name)[start:stop] for name in self._PER_QUERY})

    def tensors(self) -> list[Tensor]:
        """Every tensor of the side in a fixed order: the per-query ones, ``tau_k``, the index's ``order``."""
        return [*(getattr(self, name) for name in self._PER_QUERY), self.tau_k, self.index.order]

    def with_tensors(self, tensors: list[Tensor]) -> QuerySide:
        """The same side holding ``tensors`` (ordered as :meth:`tensors` gives them) instead of its own."""
        *per_query, tau_k, order = tensors
        return replace(self, index=replace(self.index, order=order), tau_k=tau_k,
                       **dict(zip(self._PER_QUERY, per_query)))

    def to(self, device: torch.device | str) -> QuerySide:
        """The same constants on ``device`` (e.g. ``meta``, where a walk that reads a value fails)."""
        return self.with_tensors([t.to(device) for t in self.tensors()])


@dataclass(frozen=True)
class PositiveRows:
    """:func:`positive_index`'s results: |P(i)| (``num_pos``), ``class_start`` and ``own_slot`` (N each,
    long) as in :class:`QuerySide`, and the shared :class:`PositiveIndex`."""

    num_pos: Tensor
    class_start: Tensor
    own_slot: Tensor
    index: PositiveIndex


def positive_index(labels: Tensor, ref_labels: Tensor, self_col: Tensor) -> PositiveRows:
    """Where the positives P(i) = {x : y_x = y_i, x != c_i} of each query lie in the label-sorted database, in
    O(N + M log M) time and memory; reads P = max |P(i)| on the host (the batch's one synchronisation)."""
    ref = ref_labels.long()
    ref_sorted, order = torch.sort(ref, stable=True)
    query = labels.long()
    start = torch.searchsorted(ref_sorted, query)
    count = torch.searchsorted(ref_sorted, query, right=True) - start
    slot = torch.empty_like(order)
    slot[order] = torch.arange(len(order), device=order.device)  # each column's place in the sorted order
    own = self_col.clamp(min=0)
    has_own = (self_col >= 0) & (ref[own] == query)
    own_slot = torch.where(has_own, slot[own] - start, count)
    num_pos = count - has_own.long()
    max_pos = int(num_pos.max()) if len(num_pos) else 0
    return PositiveRows(num_pos, start, own_slot, PositiveIndex(order, max_pos))


def positive_table(side: QuerySide) -> tuple[Tensor, Tensor]:
    """The positive columns of the queries of ``side`` (n x P, ascending, padded) and which are real (n x P,
    bool: the first |P(i)| of row i); P = ``side.index.max_pos``. Slot j of query i reads its class's run in
    the sorted database at j, or at j + 1 from its own column's slot on. No value is read on the host."""
    order = side.index.order
    slots = torch.arange(side.index.max_pos, device=order.device)
    source = slots[None, :] + (slots[None, :] >= side.own_slot[:, None]).long()
    columns = order[(side.class_start[:, None] + source).clamp_(max=max(len(order) - 1, 0))]
    return columns, slots[None, :] < side.num_pos[:, None]


def chunk_pairs(side: QuerySide, padded: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(row, column, real) of the (query, positive) pairs of a chunk, row-major with ascending columns: every
    slot of :func:`positive_table` when ``padded`` (n P pairs; ``real`` marks the true pairs), else only the
    true pairs (``real`` None; their number is read on the host)."""
    columns, real = positive_table(side)
    if padded:
        rows = torch.arange(len(columns), device=columns.device)[:, None].expand_as(columns)
        return rows.reshape(-1), columns.reshape(-1), real.reshape(-1)
    row, slot = real.nonzero(as_tuple=True)
    return row, columns[row, slot], None


def pair_counts(side: QuerySide, padded: bool) -> list[int]:
    """Pairs per query of :func:`chunk_pairs`, for :func:`query_groups`: P each when ``padded`` (known on the
    host), else |P(i)| (read from the device)."""
    return [side.index.max_pos] * len(side.num_pos) if padded else side.num_pos.tolist()


@dataclass
class ChunkGradient:
    """G_Q = dterms/dS_Q of a chunk (n x M) and its rows that are not all zero (``rows``, n, bool), or None
    for "take every row" (the sync-free walk, which never looks)."""

    values: Tensor
    rows: Tensor | None


class ChunkKernel(Protocol):
    """What a loss gives the walk: its per-query statistics and their closed-form gradient, chunk by chunk."""

    query_chunk: int
    sync_free: bool  # the padded, fixed-shape walk that never reads a value on the host (module docstring)

    @property
    def scale(self) -> float:
        """The walk computes ``S_Q = (E_Q / scale) R^T`` and passes it to :meth:`chunk`."""

    def query_side(self, labels: Tensor, ref_labels: Tensor, self_col: Tensor, dtype: torch.dtype) -> QuerySide:
        """The per-query constants of queries ``labels`` (N) against the database labels ``ref_labels`` (M)."""

    def stats_width(self) -> int:
        """W, the number of statistics per query."""

    def chunk(
        self, scaled: Tensor, side: QuerySide, ref_labels: Tensor, num_valid: int, need_grad: bool
    ) -> tuple[Tensor, ChunkGradient | None]:
        """The statistics (n x W) of one chunk ``scaled`` (n x M) and, when ``need_grad``, dterms/dS of its rows
        (None when no row has a term)."""

    def terms(self, stats: Tensor, side: QuerySide, num_valid: int) -> Tensor:
        """The sum of the per-query terms (a scalar) from the statistics of all queries."""


def query_groups(num_pos: list[int], pair_block: int) -> list[tuple[int, int, int, int]]:
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


def pair_sigmoids(
    scaled: Tensor, side: QuerySide, row: Tensor, col: Tensor, buffer: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The sigmoids of the pairs (row i, column x) of a block (B pairs), over a chunk ``scaled`` = t (n x M):

    ``sig`` = sigmoid(t_i - t_ix) (B x M, written into ``buffer``), ``excluded_sig`` = sigmoid(t_ie - t_ix) at
    the excluded column e_i (B; 0 for queries without one) and the rank of x among the database
    ``1 + sum_{z in D(i), z != x} sigmoid(t_iz - t_ix) = 1/2 + sum_z sig - excluded_sig`` (B)."""
    anchor = scaled[row, col]  # B: t_ix
    sig = torch.index_select(scaled, 0, row, out=buffer).sub_(anchor[:, None]).sigmoid_()
    excluded = side.excluded[row].clamp(min=0)
    excluded_sig = torch.sigmoid(scaled[row, excluded] - anchor) * (side.excluded[row] >= 0)
    rank = 0.5 + sig.sum(1) - excluded_sig  # B
    return sig, excluded_sig, rank


def scatter_pair_terms(
    grad: Tensor, row: Tensor, col: Tensor, excluded: Tensor, terms: Tensor, col_terms: Tensor,
    excluded_terms: Tensor,
) -> None:
    """grad[row] += terms (B x M), then grad[row, col] += col_terms and grad[row, excluded] += excluded_terms
    (B each): a pair block's part of dterms/dS, the terms at the pair's own column and at the excluded column
    (``excluded`` clamped to 0 where there is none, with a zero term) being corrected by the caller's values."""
    grad.index_add_(0, row, terms)
    flat, num_db = grad.view(-1), grad.shape[1]
    flat.index_add_(0, row * num_db + col, col_terms)
    flat.index_add_(0, row * num_db + excluded, excluded_terms)


class GradientProducts:
    """dE += G R and dR += G^T E over the nonzero rows of the chunks' G_Q, in matrix products of about
    ``rows_per_product`` rows.

    A row of G_Q that is all zero (e.g. RS@k's queries whose positives all lie far down the ranking) is left
    out, which is exact. A chunk whose rows are all nonzero goes straight into the products, and so do the
    nonzero rows of a chunk with more than ``rows_per_product`` of them; those of the others are copied into a
    buffer (``rows_per_product`` x M) until it is full, so that sparse chunks do not pay one pass over dR each."""

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

    def add(self, chunk_grad: ChunkGradient, start: int) -> None:
        """The products of a chunk whose first query is row ``start``."""
        if chunk_grad.rows is None or bool(chunk_grad.rows.all()):
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


def walk(
    queries: Tensor, database: Tensor, ref_labels: Tensor, side: QuerySide, kernel: ChunkKernel, num_valid: int,
    need_queries: bool, need_database: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The walk of a batch: its terms (a scalar) and their gradients w.r.t. ``queries`` (N x D) and ``database``
    (M x D) where asked for (else None), accumulated chunk by chunk (module docstring). When ``queries`` is
    ``database`` one buffer holds both gradients and is returned for both."""
    same = queries is database
    grad_queries = torch.zeros_like(queries) if need_queries else None
    grad_database = grad_queries if same else torch.zeros_like(database) if need_database else None
    stats = queries.new_empty(len(queries), kernel.stats_width())
    products = GradientProducts(queries, database, grad_queries, grad_database, max(1, kernel.query_chunk // 4))
    for start in range(0, len(queries), kernel.query_chunk):
        stop = min(start + kernel.query_chunk, len(queries))
        scaled = (queries[start:stop] / kernel.scale) @ database.T
        stats[start:stop], chunk_grad = kernel.chunk(
            scaled, side.rows(start, stop), ref_labels, num_valid, need_queries or need_database
        )
        del scaled  # freed before the products, so the gathered rows of G take its place
        if chunk_grad is not None:
            products.add(chunk_grad, start)
    products.flush()
    return kernel.terms(stats, side, num_valid), grad_queries, grad_database


class Walker(Protocol):
    """Runs :func:`walk` (e.g. replayed from a CUDA graph, :class:`recallk.losses.walk_graph.WalkGraphs`)."""

    def __call__(
        self, queries: Tensor, database: Tensor, ref_labels: Tensor, side: QuerySide, kernel: ChunkKernel,
        num_valid: int, need_queries: bool, need_database: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]: ...


class _EmbeddingTerms(torch.autograd.Function):
    """terms(E_Q R^T), chunk by chunk; the gradient is accumulated during the forward pass (no N x M is kept)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, queries: Tensor, database: Tensor, ref_labels: Tensor, side: QuerySide, kernel: ChunkKernel,
        num_valid: int, walker: Walker,
    ) -> Tensor:
        need_queries, need_database = ctx.needs_input_grad[:2]
        terms, grad_queries, grad_database = walker(
            queries, database, ref_labels, side, kernel, num_valid, need_queries, need_database)
        ctx.grads = grad_queries, None if queries is database else grad_database  # the tensor passed twice: once
        return terms

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad_queries, grad_database = (None if g is None else g * grad for g in ctx.grads)
        return grad_queries, grad_database, None, None, None, None, None


class _SimilarityTerms(torch.autograd.Function):
    """terms(S) for a given similarity matrix S (N x M), chunk by chunk over its rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, sim: Tensor, ref_labels: Tensor, side: QuerySide, kernel: ChunkKernel, num_valid: int
    ) -> Tensor:
        grad_sim = torch.zeros_like(sim) if ctx.needs_input_grad[0] else None
        stats = sim.new_empty(len(sim), kernel.stats_width())
        for start in range(0, len(sim), kernel.query_chunk):
            stop = min(start + kernel.query_chunk, len(sim))
            stats[start:stop], chunk_grad = kernel.chunk(
                sim[start:stop] / kernel.scale, side.rows(start, stop), ref_labels, num_valid, grad_sim is not None
            )
            if chunk_grad is not None:
                grad_sim[start:stop] = chunk_grad.values
        ctx.grad_sim = grad_sim
        return kernel.terms(stats, side, num_valid)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return ctx.grad_sim * grad, None, None, None, None


def embedding_terms(
    queries: Tensor, database: Tensor, ref_labels: Tensor, side: QuerySide, kernel: ChunkKernel, num_valid: int,
    walker: Walker = walk,
) -> Tensor:
    """The loss terms of ``queries`` (N x D) against ``database`` (M x D), differentiable w.r.t. both.

    ``side`` holds the queries' constants (``kernel.query_side``); ``num_valid`` (the number of queries with a
    positive in the whole, possibly sharded, batch) divides the sum, so terms of disjoint query sets add up to
    the loss. Pass the same tensor as queries and database for a batch ranked against itself (one gradient
    buffer then serves both). ``walker`` runs the walk: :func:`walk`, or its CUDA-graph replay.
    """
    return _EmbeddingTerms.apply(queries, database, ref_labels, side, kernel, num_valid, walker)


def similarity_terms(
    sim: Tensor, ref_labels: Tensor, side: QuerySide, kernel: ChunkKernel, num_valid: int
) -> Tensor:
    """The loss terms of the rows of ``sim`` (N x M), differentiable w.r.t. ``sim``."""
    return _SimilarityTerms.apply(sim, ref_labels, side, kernel, num_valid)
