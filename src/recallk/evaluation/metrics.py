"""Retrieval metrics from exact kNN: recall@k, precision@1, R-precision and MAP@R.

For a query ``q`` with label ``y_q`` let ``R_q`` be its number of positives (references with label ``y_q``,
the query itself not counted) and ``h_q(j) = 1`` when its ``j``-th ranked neighbour (``j = 1, 2, ...``) is a
positive. Averaged over the queries that have at least one positive:

- ``recall@k``    = mean of ``max_{j <= k} h_q(j)`` (a hit: at least one positive among the top k);
- ``precision@1`` = mean of ``h_q(1)``;
- ``r_precision`` = mean of ``(1 / R_q) * sum_{j <= R_q} h_q(j)``;
- ``map@r``       = mean of ``(1 / R_q) * sum_{j <= R_q} h_q(j) * P_q(j)`` with
  ``P_q(j) = (1 / j) * sum_{i <= j} h_q(i)``  (Musgrave et al., "A Metric Learning Reality Check", 2020).

These equal pytorch-metric-learning's ``AccuracyCalculator`` (``avg_of_avgs=False``) values for
``precision_at_1``, ``r_precision`` and ``mean_average_precision_at_r`` with exact inner-product kNN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recallk.evaluation.knn import BACKENDS, iter_knn_chunks
from recallk.losses.input_checks import as_embeddings, as_labels, check_k
from recallk.losses.unit_norm import warn_if_not_unit_norm

DEFAULT_CHUNK_SIZE = 1024


def retrieval_metrics(
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    k: int | Sequence[int] = (1, 2, 4, 8),
    ref_embeddings: Tensor | np.ndarray | None = None,
    ref_labels: Tensor | np.ndarray | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "torch",
    progress: bool = False,
) -> dict[str, float | int]:
    """Exact-kNN retrieval metrics of query embeddings against references.

    Similarity is the dot product of the given embeddings: pass **L2-normalised** embeddings to rank by
    cosine similarity (others raise one ``UnnormalizedEmbeddingsWarning``, as the losses do). The search runs on
    the device of ``embeddings`` (references are moved there), chunked over queries with memory
    ``O(chunk_size x num_references)``.

    Neighbours are ranked by similarity descending, then reference index ascending (deterministic ties).

    Args:
        embeddings: ``(N, D)`` query embeddings (torch tensor or numpy array).
        labels: ``(N,)`` integer class ids of the queries.
        k: recall cut-offs. A cut-off larger than the number of references uses all references.
        ref_embeddings: optional ``(M, D)`` reference embeddings. Without them every query is searched against
            all the others, leaving itself out **by index** (an identical copy is still a neighbour).
        ref_labels: ``(M,)`` integer class ids of the references; required with ``ref_embeddings``.
        chunk_size: queries per matrix product.
        backend: ``"torch"`` or ``"faiss"`` (exact ``IndexFlatIP`` on CPU; needs ``pip install faiss-cpu``).
        progress: show a tqdm progress bar (off by default: a library call stays quiet).

    Returns:
        ``{"recall@<k>": ... for each k, "precision@1", "r_precision", "map@r", "num_queries",
        "num_queries_skipped"}``. Metrics are means over the ``num_queries`` queries with at least one
        positive; ``num_queries_skipped`` queries have none (a singleton class without references, a class
        absent from the references) and are left out.

    Raises:
        ValueError: on NaN/Inf rows, shape or dtype mismatches, non-integer or non-1-D labels, ``k < 1``,
            empty inputs, an unknown backend, or when no query has a positive.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    ks = sorted(set(check_k(k)))
    queries = as_embeddings(embeddings, "embeddings")
    warn_if_not_unit_norm(queries, "embeddings", "retrieval_metrics")
    query_labels = as_labels(labels, "labels", len(queries), "embeddings")
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("pass both ref_embeddings and ref_labels, or neither")
    exclude_self = ref_embeddings is None
    if exclude_self:
        references, reference_labels = queries, query_labels
    else:
        references = as_embeddings(ref_embeddings, "ref_embeddings")
        warn_if_not_unit_norm(references, "ref_embeddings", "retrieval_metrics")
        reference_labels = as_labels(ref_labels, "ref_labels", len(references), "ref_embeddings")
        if references.shape[1] != queries.shape[1]:
            raise ValueError(
                f"embeddings have dimension {queries.shape[1]} but ref_embeddings have {references.shape[1]}"
            )
        references = references.to(queries.device, torch.promote_types(references.dtype, queries.dtype))
        queries = queries.to(references.dtype)

    device = queries.device
    classes, class_ids = torch.unique(torch.cat([query_labels.cpu(), reference_labels.cpu()]), return_inverse=True)
    query_classes = class_ids[: len(query_labels)].to(device)
    reference_classes = class_ids[len(query_labels) :].to(device)
    reference_class_sizes = torch.bincount(reference_classes, minlength=len(classes))
    num_positives = reference_class_sizes[query_classes] - int(exclude_self)

    used = (num_positives > 0).nonzero().squeeze(1)
    num_skipped = len(queries) - len(used)
    if len(used) == 0:
        reason = "every class has a single item" if exclude_self else "no query label occurs in ref_labels"
        raise ValueError(f"no query has a positive to retrieve ({reason}); metrics would be undefined")

    num_positives = num_positives[used]
    used_classes = query_classes[used]
    used_queries = queries if num_skipped == 0 else queries[used]  # no copy when every query is used
    num_neighbours = num_positives.clamp(min=ks[-1])
    totals = torch.zeros(len(ks) + 3, dtype=torch.float64, device=device)
    for start, stop, _, neighbours in iter_knn_chunks(
        used_queries,
        references,
        num_neighbours,
        self_index=used if exclude_self else None,
        chunk_size=chunk_size,
        backend=backend,
        progress=progress,
    ):
        hits = reference_classes[neighbours] == used_classes[start:stop, None]
        totals += _chunk_sums(hits, num_positives[start:stop], ks)

    means = (totals / len(used)).tolist()
    results: dict[str, float | int] = {f"recall@{cutoff}": means[i] for i, cutoff in enumerate(ks)}
    results["precision@1"], results["r_precision"], results["map@r"] = means[len(ks) :]
    results["num_queries"] = len(used)
    results["num_queries_skipped"] = num_skipped
    return results


