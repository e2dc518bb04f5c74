"""recallk.fit: a model and datasets defined here, trained through the trainer the CLI uses."""

from __future__ import annotations

import csv
import json
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

import recallk
from recallk.config import config_from_dict
from recallk.errors import RecallkUsageError, TrainingInterrupted
from recallk.training.checkpoint import load_checkpoint
from recallk.training.fit import _warn_unused_keys

ROOT = Path(__file__).resolve().parents[1]


class Glyphs(Dataset):
    """8x8 one-channel images: each class a fixed random pattern, each item that pattern plus noise and a random
    shift drawn from torch's generator (a random transform, replayed by position on resume)."""

    def __init__(self, classes: range, per_class: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        patterns = {c: torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(100 + c)) for c in classes}
        self.targets = [c for c in classes for _ in range(per_class)]
        self.images = torch.stack([patterns[c] + 0.3 * torch.rand(1, 8, 8, generator=generator) for c in self.targets])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        shift = int(torch.randint(-1, 2, ()))
        return torch.roll(self.images[index], shift, dims=2), self.targets[index]


class TinyNet(nn.Module):
    """Conv -> ReLU -> average pool -> Linear -> L2 normalisation: (B, 1, 8, 8) -> (B, dim)."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        return nn.functional.normalize(self.fc(x), dim=1)


class BatchNormNet(TinyNet):
    """TinyNet with a BatchNorm layer after its convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8))


class Unlabelled(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1, 8, 8), index % 2


CONFIG = {
    "seed": 1,
    "data": {"batch_size": 16, "samples_per_class": 2, "num_workers": 0},
    "loss": {"name": "rsk", "k": [1, 2, 4]},
    "optim": {"lr": 3e-3},
    "train": {"epochs": 2, "chunk_size": 6, "device": "cpu"},
    "eval": {"k": [1, 2], "batch_size": 32},
}


def datasets() -> tuple[Dataset, Dataset, Dataset]:
    train = Glyphs(range(8), 6, seed=1)
    val = Subset(Glyphs(range(8, 11), 4, seed=2), list(range(12)))
    test = recallk.LabelledDataset(Glyphs(range(11, 15), 4, seed=3), [c for c in range(11, 15) for _ in range(4)])
    return train, val, test


def fit(run: Path, **config: dict) -> tuple[TinyNet, dict]:
    torch.manual_seed(0)
    model = TinyNet()
    train, val, test = datasets()
    sections = {**CONFIG, **{section: {**CONFIG.get(section, {}), **values} for section, values in config.items()}}
    summary = recallk.fit(model, train, test_data=test, val_data=val, config=sections, run_dir=run, progress=False)
    return model, summary


def test_fit_trains_into_a_run_folder_that_load_model_reloads(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, summary = fit(run)
    assert summary["steps"] > 0 and summary["epochs"] == 2 and summary["own"] == {"model": f"{__name__}.TinyNet"}
    assert set(summary["splits"]) == {"test"} and 0.0 <= summary["recall@1"] <= 1.0
    for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/best.pt", "checkpoints/last.pt",
                 "embeddings_test.npz", "plots/retrievals_test.png", "plots/recall_at_k.png"):
        assert (run / name).is_file(), name
    config_text = (run / "config.yaml").read_text()
    assert config_text.startswith("# trained by recallk.fit on your own model") and "embed_dim: 12" in config_text
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0]["val_recall@1"]
    assert json.loads((run / "summary.json").read_text())["own"] == summary["own"]

    # the test embeddings, the model object after fit (best.pt's weights) and load_model all agree
    _, _, test = datasets()
    inputs = torch.stack([test.dataset.images[i] for i in range(len(test))])
    model.eval()
    with torch.no_grad():
        expected = model(inputs)
    loaded = recallk.load_model(run, model=TinyNet())
    assert loaded.own == summary["own"] and loaded.embed_dim == 12
    torch.testing.assert_close(loaded.embed(inputs), expected)
    torch.testing.assert_close(loaded.embed(list(inputs[:3])), expected[:3])
    # the exported test embeddings came from the same weights (the test items were read with their random shift)
    exported = np.load(run / "embeddings_test.npz")
    assert exported["embeddings"].shape == (16, 12) and list(exported["class_names"]) == ["11", "12", "13", "14"]

    # a saved folder reloads the same way; without an instance of the model both say what to pass
    folder = loaded.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(recallk.load_model(folder, model=TinyNet()).embed(inputs), expected)
    assert "load_model(\"saved\", model=TinyNet(...))" in (folder / "README.md").read_text()
    for path in (run, folder):
        with pytest.raises(RecallkUsageError, match=r"model=YourModel\(\.\.\.\)"):
            recallk.load_model(path)
    with pytest.raises(RecallkUsageError, match="do not fit TinyNet"):
        recallk.load_model(run, model=TinyNet(dim=5))


