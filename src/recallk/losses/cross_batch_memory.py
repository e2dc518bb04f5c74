"""Cross-batch memory for RS@k: a queue of earlier batches' embeddings as extra database items.

In the spirit of pytorch-metric-learning's ``CrossBatchMemory`` (XBM, Wang et al., CVPR 2020), which does not
accept RS@k. With B the batch (N x D, labels y) and Q the queue of the last ``memory_size`` embeddings of
earlier batches (labels y_Q, detached), the loss is

    loss = RS@k(queries B, database [B; Q], query_index = 0..N-1)

so each query is ranked against the rest of its batch and the whole memory; the gradient reaches B only (as
queries and as database items). After the loss, B joins the queue (oldest rows leave first) when the module is
in training mode; ``eval()`` leaves the memory unchanged. The queue is stored in buffers, so it is part of
``state_dict()`` and a resumed run continues with the same memory.
"""

from __future__ import annotations

import torch
from torch import nn

from recallk.losses.input_checks import check_embeddings, check_labels
from recallk.losses.recall_at_k import RecallAtKLoss


class CrossBatchRecallAtK(nn.Module):
    """RS@k of each batch against the batch plus a memory of the last ``memory_size`` earlier embeddings.

    Args:
        loss: the :class:`RecallAtKLoss` to compute (without SiMix: the memory holds real items only).
        embedding_size: D, the width of the embeddings (the memory is allocated up front, as in PML).
        memory_size: how many past embeddings the queue holds.

    Call as ``memory_loss(embeddings (N, D), labels (N,))``; returns the scalar loss. ``filled`` is the number
    of items in the memory now.
    """

    memory_embeddings: torch.Tensor
    memory_labels: torch.Tensor
    filled_count: torch.Tensor
    next_slot: torch.Tensor

    def __init__(self, loss: RecallAtKLoss, embedding_size: int, memory_size: int = 1024) -> None:
        super().__init__()
        if not isinstance(loss, RecallAtKLoss):
            raise ValueError(f"CrossBatchRecallAtK wraps a recallk.RecallAtKLoss, got {type(loss).__name__}")
        if loss.mixup is not None:
            raise ValueError("CrossBatchRecallAtK does not combine with SiMix (mixup); pass RecallAtKLoss(mixup=None)")
        for name, value in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.loss = loss
        self.embedding_size = embedding_size
        self.memory_size = memory_size
        self.register_buffer("memory_embeddings", torch.zeros(memory_size, embedding_size))
        self.register_buffer("memory_labels", torch.zeros(memory_size, dtype=torch.long))
        self.register_buffer("filled_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("next_slot", torch.zeros((), dtype=torch.long))

    @property
    def filled(self) -> int:
        return int(self.filled_count)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, filled={self.filled}"

    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The items in memory now: embeddings (filled, D) and labels (filled,)."""
        return self.memory_embeddings[: self.filled], self.memory_labels[: self.filled]

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple: tuple | None = None
    ) -> torch.Tensor:
        check_embeddings(embeddings)
        check_labels(labels, len(embeddings))
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings have {embeddings.shape[1]} dims but the memory holds {self.embedding_size}; "
                f"build CrossBatchRecallAtK with embedding_size={embeddings.shape[1]}"
            )
        labels = labels.to(embeddings.device)
        stored, stored_labels = self.memory()
        database = torch.cat([embeddings, stored.to(embeddings.device, embeddings.dtype)])
        database_labels = torch.cat([labels.long(), stored_labels.to(embeddings.device)])
        own_rows = torch.arange(len(embeddings), device=embeddings.device)
        value = self.loss(embeddings, labels, indices_tuple, database, database_labels, query_index=own_rows)
        if self.training:
            self.enqueue(embeddings.detach(), labels)
        return value

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Add rows to the queue; when it is full the oldest rows are replaced first."""
        embeddings, labels = embeddings[-self.memory_size :], labels[-self.memory_size :]
        device = self.memory_embeddings.device
        slots = (self.next_slot.to(device) + torch.arange(len(embeddings), device=device)) % self.memory_size
        self.memory_embeddings[slots] = embeddings.to(device, self.memory_embeddings.dtype)
        self.memory_labels[slots] = labels.to(device, torch.long)
        self.next_slot.fill_(int(self.next_slot + len(embeddings)) % self.memory_size)
        self.filled_count.fill_(min(self.memory_size, self.filled + len(embeddings)))
