"""``recallk whiten``: fit a whitening for a trained model and store it with the model, as a new checkpoint.

The trained network's descriptors (the head's output before any whitening, float32, the evaluation preprocessing)
are computed for the images of matching pairs (learned whitening, :func:`~recallk.models.whitening.learn_whitening`)
or for a set of images (PCA whitening, :func:`~recallk.models.whitening.pca_whitening`). The result is written as
``checkpoints/whitened.pt`` next to the checkpoint it came from: the same weights plus the whitening buffers, and a
config with ``model.whitening`` and ``model.whitening_dim`` set, so that every loader builds the layer and applies
it. A run directory resolves to ``whitened.pt`` before ``best.pt``
(:func:`~recallk.training.evaluate_run.resolve_checkpoint`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recallk.config import Config, config_from_dict, config_to_dict
from recallk.data.image_dataset import ImageDataset
from recallk.data.landmarks import sfm120k_pairs
from recallk.data.paths import resolve_data_dir
from recallk.data.sources import DatasetSource
from recallk.data.stores import DirectoryStore
from recallk.engine.distributed import resolve_device
from recallk.errors import RecallkUsageError
from recallk.evaluation.embed import embed_source
from recallk.models.factory import EmbeddingModel
from recallk.models.whitening import Whitening, learn_whitening, pca_whitening
from recallk.training.assemble import build_network, eval_transform, reader_decoding_of
from recallk.training.checkpoint import load_checkpoint, save_checkpoint
from recallk.training.evaluate_run import WHITENED_CHECKPOINT, resolve_checkpoint

# Data sets whose reader lists matching pairs: name -> reader of (images folder, image names, pairs (M, 2)).
PAIR_READERS = {"sfm120k": sfm120k_pairs}


def whiten_run(
    path: str | Path,
    pairs: str | None = None,
    images: Sequence[Path] = (),
    dim: int | None = None,
    power: float = 0.5,
    out: str | Path | None = None,
    force: bool = False,
    data_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[Path, Whitening]:
    """Fit a whitening for the model at ``path`` (a run directory or a checkpoint) and save the whitened model.

    ``pairs``: a part of the run's data set that lists matching pairs (sfm120k: ``val``, ``train`` or ``whiten``)
    -> learned whitening; ``images``: image files -> PCA whitening with eigenvalue ``power``. ``dim``: output
    size (default: the embedding size). ``out``: the new checkpoint (default ``checkpoints/whitened.pt`` beside the
    source); an existing file is replaced only with ``force``. Returns the file written and the whitening layer.
    """
    if (pairs is None) == (not images):
        raise RecallkUsageError("pass either --pairs PART (learned whitening) or --images PATH ... (PCA whitening)")
    checkpoint = resolve_checkpoint(path)
    target = Path(out) if out is not None else checkpoint.parent / WHITENED_CHECKPOINT
    if target.exists() and not force:
        raise RecallkUsageError(f"{target} already exists; pass --force to replace it or --out FILE to write elsewhere")
    state = load_checkpoint(checkpoint)
    config = config_from_dict(state["config"])
    network = build_network(config, weights_follow=True)
    network.load_state_dict(state["model"])
    if not isinstance(network, EmbeddingModel):
        raise RecallkUsageError("whitening applies to image models only; this run trained a text model")
    network.set_whitening(None)  # fit on the head's own descriptors, also when re-whitening a whitened model
    dataset, pair_index = _images_to_embed(config, pairs, images, data_dir)
    torch_device = resolve_device(device)
    descriptors = embed_source(
        network.to(torch_device), DatasetSource(dataset, config.data.num_workers),
        batch_size or config.eval.batch_size, torch_device, progress=progress, desc="embedding for whitening",
    )
    if pair_index is not None:
        kind, layer = "learned", learn_whitening(descriptors, torch.from_numpy(pair_index), dim)
    else:
        kind, layer = "pca", pca_whitening(descriptors, dim, power)
    network.set_whitening(layer)
    whitened = dataclasses.replace(
        config, model=dataclasses.replace(config.model, whitening=kind, whitening_dim=layer.out_dim)
    )
    about: dict[str, Any] = {
        "kind": kind, "dim": layer.out_dim, "source_checkpoint": str(checkpoint), "images": len(dataset),
        "pairs": None if pair_index is None else f"{config.data.dataset} {pairs} ({len(pair_index)} pairs)",
        "power": power if kind == "pca" else None,
    }
    save_checkpoint(target, {"config": config_to_dict(whitened), "model": network.cpu().state_dict(),
                             "whitening": about})
    return target, layer


def _images_to_embed(
    config: Config, pairs: str | None, images: Sequence[Path], data_dir: str | Path | None
) -> tuple[ImageDataset, np.ndarray | None]:
    """The images to describe, decoded and transformed as for evaluation, and the pairs among them (or None)."""
    mode, invert = reader_decoding_of(config)
    data = config.data
    transform = eval_transform(data.transform, data.image_size, config.model.backbone, data.options.get("mean"),
                               data.options.get("std"))
    if pairs is not None:
        reader = PAIR_READERS.get(data.dataset)
        if reader is None:
            raise RecallkUsageError(
                f"data set {data.dataset!r} lists no matching pairs (only {', '.join(PAIR_READERS)} does); use "
                "--images PATH for PCA whitening"
            )
        root = resolve_data_dir(data_dir if data_dir is not None else data.data_dir)
        base, names, index = reader(root, pairs)
        store = DirectoryStore(base)
        hint = f"the {data.dataset} images must sit under {base}"
    else:
        names, index, store = [str(Path(p).resolve()) for p in images], None, DirectoryStore("/")
        hint = "pass existing image files"
    dataset = ImageDataset(store, names, np.zeros(len(names), dtype=np.int64), ["all"], transform=transform,
                           image_mode=mode, invert=invert, missing_hint=hint)
    return dataset, index
