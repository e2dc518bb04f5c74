"""RS@k (or recallk's Smooth-AP / FastAP) as a sentence-transformers loss: ``CachedRecallAtKLoss``
(``pip install 'recallk[text]'``).

A drop-in loss for class-labelled sentences (a dataset with one text column and a ``label`` column) that works
with ``SentenceTransformerTrainer`` and ``model.fit``. Like sentence-transformers'
``CachedMultipleNegativesRankingLoss`` it embeds the batch in mini-batches twice, through recallk's multistage
engine (:mod:`recallk.engine.multistage`):

1. ``forward`` embeds every mini-batch without a graph (saving each one's RNG state, so dropout replays), computes
   RS@k on the whole batch and its gradient G = dL/dE (N, D), and returns the loss as a leaf tensor;
2. ``loss.backward()`` (called by the trainer) runs a hook that re-embeds each mini-batch with autograd and
   backpropagates its rows of ``G * grad_output`` (so loss scaling and gradient accumulation apply).

The parameter gradient equals that of RS@k on the full batch embedded at once, while activation memory is that
of one mini-batch: batches of thousands of sentences train in the memory of ``mini_batch_size``. Re-embedded
mini-batches other than the last run under DDP's ``no_sync()`` when the trainer has wrapped the model in
DistributedDataParallel, so gradients are all-reduced once per step. With ``gather_across_devices=True`` (several
processes) the loss is RS@k over the global batch of all devices, each device computing the terms of its own
sentences against all of them (:func:`recallk.engine.multistage.loss_and_embedding_grad`).

Batches need several sentences per label; use ``batch_sampler=BatchSamplers.GROUP_BY_LABEL`` in the training
arguments (or recallk's :class:`~recallk.data.sampler.ClassBalancedBatchSampler`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from recallk.engine.multistage import (
    FirstPass,
    backward_through_chunks,
    embed_without_graph,
    loss_and_embedding_grad,
)
from recallk.losses.recall_at_k import ChunkedRankingLoss, RecallAtKLoss
from recallk.losses.simix import SimilarityMixup
from recallk.models.text import SentenceEncoder

try:
    from sentence_transformers import SentenceTransformer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "recallk.integrations.sentence_transformers needs sentence-transformers; pip install 'recallk[text]'"
    ) from err


def _tensor_features(features: dict[str, Any]) -> dict[str, Tensor]:
    """The batch-shaped tensors of a features dict (sentence-transformers also passes e.g. ``modality``)."""
    return {name: value for name, value in features.items() if isinstance(value, Tensor) and value.dim() > 0}


class CachedRecallAtKLoss(nn.Module):
    """RS@k over a whole batch of labelled sentences, embedded ``mini_batch_size`` sentences at a time.

    Args:
        model: the SentenceTransformer being trained.
        mini_batch_size: sentences per forward pass (the memory knob; the gradient does not depend on it).
        k: recall levels averaged by RS@k.
        tau_rank, tau_k: sigmoid temperatures of the rank and of "rank <= k" (0.01, and ``"k"``: tau_k = k for each
            k, :class:`~recallk.RecallAtKLoss`'s default; the paper's tau_k is 1).
        mixup: SiMix: ``True`` or a :class:`~recallk.losses.simix.SimilarityMixup` to add mixed same-label items.
        rank_includes_query: count the query in its own ranks, as the authors' code does.
        show_progress_bar: show a progress bar over the mini-batches of both embedding passes (named as in
            sentence-transformers' cached losses; off by default).
        gather_across_devices: with several processes, compute RS@k over the batches of all devices (the
            global batch) instead of each device's own. Evaluation without gradients stays per device.
            SiMix draws from a generator seeded by ``torch.initial_seed()`` (the run seed) + the step number.
        loss: another of recallk's chunked losses to use instead of RS@k, e.g. ``recallk.SmoothAPLoss()`` or
            ``recallk.FastAPLoss()`` (with its own ``mixup``); ``k``, ``tau_rank``, ``tau_k``, ``mixup`` and
            ``rank_includes_query`` must then stay at their defaults.

    Inputs: ``sentence_features`` with one features dict (N sentences) and ``labels``: (N,) integers of any
    values, or N strings (class names; only equality matters, so they are numbered per batch). A ``datasets``
    column of strings must be numbered before sentence-transformers' collator sees it:
    ``dataset.class_encode_column("label")``.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        mini_batch_size: int = 32,
        k: Sequence[int] = (1, 2, 4, 8, 16),
        tau_rank: float = 0.01,
        tau_k: float | str | Sequence[float] = "k",
        mixup: SimilarityMixup | bool | None = None,
        rank_includes_query: bool = False,
        show_progress_bar: bool = False,
        gather_across_devices: bool = False,
        loss: ChunkedRankingLoss | None = None,
    ) -> None:
        super().__init__()
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        self.model = model
        self.mini_batch_size = mini_batch_size
        self.show_progress_bar = bool(show_progress_bar)
        self.gather_across_devices = bool(gather_across_devices)
        self.steps = 0
        if loss is None:
            loss = RecallAtKLoss(
                k, tau_rank, tau_k, rank_includes_query, SimilarityMixup() if mixup is True else (mixup or None)
            )
        elif not isinstance(loss, ChunkedRankingLoss):
            raise ValueError(
                f"loss must be one of recallk's chunked losses (RecallAtKLoss, SmoothAPLoss, FastAPLoss), got "
                f"{type(loss).__name__}"
            )
        elif mixup or rank_includes_query or tuple(k) != (1, 2, 4, 8, 16) or (tau_rank, tau_k) != (0.01, "k"):
            raise ValueError("give either loss= or the RS@k settings (k, tau_rank, tau_k, mixup, "
                             "rank_includes_query), not both; set them on the loss you pass")
        self.loss = loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        features = list(sentence_features)
        if len(features) != 1:
            raise ValueError(
                f"CachedRecallAtKLoss takes one text column and a label column, got {len(features)} text columns; "
                "give a dataset with columns (text, label)"
            )
        if labels is None:
            raise ValueError("CachedRecallAtKLoss needs class labels: give the dataset a 'label' column")
        labels = label_ids(labels)
        if not self.gather_across_devices and len(labels) and len(torch.unique(labels)) == len(labels):
            raise ValueError(
                f"no two sentences of this batch of {len(labels)} share a label, so RS@k has no positive to rank: "
                "sentence-transformers' default batch sampler draws sentences at random; pass "
                "batch_sampler=BatchSamplers.GROUP_BY_LABEL to SentenceTransformerTrainingArguments "
                "(from sentence_transformers.base.sampler import BatchSamplers), or batches with several "
                "sentences per label to model.fit"
            )
        inputs = _tensor_features(features[0])
        encoder = _ProgressEncoder(  # copies the features dict and L2-normalises, as recallk's models do
            SentenceEncoder(self.model), self.show_progress_bar, len(labels), self.mini_batch_size
        )
        first = embed_without_graph(encoder, inputs, self.mini_batch_size)
        labels = labels.to(first.embeddings.device)
        embeddings = first.embeddings.to(torch.promote_types(first.embeddings.dtype, torch.float32))
        if not torch.is_grad_enabled():
            return self.loss(embeddings, labels)
        if self.loss.mixup is not None:
            self.loss.mixup.seed(torch.initial_seed() + self.steps)  # run seed + step: one draw on every device
        self.steps += 1
        loss, grad = loss_and_embedding_grad(self.loss, embeddings, labels, all_gather=self.gather_across_devices)
        first.embeddings = first.embeddings[:0]
        result = loss.detach().clone().requires_grad_(True)
        result.register_hook(partial(_backward_hook, encoder=encoder, inputs=inputs, first=first, grad=grad))
        return result

    def get_config_dict(self) -> dict[str, Any]:
        """Hyper-parameters shown in sentence-transformers' model cards."""
        shared = {
            "mini_batch_size": self.mini_batch_size,
            "show_progress_bar": self.show_progress_bar,
            "gather_across_devices": self.gather_across_devices,
        }
        if not isinstance(self.loss, RecallAtKLoss):
            return {**shared, "loss": repr(self.loss)}
        return {
            **shared,
            "k": list(self.loss.k),
            "tau_rank": self.loss.tau_rank,
            "tau_k": list(self.loss.tau_k),
            "mixup": repr(self.loss.mixup),
            "rank_includes_query": self.loss.rank_includes_query,
        }

    @property
    def citation(self) -> str:
        return """
@inproceedings{patel2022recall,
    title={Recall@k Surrogate Loss with Large Batches and Similarity Mixup},
    author={Patel, Yash and Tolias, Giorgos and Matas, Ji{\\v{r}}{\\'\\i}},
    booktitle={CVPR},
    year={2022}
}
"""


