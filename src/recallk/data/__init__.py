"""Data sets, transforms and the class-balanced batch sampler.

Every reader returns an :class:`ImageDataset` of ``(transformed image, label)`` with ``.labels`` (int64 ``0..C-1``),
``.item_ids``, ``.class_names`` and ``.num_classes``; :func:`build_dataset` picks the reader by name. Names are
imported lazily so that ``recallk.data.paths`` can be used without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "BadImageError": "recallk.data.image_dataset",
    "ClassBalancedBatchSampler": "recallk.data.sampler",
    "DownloadError": "recallk.data.download",
    "ImageDataset": "recallk.data.image_dataset",
    "OMNIGLOT_CHECKSUMS": "recallk.data.omniglot",
    "OMNIGLOT_URL": "recallk.data.omniglot",
    "READERS": "recallk.data.factory",
    "build_dataset": "recallk.data.factory",
    "build_omniglot": "recallk.data.omniglot",
    "build_transforms": "recallk.data.transforms",
    "download_file": "recallk.data.download",
    "load_omniglot_arrays": "recallk.data.omniglot",
    "resolve_data_dir": "recallk.data.paths",
    "user_cache_dir": "recallk.data.paths",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'recallk.data' has no attribute {name!r}")
