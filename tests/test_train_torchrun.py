"""`torchrun --nproc_per_node=2 -m recallk train` (gloo, CPU) trains the same model as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recallk.config import save_config
from recallk.training.checkpoint import load_checkpoint
from test_trainer import make_glyph_folder, tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("simix", [False, True])
def test_two_process_training_matches_one_process(tmp_path: Path, simix: bool) -> None:
    """RS@k sharded over two ranks (SiMix: one draw per step from run seed + step) trains the same weights."""
    data = make_glyph_folder(tmp_path / "data")
    config = save_config(
        tiny_config(
            tmp_path, train__epochs=1, data__split_val=None, output__plots=False, loss__simix=simix,
            loss__simix_pairs_per_class=1 if simix else None,
        ),
        tmp_path / "tiny.yaml",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = ["-m", "recallk", "train", str(config), "--data-dir", str(data), "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    two = subprocess.run([*torchrun, *common, "--run-dir", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *common, "--run-dir", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "summary.json").is_file()
