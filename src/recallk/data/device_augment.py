"""JPEG decoding and the training augmentation of whole batches on the training device (``data.decode: gpu``).

The CPU path decodes each image with Pillow in a loader worker and applies ``RandomResizedCrop`` + horizontal flip
+ ``ToTensor`` + ``Normalize`` under ``torch.manual_seed(seed)`` (the item's seed, see
:mod:`recallk.data.sources`). Here the workers only read file bytes; the batch is decoded at once by
``torchvision.io.decode_jpeg(list, device=...)`` and each image is cropped, resized and flipped on ``device``, then
the batch is normalised in one operation. The same functions run on the CPU and on CUDA (``device`` is a
parameter), which is how the tests compare them with the Pillow path.

The random draws are the CPU path's exactly: :func:`crop_parameters` makes the draws of torchvision's
``RandomResizedCrop.get_params`` and ``RandomHorizontalFlip`` in the same order from a generator seeded with the
item's seed, so both paths cut the same rectangles and flip the same images; pixel values differ only by the
resampling (torch's antialiased resize against Pillow's), a few units of 255 at most.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

JPEG_EXTENSIONS = (".jpg", ".jpeg")  # the files decode_jpeg reads (any case)
_RESIZE_MODES = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)  # torch's antialias matches Pillow's


@dataclass(frozen=True)
class CropRecipe:
    """The parameters of a ``RandomResizedCrop(size) -> RandomHorizontalFlip -> ToTensor -> Normalize`` pipeline.

    ``size``: output side in pixels; ``scale``/``ratio``: the crop's area fraction and aspect-ratio ranges;
    ``interpolation``: bilinear or bicubic; ``flip_p``: flip probability; ``mean``/``std``: per channel, on [0, 1].
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: InterpolationMode
    flip_p: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, transform: object) -> CropRecipe | None:
        """The recipe of a training transform built by :func:`~recallk.data.transforms.build_transforms`
        (``imagenet`` or ``timm``), or ``None`` when ``transform`` is anything else (e.g. ``omniglot``)."""
        steps = [s for s in getattr(transform, "transforms", []) if not isinstance(s, T.Lambda)]  # the RGB step
        kinds = (T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize)
        if len(steps) != len(kinds) or not all(isinstance(s, k) for s, k in zip(steps, kinds)):
            return None
        crop, flip, _, normalize = steps
        if crop.size[0] != crop.size[1] or crop.interpolation not in _RESIZE_MODES:
            return None
        return cls(
            size=crop.size[0], scale=tuple(crop.scale), ratio=tuple(crop.ratio), interpolation=crop.interpolation,
            flip_p=float(flip.p), mean=tuple(normalize.mean), std=tuple(normalize.std),
        )


def crop_parameters(height: int, width: int, seed: int, recipe: CropRecipe) -> tuple[int, int, int, int, bool]:
    """``(top, left, crop height, crop width, flip)`` for an image of ``height`` x ``width`` and item ``seed``.

    The draws of torchvision's ``RandomResizedCrop.get_params`` followed by ``RandomHorizontalFlip``'s, in order,
    from a private generator seeded with ``seed``: what the CPU path draws under ``torch.manual_seed(seed)``,
    without touching the process's global generator (this runs in a background thread).
    """
    generator = torch.Generator().manual_seed(seed)
    area = height * width
    log_ratio = torch.log(torch.tensor(recipe.ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(recipe.scale[0], recipe.scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            break
    else:  # torchvision's fallback: the central crop of the ratio range
        in_ratio = width / height
        if in_ratio < min(recipe.ratio):
            w, h = width, int(round(width / min(recipe.ratio)))
        elif in_ratio > max(recipe.ratio):
            h, w = height, int(round(height * max(recipe.ratio)))
        else:
            w, h = width, height
        i, j = (height - h) // 2, (width - w) // 2
    flip = bool(torch.rand(1, generator=generator) < recipe.flip_p)
    return i, j, h, w, flip


def decode_jpegs(data: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """JPEG files' bytes (uint8 tensors on the CPU) -> RGB uint8 images ``(3, H, W)`` on ``device``, in one call.

    On CUDA the current stream is drained first: torchvision's decoder writes on a stream of its own that is not
    ordered against the caller's, so it could write into memory the caller's queued kernels still read
    (pytorch/vision PR 9606).
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)


def decoder_problem(device: torch.device) -> str | None:
    """Why :func:`decode_jpegs` cannot run on ``device`` (e.g. no GPU, a torchvision built without nvJPEG): the
    first line of the error of decoding a tiny JPEG there, or ``None`` when it works."""
    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 240)).save(probe, format="JPEG")
    try:
        decode_jpegs([torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)], device)
    except (RuntimeError, AssertionError) as err:  # AssertionError: a torch build without CUDA
        return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None


def augment_batch(images: Sequence[Tensor], seeds: Sequence[int], recipe: CropRecipe) -> Tensor:
    """Decoded uint8 images ``(3, H_i, W_i)`` (one device) -> the float batch ``(B, 3, size, size)``.

    Per image: the crop of :func:`crop_parameters` for its seed, resized to ``size`` x ``size`` with antialiasing
    and rounded to uint8 (as Pillow's resize), flipped when drawn; then the batch becomes ``(x / 255 - mean) / std``.
    """
    if len(images) != len(seeds):
        raise ValueError(f"got {len(images)} images but {len(seeds)} seeds; they must match one to one")
    out = []
    for image, seed in zip(images, seeds):
        i, j, h, w, flip = crop_parameters(image.shape[-2], image.shape[-1], seed, recipe)
        crop = F2.resized_crop(image, i, j, h, w, [recipe.size, recipe.size], recipe.interpolation, antialias=True)
        out.append(crop.flip(-1) if flip else crop)
    batch = torch.stack(out).float()
    device = batch.device
    mean = torch.tensor(recipe.mean, device=device).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(recipe.std, device=device).view(1, -1, 1, 1) * 255.0
    return batch.sub_(mean).div_(std)