def test_stopped_and_resumed_fit_repeats_the_uninterrupted_run(tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    fit(full)
    fit(cut, train={"max_steps": 2})
    assert load_checkpoint(cut / "checkpoints" / "last.pt")["step"] == 2
    torch.manual_seed(0)
    train, val, test = datasets()
    summary = recallk.fit(TinyNet(), train, test_data=test, val_data=val, config=CONFIG, run_dir=cut, resume=True,
                          progress=False)
    assert summary["steps"] == json.loads((full / "summary.json").read_text())["steps"]
    losses = [[r["train_loss"] for r in csv.DictReader((run / "metrics.csv").open()) if r["epoch"] in ("1", "2")]
              for run in (full, cut)]
    assert losses[0] == losses[1]
    a = load_checkpoint(full / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(cut / "checkpoints" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # the resume's change (train.max_steps) was recorded, and config.yaml still says whose run it is
    assert (cut / "config_changes.jsonl").is_file()
    assert (cut / "config.yaml").read_text().startswith("# trained by recallk.fit on your own model")
    # a run started from a config (no such heading) is not resumed with a given model and data
    text = (cut / "config.yaml").read_text()
    (cut / "config.yaml").write_text(text.split("\n", 1)[1])
    with pytest.raises(RecallkUsageError, match=f"resume it with recallk train --resume {cut}"):
        recallk.fit(TinyNet(), train, test_data=test, val_data=val, config=CONFIG, run_dir=cut, resume=True)


class CtrlCGlyphs(Glyphs):
    """Glyphs that send this process a real SIGINT (as Ctrl-C in its terminal does) on reading its ``at``-th item."""

    def __init__(self, at: int) -> None:
        super().__init__(range(8), 6, seed=1)
        self.at, self.reads = at, 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__getitem__(index)


def test_ctrl_c_saves_the_step_and_the_resumed_fit_repeats_the_uninterrupted_run(tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    fit(full)
    _, val, test = datasets()
    torch.manual_seed(0)
    with pytest.raises(TrainingInterrupted):  # during step 4 (16 items a batch): it finishes that step, then stops
        recallk.fit(TinyNet(), CtrlCGlyphs(at=16 * 3 + 5), test_data=test, val_data=val, config=CONFIG,
                    run_dir=cut, progress=False)
    assert load_checkpoint(cut / "checkpoints" / "last.pt")["step"] == 4
    torch.manual_seed(0)
    recallk.fit(TinyNet(), Glyphs(range(8), 6, seed=1), test_data=test, val_data=val, config=CONFIG, run_dir=cut,
                resume=True, progress=False)
    a = load_checkpoint(full / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(cut / "checkpoints" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: (TinyNet(), Unlabelled()), r"no labels .* recallk.LabelledDataset\(train_data, labels\)"),
        (lambda: (TinyNet(), recallk.LabelledDataset(Unlabelled(), [1, 0, 1, 0])),
         r"train_data\[0\] has label 0 but the labels given up front say 1"),
        (lambda: (nn.Conv2d(1, 4, 3), Glyphs(range(2), 2, 0)), r"returned \(1, 4, 6, 6\) .* embeddings \(B, D\)"),
        (lambda: (nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), Glyphs(range(2), 2, 0)),
         r"L2 norm .* torch.nn.functional.normalize"),
        (lambda: (nn.Linear(3, 4), Glyphs(range(2), 2, 0)), r"failed on a batch of train_data's first input"),
        (lambda: (BatchNormNet(), Glyphs(range(8), 6, 0)),
         r"needs frozen BatchNorm; freeze them with recallk.engine.freeze_batchnorm\(model\) or train.chunk_size>=16"),
    ],
)
def test_what_fit_needs_is_one_clear_line(tmp_path: Path, make, message: str) -> None:
    model, data = make()
    with pytest.raises(RecallkUsageError, match=message):
        recallk.fit(model, data, test_data=Glyphs(range(2), 2, 0), config=CONFIG, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_the_cli_does_not_rebuild_or_resume_a_run_of_your_own_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(run, train={"max_steps": 1}, output={"plots": False})
    for command, message in (("evaluate", "model=YourModel(...)"), ("train --resume", "resume it in Python")):
        result = subprocess.run(
            [sys.executable, "-m", "recallk", *command.split(), str(run)], capture_output=True, text=True,
            timeout=300,
        )
        assert result.returncode == 2 and message in result.stderr, (command, result.stderr[-1000:])
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_config_keys_fit_does_not_use_are_named(caplog: pytest.LogCaptureFixture) -> None:
    config = config_from_dict(
        {"data": {"dataset": "cub", "data_dir": "/data", "batch_size": 8}, "model": {"backbone": "vit_b16"}}
    )
    with caplog.at_level("WARNING"):
        _warn_unused_keys(config)
    assert "not used: data.dataset, data.data_dir, model.backbone" in caplog.text


def test_lightning_example_trains_with_the_multistage_engine(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lightning_multistage.py"), "--max-steps", "3",
         "--root", str(tmp_path)], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "recall@1" in result.stdout


def test_own_model_example_trains_and_reloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = runpy.run_path(str(ROOT / "examples" / "own_model.py"), run_name="own_model_example")
    summary = example["main"](str(tmp_path / "run"))
    assert summary["recall@1"] > summary["untrained"]["recall@1"]
    assert "embedded (4, 32) with the trained model" in capsys.readouterr().out


def test_the_guide_shows_the_tested_examples_verbatim() -> None:
    guide = (ROOT / "docs" / "guide" / "own-model.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", guide, flags=re.S | re.M)
    examples = {name: (ROOT / "examples" / name).read_text(encoding="utf-8")
                for name in ("own_model.py", "lightning_multistage.py")}
    assert len(blocks) >= 3
    for block in blocks:
        assert any(block in text for text in examples.values()), f"not in examples/: {block[:200]}"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"train": {"early_stopping_patience": 2}}, "train.early_stopping_patience needs a validation split; pass "
                                                    "val_data="),
        ({"eval": {"benchmarks": ["roxford5k"]}}, "remove eval.benchmarks"),
    ],
)
def test_config_settings_fit_cannot_honour_are_one_line(tmp_path: Path, config: dict, message: str) -> None:
    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text(json.dumps(config))  # the same config as a file (JSON is YAML)
    for given in (config, yaml_file, config_from_dict({**config, "data": {"split_val": "v"}})):
        with pytest.raises(RecallkUsageError, match=re.escape(message)):
            recallk.fit(TinyNet(), Glyphs(range(2), 2, 0), test_data=Glyphs(range(2), 2, 0), config=given,
                        run_dir=tmp_path / "r")
    with pytest.raises(RecallkUsageError, match="got 3 labels for a dataset of 4 items"):
        recallk.LabelledDataset(Unlabelled(), [0, 1, 0])
