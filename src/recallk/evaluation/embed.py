"""Embedding a whole split with a model, and evaluating retrieval on it.

:func:`embed_source` is the one code path that turns a split into evaluation embeddings: training-time validation
and test, ``recallk evaluate`` and ``recallk embed`` all call it. It always runs the model in float32, outside any
autocast region, so metrics do not depend on the training precision (``train.amp``): bf16 embeddings of a network
trained under bf16 autocast can rank neighbours very differently from its float32 embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from recallk.data.inputs import Inputs, batch_rows, to_device
from recallk.evaluation.metrics import retrieval_metrics
from recallk.files import atomic_write

if TYPE_CHECKING:
    from recallk.data.sources import BatchSource


@torch.no_grad()
def embed_batches(
    model: nn.Module,
    batches: Iterable[Inputs],
    device: torch.device,
    total: int | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> torch.Tensor:
    """Run ``model`` (in eval mode, in float32 with autocast disabled) over ``batches`` of inputs (image tensors or
    token dicts); returns float32 embeddings (N, D) on the CPU.

    ``total`` is the number of items, for the progress bar. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        with tqdm(total=total, desc=desc, unit="item", disable=not progress, leave=False) as bar, \
                torch.autocast(device.type, enabled=False):
            for inputs in batches:
                out.append(model(to_device(inputs, device)).float().cpu())
                bar.update(batch_rows(inputs))
    finally:
        model.train(was_training)
    return torch.cat(out)


def embed_source(
    model: nn.Module,
    source: BatchSource,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    desc: str = "embedding",
) -> torch.Tensor:
    """:func:`embed_batches` over a whole split (a :mod:`recallk.data.sources` source), in order: float32 (N, D)."""
    return embed_batches(
        model, source.eval_batches(batch_size), device, total=len(source.labels), progress=progress, desc=desc
    )


def evaluate_embeddings(
    embeddings: torch.Tensor, labels: torch.Tensor, k: Sequence[int], progress: bool = True
) -> dict[str, float | int]:
    """All-vs-all retrieval metrics of a split (each item a query against the rest)."""
    return retrieval_metrics(embeddings, labels, k=tuple(k), progress=progress)


def raw_pixel_embeddings(batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Flattened, L2-normalised input pixels: the no-learning baseline (N, C*H*W)."""
    return torch.nn.functional.normalize(torch.cat([b.flatten(1).float() for b in batches]), dim=1)


def save_embeddings(path: Path, embeddings: torch.Tensor, source: BatchSource) -> None:
    """Save ``embeddings`` (N, D) float32, ``labels`` (N,), ``item_ids`` (N,) and, when the split names its classes,
    ``class_names`` (C,) (``class_names[labels[i]]`` is item i's class) of a split to an ``.npz`` file."""
    arrays = {"embeddings": embeddings.numpy(), "labels": source.labels.numpy(), "item_ids": np.array(source.item_ids)}
    if source.class_names is not None:
        arrays["class_names"] = np.array(source.class_names, dtype=str)
    atomic_write(Path(path), lambda handle: np.savez(handle, **arrays))
