"""Checks across the splits of one run on user data (the ``csv`` and ``folder`` readers), before training: every
listed image exists, no two splits read the same CSV file, and no image is in two splits (a test on training images
overstates recall). The training pre-flight and ``recallk train --dry-run`` run them. ``--dry-run`` also reads the
landmark training sets' lists (:func:`check_landmark_splits`), which training reads first thing anyway."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from recallk.data.factory import build_dataset
from recallk.data.folder_csv import csv_split_file
from recallk.data.paths import resolve_data_dir
from recallk.data.sources import TRANSFORM_OPTIONS, reader_kwargs
from recallk.errors import RecallkUsageError

if TYPE_CHECKING:
    from recallk.config import DataConfig

USER_READERS = ("csv", "folder")  # readers of user-arranged data; the standard data sets' splits are fixed
LANDMARK_READERS = ("sfm120k", "gldv2")  # large downloads that users extract themselves: pickle/CSV plus images


def check_landmark_splits(cfg: DataConfig, data_dir: str | Path | None, splits: Sequence[str]) -> None:
    """For the landmark readers: read each distinct split in ``splits`` as training reads it (the pickle or CSV,
    every listed image exists, classes too small dropped; no image decoded), so that a missing list file, a pickle
    without ``cluster`` or a missing image fails with the one line training would give."""
    if cfg.dataset not in LANDMARK_READERS:
        return
    for split in dict.fromkeys(splits):
        build_dataset(cfg.dataset, resolve_data_dir(data_dir), split, **reader_kwargs(cfg))


def check_user_splits(cfg: DataConfig, data_dir: str | Path | None, splits: Sequence[str]) -> None:
    """For the ``csv`` and ``folder`` readers: read the listing of each distinct split name in ``splits`` (no image
    is decoded) and refuse, with one line naming the splits, two that resolve to the same CSV file or share an
    image. A missing CSV, a malformed row or a missing image fails here as it would when training starts."""
    if cfg.dataset not in USER_READERS or cfg.in_memory:
        return
    names = list(dict.fromkeys(splits))
    root = resolve_data_dir(data_dir)
    kwargs = {k: v for k, v in cfg.options.items() if k not in TRANSFORM_OPTIONS}
    if cfg.dataset == "csv":
        files = {
            split: {os.path.abspath(csv_split_file(root, split, kwargs.get("csv_file"), kwargs.get("csv_files")))}
            for split in names
        }
        _refuse_overlap(files, lambda a, b, shared: (
            f"splits {a!r} and {b!r} both read {next(iter(shared))}, so the {b} metrics are measured on the {a} "
            f"data; give each split its own file: data.options.csv_files={{{a}: {a}.csv, {b}: {b}.csv}} "
            "(data.options.csv_file is one file for a single split)"
        ))
    images: dict[str, set[str]] = {}
    for split in names:
        dataset = build_dataset(cfg.dataset, root, split, **kwargs)
        images[split] = {os.path.normpath(os.path.abspath(dataset.store.describe(n))) for n in dataset.item_ids}
    _refuse_overlap(images, lambda a, b, shared: (
        f"splits {a!r} and {b!r} share {len(shared)} image(s), e.g. {sorted(shared)[0]}, so the {b} metrics are "
        f"measured partly on the {a} data; keep each image in one split"
    ))


def _refuse_overlap(members: Mapping[str, set[str]], message: Callable[[str, str, set[str]], str]) -> None:
    for (a, first), (b, second) in itertools.combinations(members.items(), 2):
        shared = first & second
        if shared:
            raise RecallkUsageError(message(a, b, shared))
