"""Shared fixtures: one tiny trained run per test session, reused by the tests of what comes after training."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_fixtures import write_glyphs


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of a tiny CNN trained for 2 epochs on a generated glyph folder (8 train / 6 test classes),
    with validation on the test split, plots and exported test embeddings. Its data root is ``run/../data``."""
    from recallk.config import config_from_dict
    from recallk.training.trainer import train

    base = tmp_path_factory.mktemp("trained")
    data = base / "data"
    write_glyphs(data / "train", range(8), seed=1)
    write_glyphs(data / "test", range(8, 14), seed=2)
    config = config_from_dict({
        "name": "tiny",
        "seed": 5,
        "data": {
            "dataset": "folder", "split_train": "train", "split_val": "test", "split_test": ["test"],
            "image_size": 16, "transform": "omniglot", "batch_size": 16, "samples_per_class": 2, "num_workers": 0,
        },
        "model": {"backbone": "omniglot_cnn", "widths": [8, 16], "embed_dim": 12, "pooling": "gem"},
        "loss": {"name": "rsk", "k": [1, 2, 4]},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 2, "chunk_size": 16, "device": "cpu", "select_metric": "map@r"},
        "eval": {"k": [1, 2], "batch_size": 32},
        "output": {"runs_root": str(base)},
    })
    run = base / "run"
    train(config, run, data_dir=data, progress=False)
    return run
