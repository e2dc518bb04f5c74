"""Image transforms (torchvision) for training and evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from PIL import Image
from timm.data import resolve_model_data_config
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms as T

from recallk.registry import TRANSFORMS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Omniglot training augmentation, for images read from files and for decoded arrays (data.in_memory) alike:
# rotation +-degrees, shift up to translate * size, scale range, x-shear +-shear degrees.
OMNIGLOT_AUGMENTATION = {"degrees": 10.0, "translate": 0.1, "scale": (0.9, 1.1), "shear": 6.0}
TRAIN_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default: the share of the image's area each crop keeps


def build_transforms(
    kind: str,
    image_size: int,
    train: bool,
    backbone: str | None = None,
    *,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    crop_scale: Sequence[float] = TRAIN_CROP_SCALE,
    hflip: bool = True,
) -> T.Compose:
    """PIL image -> float tensor ``(C, image_size, image_size)``.

    ``mean``/``std`` (one value, or one per channel) normalise the tensor as ``(x - mean) / std``; they replace the
    ImageNet statistics of ``imagenet`` and add a normalisation to ``omniglot`` (which has none by default).

    ``imagenet``: train = RandomResizedCrop (a crop of ``crop_scale`` = (min, max) of the image's area, aspect ratio
    3/4 to 4/3, resized to ``image_size``) + a random horizontal flip (``hflip``), test = Resize(image_size * 256 /
    224) + CenterCrop; both RGB, normalised with the ImageNet mean/std.
    ``timm``: the same steps (``crop_scale``, ``hflip`` too) with the preprocessing of the timm model ``backbone``
    (its pretrained weights' tag): mean/std, interpolation and the test crop fraction from
    ``timm.data.resolve_model_data_config`` (augreg ViTs expect mean = std = 0.5 and bicubic resizing with crop 0.9).
    ``omniglot``: one channel in [0, 1], resized to ``image_size``; train adds the random affine of
    ``OMNIGLOT_AUGMENTATION`` (rotation +-10 degrees, shift up to 10 %, scale 0.9-1.1, shear +-6 degrees) whose
    fill 0 matches recallk's inverted (dark) background.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    scale = (float(crop_scale[0]), float(crop_scale[1]))
    flip = [T.RandomHorizontalFlip(p=0.5 if hflip else 0.0)]  # always a step: the same pipeline shape either way
    if kind == "imagenet":
        if train:
            steps = [T.RandomResizedCrop(image_size, scale=scale), *flip]
        else:
            steps = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
        normalize = T.Normalize(*_statistics(mean, std, IMAGENET_MEAN, IMAGENET_STD))
        return T.Compose([T.Lambda(_to_rgb), *steps, T.ToTensor(), normalize])
    if kind == "timm":
        config = timm_data_config(backbone)
        interpolation = str_to_interp_mode(config["interpolation"])
        if train:
            steps = [T.RandomResizedCrop(image_size, scale=scale, interpolation=interpolation), *flip]
        else:
            resize = int(image_size / config["crop_pct"])  # timm's eval resize for crop_mode "center"
            size = (resize, resize) if config.get("crop_mode") == "squash" else resize
            steps = [T.Resize(size, interpolation=interpolation), T.CenterCrop(image_size)]
        normalize = T.Normalize(*_statistics(mean, std, config["mean"], config["std"]))
        return T.Compose([T.Lambda(_to_rgb), *steps, T.ToTensor(), normalize])
    if kind == "omniglot":
        steps = [T.Grayscale(num_output_channels=1), T.Resize((image_size, image_size))]
        if train:
            aug = OMNIGLOT_AUGMENTATION
            steps.append(T.RandomAffine(degrees=aug["degrees"], translate=(aug["translate"],) * 2, scale=aug["scale"],
                                        shear=aug["shear"], fill=0))
        if mean is not None or std is not None:
            return T.Compose([*steps, T.ToTensor(), T.Normalize(*_statistics(mean, std, (0.0,), (1.0,)))])
        return T.Compose([*steps, T.ToTensor()])
    raise ValueError(TRANSFORMS.unknown(kind))


def timm_data_config(backbone: str | None) -> dict[str, Any]:
    """timm's preprocessing of ``backbone`` (``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``).

    The model is built on the meta device (no memory, no weights) only to resolve its pretrained config.
    """
    if backbone is None or not timm.is_model(backbone):
        raise ValueError(
            f"data.transform=timm takes its preprocessing from a timm backbone, but model.backbone is {backbone!r}; "
            "set model.backbone to a timm model name or data.transform to imagenet/omniglot"
        )
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    config = resolve_model_data_config(model)
    if config.get("crop_mode", "center") not in ("center", "squash"):
        raise ValueError(
            f"timm crop_mode {config['crop_mode']!r} of {backbone} is not supported; use data.transform=imagenet"
        )
    return config


def _statistics(
    mean: Sequence[float] | float | None, std: Sequence[float] | float | None,
    default_mean: tuple[float, ...], default_std: tuple[float, ...],
) -> tuple[list[float], list[float]]:
    """``(mean, std)`` as lists (defaults where not given); a non-positive std is a ``ValueError``."""
    means = default_mean if mean is None else [mean] if isinstance(mean, (int, float)) else mean
    stds = default_std if std is None else [std] if isinstance(std, (int, float)) else std
    if not all(isinstance(v, (int, float)) for v in [*means, *stds]) or any(s <= 0 for s in stds):
        raise ValueError(
            f"normalisation mean {mean!r} and std {std!r} must be numbers (std > 0), one or one per channel; "
            "set e.g. data.options.mean=0.5 and data.options.std=0.5"
        )
    return [float(v) for v in means], [float(v) for v in stds]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale (e.g. Omniglot) or palette images become 3-channel RGB for ImageNet-pretrained backbones."""
    return image.convert("RGB")
