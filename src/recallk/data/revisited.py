"""Revisited Oxford 5k / Paris 6k (and their 1M distractors) in the official layout of the revisitop project.

Under a data root::

    <root>/roxford5k/gnd_roxford5k.pkl      # imlist, qimlist, gnd
    <root>/roxford5k/jpg/<name>.jpg         # every name of imlist and qimlist (".jpg" added when absent)

``imlist`` names the database images, ``qimlist`` the queries (not in the database), and ``gnd[q]`` holds the
query's box ``bbx`` = (x1, y1, x2, y2) in original pixels and its ``easy``, ``hard`` and ``junk`` database indices
(0-based into ``imlist``). Distractors (R1M) come from a list file, one image path per line (relative to the list
file's folder, or absolute); they are appended **after** the database, so ``gnd`` indices stay valid.

:class:`LandmarkImages` reads the images for descriptors: a query is cropped to its box first, then every image is
scaled by ``min(1, image_size / longer side of the full image)`` (a crop keeps the scale of its full image; never
upscaled). Every problem in the files is a one-line :class:`~recallk.errors.RecallkUsageError`, raised by
:func:`read_revisited` before any image is decoded for a descriptor.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from recallk.data.image_dataset import convert_image, unreadable_images
from recallk.data.listing import read_path_list
from recallk.errors import RecallkUsageError
from recallk.registry import BENCHMARKS

# What a ground-truth pickle may hold besides plain Python containers: numpy arrays and scalars.
_ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}
_BOX_TOLERANCE = 1.0  # pixels a box may pass the image border (rounding in the published boxes)


@dataclass
class RevisitedBenchmark:
    """One benchmark read from disk: image paths, query boxes and ground truth (indices into ``database``)."""

    name: str
    database: list[Path]
    queries: list[Path]
    boxes: list[tuple[float, float, float, float]]
    gnd: list[dict[str, Any]]
    distractors: list[Path] = field(default_factory=list)

    @property
    def search_database(self) -> list[Path]:
        """The searched images: the database, then the distractors (so ``gnd`` indices stay valid)."""
        return self.database + self.distractors


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles containers, numbers, strings and numpy arrays only: a crafted pickle cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return super().find_class(module, name)


def _image_path(folder: Path, name: str) -> Path:
    return folder / (name if name.lower().endswith(".jpg") else f"{name}.jpg")


def _load_ground_truth(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecallkUsageError(
            f"ground-truth file {path} does not exist; put the official revisitop files under "
            f"{path.parent} (gnd pickle + jpg/)"
        )
    try:
        with path.open("rb") as handle:
            raw = _GroundTruthUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise RecallkUsageError(f"{path} is not a readable ground-truth pickle ({err}); use the official one") from None
    missing = [key for key in ("imlist", "qimlist", "gnd") if not isinstance(raw, dict) or key not in raw]
    if missing:
        raise RecallkUsageError(f"{path} has no {', '.join(missing)}; a gnd pickle holds imlist, qimlist and gnd")
    if len(raw["gnd"]) != len(raw["qimlist"]):
        raise RecallkUsageError(
            f"{path}: gnd has {len(raw['gnd'])} entries but qimlist {len(raw['qimlist'])} queries; one gnd per query"
        )
    return raw


def _checked_gnd(path: Path, gnd: Sequence[Any], num_database: int) -> list[dict[str, Any]]:
    """The per-query ground truth with index arrays; one line naming the query for a missing key or bad index."""
    checked = []
    for q, entry in enumerate(gnd):
        missing = [key for key in ("bbx", "easy", "hard", "junk") if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise RecallkUsageError(
                f"{path}: gnd[{q}] has no {', '.join(missing)}; each query needs bbx, easy, hard and junk"
            )
        item = {key: np.asarray(entry[key], dtype=np.int64).ravel() for key in ("easy", "hard", "junk")}
        for key, values in item.items():
            if values.size and (values.min() < 0 or values.max() >= num_database):
                raise RecallkUsageError(
                    f"{path}: gnd[{q}]['{key}'] holds an index outside imlist (0..{num_database - 1})"
                )
        box = np.asarray(entry["bbx"], dtype=np.float64).ravel()
        if box.size != 4:
            raise RecallkUsageError(f"{path}: gnd[{q}]['bbx'] must be x1, y1, x2, y2, got {entry['bbx']!r}")
        item["bbx"] = box
        checked.append(item)
    return checked


def _check_unique(path: Path, key: str, images: Sequence[Path]) -> None:
    seen: set[Path] = set()
    for index, image in enumerate(images):
        if image in seen:
            raise RecallkUsageError(f"{path}: {key}[{index}] names {image.name} a second time; each image may be "
                                    f"listed once in {key} (use the official ground truth)")
        seen.add(image)


def _check_exists(paths: Sequence[Path], where: str) -> None:
    for path in paths:
        if not path.is_file():
            raise RecallkUsageError(f"image {path} listed in {where} does not exist; restore it or fix the list")


def _check_box(path: Path, box: np.ndarray, q: int) -> tuple[float, float, float, float]:
    with Image.open(path) as image:
        width, height = image.size
    x1, y1, x2, y2 = (float(v) for v in box)
    tol = _BOX_TOLERANCE
    if not (-tol <= x1 < x2 <= width + tol and -tol <= y1 < y2 <= height + tol):
        raise RecallkUsageError(
            f"query {q} ({path.name}): bbx ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is outside the {width}x{height} image "
            "or empty; fix gnd[q]['bbx'] (x1, y1, x2, y2 in original pixels)"
        )
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))


def read_distractor_list(path: str | Path) -> list[Path]:
    """Paths of a distractor list file: one image per line, relative to the file's folder (or absolute)."""
    return read_path_list(path, "distractor list")


