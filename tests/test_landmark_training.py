"""Landmark retrieval end to end on the CPU: the SfM-120k recipe trains a tiny model on an SfM-format fixture (and
evaluates Revisited Oxford/Paris fixtures after training), `recallk whiten` learns a whitening from its val pairs,
every way of loading the run applies it, and `recallk evaluate --benchmark roxford5k` evaluates the whitened model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import recallk
from recallk.cli import main
from recallk.config import load_config
from recallk.data.landmarks import sfm120k_pairs
from recallk.evaluation.multiscale import multiscale_descriptors
from recallk.models.export import load_exported
from recallk.recipes import recipe_path
from recallk.training.checkpoint import load_checkpoint
from recallk.training.evaluate_run import landmark_tensor_transform
from revisited_fixtures import write_revisited

from data_fixtures import landmark_image, make_gldv2, make_sfm120k

TINY = [  # the recipe, shrunk to a CPU-sized model and batch
    "model.backbone=omniglot_cnn", "model.pretrained=false", "model.in_chans=3", "model.widths=[8,16]",
    "model.embed_dim=8", "data.image_size=16", "data.batch_size=8", "data.samples_per_class=2",
    "data.num_workers=0", "train.epochs=1", "train.max_steps=2", "train.chunk_size=4", "train.eval_every=1",
    "eval.batch_size=32", "output.plots=false",
]


@pytest.fixture(scope="module")
def sfm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("sfm")
    make_sfm120k(base / "data", {"train": {c: 3 for c in range(6)}, "val": {c: 4 for c in range(10, 16)}},
                 size=16, whiten=True)
    write_revisited(base / "data", "roxford5k")
    run = base / "run"
    status = main(["train", "sfm120k_resnet101_gem", *TINY, "eval.benchmarks=[roxford5k]", "--data-dir",
                   str(base / "data"), "--run-dir", str(run), "--device", "cpu"])
    assert status == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["benchmarks"]["roxford5k"]["scales"] == [1.0, 0.7071, 0.5]  # the recipe's eval.scales
    return run


@pytest.mark.parametrize(("recipe", "write", "fitting"), [
    ("sfm120k_resnet101_gem", lambda root: make_sfm120k(root, {"train": {c: 3 for c in range(6)}, "val": {10: 2}}),
     []),
    ("gldv2_resnet50_gem", lambda root: make_gldv2(root, {c: 3 for c in range(8)}),
     ["data.options={val_landmarks: 2}"]),
])
def test_landmark_recipes_pass_the_dry_run(
    recipe: str, write: Callable[[Path], Path], fitting: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The dry run reads the training split and builds the sampler, so it gets data (and a batch that fits it)."""
    write(tmp_path)
    small = ["data.batch_size=8", "data.samples_per_class=2", *fitting]
    assert main(["train", recipe, "loss.name=smooth_ap", *small, "--dry-run", "--data-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "gem_lr_mult: 10.0" in printed and "freeze_batchnorm: true" in printed
    assert load_config(recipe_path(recipe)).data.batch_size == 4096


def test_sfm_recipe_trains_and_whiten_learns_from_val_pairs(sfm_run: Path, capsys: pytest.CaptureFixture) -> None:
    plain = recallk.load_model(sfm_run)
    images = torch.rand(5, 3, 16, 16)
    unwhitened = plain.embed(images)
    assert unwhitened.shape == (5, 8)

    assert main(["whiten", str(sfm_run), "--pairs", "val", "--dim", "6", "--scales", "1", "--device", "cpu"]) == 0
    assert "(whitening learned from pairs 'val', 8 -> 6 dims)" in capsys.readouterr().out
    whitened_file = sfm_run / "checkpoints" / "whitened.pt"
    state = load_checkpoint(whitened_file)
    assert state["config"]["model"]["whitening"] == "learned" and state["config"]["model"]["whitening_dim"] == 6
    assert state["whitening"]["pairs"] == "sfm120k val (18 pairs)"

    model = recallk.load_model(sfm_run)  # the run now resolves to whitened.pt
    assert model.embed_dim == 6
    expected = model.network.whitening(unwhitened)
    torch.testing.assert_close(model.embed(images), expected, atol=1e-5, rtol=0)
    # fitted on the run's own descriptors of the val pairs: their differences now have unit variance in every direction
    base, names, pairs = sfm120k_pairs(sfm_run.parent / "data", "val")
    to_tensor = landmark_tensor_transform(plain.config)  # full images (16 px < eval.image_size), at scale 1
    full_images = [to_tensor(Image.open(base / n).convert("RGB")) for n in names]
    descriptors = multiscale_descriptors(plain.network, full_images, torch.device("cpu"), progress=False).double()
    projection = model.network.whitening.projection.double()
    differences = (descriptors[pairs[:, 0]] - descriptors[pairs[:, 1]]) @ projection.t()
    torch.testing.assert_close(differences.t() @ differences / len(pairs), torch.eye(6, dtype=torch.float64),
                               atol=1e-3, rtol=0)

    saved = model.save_pretrained(sfm_run.parent / "shared")
    torch.testing.assert_close(recallk.load_model(saved).embed(images), expected, atol=1e-5, rtol=0)
    card = (Path(saved) / "README.md").read_text()
    assert "6-d unit-norm embeddings" in card and "learned whitening after the head" in card  # the whitened size
    exported = sfm_run.parent / "model.pt"
    assert main(["export", str(sfm_run), "--format", "torchscript", "--out", str(exported)]) == 0
    torch.testing.assert_close(load_exported(exported, "torchscript")(images), expected, atol=1e-5, rtol=0)

    # the benchmark: multi-scale descriptors (the recipe's eval.scales), whitened after aggregation
    assert main(["evaluate", str(sfm_run), "--benchmark", "roxford5k", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "medium" in printed and "mP@10" in printed
    saved = json.loads((sfm_run / "evaluation.json").read_text())["roxford5k"]
    assert saved["whitening"] == "learned" and saved["scales"] == [1.0, 0.7071, 0.5]
    assert all(0 <= saved[protocol]["map"] <= 1 for protocol in ("easy", "medium", "hard"))

    # never overwritten silently; --force replaces it
    assert main(["whiten", str(sfm_run), "--pairs", "val"]) == 2
    assert "whitened.pt already exists; pass --force" in capsys.readouterr().err
    assert main(["whiten", str(sfm_run), "--pairs", "whiten", "--force", "--device", "cpu"]) == 0
    assert recallk.load_model(sfm_run).embed_dim == 8


def test_pca_whitening_from_images_and_bad_requests(sfm_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    for i in range(20):
        landmark_image(tmp_path / "sample" / f"{i}.jpg", i % 5, rng, size=16)
    out = tmp_path / "pca.pt"
    assert main(["whiten", str(sfm_run), "--images", str(tmp_path / "sample"), "--power", "0.25", "--dim", "4",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert "(whitening PCA, power 0.25, 8 -> 4 dims)" in capsys.readouterr().out
    assert recallk.load_model(out).embed(torch.rand(2, 3, 16, 16)).shape == (2, 4)

    assert main(["whiten", str(sfm_run), "--pairs", "val", "--power", "0.25", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--power sets PCA whitening (--images)" in capsys.readouterr().err
    assert main(["whiten", str(sfm_run), "--pairs", "test", "--out", str(tmp_path / "x.pt")]) == 2
    assert "unknown sfm120k pairs split 'test'" in capsys.readouterr().err
    assert main(["whiten", str(sfm_run), "--pairs", "val", "--dim", "9", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--dim 9: the whitening dimension must be in 1..8" in capsys.readouterr().err
