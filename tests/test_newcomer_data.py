"""What a newcomer met on their own data (issue #19): CSV splits that silently read one file, malformed CSV rows,
padded classes, run folders that were not recallk's, run names that collided, one bad or huge image that aborted a
gallery, and dry runs that passed where training then failed. Each test runs the real reader, trainer or command."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from recallk.cli import main
from recallk.config import config_to_dict, explain_config, load_config
from recallk.data.folder_csv import build_csv
from recallk.data.sampler import ClassBalancedBatchSampler
from recallk.data.sources import build_source
from recallk.errors import ConfigError
from recallk.training.trainer import default_run_dir

from data_fixtures import make_glyph_folder, write_corrupt_image
from run_fixtures import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The glyph folder (12 train, 12 test classes of 6 images) plus ``train.csv`` and ``test.csv`` listing them."""
    root = make_glyph_folder(tmp_path_factory.mktemp("glyphs"))
    for split in ("train", "test"):
        rows = [f"{p.relative_to(root).as_posix()},{p.parent.name}" for p in sorted((root / split).rglob("*.png"))]
        (root / f"{split}.csv").write_text("path,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


def _yaml(tmp_path: Path, **overrides: object) -> Path:
    config = tmp_path / "tiny.yaml"
    raw = config_to_dict(tiny_config(tmp_path, train__epochs=1, output__plots=False, **overrides))
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return config


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recallk:")]
    assert len(lines) == 1, lines
    return lines[0]


def _write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# 1. A --run-dir that holds files recallk did not write is refused, and nothing in it is touched


def test_a_folder_of_other_files_is_not_a_run_directory(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "my_project"
    (folder / "plots").mkdir(parents=True)
    (folder / "config.yaml").write_text("my own config\n")
    (folder / "plots" / "figure.png").write_bytes(b"my figure")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", str(_yaml(tmp_path)), "--run-dir", str(folder), "--data-dir", str(data_dir)]) == 2
    line = _error_line(capsys)
    assert f"run directory {folder} is not empty" in line and "not a recallk run" in line and "--run-dir" in line
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------------------------------------------------
# 2. One CSV for every split is refused; per-split files work; splits sharing images are refused


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        ("{csv_file: train.csv}", ["splits 'train' and 'test' both read", "train.csv", "data.options.csv_files="]),
        ("{csv_files: {train: train.csv, test: train.csv}}", ["splits 'train' and 'test' both read"]),
        ("{csv_files: {train: train.csv, test: overlap.csv}}", ["splits 'train' and 'test' share 1 image(s)"]),
        ("{csv_files: {train: train.csv}}", ["csv_files names no file for split 'test'"]),
        ("{csv_files: {train: train.csv, test: listed_missing.csv}}", ["1 of 1 listed images are missing"]),
    ],
    ids=["csv_file", "same-file", "shared-image", "split-without-file", "missing-image"],
)
def test_csv_splits_must_be_distinct_before_training(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], options: str, fragments: list[str]
) -> None:
    first_train_row = (data_dir / "train.csv").read_text().splitlines()[1]
    _write_csv(data_dir / "overlap.csv", "path,label\n" + "\n".join(
        [first_train_row, *(data_dir / "test.csv").read_text().splitlines()[1:]]) + "\n")
    _write_csv(data_dir / "listed_missing.csv", "path,label\ntest/nowhere.png,x\n")
    run = tmp_path / "run"
    capsys.readouterr()
    args = ["train", str(_yaml(tmp_path)), "--run-dir", str(run), "--data-dir", str(data_dir), "data.dataset=csv",
            f"data.options={options}", "--dry-run"]
    assert main(args) == 2
    line = _error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert not run.exists()


def test_per_split_csv_files_pass_the_dry_run_and_read_their_own_files(tmp_path: Path, data_dir: Path) -> None:
    options = "data.options={csv_files: {train: train.csv, test: test.csv}}"
    assert main(["train", str(_yaml(tmp_path)), "--data-dir", str(data_dir), "data.dataset=csv", options,
                 "--dry-run"]) == 0
    config = load_config(_yaml(tmp_path), ["data.dataset=csv", options])
    for split in ("train", "test"):
        item_ids = build_source(config.data, split, False, data_dir).item_ids
        assert len(item_ids) == 72 and all(i.startswith(f"{split}/") for i in item_ids)


