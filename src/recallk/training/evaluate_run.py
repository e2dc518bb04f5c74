"""Evaluating and exporting a trained model from a run directory or a checkpoint file (``recallk evaluate``,
``recallk embed``); the parts come from :mod:`recallk.training.assemble`, as in training.

:func:`benchmark_metrics` is the one code path of landmark benchmarks (ROxf / RPar): the trainer calls it after
training for ``eval.benchmarks`` and ``recallk evaluate --benchmark`` through :func:`evaluate_benchmark`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

from recallk.config import Config, config_from_dict
from recallk.data.revisited import LandmarkImages, RevisitedBenchmark, read_revisited
from recallk.engine.distributed import resolve_device
from recallk.errors import RecallkUsageError
from recallk.evaluation.embed import embed_source, evaluate_embeddings, save_embeddings
from recallk.evaluation.multiscale import PostProcess, iter_multiscale_descriptors, multiscale_descriptors
from recallk.evaluation.revisited import search_metrics
from recallk.models.factory import EmbeddingModel
from recallk.training.assemble import build_network, build_split, eval_transform, reader_decoding_of
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
    return trained_network(state, checkpoint).to(device).eval(), config_from_dict(state["config"]), checkpoint


def trained_network(state: dict[str, Any], checkpoint: Path, model: nn.Module | None = None) -> nn.Module:
    """The network of a checkpoint's ``state`` with its weights: ``model`` when given, else built from the saved
    config. A run of your own model (:func:`recallk.fit`, ``state["own"]``) is never rebuilt from the file: without
    ``model`` that is a one-line error saying to pass an instance."""
    own = state.get("own")
    if model is None and own is not None:
        raise RecallkUsageError(
            f"{checkpoint} was trained by recallk.fit on your own model ({own['model']}), which recallk does not "
            f"rebuild from files; load it in Python with an instance: recallk.load_model(path, model=YourModel(...))"
        )
    if model is None:
        model = build_network(config_from_dict(state["config"]), weights_follow=True)  # weights: the checkpoint's
    load_network_weights(model, state["model"], checkpoint)
    return model


def load_network_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """``model.load_state_dict(weights)`` (strict); a model that does not fit is a one-line error."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise RecallkUsageError(
            f"the weights in {source} do not fit {type(model).__name__} ({first.rstrip('.')}); pass the model the "
            "run trained, built with the same arguments"
        ) from None


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


def landmark_tensor_transform(config: Config) -> Callable[[Image.Image], torch.Tensor]:
    """The run's evaluation transform without its resize and crop: colour conversion, tensor, normalisation."""
    data = config.data
    full = eval_transform(data.transform, data.image_size, config.model.backbone, data.options.get("mean"),
                          data.options.get("std"))
    return T.Compose([step for step in full.transforms if not isinstance(step, (T.Resize, T.CenterCrop))])


def landmark_images(config: Config, paths: list[Path], boxes: list | None = None) -> DataLoader:
    """The images ``paths`` (queries cropped to ``boxes``) one at a time, as the landmark benchmarks read them:
    decoded as the run's reader decodes, scaled to ``eval.image_size`` (shrink only), the run's normalisation."""
    mode, invert = reader_decoding_of(config)
    dataset = LandmarkImages(paths, config.eval.image_size, landmark_tensor_transform(config), mode, invert, boxes)
    return DataLoader(dataset, batch_size=None, num_workers=config.data.num_workers)  # one image at a time


def benchmark_metrics(
    model: nn.Module,
    config: Config,
    benchmark: RevisitedBenchmark,
    device: torch.device,
    scales: Sequence[float] | None = None,
    post_process: PostProcess | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Easy/Medium/Hard mAP and mP@1/5/10 of ``model`` on ``benchmark`` (distractors included), as fractions.

    Images are decoded as the run's reader decodes, queries cropped to their box, everything scaled to
    ``eval.image_size`` (shrink only) and described at ``scales`` (default ``eval.scales``); ``post_process``
    (e.g. whitening) maps the aggregated descriptors. Distractor descriptors are scored chunk by chunk and dropped.
    Returns ``{"easy": {...}, "medium": {...}, "hard": {...}, "image_size", "scales", "database", "distractors"}``.
    """
    if hasattr(model, "tokenize"):
        raise RecallkUsageError(f"{benchmark.name} is an image benchmark but this run's model embeds text")
    scales = tuple(scales or config.eval.scales)
    options: dict[str, Any] = {"scales": scales, "post_process": post_process, "progress": progress}
    queries = multiscale_descriptors(model, landmark_images(config, benchmark.queries, benchmark.boxes), device,
                                     total=len(benchmark.queries), desc=f"{benchmark.name} queries", **options)
    database = multiscale_descriptors(model, landmark_images(config, benchmark.database), device,
                                      total=len(benchmark.database), desc=f"{benchmark.name} database", **options)
    distractors = iter_multiscale_descriptors(model, landmark_images(config, benchmark.distractors), device,
                                              total=len(benchmark.distractors), desc="distractors", **options)
    results: dict[str, Any] = search_metrics(queries.to(device), database, benchmark.gnd, distractors)
    results.update(image_size=config.eval.image_size, scales=list(scales), database=len(benchmark.database),
                   distractors=len(benchmark.distractors))
    return results


def benchmark_key(name: str, distractors: str | Path | None) -> str:
    """The results key of a benchmark: ``roxford5k``, or ``roxford5k+<list file stem>`` with distractors."""
    return name if distractors is None else f"{name}+{Path(distractors).stem}"


def evaluate_benchmark(
    path: str | Path,
    benchmark: str,
    data_dir: str | Path | None = None,
    distractors: str | Path | None = None,
    scales: Sequence[float] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """``{key: metrics}`` (:func:`benchmark_key`, :func:`benchmark_metrics`) of a trained model on a landmark
    benchmark read from ``<data root>/<benchmark>/`` (data root: ``data_dir``, else the run's ``data.data_dir``)."""
    from recallk.data.paths import resolve_data_dir

    torch_device = resolve_device(device)
    model, config, _ = load_trained_model(path, torch_device)
    read = read_revisited(resolve_data_dir(data_dir or config.data.data_dir), benchmark, distractors)
    # a learned whitening (recallk whiten) maps the multi-scale aggregate, as it was fitted on it (cirtorch's order)
    whitening = model.pop_whitening() if isinstance(model, EmbeddingModel) else None
    metrics = benchmark_metrics(model, config, read, torch_device, scales, post_process=whitening, progress=progress)
    metrics["whitening"] = config.model.whitening
    return {benchmark_key(benchmark, distractors): metrics}
