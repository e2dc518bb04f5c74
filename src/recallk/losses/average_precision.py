"""Average-precision surrogates on recallk's query-chunked kernel: Smooth-AP and FastAP, any batch size.

Both take every batch item as a query against the rest of the batch (or a reference set), like
:class:`~recallk.losses.recall_at_k.RecallAtKLoss`, whose PML interface, ``ref_emb``/``query_index``, SiMix,
``sharded_loss`` and ``from_similarity`` they share (:class:`~recallk.losses.recall_at_k.ChunkedRankingLoss`).
Formulas and gradients: :mod:`recallk.losses.chunked_ap`. Unlike pytorch-metric-learning's versions they accept
any labels and class sizes in any order, and need no N x N (x N or x bins) tensor: extra memory is a few
``query_chunk x M`` blocks plus the embedding gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from recallk.losses.chunked_ap import FastAPSettings, SmoothAPSettings
from recallk.losses.input_checks import check_temperature
from recallk.losses.recall_at_k import ChunkedRankingLoss
from recallk.losses.simix import SimilarityMixup


class SmoothAPLoss(ChunkedRankingLoss):
    """Smooth-AP (Brown et al., ECCV 2020) for any labels; a pytorch-metric-learning loss.

    For query q with positives P(q) and database D(q) (everything but q), and t = s / ``temperature``:
    ``R(i, D) = 1 + sum_{j in D, j != i} sigmoid(t_qj - t_qi)``, ``R(i, P)`` the same over P(q),
    ``AP_q = mean_{i in P(q)} R(i, P) / R(i, D)``, loss = 1 - mean of AP_q over the queries with a positive.

    Args:
        temperature: of the sigmoid that smooths the rank (the paper's 0.01).
        mixup, query_chunk, sync_free, cuda_graph: as in :class:`~recallk.losses.recall_at_k.RecallAtKLoss`,
            and so are distance, reducer, embedding_regularizer, embedding_reg_weight, collect_stats and the call
            ``loss(embeddings, labels, ref_emb=None, ref_labels=None, query_index=None)``. Extra memory is about
            ``3 * query_chunk * M`` floats.
    """

    short_name = "Smooth-AP"

    def __init__(
        self, temperature: float = 0.01, mixup: SimilarityMixup | None = None,
        query_chunk: int | None = None, sync_free: bool | None = None, cuda_graph: bool = False,
        **pml_kwargs: Any,
    ) -> None:
        self.temperature = check_temperature(temperature, "temperature")
        super().__init__(mixup, query_chunk, sync_free, cuda_graph, **pml_kwargs)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, mixup={self.mixup}, query_chunk={self.query_chunk}"

    def _settings(self, device: torch.device) -> SmoothAPSettings:
        return SmoothAPSettings(self.temperature, self.chunk_for(device), self.sync_free_for(device))


class FastAPLoss(ChunkedRankingLoss):
    """FastAP (Cakir et al., CVPR 2019) on unit vectors; a pytorch-metric-learning loss.

    On the squared distance ``d = 2 - 2 s`` over [0, 4] with ``num_bins`` triangular bins centred at
    0, 4 / L, ..., 4: per query the positive and negative histograms h+, h-, H+ = cumsum h+,
    H = cumsum (h+ + h-), ``AP_q = sum_l h+_l H+_l / H_l / |P(q)|`` (bins with H = 0 count 0), loss = mean over
    the queries with a positive of 1 - AP_q. Equals PML's ``FastAPLoss(num_bins)`` on unit vectors.

    Args:
        num_bins: L, the number of histogram bins (the paper's 10).
        mixup, query_chunk, sync_free, cuda_graph, distance, ...: as in
            :class:`~recallk.losses.recall_at_k.RecallAtKLoss`. Extra memory is about ``5 * query_chunk * M``
            floats (the bin indices are int64).
    """

    short_name = "FastAP"

    def __init__(
        self, num_bins: int = 10, mixup: SimilarityMixup | None = None, query_chunk: int | None = None,
        sync_free: bool | None = None, cuda_graph: bool = False, **pml_kwargs: Any,
    ) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
        self.num_bins = num_bins
        super().__init__(mixup, query_chunk, sync_free, cuda_graph, **pml_kwargs)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, mixup={self.mixup}, query_chunk={self.query_chunk}"

    def _settings(self, device: torch.device) -> FastAPSettings:
        return FastAPSettings(self.num_bins, self.chunk_for(device), self.sync_free_for(device))
