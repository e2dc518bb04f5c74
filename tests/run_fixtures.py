"""Small run settings shared by the training tests: a tiny config and a free TCP port for torchrun."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

from recallk.config import Config, config_from_dict


def load_benchmark(script: Path) -> ModuleType:
    """Import a script of benchmarks/ as a module named after its file (it may import its sibling scripts)."""
    sys.path.insert(0, str(script.parent))
    try:
        spec = importlib.util.spec_from_file_location(script.stem, script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(script.parent))
    return module


def tiny_config(run_root: Path, **overrides: object) -> Config:
    """A 3-epoch RS@k run of a tiny CNN on :func:`data_fixtures.make_glyph_folder` data; ``section__key=value``
    overrides."""
    raw = {
        "name": "tiny",
        "seed": 3,
        "data": {
            "dataset": "folder", "split_train": "train", "split_val": "test", "split_test": ["test"],
            "image_size": 16, "transform": "omniglot", "batch_size": 16, "samples_per_class": 2, "num_workers": 0,
        },
        "model": {
            "backbone": "omniglot_cnn", "widths": [8, 16], "embed_dim": 16, "pooling": "avg", "layernorm": True,
            "freeze_batchnorm": True,
        },
        "loss": {"name": "rsk", "k": [1, 2, 4]},
        "optim": {"lr": 3e-3, "schedule": "cosine"},
        "train": {"epochs": 3, "chunk_size": 6, "device": "cpu", "eval_every": 1},
        "eval": {"k": [1, 2], "batch_size": 32},
        "output": {"runs_root": str(run_root), "plots": True, "export_embeddings": True},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return config_from_dict(raw)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
