"""What a new user meets on their own data and default settings (issue #11): each case trains or evaluates for real
and checks that the number reported is right, that a silent failure now says so, or that a promise holds."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from recallk.cli import main
from recallk.config import config_to_dict
from recallk.data.folder_csv import build_csv, build_folder
from recallk.data.sampler import ClassBalancedBatchSampler
from recallk.data.sources import build_source
from recallk.evaluation.metrics import format_metrics_table
from recallk.files import read_metrics
from recallk.losses.recall_at_k import RecallAtKLoss
from recallk.losses.unit_norm import UnnormalizedEmbeddingsWarning
from recallk.training.evaluate_run import evaluate_run
from recallk.training.trainer import train

from data_fixtures import make_glyph_folder
from run_fixtures import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_glyph_folder(tmp_path_factory.mktemp("glyphs"))


def test_bf16_training_reports_the_float32_metrics_of_recallk_evaluate(tmp_path: Path, data_dir: Path) -> None:
    """Under train.amp=bf16 the summary's test metrics are those `recallk evaluate` computes on the checkpoint."""
    run = tmp_path / "run"
    config = tiny_config(tmp_path, train__amp="bf16", train__epochs=2, output__plots=False)
    summary = train(config, run, data_dir=data_dir, progress=False)
    evaluated = evaluate_run(run, data_dir=data_dir, device="cpu", progress=False)["test"]
    for metric in ("recall@1", "recall@2", "map@r"):
        assert abs(summary[metric] - evaluated[metric]) <= 1e-3, (metric, summary[metric], evaluated[metric])
    assert summary["validation"] == {"images": 72, "classes": 12}  # item 3: the validation database size is reported


# ---------------------------------------------------------------------------------------------------------------------
# 2. Every image mode Pillow reads decodes into the right 0-255 range


def _write_mode_images(folder: Path) -> dict[str, tuple[int, int]]:
    """One file per mode, each 4x4 with a mid-grey left half (128 in 8 bits) and a white right half; returns
    ``{file name: (expected left value, expected right value)}`` after decoding to 8-bit grey."""
    folder.mkdir(parents=True)
    grey = np.full((4, 4), 128, dtype=np.uint8)
    grey[:, 2:] = 255
    made = {}

    def save(name: str, image: Image.Image) -> None:
        image.save(folder / name)
        made[name] = (128, 255)

    save("mode_L.png", Image.fromarray(grey, "L"))
    save("mode_P.png", Image.fromarray(grey, "L").convert("P"))
    save("mode_RGBA.png", Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)]), "RGBA"))
    alpha = np.full_like(grey, 255)
    alpha[:, 2:] = 0  # transparent right half over black pixels: composited onto white
    black_right = grey.copy()
    black_right[:, 2:] = 0
    save("mode_LA.png", Image.fromarray(np.dstack([black_right, alpha]), "LA"))
    save("mode_I16.png", Image.fromarray(grey.astype(np.uint16) * 257))  # 16-bit PNG (mode I;16)
    save("mode_I.tif", Image.fromarray(grey.astype(np.int32) * 257))  # 32-bit integer TIFF (mode I)
    save("mode_F.tif", Image.fromarray(grey.astype(np.float32) / 255))  # float TIFF in [0, 1] (mode F)
    cmyk = np.zeros((4, 4, 4), dtype=np.uint8)
    cmyk[..., 3] = 255 - grey  # grey as black ink only
    save("mode_CMYK.tif", Image.fromarray(cmyk, "CMYK"))
    binary = np.zeros((4, 4), dtype=bool)
    binary[:, 2:] = True
    Image.fromarray(binary).save(folder / "mode_1.png")
    made["mode_1.png"] = (0, 255)
    return made


@pytest.mark.parametrize("image_mode", ["L", "RGB"])
def test_every_pillow_mode_decodes_into_the_right_range(tmp_path: Path, image_mode: str) -> None:
    expected = _write_mode_images(tmp_path / "all" / "modes")
    dataset = build_folder(tmp_path, "all")
    dataset.image_mode = image_mode
    assert len(dataset) == len(expected)
    for index, name in enumerate(dataset.item_ids):
        with Image.open(tmp_path / "all" / name) as original:
            stored_mode = original.mode
        pixels = np.asarray(dataset.load_image(index), dtype=np.int64)
        left, right = expected[Path(name).name]
        assert np.abs(pixels[:, :2] - left).max() <= 1, (name, stored_mode, pixels[:, :2].ravel()[:4])
        assert np.abs(pixels[:, 2:] - right).max() <= 1, (name, stored_mode, pixels[:, 2:].ravel()[:4])


# ---------------------------------------------------------------------------------------------------------------------
# 4. A model that does not train says so; folder/csv readers take the grayscale options