def test_a_folder_split_that_holds_another_split_is_refused(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``split_train=all`` reads ``<root>/<class>/...`` when ``<root>/all`` does not exist: the test folder too."""
    capsys.readouterr()
    assert main(["train", str(_yaml(tmp_path)), "--data-dir", str(data_dir), "data.split_train=all", "--dry-run"]) == 2
    assert "splits 'all' and 'test' share 72 image(s)" in _error_line(capsys)


# ---------------------------------------------------------------------------------------------------------------------
# 6, 10. Malformed CSV rows are one line naming file and line; a byte-order mark, other columns and delimiters work


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("path,label\na.png,1\nb.png,\n", "line 3 has an empty 'label'"),
        ("path,label\na.png,1\nb.png\n", "line 3 has 1 field(s), the header 2"),
        ("path,label\na.png,1\nb,c.png,2\n", "line 3 has 3 fields, the header 2; quote fields"),
    ],
    ids=["empty-label", "missing-field", "extra-field"],
)
def test_malformed_csv_rows_name_the_file_and_line(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str
) -> None:
    bad = _write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match="bad.csv line"):
        build_csv(tmp_path, "bad")
    capsys.readouterr()  # and through the command line: exit 2, one line, already in --dry-run
    assert main(["train", str(_yaml(tmp_path)), "--data-dir", str(data_dir), "data.dataset=csv",
                 f"data.options={{csv_files: {{train: {bad}, test: test.csv}}}}", "--dry-run"]) == 2
    line = _error_line(capsys)
    assert f"{bad} {fragment}" in line, line


def test_csv_with_a_byte_order_mark_and_custom_columns(tmp_path: Path, data_dir: Path) -> None:
    rows = (data_dir / "train.csv").read_text().splitlines()[1:5]
    excel = _write_csv(data_dir / "excel.csv", "path,label\n" + "\n".join(rows) + "\n", encoding="utf-8-sig")
    assert excel.read_bytes().startswith(b"\xef\xbb\xbf")
    assert len(build_csv(data_dir, "x", csv_file="excel.csv")) == 4
    semicolons = "file;class\n" + "\n".join(r.replace(",", ";") for r in rows) + "\n"
    _write_csv(data_dir / "semi.csv", semicolons)
    dataset = build_csv(data_dir, "x", csv_file="semi.csv", path_column="file", label_column="class", delimiter=";")
    assert dataset.item_ids == [r.split(",")[0] for r in rows]
    with pytest.raises(ValueError, match="must start with a header naming the columns 'path' and 'label'"):
        build_csv(data_dir, "x", csv_file="semi.csv")
    config = load_config(None, ["data.dataset=csv", "data.transform=omniglot", "data.image_size=16",
                                "data.options={csv_file: semi.csv, path_column: file, label_column: class, "
                                "delimiter: ';'}"])
    assert len(build_source(config.data, "x", False, data_dir).labels) == 4  # the options pass the pre-flight


# ---------------------------------------------------------------------------------------------------------------------
# 5. Classes smaller than samples_per_class: padded and said once, or dropped


def test_small_classes_are_reported_once_or_dropped(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.repeat(np.arange(6), [4, 4, 4, 4, 2, 1])  # classes 4 and 5 have fewer than 4 images
    with caplog.at_level(logging.WARNING, logger="recallk"):
        padded = ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=4, seed=0)
        batches = [b for _ in range(3) for b in padded]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "2 of 6 classes have fewer than samples_per_class=4 images" in message and "(5 repeats" in message
    assert any(labels[b].tolist().count(5) == 4 for b in batches)  # one image repeated 4 times: what is reported
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recallk"):
        dropped = ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=4, seed=0, small_classes="drop")
        seen = {int(label) for _ in range(5) for b in dropped for label in labels[b]}
    assert seen == {0, 1, 2, 3}
    assert ["dropped 2 of 6 classes (3 images)" in r.getMessage() for r in caplog.records] == [True]
    assert load_config(None, ["data.small_classes=drop"]).data.small_classes == "drop"
    with pytest.raises(ConfigError, match="did you mean 'drop'"):
        load_config(None, ["data.small_classes=dropp"])
    assert "data.small_classes" in explain_config("data") and "data.max_image_pixels" in explain_config("data")


# ---------------------------------------------------------------------------------------------------------------------
# 8. Runs started in the same second get different folders


def test_default_run_names_differ_within_one_second(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    names = {default_run_dir(config).name for _ in range(20)}
    assert len(names) == 20
    assert all(n.startswith("tiny-") for n in names)


# ---------------------------------------------------------------------------------------------------------------------
# 18. --dry-run catches a CSV listing missing images (above) and a CUDA device that is not there


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_dry_run_refuses_cuda_without_cuda(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["train", str(_yaml(tmp_path)), "--data-dir", str(data_dir), "train.device=cuda", "--dry-run"]) == 2
    line = _error_line(capsys)
    assert "train.device=cuda but PyTorch finds no CUDA device" in line and "train.device=cpu" in line


# ---------------------------------------------------------------------------------------------------------------------
# 14. One undecodable image in a gallery: the error names it and --skip-bad-images; the option skips and reports


@pytest.fixture()
def gallery(tmp_path: Path, trained_run: Path) -> Path:
    folder = tmp_path / "gallery"
    for image in sorted((trained_run.parent / "data" / "test").rglob("*.png"))[:6]:
        target = folder / image.parent.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image.read_bytes())
    write_corrupt_image(folder / "broken.png")
    return folder


def test_embed_and_search_skip_bad_images_when_asked(
    tmp_path: Path, trained_run: Path, gallery: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "gallery.npz"
    capsys.readouterr()
    assert main(["embed", str(trained_run), "--images", str(gallery), "--out", str(out), "--device", "cpu"]) == 2
    line = _error_line(capsys)
    assert f"cannot decode image {gallery / 'broken.png'}" in line and "--skip-bad-images" in line, line
    with caplog.at_level(logging.WARNING, logger="recallk"):
        assert main(["embed", str(trained_run), "--images", str(gallery), "--out", str(out), "--device", "cpu",
                     "--skip-bad-images"]) == 0
    with np.load(out) as saved:
        assert len(saved["item_ids"]) == len(saved["embeddings"]) == 6
        assert str(gallery / "broken.png") not in saved["item_ids"].tolist()
    (warned,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned.startswith("skipped 1 of 7 images that could not be decoded") and "broken.png" in warned
    query = next(gallery.rglob("0.png"))
    results = tmp_path / "results.json"
    search = ["search", str(trained_run), "--gallery", str(gallery), "--query", str(query), "--out", str(results),
              "--device", "cpu", "--top-k", "2"]
    capsys.readouterr()
    assert main(search) == 2
    assert "--skip-bad-images" in _error_line(capsys)
    assert main([*search, "--skip-bad-images"]) == 0
    assert json.loads(results.read_text())["results"][0]["neighbours"][0]["path"] == str(query)
    capsys.readouterr()
    assert main(search) == 2  # the cache built with the option does not hide the bad file from a run without it
    assert "--skip-bad-images" in _error_line(capsys)


# ---------------------------------------------------------------------------------------------------------------------
# 15. An image over Pillow's decompression-bomb limit: the error names the option that raises it; one over the
#     warning limit is reported once in a log line, never as Pillow's raw warning


def test_images_over_the_pixel_limit(
    tmp_path: Path, data_dir: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 250)  # the 24 x 24 glyphs (576 pixels) are then "too large"
    config = load_config(None, ["data.dataset=folder", "data.transform=omniglot", "data.image_size=16"])
    source = build_source(config.data, "test", False, data_dir)
    with pytest.raises(ValueError, match=r"has 576 pixels, more than twice Pillow's limit of 250.*"
                                         r"data.max_image_pixels=576"):
        source.dataset[0]
    options = ["data.dataset=folder", "data.transform=omniglot", "data.image_size=16", "data.max_image_pixels=400"]
    checked = load_config(None, [*options, "data.skip_bad_images=true"])  # opens every image while it is built
    assert len(build_source(checked.data, "test", False, data_dir).labels) == 72
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 250)
    config = load_config(None, options)  # 576 pixels: over the warning limit of 400, under twice it
    source = build_source(config.data, "test", False, data_dir)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="recallk"):
        warnings.simplefilter("error")  # Pillow's raw DecompressionBombWarning would fail here
        images = [source.dataset[i][0] for i in range(3)]
    assert len(images) == 3
    (logged,) = [r.getMessage() for r in caplog.records]
    assert "576 pixels, over Pillow's decompression-bomb warning limit of 400" in logged
    assert "data.max_image_pixels=576" in logged
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # the run's 20 x 20 glyphs: 400 pixels
    out = tmp_path / "big.npz"
    folder = str(trained_run.parent / "data" / "test" / "class08")
    capsys.readouterr()
    assert main(["embed", str(trained_run), "--images", folder, "--out", str(out), "--device", "cpu"]) == 2
    assert "has 400 pixels" in (line := _error_line(capsys)) and "--max-image-pixels 400" in line, line
    caplog.clear()
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="recallk"):
        warnings.simplefilter("error")
        assert main(["embed", str(trained_run), "--images", folder, "--out", str(out), "--device", "cpu",
                     "--max-image-pixels", "300"]) == 0
    assert len(np.load(out)["item_ids"]) == 4
    (logged,) = [r.getMessage() for r in caplog.records]
    assert logged.startswith("4 images have more pixels than Pillow's decompression-bomb warning limit of 300")
