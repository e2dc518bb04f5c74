"""recallk: deep metric learning by directly optimising recall@k.

Implements "Recall@k Surrogate Loss with Large Batches and Similarity Mixup" (Patel, Tolias, Matas, CVPR 2022):
``RecallAtKLoss`` (RS@k), ``SmoothAPLoss`` and ``FastAPLoss`` on the same chunked kernel, ``SimilarityMixup``
(SiMix) and ``retrieval_metrics``; using a trained model: ``load_model`` (a :class:`RecallkModel` that embeds
images or text) and ``Index`` (gallery search); training your own ``nn.Module`` on your own datasets: ``fit``
(with ``LabelledDataset`` for datasets without a ``.labels`` attribute). The public names are imported lazily so
that ``recallk --help`` answers without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "CrossBatchRecallAtK": "recallk.losses.cross_batch_memory",
    "RecallAtKLoss": "recallk.losses.recall_at_k",
    "SmoothAPLoss": "recallk.losses.average_precision",
    "FastAPLoss": "recallk.losses.average_precision",
    "SimilarityMixup": "recallk.losses.simix",
    "retrieval_metrics": "recallk.evaluation.metrics",
    "load_model": "recallk.pretrained",
    "RecallkModel": "recallk.pretrained",
    "Index": "recallk.evaluation.index",
    "fit": "recallk.training.fit",
    "LabelledDataset": "recallk.data.own_dataset",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'recallk' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, lazy ones included (``dir(recallk)``, tab completion), and the module's dunders."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})