# black-on-white glyphs, GroupNorm from scratch, batch 128, the paper's tau_k: every similarity starts near 1
STUCK_SETTINGS = dict(
    loss__tau_k=1.0, model__norm="group", model__freeze_batchnorm=False, model__layernorm=False, train__epochs=5,
    train__eval_every=0,
    train__chunk_size=128, data__batch_size=128, data__samples_per_class=4, output__plots=False,
    output__export_embeddings=False,
)


@pytest.fixture(scope="module")
def forty_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_glyph_folder(tmp_path_factory.mktemp("glyphs40"), classes=40, per_class=4)


def test_a_model_that_does_not_train_is_reported_once(
    tmp_path: Path, forty_classes: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="recallk"):
        train(tiny_config(tmp_path, **STUCK_SETTINGS), tmp_path / "run", data_dir=forty_classes, progress=False)
    losses = [float(row["train_loss"]) for row in read_metrics(tmp_path / "run" / "metrics.csv")]
    assert max(losses) - min(losses) < 1e-4  # the situation is real: nothing trains
    stuck = [r.getMessage() for r in caplog.records if "the model is not training" in r.getMessage()]
    assert len(stuck) == 1, stuck
    for fix in ("model.layernorm=true", "data.options.invert=true", "loss.tau_k", "model.pretrained"):
        assert fix in stuck[0]


def test_a_training_model_is_not_reported(tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="recallk"):
        train(tiny_config(tmp_path, train__epochs=2, output__plots=False), tmp_path / "run", data_dir=data_dir,
              progress=False)
    assert not [r for r in caplog.records if "the model is not training" in r.getMessage()]


