"""``build_loss``: recallk's chunked losses (RS@k, Smooth-AP, FastAP) or a pytorch-metric-learning baseline, all
called as ``loss(embeddings, labels)``.

Baselines use pytorch-metric-learning's implementations with its defaults unless ``params`` overrides them:
contrastive, triplet (margin 0.1 with a semi-hard-or-harder triplet miner), multi-similarity (with its miner),
normalised softmax, proxy-anchor and FastAP (PML's, for comparison with recallk's ``fast_ap``; PML's Smooth-AP is
not offered: version 2.9 groups the batch into the wrong classes, see BENCHMARKS.md). Proxy and softmax losses own
trainable parameters; the trainer optimises them with the model (``loss.parameters()``).
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import nn

from recallk.losses.average_precision import FastAPLoss, SmoothAPLoss
from recallk.losses.cross_batch_memory import CrossBatchRecallAtK
from recallk.losses.recall_at_k import RecallAtKLoss
from recallk.losses.simix import SimilarityMixup
from recallk.registry import CHUNKED_LOSSES, LOSSES

LOSS_NAMES = tuple(LOSSES)  # recallk.registry.LOSSES: recallk's chunked losses, then the PML baselines
BASELINES = tuple(name for name in LOSS_NAMES if name not in CHUNKED_LOSSES)


class MinedLoss(nn.Module):
    """A pytorch-metric-learning loss whose tuples come from a miner on each batch."""

    def __init__(self, loss: nn.Module, miner: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


def build_loss(
    name: str,
    *,
    num_classes: int | None = None,
    embed_dim: int | None = None,
    k: tuple[int, ...] = (1, 2, 4, 8, 16),
    tau_rank: float = 0.01,
    tau_k: float | str | tuple[float, ...] = "k",
    rank_includes_query: bool = False,
    simix: bool = False,
    simix_pairs_per_class: int | None = 6,
    memory_size: int = 0,
    params: dict[str, Any] | None = None,
) -> nn.Module:
    """The loss called ``name`` (one of ``LOSS_NAMES``); ``params`` are extra constructor arguments.

    ``num_classes`` and ``embed_dim`` are needed by the proxy and softmax losses (one proxy per training class).
    ``memory_size > 0`` wraps RS@k in a :class:`CrossBatchRecallAtK` memory of that many past embeddings (needs
    ``embed_dim``).
    """
    params = dict(params or {})
    if memory_size and name != "rsk":
        raise ValueError(f"the cross-batch memory works with the rsk loss only, not {name!r}; set loss.memory_size: 0")
    if name == "rsk":
        mixup = SimilarityMixup(simix_pairs_per_class) if simix else None
        loss = RecallAtKLoss(k, tau_rank, tau_k, rank_includes_query, mixup, **params)
        if not memory_size:
            return loss
        if not embed_dim:
            raise ValueError("the cross-batch memory needs embed_dim (the width of the stored embeddings)")
        return CrossBatchRecallAtK(loss, embed_dim, memory_size)
    if name in ("smooth_ap", "fast_ap"):
        mixup = SimilarityMixup(simix_pairs_per_class) if simix else None
        return (SmoothAPLoss if name == "smooth_ap" else FastAPLoss)(mixup=mixup, **params)
    if simix:
        raise ValueError(
            f"SiMix works with recallk's losses {', '.join(CHUNKED_LOSSES)} only, not {name!r}; set loss.simix: false"
        )
    if name == "contrastive":
        return pml_losses.ContrastiveLoss(**params)
    if name == "triplet":
        margin = params.pop("margin", 0.1)
        miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=params.pop("triplets", "semihard"))
        return MinedLoss(pml_losses.TripletMarginLoss(margin=margin, **params), miner)
    if name == "multi_similarity":
        miner = pml_miners.MultiSimilarityMiner(epsilon=params.pop("epsilon", 0.1))
        return MinedLoss(pml_losses.MultiSimilarityLoss(**params), miner)
    if name == "fastap":
        return pml_losses.FastAPLoss(**params)
    if name in ("normalized_softmax", "proxy_anchor"):
        if not num_classes or not embed_dim:
            raise ValueError(f"the {name} loss needs num_classes and embed_dim (one proxy per training class)")
        cls = pml_losses.NormalizedSoftmaxLoss if name == "normalized_softmax" else pml_losses.ProxyAnchorLoss
        return cls(num_classes=num_classes, embedding_size=embed_dim, **params)
    raise ValueError(LOSSES.unknown(name))
