"""The one dataset class every reader returns: a list of image names in a store, with integer class labels."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from recallk.data.stores import ImageStore
from recallk.errors import RecallkUsageError

logger = logging.getLogger(__name__)

# Exceptions Pillow raises on unreadable, truncated or malformed image files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadImageError(RecallkUsageError):
    """An image file exists but cannot be decoded (a data set problem the user fixes: the CLI exits with status 2)."""


def image_error(file: IO[bytes] | str | Path) -> str | None:
    """Why Pillow cannot read ``file`` (from its header and ``verify()``, without decoding the pixels), or ``None``
    when it can: cheap enough to check every image of a data set before the work starts."""
    try:
        _leave_bomb_warnings_to_recallk()  # reported when loaded
        with Image.open(file) as image:
            image.verify()
    except _DECODE_ERRORS as err:
        return " ".join(str(err).split()) or type(err).__name__
    return None


def unreadable_images(paths: Sequence[Path], what: str, skip: bool) -> set[Path]:
    """The image files among ``paths`` that Pillow cannot read (:func:`image_error`), checked before any work.

    Without ``skip`` any such file is a one-line :class:`BadImageError` (count, the first file and why, the
    option that leaves them out); with ``skip`` they are returned, for the caller to leave out, and named in one
    warning. ``what`` names the images in both (e.g. ``"roxford5k images"``).
    """
    errors = {path: error for path in paths if (error := image_error(path)) is not None}
    if not errors:
        return set()
    first, reason = next(iter(errors.items()))
    if not skip:
        raise BadImageError(
            f"{len(errors)} of {len(paths)} {what} cannot be read, e.g. {first} ({reason}); replace or remove them, "
            "or pass --skip-bad-images (data.skip_bad_images=true in training) to leave them out"
        )
    shown = ", ".join(str(p) for p in list(errors)[:3])
    logger.warning("skipped %d of %d %s that cannot be read (--skip-bad-images): %s%s", len(errors), len(paths),
                   what, shown, " ..." if len(errors) > 3 else "")
    return set(errors)


def apply_pixel_limit(limit: int | None) -> None:
    """Set Pillow's decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS`` of this process to ``limit`` pixels
    (Pillow warns above it and refuses images over twice it); ``None`` leaves it as it is (Pillow's default
    89,478,485)."""
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = limit


def _leave_bomb_warnings_to_recallk() -> None:
    """Put a filter for Pillow's ``DecompressionBombWarning`` first in this process's warning filters (recallk
    reports such images itself, see :func:`read_image`), unless it is first already. Not a
    ``warnings.catch_warnings()`` around each image: entering and leaving one resets Python's once-per-location
    registry, so every other warning meant to show once would repeat at each image (each training step with
    ``data.num_workers=0``); the filters change here only when other code changed them."""
    if not warnings.filters or warnings.filters[0] != _BOMB_FILTER:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


_BOMB_FILTER = ("ignore", None, Image.DecompressionBombWarning, None, 0)  # as warnings.filterwarnings stores it


def read_image(file: IO[bytes] | str | Path) -> tuple[Image.Image, int | None]:
    """The decoded image of ``file``, and its pixel count when it is over Pillow's decompression-bomb warning limit
    ``PIL.Image.MAX_IMAGE_PIXELS`` (``None`` otherwise), for the caller to report once; Pillow's own
    ``DecompressionBombWarning`` is filtered (:func:`_leave_bomb_warnings_to_recallk`), its error (over twice the
    limit) raised as usual."""
    _leave_bomb_warnings_to_recallk()
    image = Image.open(file)
    image.load()
    limit = Image.MAX_IMAGE_PIXELS
    pixels = max(1, image.width) * max(1, image.height)  # Pillow's own count (PIL.Image._decompression_bomb_check)
    return image, (pixels if limit is not None and pixels > limit else None)


def too_large_message(image: str, err: Exception, option: str) -> str:
    """One line for Pillow's ``DecompressionBombError`` on ``image``: its size, the limit and ``option``, how the
    user raises ``PIL.Image.MAX_IMAGE_PIXELS`` (``{}`` in it is replaced by the image's pixel count)."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    pixels = int(found.group(1)) if found else None
    size = f"{pixels:,} pixels" if pixels else "more pixels than Pillow accepts"
    limit = Image.MAX_IMAGE_PIXELS
    bound = f"twice Pillow's limit of {limit:,}" if limit else "Pillow's limit"
    return (
        f"image {image} has {size}, more than {bound} (a guard against decompression bombs, files that expand to "
        f"huge images); if the image is genuine, raise the limit: {option.format(pixels or 'PIXELS')}"
    )


# Modes holding more than 8 bits per pixel: Pillow's convert("L"/"RGB") clips them at 255 instead of rescaling.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def convert_image(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode`` ("L" or "RGB") with its pixel values mapped onto 0-255, for every mode Pillow reads.

    - 16-bit integers (``I;16*``, and ``I``, which Pillow uses for 16-bit PNGs and 32-bit TIFFs) are scaled by
      255/65535 (``I`` values outside 0-65535 are clipped);
    - floats (``F``) are taken as 0-1 when no value exceeds 1, else as 0-255, and clipped to that range;
    - images with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) are composited onto white;
    - ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ... go through Pillow's own conversion.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if pixels.size and pixels.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8), "L")
    elif image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert(mode)