def test_folder_and_csv_readers_take_grayscale_invert_and_normalisation(tmp_path: Path, data_dir: Path) -> None:
    plain = build_folder(data_dir, "train")
    inverted = build_folder(data_dir, "train", grayscale=True, invert=True)
    original = np.asarray(plain.load_image(0).convert("L"), dtype=np.int64)
    assert inverted.load_image(0).mode == "L"
    np.testing.assert_array_equal(np.asarray(inverted.load_image(0), dtype=np.int64), 255 - original)
    (tmp_path / "train.csv").write_text(
        "path,label\n" + "".join(f"{data_dir / 'train' / name},{label}\n"
                                 for name, label in zip(plain.item_ids, plain.labels)), encoding="utf-8"
    )
    from_csv = build_csv(tmp_path, "train", grayscale=True, invert=True)
    np.testing.assert_array_equal(np.asarray(from_csv.load_image(0)), np.asarray(inverted.load_image(0)))
    # through the config: data.options reach the reader, mean/std the transform
    cfg = tiny_config(tmp_path, data__options={"invert": True, "mean": 0.5, "std": 0.25}).data
    source = build_source(cfg, "train", False, data_dir)
    first = next(iter(source.eval_batches(1)))[0, 0]
    expected = (torch.from_numpy(255 - original).float() / 255).unsqueeze(0).unsqueeze(0)
    expected = torch.nn.functional.interpolate(expected, size=16, mode="bilinear", antialias=True)[0, 0]
    torch.testing.assert_close(first, (expected - 0.5) / 0.25, atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# 5. The sampler reshuffles on every iteration without set_epoch; an explicit set_epoch still wins


def test_sampler_moves_to_a_new_epoch_on_each_iteration() -> None:
    labels = np.repeat(np.arange(20), 5)
    sampler = ClassBalancedBatchSampler(labels, batch_size=16, samples_per_class=4, seed=1)
    first, second, third = list(sampler), list(sampler), list(sampler)
    assert first != second and second != third and first != third
    assert sampler.epoch == 2
    assert second == [b.reshape(-1).tolist() for b in sampler.global_batches(1)]
    sampler.set_epoch(0)
    assert list(sampler) == first  # explicit epochs (the trainer's exact resume) still repeat exactly
    sampler.set_epoch(0)
    assert list(sampler) == first
    # a DataLoader iterates the batch sampler once per pass, as a PML user's loop does
    loader = DataLoader(TensorDataset(torch.arange(len(labels))), batch_sampler=sampler)
    passes = [[batch[0].tolist() for batch in loader] for _ in range(2)]
    assert passes[0] != passes[1]


# ---------------------------------------------------------------------------------------------------------------------
# 6. Unnormalised embeddings are not ranked silently


def test_unnormalised_embeddings_warn_once_and_unit_ones_do_not() -> None:
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(32, 8, generator=generator) * 3
    labels = torch.arange(8).repeat_interleave(4)
    loss = RecallAtKLoss(k=(1, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        loss(raw, labels)
        loss(raw * 2, labels)
        loss(torch.nn.functional.normalize(raw, dim=1), labels, ref_emb=raw, ref_labels=labels)
    unnormalised = [w for w in caught if issubclass(w.category, UnnormalizedEmbeddingsWarning)]
    assert len(unnormalised) == 2, [str(w.message) for w in caught]  # once for embeddings, once for ref_emb
    assert "torch.nn.functional.normalize" in str(unnormalised[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnnormalizedEmbeddingsWarning)
        unit = torch.nn.functional.normalize(raw, dim=1)
        loss(unit, labels)
        loss(unit.bfloat16(), labels)  # rounding to bf16 is not "unnormalised"


# ---------------------------------------------------------------------------------------------------------------------
# 7. `recallk train` ends with the run directory and the test metrics; train.log_every logs the loss


def test_train_prints_the_run_directory_and_the_test_table(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(tiny_config(tmp_path, output__plots=False))), encoding="utf-8")
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="recallk"):
        status = main(["train", str(config), "--run-dir", str(run), "--data-dir", str(data_dir),
                       "train.epochs=2", "train.log_every=2"])
    assert status == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert f"run directory: {run}" in out
    assert set(format_metrics_table(summary["splits"]).splitlines()) <= set(out.splitlines())
    assert f"{summary['recall@1']:.4f}" in out
    logged = [r.getMessage() for r in caplog.records if "mean of the last" in r.getMessage()]
    assert [m.split(":")[0] for m in logged] == ["epoch 1 step 2", "epoch 1 step 4", "epoch 2 step 6", "epoch 2 step 8"]


# ---------------------------------------------------------------------------------------------------------------------
# 9. --resume refuses a changed config, except keys that are safe to change, and records those


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recallk:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture()
def one_epoch_run(tmp_path: Path, data_dir: Path) -> Path:
    config = tmp_path / "tiny.yaml"
    raw = config_to_dict(tiny_config(tmp_path, train__epochs=1, output__plots=False))
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--data-dir", str(data_dir)]) == 0
    return run


def test_resume_refuses_a_changed_config_and_names_the_keys(
    one_epoch_run: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (one_epoch_run / "config.yaml").read_text()
    capsys.readouterr()
    status = main(["train", "--resume", str(one_epoch_run), "data.dataset=csv", "model.embed_dim=8",
                   "train.epochs=2"])
    assert status == 2
    line = _error_line(capsys)
    assert "data.dataset: 'folder' -> 'csv'" in line and "model.embed_dim: 16 -> 8" in line, line
    assert "train.epochs" in line.split("keys that may change")[1] and "train.epochs: " not in line
    assert (one_epoch_run / "config.yaml").read_text() == before


def test_resume_accepts_and_records_safe_changes(
    one_epoch_run: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="recallk"):
        assert main(["train", "--resume", str(one_epoch_run), "train.epochs=2", "optim.lr=1e-3"]) == 0
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from")]
    assert resumed and resumed[0].endswith("in epoch 2/2 after batch 0 of 4 (step 4)"), resumed  # as the bar counts
    saved = yaml.safe_load((one_epoch_run / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["optim"]["lr"] == 1e-3
    (entry,) = [json.loads(line) for line in (one_epoch_run / "config_changes.jsonl").read_text().splitlines()]
    assert entry["epoch"] == 1 and entry["step"] == 4
    assert entry["changes"] == {"optim.lr": {"old": 3e-3, "new": 1e-3}, "train.epochs": {"old": 1, "new": 2}}
    assert len(read_metrics(one_epoch_run / "metrics.csv")) == 2


# ---------------------------------------------------------------------------------------------------------------------
# 10. A bad image can be removed as the error says, and the run resumed


def test_a_removed_bad_image_does_not_block_resume(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(tiny_config(tmp_path, train__epochs=1, output__plots=False))),
                      encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--data-dir", str(data)]) == 0
    bad = sorted((data / "train" / "class03").iterdir())[:2]
    for image in bad:
        image.write_bytes(b"")  # empty files: found by the listing, undecodable when loaded
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 2
    line = _error_line(capsys)
    assert "cannot decode image" in line and "--resume RUN_DIR" in line, line
    for image in bad:
        image.unlink()  # what the error says to do
    with caplog.at_level(logging.WARNING, logger="recallk"):
        assert main(["train", "--resume", str(run), "train.epochs=2"]) == 0
    assert any("the training split has 70 items, 72 when" in r.getMessage() for r in caplog.records)
    assert [int(row["step"]) for row in read_metrics(run / "metrics.csv")] == [4, 8]  # the same schedule


# ---------------------------------------------------------------------------------------------------------------------
# 11. One line and exit 2, before training, and --dry-run catches what can be known without training


@pytest.fixture()
def tiny_yaml(tmp_path: Path) -> Path:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(tiny_config(tmp_path, train__epochs=1, output__plots=False))),
                      encoding="utf-8")
    return config


def test_misspelt_names_in_a_recipe_are_one_line_with_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    """The registries, not the data code, refuse the names: the dry run of a bundled recipe stops at the first."""
    capsys.readouterr()
    assert main(["train", "omniglot", "data.dataset=sopp", "data.transform=imagenett", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "did you mean 'sop'?" in lines[0] or "did you mean 'imagenet'?" in lines[0], lines[0]


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["loss.params={chunk_elementz: 5}"], ["loss.params", "chunk_elementz"]),
        (["loss.name=contrastive", "loss.params={pos_margn: 0.1}"], ["loss.params", "pos_margn"]),
        (["data.options={invrt: true}"], ["data.options", "invrt", "allowed: grayscale, invert, mean, std"]),
        (["data.transform=imagenet"], ["3-channel", "model.in_chans=3", "data.transform=omniglot"]),
        (["data.transform=omniglott"], ["unknown transform 'omniglott' for 'data.transform'", "'omniglot'?"]),
        (["data.dataset=foldr"], ["unknown dataset 'foldr' for 'data.dataset'", "did you mean 'folder'?"]),
        (["--data-dir", "/nonexistent/recallk-data"], ["data directory /nonexistent/recallk-data does not exist"]),
    ],
    ids=["rsk-param", "pml-param", "reader-option", "channels", "transform", "dataset", "data-dir"],
)
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "train"])
def test_config_mistakes_are_one_line_before_training(
    tmp_path: Path, data_dir: Path, tiny_yaml: Path, capsys: pytest.CaptureFixture[str], overrides: list[str],
    fragments: list[str], dry_run: bool,
) -> None:
    run = tmp_path / "run"
    args = ["train", str(tiny_yaml), "--run-dir", str(run), "--data-dir", str(data_dir), *overrides]
    capsys.readouterr()
    assert main([*args, *(["--dry-run"] if dry_run else [])]) == 2
    line = _error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert not run.exists()


