"""RS@k: the smooth Recall@k surrogate loss (Patel, Tolias, Matas, CVPR 2022).

Every batch item q is a query; its database is the rest of the batch (or a reference set). With s the dot
product of (L2-normalised) embeddings, P(q) the positives of q and D(q, x) the database without x and q:

    r(q, x) = 1 + sum_{z in D(q, x)} sigmoid((s(q, z) - s(q, x)) / tau_rank)
    R_k(q)  = min(sum_{x in P(q)} sigmoid((k - r(q, x)) / tau_k), k) / min(k, |P(q)|)
    loss    = 1 - mean_{q : |P(q)| > 0} mean_k R_k(q)

With ``rank_includes_query=True`` the query itself stays in every rank sum (each rank about one higher), which
is what the authors' code does; k is clipped to the database size (which then includes the query).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction

from recallk.losses.simix import SimilarityMixup
from recallk.losses.smooth_rank import DEFAULT_CHUNK_ELEMENTS, smooth_rank
from recallk.losses.validation import (
    check_distance,
    check_embeddings,
    check_k,
    check_labels,
    check_tau_k,
    check_temperature,
)
from recallk.losses.unit_norm import warn_if_not_unit_norm


class RecallAtKLoss(BaseMetricLossFunction):
    """Smooth Recall@k surrogate loss (RS@k), optionally with SiMix; a pytorch-metric-learning loss.

    Args:
        k: the recall levels averaged by the loss (ints, or numpy/tensor integers).
        tau_rank: temperature of the sigmoid that smooths the rank.
        tau_k: temperature of the sigmoid that smooths "rank <= k"; one value or one per k.
        rank_includes_query: count the query in its own rank sums, as the authors' code does.
        mixup: a :class:`SimilarityMixup` to add virtual same-class items to the batch (square case only).
        chunk_elements: memory bound of the rank computation, in (pair x database) entries per chunk.
        distance: a pytorch-metric-learning ``DotProductSimilarity`` (the default, without normalisation: give
            L2-normalised embeddings, as recallk's models output) or ``CosineSimilarity`` (L2-normalises the
            embeddings and ``ref_emb`` first). RS@k ranks by similarity, so other distances are refused.
        reducer, embedding_regularizer, embedding_reg_weight, collect_stats: as in every PML loss. RS@k is one
            value for the batch (PML's ``already_reduced``), so reducers pass it through unchanged.

    Call as ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, query_index=None)``,
    PML's ``forward`` with ``query_index`` as a keyword:
        embeddings: N x D, labels: N integers in any order and class sizes.
        indices_tuple: must be None; RS@k ranks every pair of the batch, so miners do not apply.
        ref_emb / ref_labels: M x D database (default: the batch itself, each query left out of its own).
        query_index: N indices into ``ref_emb`` of the queries themselves, left out of their own database.
    Returns a scalar in the embeddings' dtype; computed in float32 (or float64) even under autocast.
    Being a ``BaseMetricLossFunction``, it works in PML's ``DistributedLossWrapper`` (``efficient=False``, the
    default) and ``MultipleLosses``. For a cross-batch memory use :class:`~recallk.losses.CrossBatchRecallAtK`.
    """

    def __init__(
        self,
        k: Sequence[int] = (1, 2, 4, 8, 16),
        tau_rank: float = 0.01,
        tau_k: float | Sequence[float] = 1.0,
        rank_includes_query: bool = False,
        mixup: SimilarityMixup | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        **pml_kwargs: Any,
    ) -> None:
        super().__init__(**pml_kwargs)
        check_distance(self.distance)
        self.k = check_k(k)
        self.tau_rank = check_temperature(tau_rank, "tau_rank")
        self.tau_k = check_tau_k(tau_k, len(self.k))
        self.rank_includes_query = bool(rank_includes_query)
        if mixup is not None and not isinstance(mixup, SimilarityMixup):
            raise ValueError(f"mixup must be a recallk.SimilarityMixup or None, got {type(mixup).__name__}")
        self.mixup = mixup
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        self.chunk_elements = int(chunk_elements)

    def get_default_distance(self) -> DotProductSimilarity:
        """Plain dot products: recallk's embeddings are already L2-normalised."""
        return DotProductSimilarity(normalize_embeddings=False)

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, tau_rank={self.tau_rank}, tau_k={self.tau_k}, "
            f"rank_includes_query={self.rank_includes_query}, mixup={self.mixup}"
        )

    def forward(  # type: ignore[override]
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: tuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        *,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if indices_tuple is not None:
            raise ValueError(
                f"RecallAtKLoss got an indices_tuple ({type(indices_tuple).__name__}), but RS@k ranks every pair of "
                "the batch, so miners do not apply; call loss(embeddings, labels) (DistributedLossWrapper: keep "
                "efficient=False)"
            )
        self.reset_stats()
        raw_embeddings = embeddings
        if self.distance.normalize_embeddings:
            check_embeddings(embeddings)
            embeddings = self.distance.normalize(embeddings)
            if ref_emb is not None:
                check_embeddings(ref_emb, "ref_emb")
                ref_emb = self.distance.normalize(ref_emb)
        loss = self._rs_at_k(embeddings, labels, ref_emb, ref_labels, query_index)
        loss_dict = {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}
        self.add_embedding_regularization_to_loss_dict(loss_dict, raw_embeddings)
        return self.reducer(loss_dict, raw_embeddings, labels)

    def _rs_at_k(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
        query_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """RS@k of the queries ``embeddings`` against ``ref_emb`` (default: the batch itself); see the class doc."""
        check_embeddings(embeddings)
        warn_if_not_unit_norm(embeddings)
        check_labels(labels, len(embeddings))
        labels = labels.to(embeddings.device)
        if ref_emb is None:
            if ref_labels is not None or query_index is not None:
                raise ValueError("ref_labels and query_index only make sense together with ref_emb")
            with _float32(embeddings) as emb:
                sim = emb @ emb.T
            return self.from_similarity(sim, labels).to(embeddings.dtype)
        check_embeddings(ref_emb, "ref_emb")
        if ref_labels is None:
            raise ValueError("ref_emb was given without ref_labels; pass the labels of the reference rows")
        check_labels(ref_labels, len(ref_emb), "ref_labels")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"embeddings have {embeddings.shape[1]} dims but ref_emb has {ref_emb.shape[1]}; they must match"
            )
        if self.mixup is not None:
            raise ValueError(
                "SiMix needs the whole batch as queries and database; call the loss without ref_emb "
                "(gather the global batch first when training on several GPUs)"
            )
        warn_if_not_unit_norm(ref_emb, "ref_emb")
        self_col = self._self_columns(query_index, len(embeddings), len(ref_emb), embeddings.device)
        with _float32(embeddings) as emb, _float32(ref_emb) as ref:
            loss = self._loss(emb @ ref.T, labels, ref_labels.to(embeddings.device), self_col)
        return loss.to(embeddings.dtype)

    def from_similarity(self, sim: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss on a square N x N similarity matrix whose row i and column i are item i.

        Differentiable w.r.t. ``sim``. SiMix, when set, is applied here.
        """
        if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
            raise ValueError(f"from_similarity needs a square N x N matrix, got shape {tuple(sim.shape)}")
        check_labels(labels, len(sim))
        if not bool(torch.isfinite(sim).all()):
            raise ValueError("the similarity matrix contains NaN or Inf; check the embeddings")
        labels = labels.to(sim.device)
        with _float32(sim) as sim32:
            if self.mixup is not None:
                sim32, labels = self.mixup.mix(sim32, labels)
            self_col = torch.arange(len(sim32), device=sim.device)
            return self._loss(sim32, labels, labels, self_col).to(sim.dtype)

    @staticmethod
    def _self_columns(
        query_index: torch.Tensor | None, num_queries: int, num_refs: int, device: torch.device
    ) -> torch.Tensor:
        if query_index is None:
            return torch.full((num_queries,), -1, dtype=torch.long, device=device)
        query_index = torch.as_tensor(query_index, device=device)
        check_labels(query_index, num_queries, "query_index")
        if len(query_index) and (int(query_index.min()) < 0 or int(query_index.max()) >= num_refs):
            raise ValueError(f"query_index must hold row indices of ref_emb in [0, {num_refs}), got values outside")
        return query_index.long()

    def _loss(
        self, sim: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor, self_col: torch.Tensor
    ) -> torch.Tensor:
        """RS@k on N x M similarities; ``self_col[i]`` is the database column of query i, or -1."""
        num_q, num_db = sim.shape
        has_self = self_col >= 0
        positives = labels[:, None] == ref_labels[None, :]
        rows = torch.arange(num_q, device=sim.device)
        positives[rows[has_self], self_col[has_self]] = False
        num_pos = positives.sum(1)
        if not bool((num_pos > 0).any()):
            raise ValueError(
                "no query in the batch has a positive (another item of its class), so the loss is undefined; "
                "sample several items per class, e.g. with recallk.data.ClassBalancedBatchSampler"
            )
        query, positive = positives.nonzero(as_tuple=True)
        excluded = self_col if not self.rank_includes_query else torch.full_like(self_col, -1)
        ranks = smooth_rank(sim, query, positive, excluded, self.tau_rank, self.chunk_elements)

        db_size = num_db - (has_self & (not self.rank_includes_query)).long()  # N
        k = torch.tensor(self.k, dtype=sim.dtype, device=sim.device)
        k_eff = torch.minimum(k[None, :], db_size[:, None].to(sim.dtype))  # N x K
        tau_k = torch.tensor(self.tau_k, dtype=sim.dtype, device=sim.device)
        hits = torch.sigmoid((k_eff[query] - ranks[:, None]) / tau_k)  # P x K
        soft_hits = torch.zeros(num_q, len(self.k), dtype=sim.dtype, device=sim.device).index_add(0, query, hits)
        norm = torch.minimum(k_eff, num_pos[:, None].to(sim.dtype))
        valid = num_pos > 0
        recall = torch.minimum(soft_hits, k_eff)[valid] / norm[valid]
        return 1.0 - recall.mean()


class _float32:
    """Context manager yielding ``tensor`` upcast to float32 (float64 stays) with autocast switched off."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.autocast = torch.autocast(tensor.device.type, enabled=False)

    def __enter__(self) -> torch.Tensor:
        self.autocast.__enter__()
        return self.tensor if self.tensor.dtype == torch.float64 else self.tensor.float()

    def __exit__(self, *exc: object) -> None:
        self.autocast.__exit__(*exc)
