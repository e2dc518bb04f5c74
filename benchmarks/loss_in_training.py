"""How much of the RS@k gradient is exactly zero in a real training run, and what the loss then costs.

Trains the Omniglot demo recipe (``configs/omniglot.yaml``) and, before training and after chosen epochs,
embeds one large batch of training images with the current weights: every training class, 4 images each (the
first 4 of the class; 764 classes, N = 3,056, close to the paper's batch of 4,000). For that batch it records
the RS@k loss and how much of its gradient work is exactly zero: the share of (query, positive) pairs whose
gradient weight underflows (a positive ranked more than about 85 places past k) and the share of queries whose
row of dL/dS is not all zero (the kernel skips the others, ``recallk.losses.chunked_recall``). Each batch is written to
``<out>/loss_in_training/epoch_XX.pt`` for ``benchmarks/loss_speed.py --embeddings FILE`` to time.

    python benchmarks/loss_in_training.py --out benchmarks/results      # about 5 minutes on 2 CPU cores
    python benchmarks/loss_speed.py --embeddings benchmarks/results/loss_in_training/epoch_00.pt \\
        --impls floor recallk baseline --baseline-src OLD/src --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 4


def gradient_activity(embeddings: torch.Tensor, labels: torch.Tensor, loss_fn: Any) -> dict[str, float]:
    """``loss_fn`` (a RecallAtKLoss) on one batch and the shares of its pairs and query rows with a gradient."""
    from recallk.losses import chunked_recall, chunked_walk

    settings = loss_fn._settings(embeddings.device)
    num_pos, active_pairs, active_rows = 0, 0, 0
    n = len(labels)
    side = chunked_recall.query_side(labels, labels, torch.arange(n), settings, embeddings.dtype)
    num_valid = int((side.num_pos > 0).sum())
    for start in range(0, n, settings.query_chunk):
        stop = min(start + settings.query_chunk, n)
        chunk_side = side.rows(start, stop)
        scaled = embeddings[start:stop] @ embeddings.T / settings.tau_rank
        soft, grad = chunked_recall._chunk_soft_and_grad(scaled, chunk_side, settings, num_valid, True)
        assert grad is not None
        active_rows += int((grad.values != 0).any(1).sum())
        row, col, _ = chunked_walk.chunk_pairs(chunk_side, padded=False)
        block = chunked_recall._pair_block(scaled, chunk_side, row, col, None, scaled.new_empty(len(row), n))
        dsoft = chunked_recall._dsoft(soft, chunk_side, num_valid, torch.ones(()))
        active_pairs += int(chunked_recall.pair_weights(block, dsoft, side.tau_k, settings.tau_rank)[1].sum())
        num_pos += len(row)
    return {
        "loss": float(loss_fn(embeddings, labels)),
        "pairs_with_gradient": active_pairs / num_pos,
        "rows_with_gradient": active_rows / n,
    }


def fixed_batch(labels: torch.Tensor) -> torch.Tensor:
    """Indices of the first ``PER_CLASS`` items of every class with that many, grouped by class."""
    picks = []
    for label in torch.unique(labels):
        members = (labels == label).nonzero().squeeze(1)
        if len(members) >= PER_CLASS:
            picks.append(members[:PER_CLASS])
    return torch.cat(picks)


def run(out: Path, data_dir: str | None, epochs: set[int], overrides: list[str]) -> list[dict[str, Any]]:
    from recallk.config import load_config
    from recallk.data.sources import ArraySource
    from recallk.training.trainer import Trainer

    config = load_config(REPO / "configs" / "omniglot.yaml", [*overrides, "output.plots=false",
                                                               "output.export_embeddings=false"])
    folder = out / "loss_in_training"
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    class Probe(Trainer):
        """The recipe's trainer, probing the fixed batch before training and after the chosen epochs."""

        def probe(self) -> None:
            embeddings = self.embed(batch, "probe")
            labels = torch.arange(len(embeddings) // PER_CLASS).repeat_interleave(PER_CLASS)
            torch.save({"embeddings": embeddings, "labels": labels}, folder / f"epoch_{self.epoch:02d}.pt")
            row = {"epoch": self.epoch, "n": len(labels), "dim": embeddings.shape[1],
                   **gradient_activity(embeddings, labels, self.loss_fn)}
            rows.append(row)
            print(json.dumps(row), flush=True)

        def _end_epoch(self) -> None:
            super()._end_epoch()
            if self.epoch in epochs:
                self.probe()

    shutil.rmtree(folder / "run", ignore_errors=True)  # the training run is scratch: only the probes are kept
    trainer = Probe(config, folder / "run", data_dir=data_dir, progress=False)
    source = trainer.train_source
    assert isinstance(source, ArraySource), "the probe needs the in-memory Omniglot source"
    index = fixed_batch(source.labels)
    batch = ArraySource(source.images[index], source.labels[index])
    try:
        trainer.probe()
        trainer.fit()
    finally:
        trainer.close()
    report = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "command": "python benchmarks/loss_in_training.py " + " ".join(sys.argv[1:]), "rows": rows}
    (folder / "activity.json").write_text(json.dumps(report, indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4, 8, 18], help="probe after these epochs")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=2")
    args = parser.parse_args(argv)
    rows = run(args.out, args.data_dir, set(args.epochs), args.overrides)
    print("| epoch | loss | pairs with a gradient | query rows with a gradient |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['epoch']} | {row['loss']:.4f} | {row['pairs_with_gradient']:.1%} | "
              f"{row['rows_with_gradient']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