def _chunk_sums(hits: Tensor, num_positives: Tensor, ks: list[int]) -> Tensor:
    """Per-chunk sums of the metrics.

    Args:
        hits: ``(B, K)`` bool, ``hits[q, j]`` true when the ``j``-th neighbour of query ``q`` is a positive;
            ``K >= R_q`` for every query.
        num_positives: ``(B,)`` ``R_q >= 1``.
        ks: sorted recall cut-offs.

    Returns:
        ``(len(ks) + 3,)`` float64: summed recall@k for each k, precision@1, R-precision, AP@R.
    """
    ranks = torch.arange(1, hits.shape[1] + 1, device=hits.device)
    hits_within_r = hits & (ranks <= num_positives[:, None])
    precision_at_rank = hits_within_r.cumsum(dim=1).double() / ranks
    r = num_positives.double()
    return torch.stack(
        [hits[:, :cutoff].any(dim=1).sum().double() for cutoff in ks]
        + [
            hits[:, 0].sum().double(),
            (hits_within_r.sum(dim=1) / r).sum(),
            ((precision_at_rank * hits_within_r).sum(dim=1) / r).sum(),
        ]
    )


def format_metrics_table(
    results: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] | None = None
) -> str:
    """Metrics of each split (or named result) as a text table: one row per metric, one column per split.

    ``metrics`` chooses the rows (default: every metric of any split, in order of appearance). Floats are shown
    with 4 decimals, integers (counts) as they are, missing values as ``-``.
    """
    splits = list(results)
    if metrics is None:
        metrics = []
        for split in splits:
            metrics.extend(m for m in results[split] if m not in metrics)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "-" if value is None else str(value)

    rows = [["metric", *splits]] + [[m, *(cell(results[s].get(m)) for s in splits)] for m in metrics]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(row, widths)))
        for row in rows
    )
