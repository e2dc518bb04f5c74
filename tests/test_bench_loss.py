"""benchmarks/loss_speed.py on embeddings from a file, and benchmarks/loss_in_training.py's gradient census."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from recallk import RecallAtKLoss

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loss_in_training", BENCHMARKS / "loss_in_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clustered(n: int, dim: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n // 4).repeat_interleave(4)
    centres = F.normalize(torch.randn(n // 4, dim, generator=g), dim=1)[labels]
    return F.normalize(centres + noise * torch.randn(n, dim, generator=g), dim=1), labels


@pytest.mark.parametrize("noise", [0.05, 0.3, 3.0])
def test_rows_with_gradient_are_the_nonzero_rows_of_dl_ds(bench: ModuleType, noise: float) -> None:
    """The census counts the query rows whose gradient w.r.t. the similarities is not all zero, as autograd
    finds them, from tight clusters (every row has one) to noise (a third of the rows have none)."""
    emb, labels = clustered(400, 16, noise)
    loss_fn = RecallAtKLoss(k=(1, 2, 4, 8, 16))
    activity = bench.gradient_activity(emb, labels, loss_fn)
    sim = (emb @ emb.T).requires_grad_()
    loss_fn.from_similarity(sim, labels).backward()
    nonzero_rows = float((sim.grad != 0).any(1).float().mean())
    assert activity["rows_with_gradient"] == pytest.approx(nonzero_rows)
    assert activity["loss"] == pytest.approx(loss_fn(emb, labels).item())
    assert 0.0 < activity["pairs_with_gradient"] <= 1.0


def test_fixed_batch_takes_four_per_class_grouped(bench: ModuleType) -> None:
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 0, 2, 0, 2, 1])  # class 1 has only 2 items: left out
    index = bench.fixed_batch(labels)
    assert labels[index].tolist() == [0, 0, 0, 0, 2, 2, 2, 2]
    assert index.tolist() == [1, 4, 6, 8, 0, 2, 5, 7]


def test_loss_speed_times_embeddings_from_a_file(tmp_path: Path) -> None:
    emb, labels = clustered(64, 8, 0.3)
    path = tmp_path / "batch.pt"
    torch.save({"embeddings": emb, "labels": labels}, path)
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "loss_speed.py"), "--embeddings", str(path), "--impls", "floor",
         "recallk", "loop", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| 64 |")]
    losses = {row[1]: row[5].rstrip(" |") for row in rows}
    assert set(losses) == {"floor", "recallk", "loop"}
    expected = RecallAtKLoss(k=(1, 2, 4, 8, 16), tau_k=1.0, rank_includes_query=True)(emb, labels).item()
    assert float(losses["recallk"]) == pytest.approx(expected, abs=2e-6)
    assert float(losses["loop"]) == pytest.approx(expected, abs=2e-6)
    wrong = tmp_path / "shuffled.pt"
    torch.save({"embeddings": emb, "labels": labels.flip(0)}, wrong)
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "loss_speed.py"), "--embeddings", str(wrong)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "contiguous groups" in refused.stderr
