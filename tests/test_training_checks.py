"""What training refuses at once, the dry run refuses too (the same checks), and the defaults pass them; a
``train.max_steps`` the epochs cannot reach is refused in one line; BatchNorm is frozen when batches are chunked;
pretrained weights are read once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from recallk.cli import main
from recallk.config import config_to_yaml, load_config
from recallk.engine.batchnorm import is_frozen_batchnorm
from recallk.errors import RecallkUsageError
from recallk.training.trainer import Trainer

from data_fixtures import make_glyph_folder
from run_fixtures import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_glyph_folder(tmp_path_factory.mktemp("glyphs"))  # 12 classes of 6 images per split


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recallk: error: "), lines
    return lines[0]


def _minimal_folder_config(tmp_path: Path) -> Path:
    """What a new user writes first: the data set and the transform, every other key left at its default."""
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  dataset: folder\n  transform: omniglot\n  image_size: 16\n  num_workers: 0\n"
                    "model:\n  in_chans: 1\ntrain:\n  device: cpu\n")
    return path


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ([], ["data.batch_size=512", "128 classes per batch", "only 12 classes", "use batch_size <= 48"]),
        (["data.batch_size=40", "train.chunk_size=20", "model.freeze_batchnorm=false"],
         ["chunks of train.chunk_size 20,", "needs frozen BatchNorm", "model.freeze_batchnorm=true"]),
    ],
    ids=["classes-per-batch", "chunked-batchnorm"],
)
def test_the_dry_run_refuses_what_training_refuses(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], fragments: list[str]
) -> None:
    config = _minimal_folder_config(tmp_path)
    capsys.readouterr()
    assert main(["train", str(config), "--data-dir", str(data_dir), *overrides, "--dry-run"]) == 2
    dry = _error_line(capsys)
    for fragment in fragments:
        assert fragment in dry, dry
    run = tmp_path / "run"
    with pytest.raises(RecallkUsageError) as refused:  # training stops with the very same line
        Trainer(load_config(config, overrides), run, data_dir=data_dir, progress=False)
    assert dry == f"recallk: error: {refused.value}"
    assert not run.exists()


def test_the_defaults_form_a_valid_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty config (Omniglot, ResNet-50, the default batch and chunk) passes the dry run's sampler and engine
    checks, and the dry run names the data folder it will read ($RECALLK_DATA) instead of ``null``."""
    data = Path(os.environ.get("RECALLK_DATA", "/nowhere"))
    if not (data / "omniglot" / "images_background.zip").is_file():
        pytest.skip("the Omniglot zips are not in $RECALLK_DATA")
    empty = tmp_path / "empty.yaml"
    empty.write_text("name: defaults\n")
    capsys.readouterr()
    assert main(["train", str(empty), "--dry-run"]) == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["data_dir"] == str(data.absolute())
    assert printed["data"]["batch_size"] > printed["train"]["chunk_size"]  # chunked: BatchNorm is frozen (null)


@pytest.mark.parametrize(("chunk", "frozen"), [(6, True), (16, False)], ids=["chunked", "whole-batch"])
def test_batchnorm_is_frozen_exactly_when_the_batch_is_chunked(
    tmp_path: Path, data_dir: Path, chunk: int, frozen: bool
) -> None:
    """``model.freeze_batchnorm: null`` (the default): frozen when the multistage engine splits the batch, batch
    statistics when one pass sees the whole batch."""
    cfg = tiny_config(tmp_path, model__freeze_batchnorm=None, train__chunk_size=chunk, train__epochs=1)
    trainer = Trainer(cfg, tmp_path / "run", data_dir=data_dir, progress=False)
    trainer.close()
    norms = [m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(is_frozen_batchnorm(m) == frozen for m in norms)
    assert trainer.chunked == frozen


def test_max_steps_beyond_the_epochs_is_refused_in_one_line(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """72 images in batches of 16: 4 steps per epoch, so 2 epochs end at step 8; ``max_steps=9`` would never stop
    the run (it used to be ignored, ``stop_reason: epochs``). Refused by the dry run and by training alike."""
    config = tmp_path / "tiny.yaml"
    config.write_text(config_to_yaml(tiny_config(tmp_path, train__epochs=2, train__max_steps=9)))
    capsys.readouterr()
    assert main(["train", str(config), "--data-dir", str(data_dir), "--dry-run"]) == 2
    line = _error_line(capsys)
    assert "train.max_steps=9 is more than the 8 steps of train.epochs=2" in line
    assert "set train.epochs=3, or train.max_steps<=8" in line
    with pytest.raises(RecallkUsageError, match="train.max_steps=9 is more than the 8 steps"):
        Trainer(load_config(config), tmp_path / "run", data_dir=data_dir, progress=False)
    assert main(["train", str(config), "--data-dir", str(data_dir), "train.max_steps=8", "--dry-run"]) == 0



def test_pretrained_weights_are_read_once(tmp_path: Path, data_dir: Path) -> None:
    """The untrained baseline of the recall@k plot uses the weights read when the run started: the weights file
    (a package's, a download's) is not read again for the final test. Here it is gone by then."""
    import timm

    weights = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    cfg = tiny_config(tmp_path, train__epochs=1, train__max_steps=1, data__split_val=None, model__backbone="resnet10t",
                      model__pretrained_path=str(weights), model__in_chans=1, output__export_embeddings=False)
    trainer = Trainer(cfg, tmp_path / "run", data_dir=data_dir, progress=False)
    try:
        weights.rename(tmp_path / "moved.pth")
        summary = trainer.fit()
    finally:
        trainer.close()
    untrained = summary["untrained"]
    reference = Trainer(tiny_config(tmp_path, train__epochs=1, data__split_val=None, model__backbone="resnet10t",
                                    model__pretrained_path=str(tmp_path / "moved.pth"), model__in_chans=1),
                        tmp_path / "reference", data_dir=data_dir, progress=False)
    reference.close()
    assert untrained == reference._untrained_metrics(reference.test_sources["test"])
