"""``build_dataset``: one entry point for every reader."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from recallk.data.folder_csv import build_csv, build_folder
from recallk.data.image_dataset import ImageDataset, apply_pixel_limit
from recallk.data.landmarks import build_gldv2, build_sfm120k
from recallk.data.omniglot import build_omniglot
from recallk.data.paths import resolve_data_dir
from recallk.data.standard_datasets import (
    build_cars,
    build_cub,
    build_inat2018,
    build_inshop,
    build_sop,
    build_vehicleid,
)
from recallk.registry import DATASETS

# The reader of each name in recallk.registry.DATASETS (tests/test_registry.py checks that they match).
READERS: dict[str, Callable[..., ImageDataset]] = {
    "omniglot": build_omniglot,
    "sop": build_sop,
    "cub": build_cub,
    "cars": build_cars,
    "inat2018": build_inat2018,
    "vehicleid": build_vehicleid,
    "inshop": build_inshop,
    "sfm120k": build_sfm120k,
    "gldv2": build_gldv2,
    "folder": build_folder,
    "csv": build_csv,
}


def build_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    transform: Callable[..., Any] | None = None,
    skip_bad_images: bool = False,
    max_image_pixels: int | None = None,
    **kwargs: Any,
) -> ImageDataset:
    """Read data set ``name``'s ``split`` from ``root`` (``None``: :func:`~recallk.data.paths.resolve_data_dir`).

    ``kwargs`` go to the reader: Omniglot takes ``val_classes``, ``seed``, ``download``, ``base_url``,
    ``checksums``; ``csv`` takes ``csv_files``, ``csv_file``, ``path_column``, ``label_column``, ``delimiter``.
    Splits per data set are in each reader's docstring. ``max_image_pixels``: Pillow's decompression-bomb limit
    (:func:`~recallk.data.image_dataset.apply_pixel_limit`; ``None``: Pillow's default).
    """
    reader = READERS.get(name)
    if reader is None:
        raise ValueError(DATASETS.unknown(name))
    apply_pixel_limit(max_image_pixels)  # before the reader: skip_bad_images opens every image at construction
    dataset = reader(resolve_data_dir(root), split, transform=transform, skip_bad_images=skip_bad_images, **kwargs)
    dataset.max_image_pixels = max_image_pixels
    return dataset


def reader_decoding(name: str, options: Mapping[str, Any]) -> tuple[str, bool]:
    """``(image_mode, invert)`` with which the reader of data set ``name`` (given ``data.options``) decodes images.

    Omniglot reads grayscale ("L") and inverts (ink bright on a dark background); ``folder`` and ``csv`` follow
    their ``grayscale`` and ``invert`` options; the other readers read RGB. (tests/test_registry.py checks this
    against the readers.)
    """
    if name == "omniglot":
        return "L", True
    if name in ("folder", "csv"):
        return ("L" if options.get("grayscale", False) else "RGB"), bool(options.get("invert", False))
    return "RGB", False
