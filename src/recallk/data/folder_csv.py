"""Readers for user data: a class-per-folder tree and a CSV of ``path,label``."""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
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


def csv_split_file(
    root: str | Path, split: str, csv_file: str | Path | None = None, csv_files: Mapping[str, str] | None = None
) -> Path:
    """The CSV that :func:`build_csv` reads for ``split``: ``csv_files[split]``, else ``csv_file``, else ``root``
    itself when it is a ``.csv`` file, else ``<root>/<split>.csv``. Relative entries of ``csv_files`` and
    ``csv_file`` are relative to ``root`` when ``root`` is a folder."""
    root = Path(root)
    if csv_files is not None and not isinstance(csv_files, Mapping):
        raise ValueError(
            f"data.options.csv_files must map split names to CSV files, got {csv_files!r}; write e.g. "
            "csv_files: {train: train.csv, val: val.csv, test: test.csv}"
        )
    if csv_files is not None and split in csv_files:
        chosen: str | Path | None = csv_files[split]
    elif csv_files is not None and csv_file is None:
        raise ValueError(
            f"data.options.csv_files names no file for split {split!r} (it has {', '.join(map(repr, csv_files))}); "
            f"add '{split}: FILE.csv' to data.options.csv_files"
        )
    else:
        chosen = csv_file
    if chosen is not None:
        path = Path(chosen).expanduser()
        return path if path.is_absolute() or root.suffix.lower() == ".csv" else root / path
    return root if root.suffix.lower() == ".csv" else root / f"{split}.csv"


def build_csv(
    root: str | Path,
    split: str = "train",
    transform: Transform = None,
    skip_bad_images: bool = False,
    csv_file: str | Path | None = None,
    csv_files: Mapping[str, str] | None = None,
    path_column: str = "path",
    label_column: str = "label",
    delimiter: str = ",",
    grayscale: bool = False,
    invert: bool = False,
) -> ImageDataset:
    """Images listed in a CSV with a header naming the columns ``path_column`` and ``label_column`` (default
    ``path`` and ``label``), fields separated by ``delimiter``; a UTF-8 byte-order mark (Excel's "CSV UTF-8") is
    accepted.

    The file of ``split`` is :func:`csv_split_file`: ``csv_files`` maps split names to files (one per split, e.g.
    ``{"train": "train.csv", "test": "test.csv"}``), ``csv_file`` is one file (for a single split). Relative image
    paths are relative to the CSV's folder. Labels are any text; when all are integers they are ordered
    numerically, else as text. A row with a missing or extra field, or an empty path or label, is a ``ValueError``
    naming the file and line. ``grayscale`` and ``invert`` as in :func:`build_folder`.
    """
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ValueError(f"data.options.delimiter must be one character, got {delimiter!r}; e.g. ',' or ';'")
    path = csv_split_file(root, split, csv_file, csv_files)
    if not all(isinstance(c, str) and c for c in (path_column, label_column)):
        raise ValueError(f"data.options path_column and label_column must be column names, got {path_column!r} and "
                         f"{label_column!r}")
    if not path.is_file():
        raise FileNotFoundError(
            f"CSV split file {path} not found; write it with a header line '{path_column}{delimiter}{label_column}'"
        )
    rows = read_csv_rows(path, path_column, label_column, delimiter)
    labels, classes = encode_labels(class_keys([label for _, label in rows]))
    return ImageDataset(
        DirectoryStore(path.parent), [p for p, _ in rows], labels, classes, transform=transform,
        image_mode="L" if grayscale else "RGB", invert=invert, skip_bad_images=skip_bad_images,
        missing_hint=f"paths in {path} are relative to {path.parent}",
    )


def read_csv_rows(path: Path, path_column: str, label_column: str, delimiter: str) -> list[tuple[str, str]]:
    """``(image path, label)`` of every data row of the CSV ``path``, stripped; one-line errors naming the line."""
    columns = (path_column, label_column)
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: drops a byte-order mark if there is one
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None or not set(columns) <= set(reader.fieldnames):
            raise ValueError(
                f"{path} must start with a header naming the columns {path_column!r} and {label_column!r} "
                f"separated by {delimiter!r}, got {reader.fieldnames}; fix the header, or set data.options "
                "path_column, label_column or delimiter"
            )
        width = len(reader.fieldnames)
        rows = []
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row:
                raise ValueError(
                    f"{where} has {width + len(row[None])} fields, the header {width}; quote fields that hold "
                    f"{delimiter!r} or remove the extra fields"
                )
            if any(row[c] is None for c in columns):
                given = sum(v is not None for v in row.values())
                raise ValueError(f"{where} has {given} field(s), the header {width}; give every row a path and a label")
            image, label = row[path_column].strip(), row[label_column].strip()
            if not image or not label:
                empty = label_column if image else path_column
                raise ValueError(f"{where} has an empty {empty!r}; fill it in or remove the row")
            rows.append((image, label))
    return rows
