"""build_transforms: output shapes, ranges and the error for an unknown kind."""

from __future__ import annotations

import pickle

import pytest
import timm
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
    for kind in ("imagenet", "omniglot", "timm"):
        pickle.loads(pickle.dumps(build_transforms(kind, 8, train=True, backbone="resnet18")))


@pytest.mark.parametrize("backbone", ["vit_base_patch32_224.augreg_in21k", "resnet50"])
def test_timm_test_transform_is_timms_own_eval_transform(backbone: str) -> None:
    config = timm.data.resolve_model_data_config(timm.create_model(backbone, pretrained=False, num_classes=0))
    theirs = timm.data.create_transform(**{**config, "input_size": (3, 32, 32)}, is_training=False)
    ours = build_transforms("timm", 32, train=False, backbone=backbone)
    image = Image.effect_noise((61, 47), 60).convert("RGB")
    assert torch.equal(ours(image), theirs(image))
    flat = build_transforms("timm", 16, train=True, backbone=backbone)(Image.new("RGB", (40, 30), (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(config["mean"])) / torch.tensor(config["std"])
    torch.testing.assert_close(flat[:, 0, 0], expected.float())  # augreg ViTs: mean = std = 0.5, not ImageNet's


def test_timm_transform_needs_a_timm_backbone() -> None:
    with pytest.raises(ValueError, match="data.transform=timm .* model.backbone is 'omniglot_cnn'"):
        build_transforms("timm", 28, train=False, backbone="omniglot_cnn")


def test_unknown_kind() -> None:
    message = "unknown transform 'clip' for 'data.transform'; choose one of 'imagenet', 'omniglot', 'timm'"
    with pytest.raises(ValueError, match=message):
        build_transforms("clip", 8, train=True)


def test_a_timm_recipe_reads_images_with_the_backbones_preprocessing(tmp_path) -> None:
    from recallk.config import DataConfig
    from recallk.data.sources import build_source

    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        Image.new("RGB", (20, 20), (128, 128, 128)).save(tmp_path / "train" / label / "0.png")
    cfg = DataConfig(dataset="folder", transform="timm", image_size=8, num_workers=0)
    source = build_source(cfg, "train", False, tmp_path, backbone="vit_base_patch32_224.augreg_in21k")
    image, _ = source.dataset[0]
    assert image.shape == (3, 8, 8)
    torch.testing.assert_close(image, torch.full((3, 8, 8), (128 / 255 - 0.5) / 0.5))  # 0.5/0.5, not ImageNet's


def test_the_training_crop_and_flip_follow_the_config(tmp_path) -> None:
    """data.crop_scale and data.hflip reach the training transform of image files (folder, csv, ...):
    crop_scale=[1, 1] without flip keeps the whole (square) image, the default crops and flips at random."""
    from recallk.config import DataConfig, load_config
    from recallk.data.sources import build_source
    from recallk.data.transforms import TRAIN_CROP_SCALE

    from data_fixtures import make_glyph_folder

    assert DataConfig().crop_scale == TRAIN_CROP_SCALE and DataConfig().hflip
    root = make_glyph_folder(tmp_path / "glyphs")
    keys = ["data.dataset=folder", "data.image_size=16"]
    whole = build_source(load_config(None, [*keys, "data.crop_scale=[1,1]", "data.hflip=false"]).data, "train", True,
                         root).dataset
    draws = [whole[0][0] for _ in range(4)]
    assert draws[0].shape == (3, 16, 16) and all(torch.equal(d, draws[0]) for d in draws)
    default = build_source(load_config(None, keys).data, "train", True, root).dataset
    assert len({default[0][0].sum().item() for _ in range(6)}) > 1
