"""RS@k: the smooth Recall@k surrogate loss (Patel, Tolias, Matas, CVPR 2022).

Every batch item q is a query; its database is the rest of the batch (or a reference set). With s the dot
product of (L2-normalised) embeddings, P(q) the positives of q and D(q, x) the database without x and q:

    r(q, x) = 1 + sum_{z in D(q, x)} sigmoid((s(q, z) - s(q, x)) / tau_rank)
    R_k(q)  = min(sum_{x in P(q)} sigmoid((k - r(q, x)) / tau_k), k) / min(k, |P(q)|)
    loss    = 1 - mean_{q : |P(q)| > 0} mean_k R_k(q)

With ``rank_includes_query=True`` the query itself stays in every rank sum (each rank about one higher), which
is what the authors' code does; k is clipped to the database size (which then includes the query).

The computation walks over chunks of ``query_chunk`` queries (:mod:`recallk.losses.chunked_recall`), so no N x M
matrix is ever stored: extra memory is about ``3.5 * query_chunk * M`` floats plus the (N + M) x D embedding
gradients. SiMix appends the virtual embeddings to the queries and to the database (O(V x D) more).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction

from recallk.losses.chunked_recall import RankSettings
from recallk.losses.chunked_walk import (
    ChunkKernel,
    Walker,
    default_query_chunk,
    embedding_terms,
    similarity_terms,
    walk,
)
from recallk.losses.input_checks import (
    check_distance,
    check_embeddings,
    check_k,
    check_labels,
    check_tau_k,
    check_temperature,
    first_order_only,
    warn_if_k_exceeds,
)
from recallk.losses.simix import SimilarityMixup
from recallk.losses.unit_norm import warn_if_not_unit_norm
from recallk.losses.walk_graph import WalkGraphs


class ChunkedRankingLoss(BaseMetricLossFunction):
    """The pytorch-metric-learning face of recallk's query-chunked losses (:mod:`recallk.losses.chunked_walk`):
    input checks, ``ref_emb``/``ref_labels``/``query_index``, SiMix virtual items, ``sharded_loss`` and
    ``from_similarity``, the same for every loss. A subclass gives its kernel (:meth:`_settings`) and
    ``short_name``; see :class:`RecallAtKLoss` for the call signature and the common arguments."""

    short_name = "the loss"  # in messages

    def __init__(
        self, mixup: SimilarityMixup | None = None, query_chunk: int | None = None,
        sync_free: bool | None = None, cuda_graph: bool = False, **pml_kwargs: Any,
    ) -> None:
        super().__init__(**pml_kwargs)
        check_distance(self.distance, type(self).__name__)
        if mixup is not None and not isinstance(mixup, SimilarityMixup):
            raise ValueError(f"mixup must be a recallk.SimilarityMixup or None, got {type(mixup).__name__}")
        self.mixup = mixup
        if query_chunk is not None and (
            isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1
        ):
            raise ValueError(f"query_chunk must be a positive integer or None (per device), got {query_chunk!r}")
        self.query_chunk = query_chunk
        if sync_free is not None and not isinstance(sync_free, bool):
            raise ValueError(f"sync_free must be True, False or None (per device), got {sync_free!r}")
        self.sync_free = sync_free
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        self.cuda_graph = cuda_graph
        self._walker: Walker = WalkGraphs() if cuda_graph else walk

    def chunk_for(self, device: torch.device) -> int:
        """The queries processed at a time on ``device``: ``query_chunk``, or when None the device's default
        (:func:`~recallk.losses.chunked_walk.default_query_chunk`: 256 on the CPU, 1024 on a GPU)."""
        return self.query_chunk or default_query_chunk(device)

    def sync_free_for(self, device: torch.device) -> bool:
        """Whether the walk on ``device`` is the padded one that never waits for the device
        (:mod:`recallk.losses.chunked_walk`): ``sync_free``, or when None everywhere but on the CPU."""
        return device.type != "cpu" if self.sync_free is None else self.sync_free

    def get_default_distance(self) -> DotProductSimilarity:
        """Plain dot products: recallk's embeddings are already L2-normalised."""
        return DotProductSimilarity(normalize_embeddings=False)

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
                f"{type(self).__name__} got an indices_tuple ({type(indices_tuple).__name__}), but {self.short_name} "
                "ranks every pair of the batch, so miners do not apply; call loss(embeddings, labels) "
                "(DistributedLossWrapper: keep efficient=False)"
            )
        self.reset_stats()
        raw_embeddings = embeddings
        if self.distance.normalize_embeddings:
            check_embeddings(embeddings)
            embeddings = self.distance.normalize(embeddings)
            if ref_emb is not None:
                check_embeddings(ref_emb, "ref_emb")
                ref_emb = self.distance.normalize(ref_emb)
        loss = first_order_only(self._rs_at_k(embeddings, labels, ref_emb, ref_labels, query_index))
        self._check_database_size(len(embeddings) - 1 if ref_emb is None else len(ref_emb) - (query_index is not None))
        loss_dict = {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}
        self.add_embedding_regularization_to_loss_dict(loss_dict, raw_embeddings)
        return self.reducer(loss_dict, raw_embeddings, labels)

    def _check_database_size(self, num_ranked: int) -> None:
        """Hook for a loss with settings that need a database of some size (RS@k: its largest k)."""

    def _rs_at_k(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
        query_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """The loss of the queries ``embeddings`` against ``ref_emb`` (default: the batch itself); see the class doc."""
        check_embeddings(embeddings)
        warn_if_not_unit_norm(embeddings)
        check_labels(labels, len(embeddings))
        labels = labels.to(embeddings.device)
        if ref_emb is None:
            if ref_labels is not None or query_index is not None:
                raise ValueError("ref_labels and query_index only make sense together with ref_emb")
            with _float32(embeddings) as emb:
                self_col = torch.arange(len(emb), device=emb.device)
                return self._embedding_loss(emb, labels, emb, labels, self_col).to(embeddings.dtype)
        check_embeddings(ref_emb, "ref_emb")
        if ref_labels is None:
            raise ValueError("ref_emb was given without ref_labels; pass the labels of the reference rows")
        check_labels(ref_labels, len(ref_emb), "ref_labels", of="ref_emb")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"embeddings have {embeddings.shape[1]} dims but ref_emb has {ref_emb.shape[1]}; they must match"
            )
        warn_if_not_unit_norm(ref_emb, "ref_emb")
        self_col = self._self_columns(query_index, len(embeddings), len(ref_emb), embeddings.device)
        with _float32(embeddings) as emb, _float32(ref_emb) as ref:
            loss = self._embedding_loss(emb, labels, ref, ref_labels.to(embeddings.device), self_col)
        return loss.to(embeddings.dtype)

    def sharded_loss(self, embeddings: torch.Tensor, labels: torch.Tensor, rows: slice) -> torch.Tensor:
        """This process's share of the loss of a global batch: the terms of the queries ``embeddings[rows]``.

        ``embeddings`` (N x D) and ``labels`` (N) are the whole global batch, which is also the database. The
        terms are normalised by the global count of queries with a positive, so the shares of disjoint ``rows``
        covering the batch add up to ``self(embeddings, labels)``, and so do their gradients. With SiMix every
        share must see the same draw (seed the mixup, :meth:`SimilarityMixup.seed`): the virtual items of all
        pairs join the database, and those whose first item lies in ``rows`` are this share's queries.
        """
        check_embeddings(embeddings)
        if self.distance.normalize_embeddings:
            embeddings = self.distance.normalize(embeddings)
        warn_if_not_unit_norm(embeddings)
        check_labels(labels, len(embeddings))
        labels = labels.to(embeddings.device)
        with _float32(embeddings) as emb:
            self_col = torch.arange(len(emb), device=emb.device)
            database, db_labels, db_self, first = self._with_virtual_items(emb, labels, emb, labels, self_col)
            owner = torch.cat([self_col, first])  # the batch row each query (real or virtual) belongs to
            mine = torch.nonzero((owner >= rows.start) & (owner < rows.stop)).squeeze(1)
            settings = self._settings(database.device)
            side_all = settings.query_side(db_labels, db_labels, db_self, database.dtype)
            num_valid = self._num_valid(side_all.num_pos)
            side = settings.query_side(db_labels[mine], db_labels, db_self[mine], database.dtype)
            terms = embedding_terms(database[mine], database, db_labels, side, settings, num_valid, self._walker)
        return terms.to(embeddings.dtype)

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
            settings = self._settings(sim32.device)
            side = settings.query_side(labels, labels, self_col, sim32.dtype)
            loss = similarity_terms(sim32, labels, side, settings, self._num_valid(side.num_pos))
        return loss.to(sim.dtype)

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

    def _settings(self, device: torch.device) -> ChunkKernel:
        """The loss's kernel for the chunked walk on ``device``."""
        raise NotImplementedError

    @staticmethod
    def _num_valid(num_pos: torch.Tensor) -> int:
        """The number of queries with a positive; a clear error when there is none."""
        num_valid = int((num_pos > 0).sum())
        if num_valid == 0:
            raise ValueError(
                "no query in the batch has a positive (another item of its class), so the loss is undefined; "
                "sample several items per class, e.g. with recallk.data.ClassBalancedBatchSampler"
            )
        return num_valid

    def _with_virtual_items(
        self, emb: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
        self_col: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """SiMix's V virtual items (mixed from the query rows) appended to the database (M + V) x D.

        Returns the database, its labels, the query columns extended by the virtual items' own columns
        (N + V), and the query row of each virtual item's first pair member (V; empty without SiMix).
        """
        if self.mixup is None:
            return ref, ref_labels, self_col, self_col[:0]
        pairs, alphas = self.mixup.draw(labels)
        virtual, virtual_labels = self.mixup.mix_embeddings(emb, labels, pairs, alphas)
        own = len(ref) + torch.arange(len(virtual), device=ref.device)
        database = torch.cat([ref, virtual])
        return database, torch.cat([ref_labels, virtual_labels]), torch.cat([self_col, own]), pairs[:, 0]

    def _embedding_loss(
        self, emb: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
        self_col: torch.Tensor,
    ) -> torch.Tensor:
        """The loss of the queries ``emb`` (N x D) against ``ref`` (M x D); ``self_col[i]``: query i's column or -1."""
        database, db_labels, self_col, _ = self._with_virtual_items(emb, labels, ref, ref_labels, self_col)
        if ref is emb:  # the batch against itself: the queries are the database (virtual items included)
            queries = database
        else:
            queries = emb if database is ref else torch.cat([emb, database[len(ref):]])
        query_labels = torch.cat([labels, db_labels[len(ref):]])
        settings = self._settings(database.device)
        side = settings.query_side(query_labels, db_labels, self_col, database.dtype)
        num_valid = self._num_valid(side.num_pos)
        return embedding_terms(queries, database, db_labels, side, settings, num_valid, self._walker)


class RecallAtKLoss(ChunkedRankingLoss):
    """Smooth Recall@k surrogate loss (RS@k), optionally with SiMix; a pytorch-metric-learning loss.

    Args:
        k: the recall levels averaged by the loss (ints, or numpy/tensor integers).
        tau_rank: temperature of the sigmoid that smooths the rank.
        tau_k: temperature of the sigmoid that smooths "rank <= k": one value, one per k, or ``"k"`` (tau_k = k,
            the default, as the authors' code until 2024-11). The paper's 1 gives a positive ranked a few dozen
            places past k no gradient: from scratch at batch 4,096 it collapsed where tau_k = k trained
            (BENCHMARKS.md, "The recall temperature"); ``tau_k=1.0`` is the paper's value.
        rank_includes_query: count the query in its own rank sums, as the authors' code does.
        mixup: a :class:`SimilarityMixup` to add virtual same-class items (mixed from the query rows) to the
            queries and the database.
        query_chunk: queries (and query-positive pairs) processed at a time: the memory knob, results do not
            depend on it; extra memory is about ``3.5 * query_chunk * M`` floats. None (the default): 256 on
            the CPU, 1024 on a GPU, where bigger products are faster (2.7x at N = 65,536 on an H200).
        sync_free: how the walk takes the (query, positive) pairs, same values either way: True pads every
            query to the batch's largest positive count and never reads a value on the host inside the walk
            (fixed shapes, no waiting for a GPU), False takes only real pairs and skips work whose result is
            exactly zero (which needs to read values). None (the default): True everywhere but on the CPU.
        cuda_graph: replay the sync-free walk of a batch from a CUDA graph captured the first time a batch of
            its shape comes (:mod:`recallk.losses.walk_graph`): one launch instead of thousands of small
            kernels; needs a CUDA device and the sync-free walk, keeps the walk's working memory reserved.
            ``from_similarity`` runs eagerly.
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

    short_name = "RS@k"

    def __init__(
        self,
        k: Sequence[int] = (1, 2, 4, 8, 16),
        tau_rank: float = 0.01,
        tau_k: float | str | Sequence[float] = "k",
        rank_includes_query: bool = False,
        mixup: SimilarityMixup | None = None,
        query_chunk: int | None = None,
        sync_free: bool | None = None,
        cuda_graph: bool = False,
        **pml_kwargs: Any,
    ) -> None:
        self.k = check_k(k)
        self.tau_rank = check_temperature(tau_rank, "tau_rank")
        self.tau_k = check_tau_k(tau_k, self.k)
        self.rank_includes_query = bool(rank_includes_query)
        super().__init__(mixup, query_chunk, sync_free, cuda_graph, **pml_kwargs)

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, tau_rank={self.tau_rank}, tau_k={self.tau_k}, "
            f"rank_includes_query={self.rank_includes_query}, mixup={self.mixup}, query_chunk={self.query_chunk}, "
            f"sync_free={self.sync_free}, cuda_graph={self.cuda_graph}"
        )

    def _settings(self, device: torch.device) -> RankSettings:
        return RankSettings(self.k, self.tau_rank, self.tau_k, self.rank_includes_query, self.chunk_for(device),
                            self.sync_free_for(device))

    def _check_database_size(self, num_ranked: int) -> None:
        """Warns once when the largest k is not smaller than what each query is ranked against."""
        warn_if_k_exceeds(self.k, num_ranked + self.rank_includes_query)


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
