"""``recallk whiten``: fit a whitening for a trained model and store it with the model, as a new checkpoint.

The trained network's descriptors (the head's output before any whitening, float32, computed as the landmark
benchmarks compute them: full images, ``eval.image_size``, ``eval.scales``) of the images of matching pairs (learned
whitening, :func:`~recallk.models.whitening.learn_whitening`) or of a set of images (PCA whitening,
:func:`~recallk.models.whitening.pca_whitening`) are fitted. The result is written as
``checkpoints/whitened.pt`` next to the checkpoint it came from: the same weights plus the whitening buffers, a
config with ``model.whitening`` and ``model.whitening_dim`` set, so that every loader builds the layer and applies
it, and the digest of the weights it was fitted on (``whitening.source_weights``). A run directory resolves to
``whitened.pt`` before ``best.pt`` as long as that digest is the run's ``best.pt`` or ``last.pt``
(:func:`~recallk.training.evaluate_run.resolve_checkpoint`); a run directory given to ``recallk whiten`` is fitted on
its ``best.pt`` (else ``last.pt``), never on an earlier whitening.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recallk.config import Config, config_from_dict, config_to_dict
from recallk.data.image_dataset import unreadable_images
from recallk.data.landmarks import sfm120k_pairs
from recallk.data.paths import resolve_data_dir
from recallk.engine.distributed import resolve_device
from recallk.errors import RecallkUsageError
from recallk.models.factory import EmbeddingModel
from recallk.models.whitening import Whitening, learn_whitening, pca_whitening
from recallk.training.assemble import build_network
from recallk.training.checkpoint import load_checkpoint, save_checkpoint, weights_digest
from recallk.training.evaluate_run import (
    WHITENED_CHECKPOINT,
    LandmarkDescriber,
    check_whitening_source,
    descriptor_cache_folder,
    trained_checkpoint,
)

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
    scales: Sequence[float] | None = None,
    progress: bool = True,
    skip_bad_images: bool = False,
) -> tuple[Path, Whitening]:
    """Fit a whitening for the model at ``path`` (a run directory or a checkpoint) and save the whitened model.

    ``pairs``: a part of the run's data set that lists matching pairs (sfm120k: ``val``, ``train`` or ``whiten``)
    -> learned whitening; ``images``: image files -> PCA whitening with eigenvalue ``power``. ``dim``: output
    size (default: the embedding size). Descriptors are computed as the landmark benchmarks compute them (full
    images with the longer side ``eval.image_size``, aggregated over ``scales``, default ``eval.scales``), so the
    whitening fits what ``recallk evaluate --benchmark`` whitens; they are kept in the run's ``descriptor_cache/``
    while they are computed, so an interrupted fit resumes. ``out``: the new checkpoint (default
    ``checkpoints/whitened.pt`` beside the source); an existing file is replaced only with ``force``. Images Pillow
    cannot read are refused before any descriptor is computed, or left out with ``skip_bad_images`` (with the pairs
    that use them). Returns the file written and the whitening layer.
    """
    if (pairs is None) == (not images):
        raise RecallkUsageError("pass either --pairs PART (learned whitening) or --images PATH ... (PCA whitening)")
    checkpoint = trained_checkpoint(path)
    target = Path(out) if out is not None else checkpoint.parent / WHITENED_CHECKPOINT
    if target.exists() and not force:
        raise RecallkUsageError(f"{target} already exists; pass --force to replace it or --out FILE to write elsewhere")
    state = load_checkpoint(checkpoint)
    source_weights = weights_digest(state["model"])
    if target.name == WHITENED_CHECKPOINT:  # a run directory would resolve to it: it must whiten that run's weights
        check_whitening_source(target, source_weights, str(checkpoint))
    config = config_from_dict(state["config"])
    network = build_network(config, weights_follow=True)
    network.load_state_dict(state["model"])
    if not isinstance(network, EmbeddingModel):
        raise RecallkUsageError("whitening applies to image models only; this run trained a text model")
    network.set_whitening(None)  # fit on the head's own descriptors, also when re-whitening a whitened model
    size = network.head.fc.out_features
    if dim is not None and not 0 < dim <= size:
        raise RecallkUsageError(f"--dim {dim}: the whitening dimension must be in 1..{size} (the embedding size)")
    paths, pair_index = _images_to_describe(config, pairs, images, data_dir, size, dim or size)
    paths, pair_index = _without_unreadable(paths, pair_index, skip_bad_images)
    torch_device = resolve_device(device)
    scales = tuple(scales or config.eval.scales)
    describe = LandmarkDescriber(network.to(torch_device), config, torch_device, scales, progress=progress,
                                 cache_dir=descriptor_cache_folder(path))
    descriptors = torch.cat(list(describe(paths, "descriptors for whitening")))
    if pair_index is not None:
        kind, layer = "learned", learn_whitening(descriptors, torch.from_numpy(pair_index), dim)
    else:
        kind, layer = "pca", pca_whitening(descriptors, dim, power)
    network.set_whitening(layer)
    whitened = dataclasses.replace(
        config, model=dataclasses.replace(config.model, whitening=kind, whitening_dim=layer.out_dim)
    )
    about: dict[str, Any] = {
        "kind": kind, "dim": layer.out_dim, "source_checkpoint": str(checkpoint), "source_weights": source_weights,
        "images": len(paths),
        "image_size": config.eval.image_size, "scales": list(scales),
        "pairs": None if pair_index is None else f"{config.data.dataset} {pairs} ({len(pair_index)} pairs)",
        "power": power if kind == "pca" else None,
    }
    save_checkpoint(target, {"config": config_to_dict(whitened), "model": network.cpu().state_dict(),
                             "whitening": about})
    describe.discard()
    return target, layer


def _images_to_describe(
    config: Config, pairs: str | None, images: Sequence[Path], data_dir: str | Path | None, size: int, dim: int
) -> tuple[list[Path], np.ndarray | None]:
    """The image files to describe and the (query, positive) pairs among them (``None`` for PCA), refused before any
    image is read when they are too few to fit ``size``-d descriptors (learned: ``size`` pairs) to ``dim``
    dimensions (PCA: ``dim + 1`` images)."""
    if pairs is None:
        if len(images) <= dim:
            raise RecallkUsageError(
                f"PCA whitening to {dim} dimensions needs more images than dimensions, got {len(images)}; pass at "
                f"least {dim + 1} images" + (f" or --dim {len(images) - 1} or less" if len(images) > 1 else "")
            )
        return [Path(p) for p in images], None
    data = config.data
    reader = PAIR_READERS.get(data.dataset)
    if reader is None:
        raise RecallkUsageError(
            f"data set {data.dataset!r} lists no matching pairs (only {', '.join(PAIR_READERS)} does); use "
            "--images PATH for PCA whitening"
        )
    base, names, index = reader(resolve_data_dir(data_dir if data_dir is not None else data.data_dir), pairs)
    if len(index) < size:
        raise RecallkUsageError(
            f"--pairs {pairs} lists {len(index)} pairs, but learned whitening of {size}-d descriptors needs at least "
            f"{size} (one per dimension); use a part with more pairs (sfm120k: train or whiten) or PCA whitening "
            "(--images)"
        )
    paths = [base / name for name in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images of the {pairs} pairs are missing, e.g. "
                                f"{missing[0]}; the {data.dataset} images must sit under {base}")
    return paths, index


def _without_unreadable(
    paths: list[Path], pair_index: np.ndarray | None, skip: bool
) -> tuple[list[Path], np.ndarray | None]:
    """``paths`` and ``pair_index`` (``(M, 2)`` indices into ``paths``) with the images Pillow cannot read refused
    (:func:`~recallk.data.image_dataset.unreadable_images`), or with ``skip`` left out, with the pairs using them."""
    bad = unreadable_images(paths, "images to fit the whitening on", skip)
    if not bad:
        return paths, pair_index
    kept = np.array([path not in bad for path in paths])
    if pair_index is not None:
        pair_index = (np.cumsum(kept) - 1)[pair_index[kept[pair_index].all(axis=1)]]
    return [path for path, keep in zip(paths, kept) if keep], pair_index
