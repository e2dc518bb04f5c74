"""Console output of `recallk train` in real processes: no progress bars in a log file or with TQDM_DISABLE, the
periodic lines instead, and their copy in the run's train.log (appended on resume)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recallk.config import config_to_yaml
from recallk.training.console import show_progress

from data_fixtures import make_glyph_folder
from run_fixtures import tiny_config


def _train(args: list[str], **streams: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recallk", "train", *args], **streams)


def _read_pty(process: subprocess.Popen, master: int) -> str:
    """Everything the process writes to the terminal whose other end is ``master``, until it exits."""
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=300)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_no_bars_in_a_log_file_or_with_tqdm_disable_and_train_log_keeps_the_lines(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(config_to_yaml(tiny_config(tmp_path, train__epochs=1, data__split_val=None,
                                                 output__plots=False, output__export_embeddings=False)))
    data, run = make_glyph_folder(tmp_path / "glyphs"), tmp_path / "run"
    common = [str(config), "--run-dir", str(run), "--data-dir", str(data), "train.log_every=1"]

    log = tmp_path / "console.log"
    with open(log, "w") as handle:
        assert _train([*common, "train.max_steps=2"], stdout=handle, stderr=subprocess.STDOUT).wait(timeout=300) == 0
    text = log.read_text()
    assert "\r" not in text  # no progress bar redrawing its line into the file
    assert "epoch 1 step 1: loss" in text and "epoch 1 step 2: loss" in text
    first = (run / "train.log").read_text()
    assert "from step 0" in first and "epoch 1 step 2: loss" in first

    # a terminal with TQDM_DISABLE=1: still no bars (a terminal turns "\n" into "\r\n"; a bar's "\r" stands alone)
    master, slave = pty.openpty()
    process = _train(["--resume", str(run), "train.max_steps=3"], stdin=subprocess.DEVNULL, stdout=slave,
                     stderr=slave, env={**os.environ, "TQDM_DISABLE": "1"})
    os.close(slave)
    shown = _read_pty(process, master)
    assert process.returncode == 0, shown
    assert not re.search("\r(?!\n)", shown) and "epoch 1 step 3: loss" in shown
    both = (run / "train.log").read_text()
    assert both.startswith(first) and "resumed from" in both and "from step 2" in both
    assert "epoch 1 step 3: loss" in both


def test_bars_are_drawn_on_a_terminal_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    master, slave = pty.openpty()
    with open(slave, "w") as terminal, open(tmp_path / "file.log", "w") as file:
        assert show_progress(None, terminal) and not show_progress(None, file)
        assert show_progress(True, file) and not show_progress(False, terminal)  # --progress / --quiet
        monkeypatch.setenv("TQDM_DISABLE", "1")
        assert not show_progress(None, terminal)
    os.close(master)


def test_train_log_keeps_every_line_the_console_shows(tmp_path: Path) -> None:
    """Warnings logged while the run is being built (small classes padded), Python warnings (k not smaller than the
    items ranked), timm's weight-loading lines and the final test table: every console line is in train.log."""
    import timm
    import torch

    data = make_glyph_folder(tmp_path / "glyphs")
    for extra in sorted((data / "train" / "class00").iterdir())[1:]:
        extra.unlink()  # one drawing left: padded to samples_per_class=2
    weights = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    config = tmp_path / "tiny.yaml"
    config.write_text(config_to_yaml(tiny_config(
        tmp_path, train__epochs=1, train__max_steps=1, data__split_val=None, loss__k=[1, 2, 16],
        model__backbone="resnet10t", model__pretrained_path=str(weights), model__in_chans=1, model__pooling="gem",
        output__plots=False, output__export_embeddings=False)))
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "recallk", "train", str(config), "--run-dir", str(run),
                             "--data-dir", str(data)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    shown = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    kept = (run / "train.log").read_text()
    assert [line for line in shown if line not in kept] == []
    for fragment in ("fewer than samples_per_class=2 images", "UserWarning: the largest k (16)",
                     "Loading pretrained weights", "recall@1", "run directory:"):
        assert any(fragment in line for line in shown), fragment  # each kind of line was on the console
