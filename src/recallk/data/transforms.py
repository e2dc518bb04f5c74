"""Image transforms (torchvision) for training and evaluation."""

from __future__ import annotations

from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORM_KINDS = ("imagenet", "omniglot")


def build_transforms(kind: str, image_size: int, train: bool) -> T.Compose:
    """PIL image -> float tensor ``(C, image_size, image_size)``.

    ``imagenet``: train = RandomResizedCrop + horizontal flip, test = Resize(image_size * 256 / 224) + CenterCrop;
    both RGB, normalised with the ImageNet mean/std.
    ``omniglot``: one channel in [0, 1], resized to ``image_size``; train adds a small RandomAffine (rotation
    +-10 degrees, shift up to 10 %, scale 0.9-1.1) whose fill 0 matches recallk's inverted (dark) background.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if kind == "imagenet":
        if train:
            steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
        return T.Compose([T.Lambda(_to_rgb), *steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if kind == "omniglot":
        steps = [T.Grayscale(num_output_channels=1), T.Resize((image_size, image_size))]
        if train:
            steps.append(T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=0))
        return T.Compose([*steps, T.ToTensor()])
    raise ValueError(f"unknown transform kind {kind!r}; choose one of {', '.join(TRANSFORM_KINDS)}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale (e.g. Omniglot) or palette images become 3-channel RGB for ImageNet-pretrained backbones."""
    return image.convert("RGB")
