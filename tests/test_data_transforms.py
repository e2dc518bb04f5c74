"""build_transforms: output shapes, ranges and the error for an unknown kind."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image

from recallk.data import build_transforms


@pytest.mark.parametrize("train", [True, False])
def test_imagenet_rgb_normalised(train: bool) -> None:
    transform = build_transforms("imagenet", 32, train=train)
    out = transform(Image.new("RGB", (50, 40), (124, 116, 104)))  # the ImageNet mean colour
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.abs().max() < 0.02  # normalised to about zero
    assert build_transforms("imagenet", 32, train=train)(Image.new("L", (40, 40))).shape == (3, 32, 32)


def test_imagenet_test_is_deterministic_center_crop() -> None:
    transform = build_transforms("imagenet", 16, train=False)
    image = Image.effect_noise((64, 48), 40).convert("RGB")
    assert torch.equal(transform(image), transform(image))


def test_omniglot_train_augments_test_does_not() -> None:
    image = Image.new("L", (105, 105), 0)
    image.paste(255, (30, 30, 70, 50))
    test = build_transforms("omniglot", 28, train=False)
    train = build_transforms("omniglot", 28, train=True)
    assert test(image).shape == (1, 28, 28) and torch.equal(test(image), test(image))
    torch.manual_seed(0)
    outs = [train(image) for _ in range(4)]
    assert all(o.shape == (1, 28, 28) and 0 <= o.min() <= o.max() <= 1 for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert outs[0][0, 0, 0] == 0  # affine fill matches the dark background


def test_picklable_for_worker_processes() -> None:
    for kind in ("imagenet", "omniglot"):
        pickle.loads(pickle.dumps(build_transforms(kind, 8, train=True)))


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown transform kind 'clip'; choose one of imagenet, omniglot"):
        build_transforms("clip", 8, train=True)
