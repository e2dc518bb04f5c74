"""`recallk export` to TorchScript and ONNX: the exported model's embeddings equal the eager model's on real images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import recallk
from recallk.errors import RecallkUsageError
from recallk.models.export import export_network, load_exported

REPO = Path(__file__).resolve().parents[1]


def real_image_batch(run: Path, model: recallk.RecallkModel, size: int) -> torch.Tensor:
    """``size`` preprocessed test images of the run (a batch size other than the export example's 4)."""
    ids = np.load(run / "embeddings_test.npz")["item_ids"][:size]
    return torch.stack([model.preprocess(run.parent / "data" / "test" / i) for i in ids])


@pytest.mark.parametrize(("fmt", "suffix"), [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_export_command_matches_eager_model(trained_run: Path, tmp_path: Path, fmt: str, suffix: str) -> None:
    out = tmp_path / f"model{suffix}"
    result = subprocess.run(
        [sys.executable, "-m", "recallk", "export", str(trained_run), "--format", fmt, "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"saved {out} ({fmt}, input (B, 1, 16, 16); max |exported - eager|" in result.stdout
    assert "Warning" not in result.stderr, result.stderr  # e.g. torch.jit.save/load's deprecation FutureWarnings
    model = recallk.load_model(trained_run)
    exported = load_exported(out, fmt)
    for size in (7, 1):  # dynamic batch size
        images = real_image_batch(trained_run, model, size)
        difference = (exported(images) - model.embed(images)).abs().max()
        assert difference <= 1e-5, difference


def test_pretrained_format_export_and_unknown_format(trained_run: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recallk", "export", str(trained_run), "--format", "pretrained", "--out",
         str(tmp_path / "folder")], capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "folder" / "model.safetensors").is_file()
    with pytest.raises(RecallkUsageError, match="unknown export format"):
        export_network(torch.nn.Identity(), torch.zeros(1, 1, 2, 2), tmp_path / "x", "tflite")


def test_embedding_head_is_scriptable() -> None:
    from recallk.models import create_model

    net = create_model("omniglot_cnn", embed_dim=4, widths=(4,), pooling="gem").eval()
    scripted = torch.jit.script(net)
    with pytest.raises(torch.jit.Error, match="expects 4-D backbone output"):
        scripted.head(torch.zeros(2, 4))