def encode_labels(keys: Sequence[Hashable]) -> tuple[np.ndarray, list[Hashable]]:
    """Map class keys to contiguous labels ``0..C-1`` in sorted key order.

    Returns ``(labels, classes)``: ``labels`` is an int64 array of shape ``(len(keys),)`` and ``classes[label]``
    is the key of that label.
    """
    classes = sorted(set(keys))
    index = {key: i for i, key in enumerate(classes)}
    return np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys)), classes


class ImageDataset(Dataset):
    """Labelled images for metric learning; ``dataset[i]`` is ``(transform(image), label)``.

    Attributes:
        labels: int64 array ``(N,)`` of class indices in ``0..num_classes-1``.
        item_ids: ``N`` image names relative to the store (relative paths or zip member names), for exports.
        class_names: ``num_classes`` strings, ``class_names[label]``.
        store: where the images are read from (:class:`~recallk.data.stores.DirectoryStore` or ``ZipStore``).

    Every listed image must exist (checked at construction; a missing one is a ``FileNotFoundError``). With
    ``skip_bad_images=True`` each image is also checked with Pillow's ``verify()`` at construction and those that
    fail are dropped and counted in a warning log line; ``verify()`` reads headers and chunk checksums without
    decoding pixels, so a truncated JPEG may still pass and then fail in ``__getitem__``. Without the flag an
    undecodable image raises :class:`BadImageError` naming the file when it is loaded. Dropping images never
    renumbers classes, so splits that share a label space (In-Shop query/gallery) stay aligned.

    ``max_image_pixels`` (set by :func:`~recallk.data.factory.build_dataset`) is Pillow's decompression-bomb limit
    in every process that loads images (:func:`apply_pixel_limit`); an image over the limit is read and reported
    once per process in a log line (not Pillow's raw warning), one over twice the limit is a :class:`BadImageError`
    naming ``data.max_image_pixels``.
    """

    max_image_pixels: int | None = None

    def __init__(
        self,
        store: ImageStore,
        names: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
        image_mode: str = "RGB",
        invert: bool = False,
        skip_bad_images: bool = False,
        missing_hint: str = "check that the data set is fully extracted",
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(names) != len(labels):
            raise ValueError(f"got {len(names)} image names but {len(labels)} labels; they must match one to one")
        if len(names) == 0:
            raise ValueError(f"no images listed under {store.describe('')}: the split is empty")
        self.store = store
        self.transform = transform
        self.image_mode = image_mode
        self.invert = invert
        self.class_names = [str(c) for c in class_names]
        self._large_reported = False
        self._check_exist(names, missing_hint)
        keep = self._verify(names) if skip_bad_images else np.ones(len(names), dtype=bool)
        if not keep.any():
            raise BadImageError(f"none of the {len(names)} listed images under {store.describe('')} can be decoded")
        self.item_ids: list[str] = [n for n, k in zip(names, keep) if k]
        self.labels: np.ndarray = labels[keep]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.item_ids)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def load_image(self, index: int) -> Image.Image:
        """The untransformed image ``index`` in ``image_mode`` (:func:`convert_image`; inverted when ``invert``)."""
        name = self.item_ids[index]
        apply_pixel_limit(self.max_image_pixels)  # loader workers started by spawn do not inherit it
        try:
            with self.store.open(name) as f:
                image, large = read_image(f)
        except FileNotFoundError:
            raise
        except Image.DecompressionBombError as exc:
            raise BadImageError(
                too_large_message(self.store.describe(name), exc, "data.max_image_pixels={}")
            ) from exc
        except _DECODE_ERRORS as exc:
            raise BadImageError(
                f"cannot decode image {self.store.describe(name)} ({exc}); replace or delete the file and run the "
                "same command again (or 'recallk train --resume RUN_DIR' if the run saved checkpoints/last.pt), or "
                "build the dataset with skip_bad_images=True (config: data.skip_bad_images=true) to drop "
                "undecodable images"
            ) from exc
        if large is not None and not self._large_reported:
            self._large_reported = True
            logger.warning(
                "image %s has %s pixels, over Pillow's decompression-bomb warning limit of %s; it is read as usual "
                "(set data.max_image_pixels=%d to raise the limit; reported once)",
                self.store.describe(name), f"{large:,}", f"{Image.MAX_IMAGE_PIXELS:,}", large,
            )
        image = convert_image(image, self.image_mode)
        return ImageOps.invert(image) if self.invert else image

    def _check_exist(self, names: Sequence[str], hint: str) -> None:
        missing = [n for n in names if not self.store.exists(n)]
        if missing:
            shown = ", ".join(self.store.describe(n) for n in missing[:3])
            raise FileNotFoundError(
                f"{len(missing)} of {len(names)} listed images are missing, e.g. {shown}; {hint}"
            )

    def _verify(self, names: Sequence[str]) -> np.ndarray:
        keep = np.ones(len(names), dtype=bool)
        for i, name in enumerate(names):
            try:
                with self.store.open(name) as f:
                    keep[i] = image_error(f) is None
            except OSError:
                keep[i] = False
        bad = [n for n, k in zip(names, keep) if not k]
        if bad:
            logger.warning(
                "skipped %d of %d images that failed to decode, e.g. %s",
                len(bad), len(names), ", ".join(self.store.describe(n) for n in bad[:3]),
            )
        return keep
