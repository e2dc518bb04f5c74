"""Exact k-nearest-neighbour search by dot-product similarity, chunked over queries.

Similarity is the plain dot product ``s_ij = <q_i, r_j>`` (cosine similarity when the embeddings are
L2-normalised). Neighbours are ranked by **similarity descending, then reference index ascending**, so the
result is deterministic even with exact ties (duplicate embeddings).

Memory is ``O(chunk_size x M)`` for ``M`` references: each chunk of queries is multiplied with all references,
the top ``k`` are kept and the similarity block is dropped. The search runs on the device of the queries.
An optional faiss backend (``faiss.IndexFlatIP``, CPU) gives the same neighbours.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

BACKENDS = ("torch", "faiss")


def sort_ties_by_index(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder each row of a top-k result by similarity descending, then index ascending.

    Args:
        values: ``(B, K)`` similarities.
        indices: ``(B, K)`` reference indices of those similarities.

    Returns:
        ``(values, indices)``, both ``(B, K)``, rows reordered.
    """
    indices, by_index = indices.sort(dim=1)
    values = values.gather(1, by_index)
    values, by_value = values.sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, by_value)


def topk_deterministic(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` columns of each row of ``sims`` with ties broken by the smaller column index.

    ``torch.topk`` picks among equal values arbitrarily. A row is ambiguous only when its ``(k+1)``-th largest
    value equals its ``k``-th; those rows (rare outside duplicate embeddings) are resolved with a stable sort.

    Args:
        sims: ``(B, M)`` similarities, no NaN.
        k: number of neighbours, ``1 <= k <= M``.

    Returns:
        ``(values, indices)``, both ``(B, k)``, ordered by value descending then index ascending.
    """
    num_cols = sims.shape[1]
    values, indices = sims.topk(min(k + 1, num_cols), dim=1)
    if values.shape[1] > k:
        ambiguous = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
        values, indices = values[:, :k], indices[:, :k]
        if ambiguous.numel() > 0:
            tied_values, tied_indices = sims[ambiguous].sort(dim=1, descending=True, stable=True)
            values[ambiguous] = tied_values[:, :k]
            indices[ambiguous] = tied_indices[:, :k]
    return sort_ties_by_index(values, indices)


def _torch_chunk_search(
    queries: Tensor, references: Tensor, k: int, self_index: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Top-``k`` references of a chunk of queries by a matrix product; ``self_index`` columns are masked."""
    sims = queries @ references.T
    if self_index is not None:
        sims[torch.arange(len(queries), device=sims.device), self_index] = float("-inf")
    return topk_deterministic(sims, k)


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            'backend="faiss" needs faiss, which is not installed: run `pip install faiss-cpu` '
            '(or `pip install recallk[faiss]`), or use backend="torch"'
        ) from error
    return faiss


class _FaissSearcher:
    """Exact inner-product search with ``faiss.IndexFlatIP`` over CPU float32 copies of the references.

    faiss orders ties arbitrarily, so one extra neighbour is requested: rows whose last kept and first dropped
    similarities are equal are recomputed with the torch path, giving the same tie order as the torch backend.
    """

    def __init__(self, references: Tensor) -> None:
        faiss = _import_faiss()
        self.references = references
        self.index = faiss.IndexFlatIP(references.shape[1])
        self.index.add(references.detach().to("cpu", torch.float32).contiguous().numpy())

    def search(self, queries: Tensor, k: int, self_index: Tensor | None) -> tuple[Tensor, Tensor]:
        num_refs = len(self.references)
        requested = min(k + 1 + (self_index is not None), num_refs)
        query_array = queries.detach().to("cpu", torch.float32).contiguous().numpy()
        distances, neighbours = self.index.search(query_array, requested)
        values, indices = torch.from_numpy(distances), torch.from_numpy(neighbours)
        if self_index is not None:
            is_self = indices == self_index.cpu().unsqueeze(1)
            is_self[~is_self.any(dim=1), -1] = True  # self not returned: drop the surplus last neighbour
            keep = ~is_self
            values = values[keep].view(len(queries), -1)
            indices = indices[keep].view(len(queries), -1)
        device = queries.device
        values, indices = values.to(device, queries.dtype), indices.to(device)
        if values.shape[1] > k:
            ambiguous = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
            values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
            if ambiguous.numel() > 0:
                exact_self = None if self_index is None else self_index[ambiguous]
                values[ambiguous], indices[ambiguous] = _torch_chunk_search(
                    queries[ambiguous], self.references, k, exact_self
                )
        return sort_ties_by_index(values, indices)


def iter_knn_chunks(
    queries: Tensor,
    references: Tensor,
    num_neighbours: int | Tensor,
    *,
    self_index: Tensor | None = None,
    chunk_size: int = 1024,
    backend: str = "torch",
    progress: bool = False,
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """Yield the exact nearest references of consecutive chunks of queries.

    Args:
        queries: ``(N, D)`` float embeddings; the search runs on their device.
        references: ``(M, D)`` float embeddings on the same device.
        num_neighbours: neighbours wanted, an int or a ``(N,)`` integer tensor per query. A chunk returns
            ``K = max`` of its queries' values, capped at the number of candidate references (``M``, or
            ``M - 1`` with ``self_index``).
        self_index: optional ``(N,)`` long tensor, the index in ``references`` of each query itself; that
            reference is never returned for that query (exclusion by index, so duplicates stay neighbours).
        chunk_size: queries per matrix product; memory is ``O(chunk_size x M)``.
        backend: ``"torch"`` (chunked matmul + topk) or ``"faiss"`` (``IndexFlatIP``, needs faiss-cpu).
        progress: show a tqdm progress bar over queries.

    Yields:
        ``(start, stop, values, indices)``: queries ``start:stop``, their ``(stop - start, K)`` similarities
        and reference indices, ranked by similarity descending then reference index ascending.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    num_candidates = len(references) - (self_index is not None)
    if num_candidates < 1:
        raise ValueError("need at least one candidate reference besides the query itself")
    if isinstance(num_neighbours, int):
        num_neighbours = torch.full((len(queries),), num_neighbours, dtype=torch.long)
    num_neighbours = num_neighbours.cpu()
    searcher = _FaissSearcher(references) if backend == "faiss" else None
    with tqdm(total=len(queries), desc="kNN", unit="query", disable=not progress, leave=False) as bar:
        for start in range(0, len(queries), chunk_size):
            stop = min(start + chunk_size, len(queries))
            k = min(int(num_neighbours[start:stop].max()), num_candidates)
            chunk_self = None if self_index is None else self_index[start:stop]
            if searcher is None:
                values, indices = _torch_chunk_search(queries[start:stop], references, k, chunk_self)
            else:
                values, indices = searcher.search(queries[start:stop], k, chunk_self)
            yield start, stop, values, indices
            bar.update(stop - start)


def exact_knn(
    queries: Tensor,
    references: Tensor,
    k: int,
    *,
    self_index: Tensor | None = None,
    chunk_size: int = 1024,
    backend: str = "torch",
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """The ``k`` most similar references of every query (see :func:`iter_knn_chunks` for the arguments).

    Returns:
        ``(values, indices)``, both ``(N, k')`` with ``k' = min(k, number of candidates)``, ranked by
        similarity descending then reference index ascending.
    """
    chunks = list(
        iter_knn_chunks(
            queries, references, k, self_index=self_index, chunk_size=chunk_size, backend=backend, progress=progress
        )
    )
    return torch.cat([values for *_, values, _ in chunks]), torch.cat([indices for *_, indices in chunks])
