"""Readers for user data: a class-per-folder tree and a CSV of ``path,label``."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from recallk.data.image_dataset import ImageDataset, encode_labels
from recallk.data.listing import class_keys
from recallk.data.stores import DirectoryStore

Transform = Callable[[Image.Image], Any] | None


def build_folder(
    root: str | Path,
    split: str = "all",
    transform: Transform = None,
    skip_bad_images: bool = False,
    grayscale: bool = False,
    invert: bool = False,
) -> ImageDataset:
    """Images in ``<root>/<split>/<class>/...`` (any depth below the class folder), or in ``<root>/<class>/...`` when
    ``split`` is ``"all"`` and ``<root>/all`` does not exist.

    Class names are the folder names, labels follow their sorted order; files are kept by extension
    (torchvision's ``IMG_EXTENSIONS``, any case) and hidden files and folders are ignored. A class folder without
    images is a ``ValueError``.
    """
    root = Path(root)
    tree = root / split
    if not tree.is_dir():
        if split != "all" or not root.is_dir():
            raise FileNotFoundError(
                f"image folder {tree} not found; arrange the images as {tree}/<class name>/<image>, or use "
                f"split='all' to read {root}/<class name>/<image>"
            )
        tree = root
    class_dirs = sorted(p for p in tree.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{tree} has no class folders; expected {tree}/<class name>/<image>")
    names, keys = [], []
    for class_dir in class_dirs:
        files = sorted(
            f.relative_to(tree).as_posix()
            for f in class_dir.rglob("*")
            if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
            and not any(part.startswith(".") for part in f.relative_to(class_dir).parts)
        )
        if not files:
            raise ValueError(
                f"class folder {class_dir} has no images (extensions {', '.join(IMG_EXTENSIONS)}); add images or "
                "remove the folder"
            )
        names += files
        keys += [class_dir.name] * len(files)
    labels, classes = encode_labels(keys)
    return ImageDataset(
        DirectoryStore(tree), names, labels, classes, transform=transform, image_mode="L" if grayscale else "RGB",
        invert=invert, skip_bad_images=skip_bad_images,
    )


def build_csv(
    root: str | Path,
    split: str = "train",
    transform: Transform = None,
    skip_bad_images: bool = False,
    csv_file: str | Path | None = None,
    grayscale: bool = False,
    invert: bool = False,
) -> ImageDataset:
    """Images listed in a CSV with a header holding the columns ``path`` and ``label``.

    The file is ``csv_file`` if given, else ``root`` itself when it is a ``.csv`` file, else ``<root>/<split>.csv``.
    Relative paths are relative to the CSV's folder. Labels are any text; when all are integers they are ordered
    numerically, else as text. ``grayscale`` and ``invert`` as in :func:`build_folder`.
    """
    root = Path(root)
    path = Path(csv_file) if csv_file is not None else root if root.suffix.lower() == ".csv" else root / f"{split}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"CSV split file {path} not found; write it with a header line 'path,label'")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(
                f"{path} must start with a header naming the columns 'path' and 'label', got {reader.fieldnames}"
            )
        rows = [(r["path"].strip(), r["label"].strip()) for r in reader]
    labels, classes = encode_labels(class_keys([label for _, label in rows]))
    return ImageDataset(
        DirectoryStore(path.parent), [p for p, _ in rows], labels, classes, transform=transform,
        image_mode="L" if grayscale else "RGB", invert=invert, skip_bad_images=skip_bad_images,
        missing_hint=f"paths in {path} are relative to {path.parent}",
    )