def label_ids(labels: Tensor | Sequence[Any] | np.ndarray) -> Tensor:
    """Labels as an integer tensor: tensors and integer sequences as they are, class names numbered.

    Strings (or any hashable class keys) get the index of their sorted unique value; RS@k only compares labels
    for equality, so numbering per batch is exact.
    """
    if isinstance(labels, Tensor):
        return labels
    values = np.asarray(labels)
    if values.dtype.kind in "iu":
        return torch.from_numpy(values.astype(np.int64))
    if values.ndim != 1:
        raise ValueError(f"labels must be one class per sentence (1-D), got shape {values.shape}")
    _, ids = np.unique(values.astype(str) if values.dtype.kind in "OUS" else values, return_inverse=True)
    return torch.from_numpy(ids.astype(np.int64))


class _ProgressEncoder(nn.Module):
    """``encoder`` that advances a tqdm bar once per call, i.e. per mini-batch of either embedding pass."""

    def __init__(self, encoder: nn.Module, enabled: bool, num_rows: int, mini_batch_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        passes = 2 if torch.is_grad_enabled() else 1  # the backward pass embeds every mini-batch again
        total = passes * -(-num_rows // mini_batch_size)
        self.bar = tqdm(total=total, desc="Embed mini-batches", unit="mini-batch", disable=not enabled, leave=False)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        output = self.encoder(features)
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.bar.close()
        return output


def _backward_hook(
    grad_output: Tensor, encoder: nn.Module, inputs: dict[str, Tensor], first: FirstPass, grad: Tensor
) -> None:
    """Stage 3, run by ``loss.backward()``: backpropagate ``grad * grad_output`` through the re-embedded chunks.

    The autograd engine runs hooks with gradients disabled; the re-embedding needs them back on.
    """
    with torch.enable_grad():
        backward_through_chunks(encoder, inputs, first, grad * grad_output.to(grad.dtype))
