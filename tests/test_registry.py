"""One source of names: every registered name is implemented, nothing else is, and the config uses the registries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recallk import registry
from recallk.config import ConfigError, config_from_dict, explain_config
from recallk.data.factory import READERS, build_dataset, reader_decoding
from recallk.data.text import TEXT_READERS
from recallk.data.transforms import build_transforms
from recallk.losses.factory import build_loss
from recallk.models.heads import EmbeddingHead
from recallk.models.small_cnn import SmallCNN
from recallk.training.assemble import AMP_DTYPES
from recallk.training.schedule import lr_multiplier

from data_fixtures import make_glyph_folder, make_omniglot_folder


def test_readers_are_the_registered_data_sets() -> None:
    assert list(READERS) == list(registry.DATASETS)
    assert list(TEXT_READERS) == list(registry.TEXT_DATASETS)
    assert not set(registry.DATASETS) & set(registry.TEXT_DATASETS)


@pytest.mark.parametrize("name", list(registry.TRANSFORMS))
def test_every_transform_builds(name: str) -> None:
    from PIL import Image

    transform = build_transforms(name, 16, train=False, backbone="resnet18")
    assert transform(Image.new("RGB", (20, 20))).shape[-2:] == (16, 16)


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_every_loss_builds_and_runs(name: str) -> None:
    loss = build_loss(name, num_classes=3, embed_dim=4)
    embeddings = torch.nn.functional.normalize(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    assert torch.isfinite(loss(embeddings, torch.arange(3).repeat_interleave(4)))


def test_poolings_norms_schedules_and_precisions_are_implemented() -> None:
    for pooling in registry.POOLINGS:
        EmbeddingHead(8, 4, pooling=pooling)
    for norm in registry.NORMS:
        SmallCNN(1, widths=(8,), norm=norm)
    for schedule in registry.SCHEDULES:
        assert lr_multiplier(schedule, total_epochs=2)(0.0) == 1.0
    assert set(AMP_DTYPES) == set(registry.AMP_MODES) - {"auto"}


def test_unregistered_names_are_refused_with_a_suggestion() -> None:
    with pytest.raises(ValueError, match="unknown pooling 'gm'.*did you mean 'gem'"):
        EmbeddingHead(8, 4, pooling="gm")
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        SmallCNN(1, widths=(8,), norm="layer")
    with pytest.raises(ValueError, match="unknown dataset 'cubb'.*did you mean 'cub'"):
        build_dataset("cubb", ".", "train")


@pytest.mark.parametrize(("key", "registry_of_key"), [
    ("data.dataset", registry.DATASETS), ("data.transform", registry.TRANSFORMS), ("loss.name", registry.LOSSES),
    ("model.pooling", registry.POOLINGS), ("model.norm", registry.NORMS), ("optim.schedule", registry.SCHEDULES),
    ("train.amp", registry.AMP_MODES), ("eval.benchmarks", registry.BENCHMARKS),
])
def test_the_config_validates_against_the_registries(key: str, registry_of_key: registry.Registry) -> None:
    section, field = key.split(".")
    for name in registry_of_key:
        config_from_dict({section: {field: name}} if key != "optim.schedule" or name != "step"
                         else {"optim": {"schedule": "step", "step_epochs": [1]}, "train": {"epochs": 2}})
    with pytest.raises(ConfigError) as err:
        config_from_dict(None, [f"{key}=nonsense"])
    message = str(err.value)
    assert f"'{key}' in override '{key}=nonsense'" in message
    assert all(repr(name) in message for name in registry_of_key)
    assert all(repr(name) in explain_config(section) for name in registry_of_key)


def test_reader_decoding_is_what_the_readers_do(tmp_path: Path) -> None:
    make_omniglot_folder(tmp_path / "omniglot")
    make_omniglot_folder(tmp_path / "omniglot", part="images_evaluation")
    omniglot = build_dataset("omniglot", tmp_path, "test")
    assert (omniglot.image_mode, omniglot.invert) == reader_decoding("omniglot", {})
    folder = make_glyph_folder(tmp_path / "glyphs", classes=2, per_class=2)
    for options in ({}, {"grayscale": True}, {"invert": True}):
        dataset = build_dataset("folder", folder, "train", **options)
        assert (dataset.image_mode, dataset.invert) == reader_decoding("folder", options)
