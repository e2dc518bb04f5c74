"""Omniglot read straight from the official zips (or their extracted folders), plus a fast decoded-array path.

Layout under ``<root>/omniglot/`` (or ``<root>`` itself when it holds the files)::

    images_background.zip   (or images_background/<Alphabet>/<characterNN>/*.png)   964 classes x 20
    images_evaluation.zip   (or images_evaluation/<Alphabet>/<characterNN>/*.png)   659 classes x 20

A class is ``"<Alphabet>/<characterNN>"``. Splits: ``train`` = background minus the validation classes,
``val`` = ``val_classes`` background classes drawn with ``numpy.random.default_rng(seed)`` (class-disjoint from
``train``), ``trainval`` = all of background, ``test`` = evaluation.

Images are returned as 8-bit grayscale with the ink bright on a dark background (the files are black ink on
white; both the dataset and :func:`load_omniglot_arrays` invert them), so zero padding from crops and affine
augmentation matches the background.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from recallk.data.download import DownloadError, download_file
from recallk.data.image_dataset import ImageDataset, encode_labels
from recallk.data.paths import arrays_cache_dir
from recallk.data.stores import DirectoryStore, ZipStore
from recallk.files import atomic_write

logger = logging.getLogger(__name__)

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
# md5 of the official archives at OMNIGLOT_URL (the values torchvision.datasets.Omniglot checks). They apply to
# downloads only: other copies of the same drawings (e.g. a shared data folder) may differ byte for byte.
OMNIGLOT_CHECKSUMS = {
    "images_background": "md5:68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "md5:6b91aef0f799c5bb55b94e3f2daec811",
}
OMNIGLOT_SPLITS = ("train", "val", "trainval", "test")
_ARRAY_CACHE_FORMAT = 1


def omniglot_dir(root: str | Path) -> Path:
    """``root`` when it directly holds the Omniglot zips or folders, else ``root/omniglot``."""
    root = Path(root)
    for part in OMNIGLOT_CHECKSUMS:
        if (root / f"{part}.zip").is_file() or (root / part).is_dir():
            return root
    return root / "omniglot"


def omniglot_source(
    root: str | Path,
    part: str,
    download: bool = False,
    base_url: str = OMNIGLOT_URL,
    checksums: dict[str, str | None] | None = None,
) -> Path:
    """Path of ``<part>.zip`` or the extracted ``<part>/`` folder, downloading the zip when asked and absent.

    ``part`` is ``"images_background"`` or ``"images_evaluation"``. ``base_url`` and ``checksums`` (part ->
    ``"md5:<hex>"``) exist so tests can serve the files locally. Raises ``FileNotFoundError`` saying where to put
    the files when they are absent and cannot be downloaded.
    """
    if part not in OMNIGLOT_CHECKSUMS:
        raise ValueError(f"unknown Omniglot part {part!r}; expected one of {sorted(OMNIGLOT_CHECKSUMS)}")
    folder = omniglot_dir(root)
    zip_path, extracted = folder / f"{part}.zip", folder / part
    if zip_path.is_file():
        return zip_path
    if extracted.is_dir():
        return extracted
    url = f"{base_url.rstrip('/')}/{part}.zip"
    where = f"put {part}.zip (from {url}) in {folder}, or extract it there as {extracted}/"
    if not download:
        raise FileNotFoundError(f"Omniglot file {zip_path} not found: {where}, or pass download=True")
    checksum = (checksums if checksums is not None else OMNIGLOT_CHECKSUMS).get(part)
    try:
        return download_file(url, zip_path, checksum=checksum)
    except DownloadError as exc:
        raise FileNotFoundError(f"Omniglot file {zip_path} not found and the download failed ({exc}): {where}") from exc


def list_omniglot(source: Path) -> tuple[DirectoryStore | ZipStore, dict[str, list[str]]]:
    """The store for ``source`` (zip or folder) and ``{"<Alphabet>/<characterNN>": [image names]}``, all sorted.

    Raises ``ValueError`` when a character folder holds no PNG.
    """
    part = source.stem if source.suffix == ".zip" else source.name
    images: dict[str, list[str]] = {}
    store: DirectoryStore | ZipStore
    if source.suffix == ".zip":
        store = ZipStore(source)
        for name in store.namelist():
            pieces = name.rstrip("/").split("/")
            if len(pieces) < 3 or pieces[0] != part:
                continue
            key = f"{pieces[1]}/{pieces[2]}"
            if name.endswith("/") and len(pieces) == 3:
                images.setdefault(key, [])
            elif len(pieces) == 4 and name.lower().endswith(".png"):
                images.setdefault(key, []).append(name)
    else:
        store = DirectoryStore(source.parent)
        for char_dir in sorted(p for p in source.glob("*/*") if p.is_dir()):
            key = f"{char_dir.parent.name}/{char_dir.name}"
            images[key] = [f"{part}/{key}/{f.name}" for f in char_dir.iterdir() if f.suffix.lower() == ".png"]
    if not images:
        raise ValueError(f"{source} holds no Omniglot images (expected {part}/<Alphabet>/<characterNN>/*.png)")
    empty = [k for k, names in images.items() if not names]
    if empty:
        raise ValueError(
            f"Omniglot class folder {store.describe(f'{part}/{empty[0]}/')} has no PNG images "
            f"({len(empty)} of {len(images)} classes are empty); restore the images or re-extract {part}.zip"
        )
    return store, {k: sorted(images[k]) for k in sorted(images)}


def select_val_classes(classes: list[str], val_classes: int | float, seed: int) -> set[str]:
    """``val_classes`` of ``classes`` (an int count, or a float fraction in (0, 1)) drawn with ``seed``."""
    if isinstance(val_classes, float):
        n = round(val_classes * len(classes)) if 0 < val_classes < 1 else 0
    else:
        n = int(val_classes)
    if not 0 < n < len(classes):
        raise ValueError(
            f"val_classes={val_classes!r} must be a count in 1..{len(classes) - 1} or a fraction in (0, 1)"
        )
    chosen = np.random.default_rng(seed).choice(len(classes), size=n, replace=False)
    return {classes[i] for i in chosen}


def _split_images(
    root: str | Path, split: str, val_classes: int | float, seed: int, **source_kwargs: Any
) -> tuple[Path, DirectoryStore | ZipStore, dict[str, list[str]]]:
    if split not in OMNIGLOT_SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; expected one of {OMNIGLOT_SPLITS}")
    part = "images_evaluation" if split == "test" else "images_background"
    source = omniglot_source(root, part, **source_kwargs)
    store, images = list_omniglot(source)
    if split in ("train", "val"):
        val = select_val_classes(list(images), val_classes, seed)
        images = {k: v for k, v in images.items() if (k in val) == (split == "val")}
    return source, store, images


def build_omniglot(
    root: str | Path,
    split: str,
    transform: Callable[[Image.Image], Any] | None = None,
    skip_bad_images: bool = False,
    val_classes: int | float = 100,
    seed: int = 0,
    download: bool = False,
    base_url: str = OMNIGLOT_URL,
    checksums: dict[str, str | None] | None = None,
) -> ImageDataset:
    """Omniglot ``split`` as an :class:`ImageDataset` of inverted grayscale ("L") images; see the module doc."""
    _, store, images = _split_images(
        root, split, val_classes, seed, download=download, base_url=base_url, checksums=checksums
    )
    names = [n for k in images for n in images[k]]
    labels, classes = encode_labels([k for k in images for _ in images[k]])
    return ImageDataset(
        store, names, labels, classes, transform=transform, image_mode="L", invert=True,
        skip_bad_images=skip_bad_images,
    )


def _decode_omniglot(source: str, names: list[str], image_size: int) -> np.ndarray:
    """Decode ``names`` from zip or folder ``source`` to inverted ``(len(names), S, S)`` uint8 (bilinear resize)."""
    path = Path(source)
    archive = zipfile.ZipFile(path) if path.suffix == ".zip" else None
    out = np.empty((len(names), image_size, image_size), dtype=np.uint8)
    try:
        for i, name in enumerate(names):
            data = archive.read(name) if archive is not None else (path.parent / name).read_bytes()
            image = Image.open(io.BytesIO(data)).convert("L")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            out[i] = np.asarray(image)
    finally:
        if archive is not None:
            archive.close()
    return np.subtract(255, out, out=out)


def _fingerprint(source: Path, names: list[str]) -> str:
    digest = hashlib.sha1("\n".join(names).encode())
    if source.is_file():
        digest.update(str(source.stat().st_size).encode())
    return digest.hexdigest()


def load_omniglot_arrays(
    root: str | Path,
    split: str,
    image_size: int = 28,
    cache_dir: str | Path | None = None,
    val_classes: int | float = 100,
    seed: int = 0,
    download: bool = False,
    num_workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All of Omniglot ``split`` decoded at once: ``(images uint8 (N, 1, S, S), labels int64 (N,))``.

    Pixels are inverted (ink 255, background 0) and resized to ``S = image_size`` with Pillow's antialiased
    bilinear filter; labels are ``0..C-1`` over the split's classes in sorted ``"<Alphabet>/<characterNN>"`` order,
    identical to :func:`build_omniglot`. The first call decodes with ``num_workers`` processes (default: up to 4,
    one per CPU) and saves ``omniglot_<split>_<S>px[...].npz`` under ``cache_dir`` (default
    :func:`~recallk.data.paths.arrays_cache_dir`); later calls load that file, which is rebuilt when the split's
    file list or the zip's size changes.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    source, _, images = _split_images(root, split, val_classes, seed, download=download)
    names = [n for k in images for n in images[k]]
    labels, _ = encode_labels([k for k in images for _ in images[k]])
    fingerprint = f"{_ARRAY_CACHE_FORMAT}:{_fingerprint(source, names)}"
    suffix = f"_val{val_classes}_seed{seed}" if split in ("train", "val") else ""
    cache_file = arrays_cache_dir(cache_dir) / f"omniglot_{split}_{image_size}px{suffix}.npz"
    if cache_file.is_file():
        with np.load(cache_file) as cached:
            if str(cached["fingerprint"]) == fingerprint:
                return torch.from_numpy(cached["images"]), torch.from_numpy(cached["labels"])
        logger.info("Omniglot array cache %s is stale; rebuilding", cache_file)
    pixels = _decode_all(source, names, image_size, num_workers)[:, None]
    atomic_write(cache_file, lambda handle: np.savez(handle, images=pixels, labels=labels,
                                                     fingerprint=np.array(fingerprint)))
    logger.info("decoded %d Omniglot %s images to %s", len(names), split, cache_file)
    return torch.from_numpy(pixels), torch.from_numpy(labels)


def _decode_all(source: Path, names: list[str], image_size: int, num_workers: int | None) -> np.ndarray:
    workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
    if workers <= 1 or len(names) < 1000:
        return _decode_omniglot(str(source), names, image_size)
    chunks = [names[i : i + 1000] for i in range(0, len(names), 1000)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = pool.map(_decode_omniglot, [str(source)] * len(chunks), chunks, [image_size] * len(chunks))
        return np.concatenate(list(parts))