def read_revisited(
    root: str | Path, name: str, distractors: str | Path | None = None, skip_bad_images: bool = False
) -> RevisitedBenchmark:
    """Read benchmark ``name`` (``roxford5k``, ``rparis6k``) from ``<root>/<name>/``, checking every file it names.

    ``distractors``: an optional list file of extra database images (R1M), appended after the database. Every
    image's header is read (:func:`~recallk.data.image_dataset.unreadable_images`): one that Pillow cannot read is
    refused here, before any descriptor, or with ``skip_bad_images`` left out (a query with its ground truth, a
    database image from every query's ``easy``/``hard``/``junk`` with the later indices shifted, a distractor).
    """
    if name not in BENCHMARKS:
        raise RecallkUsageError(BENCHMARKS.unknown(name))
    folder = Path(root).expanduser() / name
    gnd_path = folder / f"gnd_{name}.pkl"
    raw = _load_ground_truth(gnd_path)
    database = [_image_path(folder / "jpg", str(n)) for n in raw["imlist"]]
    queries = [_image_path(folder / "jpg", str(n)) for n in raw["qimlist"]]
    for key, paths in (("imlist", database), ("qimlist", queries)):
        _check_unique(gnd_path, key, paths)
    _check_exists(database + queries, f"{gnd_path}")
    gnd = _checked_gnd(gnd_path, raw["gnd"], len(database))
    extra = read_distractor_list(distractors) if distractors is not None else []
    bad = unreadable_images(queries + database + extra, f"{name} images", skip_bad_images)
    if bad:
        kept = np.array([path not in bad for path in database])
        new_index = np.cumsum(kept) - 1  # old database index -> index among the kept images
        gnd = [{key: new_index[values[kept[values]]] if key != "bbx" else values for key, values in entry.items()}
               for path, entry in zip(queries, gnd) if path not in bad]
        queries, database = [p for p in queries if p not in bad], [p for p in database if p not in bad]
        extra = [p for p in extra if p not in bad]
    if not any(entry["easy"].size or entry["hard"].size for entry in gnd):
        raise RecallkUsageError(f"{gnd_path}: no query has a positive (every gnd[q]'s easy and hard are empty), so "
                                "no mAP can be computed; use the official ground truth")
    boxes = [_check_box(path, entry.pop("bbx"), q) for q, (path, entry) in enumerate(zip(queries, gnd))]
    return RevisitedBenchmark(name, database, queries, boxes, gnd, extra)


def scale_factor(width: int, height: int, image_size: int) -> float:
    """The factor that brings a ``width x height`` image's longer side to ``image_size``, never above 1."""
    return min(1.0, image_size / max(width, height))


def fit_image(
    image: Image.Image, image_size: int, box: tuple[float, float, float, float] | None = None
) -> Image.Image:
    """``image`` cropped to ``box`` ``(x1, y1, x2, y2)`` (original pixels, rounded) when given, then scaled by
    :func:`scale_factor` of the full image (Lanczos; never enlarged): how landmark descriptors see an image."""
    factor = scale_factor(*image.size, image_size)
    if box is not None:
        x1, y1, x2, y2 = box
        image = image.crop((round(x1), round(y1), max(round(x2), round(x1) + 1), max(round(y2), round(y1) + 1)))
    if factor < 1.0:
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


class LandmarkImages(Dataset):
    """Images for descriptors, one at a time (no batch padding): ``dataset[i]`` is a ``(C, H, W)`` tensor.

    Args:
        paths: image files.
        image_size: longer side of a full image after scaling (shrink only).
        to_tensor: PIL image -> tensor (the model's normalisation; no resize or crop).
        mode: ``"RGB"`` or ``"L"``, how the run's reader decodes images (:func:`convert_image`).
        invert: invert the decoded image (as the run's reader does).
        boxes: optional ``(x1, y1, x2, y2)`` per image, in original pixels: the image is cropped to it first and
            the crop scaled by the full image's factor.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        image_size: int,
        to_tensor: Callable[[Image.Image], torch.Tensor],
        mode: str = "RGB",
        invert: bool = False,
        boxes: Sequence[tuple[float, float, float, float]] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.image_size = image_size
        self.to_tensor = to_tensor
        self.mode = mode
        self.invert = invert
        self.boxes = None if boxes is None else list(boxes)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """The decoded, cropped and scaled PIL image ``index``."""
        path = self.paths[index]
        try:
            with Image.open(path) as opened:
                image = convert_image(opened, self.mode)
        except OSError as err:
            raise RecallkUsageError(f"cannot decode image {path} ({err}); replace or remove it") from None
        if self.invert:
            image = ImageOps.invert(image)
        return fit_image(image, self.image_size, None if self.boxes is None else self.boxes[index])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.to_tensor(self.load(index))