def test_a_test_split_without_positives_fails_before_training(
    tmp_path: Path, data_dir: Path, tiny_yaml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    for class_dir in (data / "test").iterdir():
        for image in sorted(class_dir.iterdir())[1:]:
            image.unlink()  # one image per class: no query has a positive
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(tiny_yaml), "--run-dir", str(run), "--data-dir", str(data)]) == 2
    assert "split 'test' has no class with two or more items" in _error_line(capsys)
    assert not (run / "metrics.csv").exists()


def test_resume_with_another_model_is_one_line(
    tmp_path: Path, data_dir: Path, tiny_yaml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = {}
    for dim in (16, 8):
        runs[dim] = tmp_path / f"run{dim}"
        assert main(["train", str(tiny_yaml), "--run-dir", str(runs[dim]), "--data-dir", str(data_dir),
                     f"model.embed_dim={dim}"]) == 0
    shutil.copyfile(runs[8] / "checkpoints" / "last.pt", runs[16] / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(runs[16]), "train.epochs=2"]) == 2
    line = _error_line(capsys)
    assert "holds another model or loss than this config builds" in line and "size mismatch" in line, line

    # a checkpoint whose optimiser groups differ (a run started before GeM's exponent had its own group)
    from recallk.training.checkpoint import load_checkpoint, save_checkpoint

    last = runs[8] / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["optimizer"]["param_groups"][0]["name"] = "older"
    save_checkpoint(last, state)
    assert main(["train", "--resume", str(runs[8]), "train.epochs=2"]) == 2
    line = _error_line(capsys)
    assert "holds optimiser groups ['older'" in line and "resume with the recallk version" in line, line


# ---------------------------------------------------------------------------------------------------------------------
# 12. `recallk evaluate RUN --split val` keeps the test results of evaluation.json


def test_evaluating_another_split_keeps_the_earlier_results(one_epoch_run: Path, data_dir: Path) -> None:
    assert main(["evaluate", str(one_epoch_run), "--device", "cpu"]) == 0
    test_metrics = json.loads((one_epoch_run / "evaluation.json").read_text())["test"]
    assert main(["evaluate", str(one_epoch_run), "--split", "train", "--device", "cpu"]) == 0
    saved = json.loads((one_epoch_run / "evaluation.json").read_text())
    assert sorted(saved) == ["test", "train"] and saved["test"] == test_metrics
    table = (one_epoch_run / "evaluation.txt").read_text().splitlines()
    assert table[0].split() == ["metric", "test", "train"]
