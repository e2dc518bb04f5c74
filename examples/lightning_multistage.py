"""recallk's multistage engine inside your own PyTorch Lightning loop (manual optimisation).

``recallk.engine.multistage_backward`` accumulates the exact gradient of a batch-level loss such as RS@k over a
batch far larger than fits in memory, embedding it ``chunk_size`` items at a time. It runs the backward pass
itself, so the LightningModule turns Lightning's automatic optimisation off and steps its optimiser by hand.
Class-balanced batches (a few items of each class) come from recallk's sampler. Single device; run it with::

    python examples/lightning_multistage.py --max-steps 200
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import recallk
from recallk.data import ClassBalancedBatchSampler
from recallk.engine import multistage_backward


class Embedder(L.LightningModule):
    """A small CNN trained with RS@k; each step embeds its batch in chunks with the multistage engine."""

    def __init__(self, chunk_size: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.automatic_optimization = False  # multistage_backward runs the backward pass
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32),
        )
        self.loss = recallk.RecallAtKLoss(k=(1, 2, 4))
        self.chunk_size, self.lr = chunk_size, lr

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(images), dim=1)  # RS@k ranks by dot product: unit vectors

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        # the exact full-batch gradient, holding one chunk's activations at a time (BatchNorm must be frozen:
        # recallk.engine.freeze_batchnorm(self.net))
        loss = multistage_backward(self, self.loss, images, labels, self.chunk_size)
        optimizer.step()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Patterns(Dataset):
    """Stand-in for your data: 8x8 images, each class a random pattern, each item that pattern plus noise."""

    def __init__(self, classes: range, per_class: int, seed: int) -> None:
        noise = torch.Generator().manual_seed(seed)
        self.targets = [c for c in classes for _ in range(per_class)]
        patterns = {c: torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(c)) for c in classes}
        self.images = [patterns[c] + 0.5 * torch.rand(1, 8, 8, generator=noise) for c in self.targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


def main(max_steps: int, root: str) -> dict[str, float | int]:
    L.seed_everything(0)
    train_data, test_data = Patterns(range(40), 8, seed=1), Patterns(range(40, 60), 8, seed=2)
    batches = ClassBalancedBatchSampler(train_data.targets, batch_size=64, samples_per_class=4, seed=0)
    model = Embedder(chunk_size=16)
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, default_root_dir=root, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
    )
    trainer.fit(model, DataLoader(train_data, batch_sampler=batches))
    model.eval()
    with torch.no_grad():
        embeddings = model(torch.stack(test_data.images))
    return recallk.retrieval_metrics(embeddings, torch.tensor(test_data.targets), k=(1, 2, 4))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=200, help="optimiser steps")
    parser.add_argument("--root", default=".", help="Lightning's default_root_dir")
    args = parser.parse_args()
    metrics = main(args.max_steps, args.root)
    print(" ".join(f"{name}={value:.4f}" for name, value in metrics.items() if name.startswith("recall@")))
