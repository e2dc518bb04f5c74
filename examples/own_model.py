"""Your own model and your own data, trained by recallk's trainer: ``recallk.fit``.

The model is any ``nn.Module`` that maps a batch of inputs to L2-normalised embeddings; the datasets are any
``Dataset`` of ``(input, label)`` items whose labels can be read up front (here a ``.targets`` attribute). The
config holds everything else: batch composition, loss, optimiser, training, evaluation and output. Run it with::

    python examples/own_model.py runs/own-model
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import Dataset

import recallk


class Patterns(Dataset):
    """Stand-in for your data: 8x8 images, each class a random pattern; each item adds noise and a bright stripe
    on a random row (what the embedding must learn to ignore), and is shifted at random when read (a random
    transform drawn from torch's generator, so a resumed run sees the same ones)."""

    def __init__(self, classes: range, per_class: int, seed: int) -> None:
        noise = torch.Generator().manual_seed(seed)
        self.targets = [c for c in classes for _ in range(per_class)]  # read by the class-balanced sampler
        patterns = {c: torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(c)) for c in classes}
        self.images = [patterns[c] + 0.3 * torch.rand(1, 8, 8, generator=noise) for c in self.targets]
        for image in self.images:
            image[0, int(torch.randint(0, 8, (), generator=noise))] += 2.0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        shift = int(torch.randint(-1, 2, ()))
        return torch.roll(self.images[index], shift, dims=2), self.targets[index]


class SmallNet(nn.Module):
    """(B, 1, 8, 8) images -> (B, 32) unit-norm embeddings."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(64, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(self.features(images).flatten(1)), dim=1)


def main(run_dir: str) -> dict:
    torch.manual_seed(0)
    train_data = Patterns(range(40), 8, seed=1)  # classes 0-39
    val_data = Patterns(range(40, 50), 8, seed=2)  # unseen classes choose checkpoints/best.pt
    test_data = Patterns(range(50, 60), 8, seed=3)  # other unseen classes score it
    config = {
        "data": {"batch_size": 64, "samples_per_class": 4, "num_workers": 0},  # 16 classes x 4 items per batch
        "loss": {"name": "rsk", "k": [1, 2, 4]},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 6, "chunk_size": 16, "device": "auto"},  # the multistage engine: 16 items at a time
        "eval": {"k": [1, 2, 4]},
    }
    summary = recallk.fit(
        SmallNet(), train_data, val_data=val_data, test_data=test_data, config=config, run_dir=run_dir
    )
    print(f"test recall@1 {summary['recall@1']:.3f} (untrained: {summary['untrained']['recall@1']:.3f})")

    model = recallk.load_model(run_dir, model=SmallNet())  # the best checkpoint's weights in a new SmallNet
    embeddings = model.embed(torch.stack(test_data.images[:4]))  # (4, 32), unit norm
    print(f"embedded {tuple(embeddings.shape)} with the trained model from {run_dir}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/own-model")
