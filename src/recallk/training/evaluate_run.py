"""Evaluating and exporting a trained model from a run directory or a checkpoint file (``recallk evaluate``,
``recallk embed``); the parts come from :mod:`recallk.training.assemble`, as in training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recallk.config import Config, config_from_dict
from recallk.engine.distributed import resolve_device
from recallk.evaluation.embed import embed_source, evaluate_embeddings, save_embeddings
from recallk.training.assemble import build_network, build_split
from recallk.training.checkpoint import CheckpointError, load_checkpoint

logger = logging.getLogger(__name__)


WHITENED_CHECKPOINT = "whitened.pt"  # written by ``recallk whiten`` (recallk.training.whiten_run)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's ``checkpoints/whitened.pt`` (the model with its learned whitening),
    else ``best.pt``, else ``last.pt``. A ``whitened.pt`` older than ``best.pt``/``last.pt`` (training went on
    after ``recallk whiten``) is still used, with a warning to fit it again."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints"
        for name in (WHITENED_CHECKPOINT, "best.pt", "last.pt"):
            if (folder / name).is_file():
                if name == WHITENED_CHECKPOINT:
                    _warn_if_stale(folder / name)
                return folder / name
        raise CheckpointError(f"run directory {path} has no checkpoints/best.pt or last.pt; train it first")
    return path


def _warn_if_stale(whitened: Path) -> None:
    newer = [p.name for p in (whitened.with_name("best.pt"), whitened.with_name("last.pt"))
             if p.is_file() and p.stat().st_mtime > whitened.stat().st_mtime]
    if newer:
        logger.warning("%s is older than %s: training went on after recallk whiten; run recallk whiten again "
                       "(with --force) to whiten the new weights", whitened, " and ".join(newer))


def load_trained_model(path: str | Path, device: torch.device) -> tuple[nn.Module, Config, Path]:
    """The model stored in a checkpoint (or a run's best one), its config and the checkpoint path."""
    checkpoint = resolve_checkpoint(path)
    state = load_checkpoint(checkpoint)
    config = config_from_dict(state["config"])
    model = build_network(config, weights_follow=True)  # the weights come from the checkpoint
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, checkpoint


def evaluate_run(
    path: str | Path, split: str | None = None, data_dir: str | Path | None = None, device: str = "auto",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Retrieval metrics ``{split: {metric: value}}`` of a trained model on ``split`` (default: the test splits)."""
    torch_device = resolve_device(device)
    model, config, _ = load_trained_model(path, torch_device)
    results = {}
    for name in [split] if split else list(config.data.split_test):
        source = build_split(config, name, model, data_dir=data_dir)
        embeddings = embed_source(
            model, source, config.eval.batch_size, torch_device, progress=progress, desc=f"embedding {name}"
        )
        results[name] = evaluate_embeddings(embeddings, source.labels, config.eval.k, progress=progress)
    return results


def export_embeddings(
    checkpoint: str | Path,
    out: str | Path,
    split: str = "test",
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Embed ``split`` of ``dataset`` (default: the training data set) and save embeddings, labels and ids."""
    torch_device = resolve_device(device)
    model, config, _ = load_trained_model(checkpoint, torch_device)
    source = build_split(config, split, model, data_dir=data_dir, dataset=dataset)
    embeddings = embed_source(
        model, source, batch_size or config.eval.batch_size, torch_device, progress=progress,
        desc=f"embedding {split}",
    )
    out = Path(out)
    save_embeddings(out, embeddings, source)
    return out
