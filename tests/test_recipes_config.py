"""Bundled recipes (`recallk recipes`, `recallk train NAME`), `recallk config --explain`, and the run's plots."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from recallk._typed_yaml import field_paths
from recallk.config import Config, explain_config, load_config
from recallk.errors import ConfigError
from recallk.evaluation.plots import plot_training_curves, training_curves_figure
from recallk.recipes import list_recipes, recipe_path

REPO = Path(__file__).resolve().parents[1]


def recallk_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recallk", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_recipes_are_listed_copied_and_trainable_by_name(tmp_path: Path) -> None:
    names = list_recipes()
    assert {"omniglot", "sop_resnet50", "clinc150_minilm"} <= set(names)
    listed = recallk_cli("recipes", cwd=tmp_path)  # outside a source checkout: no configs/ folder here
    assert listed.returncode == 0 and "omniglot" in listed.stdout and "The CPU demo" in listed.stdout
    copied = recallk_cli("recipes", "--copy", "omniglot", tmp_path / "mine", cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "mine" / "omniglot.yaml").read_text() == recipe_path("omniglot").read_text()
    again = recallk_cli("recipes", "--copy", "omniglot", tmp_path / "mine", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    dry = recallk_cli("train", "omniglot", "train.epochs=3", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    resolved = yaml.safe_load(dry.stdout)
    assert resolved["name"] == "omniglot" and resolved["train"]["epochs"] == 3
    typo = recallk_cli("train", "omniglott", "--dry-run", cwd=tmp_path)
    assert typo.returncode == 2 and "did you mean 'omniglot'?" in typo.stderr and "recallk recipes" in typo.stderr
    missing = recallk_cli("train", "no/such.yaml", "--dry-run", cwd=tmp_path)
    assert missing.returncode == 2 and "configs/omniglot.yaml" not in missing.stderr
    assert "'recallk recipes' lists them" in missing.stderr


def test_bundled_recipes_load() -> None:
    for name in list_recipes():
        assert isinstance(load_config(recipe_path(name)), Config)


def test_help_no_longer_points_at_a_source_checkout_path() -> None:
    for args in (["--help"], ["train", "--help"]):
        result = recallk_cli(*args)
        assert result.returncode == 0 and "configs/omniglot.yaml" not in result.stdout


def test_config_explain_covers_every_key_from_the_schema() -> None:
    text = explain_config()
    for dotted in field_paths(Config):
        assert f"  {dotted}: " in text, dotted
    hints_missing = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config) if dataclasses.is_dataclass(section.default_factory)
        for f in dataclasses.fields(section.default_factory) if not f.metadata.get("help")
    ]
    assert hints_missing == []
    assert "  optim.lr: a number (default: 0.0001)" in text
    assert "  model.pooling: one of 'gem', 'avg', 'cls' (default: gem)" in text
    result = recallk_cli("config", "--explain", "data")
    assert result.returncode == 0 and "data.samples_per_class" in result.stdout and "optim.lr" not in result.stdout
    wrong = recallk_cli("config", "--explain", "dta")
    assert wrong.returncode == 2 and "unknown config section or key 'dta'" in wrong.stderr
    one = recallk_cli("config", "--explain", "train.ema_decay")  # one key: its section's title and its two lines
    assert one.returncode == 0, one.stderr
    lines = one.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("[train] ") and lines[1].startswith("  train.ema_decay: ")
    assert f"{lines[1]}\n{lines[2]}\n" in text
    assert explain_config("seed").splitlines()[1] == "  seed: an integer (default: 0)"
    for bad in ("train.nope", "nope.lr", "data.options.x"):
        with pytest.raises(ConfigError, match="choose a section"):
            explain_config(bad)


def test_run_plots_and_untrained_baseline(trained_run: Path, tmp_path: Path) -> None:
    import json

    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["untrained"]["num_queries"] == summary["num_queries"]
    assert summary["untrained"]["recall@1"] != summary["recall@1"]  # the baseline is a different model
    with_val = Image.open(trained_run / "plots" / "training_curves.png").size
    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    plain = tmp_path / "metrics.csv"
    with plain.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["epoch", "step", "train_loss"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("epoch", "step", "train_loss")} for r in rows)
    without_val = Image.open(plot_training_curves(tmp_path / "curves.png", plain)).size
    assert without_val[0] < 0.7 * with_val[0]  # one panel, no empty validation panel


def test_new_commands_have_help_with_examples() -> None:
    listing = recallk_cli("--help").stdout
    for command in ("search", "export", "recipes", "config"):
        assert command in listing
        result = recallk_cli(command, "--help")
        assert result.returncode == 0 and "examples:" in result.stdout and f"recallk {command}" in result.stdout


def test_training_curves_show_each_step_and_keep_the_legend_off_the_curves(trained_run: Path) -> None:
    """A short run is more than one dot: steps.csv holds every step's loss; the validation legend sits beside its
    panel, so it covers no curve (it sat on the selected metric's curve)."""
    steps = list(csv.DictReader((trained_run / "steps.csv").open()))
    summary = json.loads((trained_run / "summary.json").read_text())
    assert [int(r["step"]) for r in steps] == list(range(1, summary["steps"] + 1))
    fig = training_curves_figure(trained_run / "metrics.csv", "map@r", summary["best_epoch"],
                                 trained_run / "steps.csv")
    loss, validation = fig.axes
    assert [len(line.get_xdata()) for line in loss.get_lines()][:2] == [len(steps), summary["epochs"]]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not validation.get_legend().get_window_extent(renderer).overlaps(validation.get_window_extent(renderer))


def test_the_retrieval_grid_has_no_empty_band_under_its_title(trained_run: Path) -> None:
    pixels = np.asarray(Image.open(trained_run / "plots" / "retrievals_test.png").convert("L")) < 200
    inked = np.flatnonzero(pixels.any(axis=1))  # rows holding text or lines
    gaps = np.diff(inked)
    assert gaps.max() < 25, gaps.max()  # the title, the column titles and the rows follow closely
