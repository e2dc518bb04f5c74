"""How a trained image model describes an image: :class:`Description`, the one code path of ``recallk embed
--images``, ``recallk search``, :meth:`recallk.RecallkModel.embed`, ``recallk whiten`` and the landmark benchmarks
(``recallk evaluate --benchmark``, ``eval.benchmarks``).

Both ways decode an image as the run's training reader does (grayscale or RGB, inverted or not) and normalise it as
the evaluation transform of ``data.transform`` does; :func:`describes_full_images` picks one from the run's config:

* **crop** (recall@k models): the image is resized and centre-cropped to ``data.image_size``, one forward pass in
  batches; the network's output is the descriptor.
* **full** (landmark models: trained on a landmark set (:data:`LANDMARK_DATASETS`), with landmark benchmarks in
  ``eval.benchmarks``, or with a whitening from ``recallk whiten``, which is fitted on full-image descriptors):
  the whole image, its longer side shrunk to ``eval.image_size`` (Lanczos, never enlarged), one image at a time;
  the head's descriptors at ``eval.scales`` aggregated as cirtorch aggregates them (the mean of the unit-norm
  per-scale descriptors, :mod:`recallk.evaluation.multiscale`), then the model's whitening, if any, and L2
  normalisation. The landmark benchmarks compute exactly this (a query is first cropped to its box and scaled by
  its full image's factor); only ``--scales`` of a single evaluation changes the scales.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T

from recallk.config import Config
from recallk.data.image_dataset import too_large_message
from recallk.data.revisited import fit_image
from recallk.errors import RecallkUsageError
from recallk.evaluation.embed import embed_batches
from recallk.evaluation.multiscale import iter_multiscale_descriptors
from recallk.models.factory import EmbeddingModel
from recallk.models.whitening import Whitening
from recallk.training.assemble import decode_like_the_reader, eval_transform, reader_decoding_of

# Landmark training sets: a model trained on one describes full images at eval.scales (the benchmarks' way).
LANDMARK_DATASETS = ("sfm120k", "gldv2")


def describes_full_images(config: Config) -> bool:
    """Whether the model of ``config`` describes full images at ``eval.scales`` (a landmark model: data set in
    :data:`LANDMARK_DATASETS`, ``eval.benchmarks`` set, or a whitening) rather than centre crops (recall@k)."""
    return (config.data.dataset in LANDMARK_DATASETS or bool(config.eval.benchmarks)
            or config.model.whitening != "none")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns an image file or PIL image into the network's input tensor ``(C, H, W)``.

    The decoding of the training data's reader and the evaluation transform, both from the one assembly
    (:mod:`recallk.training.assemble`): ``grayscale`` and ``invert`` are the reader's decoding
    (:func:`~recallk.training.assemble.reader_decoding_of`), then the eval transform of ``data.transform``,
    ``data.image_size``, the timm ``backbone`` (``data.transform: timm``) and ``data.options.mean/std``. With
    ``full_image_size`` (landmark models) the image is not resized to ``image_size`` nor cropped: its longer side is
    shrunk to ``full_image_size`` (never enlarged) and only the transform's conversion and normalisation apply.
    """

    transform: str
    image_size: int
    invert: bool = False
    grayscale: bool = False
    backbone: str | None = None
    mean: Any = None
    std: Any = None
    full_image_size: int | None = None

    @classmethod
    def from_config(cls, config: Config, full_images: bool = False) -> Preprocessing:
        data, options = config.data, config.data.options
        mode, invert = reader_decoding_of(config)
        return cls(
            data.transform, data.image_size, invert=invert, grayscale=mode == "L", backbone=config.model.backbone,
            mean=options.get("mean"), std=options.get("std"),
            full_image_size=config.eval.image_size if full_images else None,
        )

    @property
    def mode(self) -> str:
        """The PIL mode images are decoded to: ``"L"`` or ``"RGB"``."""
        return "L" if self.grayscale else "RGB"

    def __call__(self, image: str | Path | Image.Image | np.ndarray) -> Tensor:
        if isinstance(image, np.ndarray):
            image = array_image(image)
        elif not isinstance(image, Image.Image):
            image = open_image(image)
        image = decode_like_the_reader(image, self.mode, self.invert)
        if self.full_image_size is not None:
            image = fit_image(image, self.full_image_size)
        return self.transform_fn(image)

    @functools.cached_property
    def transform_fn(self) -> Callable[[Image.Image], Tensor]:
        """The eval transform, built once (``data.transform: timm`` resolves the backbone's data config); without
        its resize and crop for full images."""
        full = eval_transform(self.transform, self.image_size, self.backbone, self.mean, self.std)
        if self.full_image_size is None:
            return full
        return T.Compose([step for step in full.transforms if not isinstance(step, (T.Resize, T.CenterCrop))])

    @functools.cached_property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of a preprocessed square image of ``image_size`` pixels (crop: every image's shape)."""
        return tuple(self(Image.new("RGB", (self.image_size, self.image_size))).shape)


@dataclasses.dataclass(frozen=True)
class Description:
    """How a model describes an image (module docstring): its :class:`Preprocessing` and, for full images, the
    scales. The model's whitening is part of the network; :meth:`iter_descriptors` applies it after the scales."""

    preprocessing: Preprocessing
    scales: tuple[float, ...] = (1.0,)

    @classmethod
    def from_config(
        cls, config: Config, full_images: bool | None = None, scales: Sequence[float] | None = None
    ) -> Description:
        """The description of ``config``'s model (``full_images`` default: :func:`describes_full_images`);
        ``scales`` (default ``eval.scales``) apply to full images only."""
        full = describes_full_images(config) if full_images is None else full_images
        return cls(Preprocessing.from_config(config, full), tuple(scales or config.eval.scales) if full else (1.0,))

    @property
    def full_images(self) -> bool:
        return self.preprocessing.full_image_size is not None

    def iter_descriptors(
        self, network: nn.Module, images: Iterable[Tensor], device: torch.device, batch_size: int = 256,
        total: int | None = None, progress: bool = True, desc: str = "descriptors", chunk_size: int = 1024,
    ) -> Iterator[Tensor]:
        """Float32 unit-norm descriptors of preprocessed ``images`` (``(C, H, W)`` each, from :attr:`preprocessing`),
        as consecutive ``(n, D)`` chunks on the CPU, in order. Crop: batches of ``batch_size`` through the network,
        one chunk. Full images: one image at a time at :attr:`scales`, the head's descriptors aggregated, then the
        network's whitening, in chunks of ``chunk_size`` images (the last one shorter)."""
        if not self.full_images:
            yield embed_batches(network, _stacked(images, batch_size), device, total=total, progress=progress,
                                desc=desc)
            return
        features, whitening = _split_whitening(network)
        yield from iter_multiscale_descriptors(features, images, device, self.scales, post_process=whitening,
                                               chunk_size=chunk_size, total=total, progress=progress, desc=desc)

    def descriptors(
        self, network: nn.Module, images: Iterable[Tensor], device: torch.device, batch_size: int = 256,
        total: int | None = None, progress: bool = True, desc: str = "descriptors",
    ) -> Tensor:
        """All of :meth:`iter_descriptors` at once: float32 ``(N, D)`` on the CPU."""
        return torch.cat(list(self.iter_descriptors(network, images, device, batch_size, total, progress, desc)))


def _stacked(images: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    batch: list[Tensor] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


class _Unwhitened(nn.Module):
    """The head's descriptors of an :class:`EmbeddingModel`, before its whitening."""

    def __init__(self, network: EmbeddingModel) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Tensor) -> Tensor:
        return self.network.unwhitened(images)


def _split_whitening(network: nn.Module) -> tuple[nn.Module, Whitening | None]:
    """``(features, whitening)``: the whitening is applied after the scales are aggregated, as it was fitted."""
    if isinstance(network, EmbeddingModel) and isinstance(network.whitening, Whitening):
        return _Unwhitened(network), network.whitening
    return network, None


def array_image(array: np.ndarray) -> Image.Image:
    """A numpy image ``(H, W)`` or ``(H, W, C)`` (C = 1, 3 or 4; integers 0-255 or 0-65535, floats 0-1 or 0-255) as a
    PIL image with its values on 0-255, decoded like an image file of that kind."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or array.size == 0:
        raise ValueError(
            f"a numpy image must be (H, W) or (H, W, C) with C = 1, 3 or 4, got shape {array.shape}; for a batch "
            "pass a list of images"
        )
    if array.dtype == np.bool_ or array.dtype.kind not in "uif":
        raise ValueError(f"a numpy image must hold integers or floats, got dtype {array.dtype}")
    if array.dtype.kind == "f":
        pixels = np.nan_to_num(array.astype(np.float64))
        scale = 255.0 if pixels.max() <= 1.0 else 1.0  # as image files of floats are read
        array = np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        pixels = array.astype(np.float64)
        pixels = pixels * (255.0 / 65535.0) if pixels.max() > 255 else pixels  # 16-bit values, as in PNG files
        array = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))  # decoded further like a file (decode_like_the_reader)


def open_image(path: str | Path) -> Image.Image:
    """A decoded image file; a missing or undecodable file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist; pass the path of an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Image.DecompressionBombError as err:
        option = "--max-image-pixels {0} (recallk embed/search; in Python PIL.Image.MAX_IMAGE_PIXELS = {0})"
        raise RecallkUsageError(too_large_message(str(path), err, option)) from None
    except (OSError, ValueError) as err:
        raise RecallkUsageError(f"cannot decode image {path} ({err}); pass a PNG/JPEG image file") from None
