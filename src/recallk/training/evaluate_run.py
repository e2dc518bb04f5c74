"""Evaluating and exporting a trained model from a run directory or a checkpoint file (``recallk evaluate``,
``recallk embed``); the parts come from :mod:`recallk.training.assemble`, as in training.

:func:`benchmark_metrics` is the one code path of landmark benchmarks (ROxf / RPar): the trainer calls it after
training for ``eval.benchmarks`` and ``recallk evaluate --benchmark`` through :func:`evaluate_benchmark`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from recallk.config import Config, config_from_dict
from recallk.data.revisited import LandmarkImages, RevisitedBenchmark, read_revisited
from recallk.engine.distributed import resolve_device
from recallk.errors import RecallkUsageError
from recallk.evaluation.embed import embed_source, evaluate_embeddings, save_embeddings
from recallk.evaluation.revisited import search_metrics
from recallk.training.assemble import build_network, build_split
from recallk.training.checkpoint import CheckpointError, load_checkpoint
from recallk.training.description import Description

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


def landmark_images(description: Description, paths: list[Path], boxes: list | None = None,
                    num_workers: int = 0) -> DataLoader:
    """The images ``paths`` (queries cropped to ``boxes``) one at a time, as a full-image ``description`` reads them:
    decoded as the run's reader decodes, scaled to ``eval.image_size`` (shrink only), the run's normalisation."""
    preprocessing = description.preprocessing
    assert preprocessing.full_image_size is not None, "landmark images are full images"
    dataset = LandmarkImages(paths, preprocessing.full_image_size, preprocessing.transform_fn, preprocessing.mode,
                             preprocessing.invert, boxes)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)  # one image at a time


def benchmark_descriptors(
    model: nn.Module,
    config: Config,
    benchmark: RevisitedBenchmark,
    device: torch.device,
    scales: Sequence[float] | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Iterator[torch.Tensor]]:
    """``(queries (Q, D), database (N, D), distractor chunks)``: the descriptors of a landmark benchmark's images.

    Every image is described as a landmark model describes it (:class:`~recallk.training.description.Description`
    with full images, what ``recallk embed`` and :meth:`recallk.RecallkModel.embed` give a landmark model):
    decoded as the run's reader decodes, queries cropped to their box, scaled to ``eval.image_size`` (shrink only),
    described at ``scales`` (default ``eval.scales``) and whitened after the scales when the model has a whitening.
    The distractors are described lazily, chunk by chunk, while the iterator is consumed.
    """
    if hasattr(model, "tokenize"):
        raise RecallkUsageError(f"{benchmark.name} is an image benchmark but this run's model embeds text")
    description = Description.from_config(config, full_images=True, scales=scales)

    def described(paths: list[Path], what: str, boxes: list | None = None) -> Iterator[torch.Tensor]:
        images = landmark_images(description, paths, boxes, config.data.num_workers)
        return description.iter_descriptors(model, images, device, total=len(paths), progress=progress, desc=what)

    queries = torch.cat(list(described(benchmark.queries, f"{benchmark.name} queries", benchmark.boxes)))
    database = torch.cat(list(described(benchmark.database, f"{benchmark.name} database")))
    return queries, database, described(benchmark.distractors, "distractors")


def benchmark_metrics(
    model: nn.Module,
    config: Config,
    benchmark: RevisitedBenchmark,
    device: torch.device,
    scales: Sequence[float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Easy/Medium/Hard mAP and mP@1/5/10 of ``model`` on ``benchmark`` (distractors included), as fractions, from
    :func:`benchmark_descriptors`; distractor descriptors are scored chunk by chunk and dropped. Returns
    ``{"easy": {...}, "medium": {...}, "hard": {...}, "image_size", "scales", "whitening", "database",
    "distractors"}``."""
    scales = tuple(scales or config.eval.scales)
    queries, database, distractors = benchmark_descriptors(model, config, benchmark, device, scales, progress)
    results: dict[str, Any] = search_metrics(queries.to(device), database, benchmark.gnd, distractors)
    results.update(image_size=config.eval.image_size, scales=list(scales), whitening=whitening_name(config),
                   database=len(benchmark.database), distractors=len(benchmark.distractors))
    return results


def whitening_name(config: Config) -> str:
    """``"none"``, or the kind and output size of the model's whitening, e.g. ``"learned 256-d"``."""
    model = config.model
    if model.whitening == "none":
        return "none"
    return f"{model.whitening} {model.whitening_dim or model.embed_dim}-d"


def benchmark_key(name: str, distractors: str | Path | None, metrics: dict[str, Any]) -> str:
    """The results key of a benchmark evaluation: every setting that changes its numbers, e.g.
    ``roxford5k+<list file stem> (best.pt, 1024 px, scales 1 0.707107 0.5, whitening none)``: the distractor list,
    and the ``checkpoint``, ``image_size``, ``scales`` and ``whitening`` of ``metrics``."""
    scales = " ".join(f"{s:g}" for s in metrics["scales"])
    settings = (f"{metrics['checkpoint']}, {metrics['image_size']} px, scales {scales}, "
                f"whitening {metrics['whitening']}")
    return f"{name if distractors is None else f'{name}+{Path(distractors).stem}'} ({settings})"


def evaluate_benchmark(
    path: str | Path,
    benchmark: str,
    data_dir: str | Path | None = None,
    distractors: str | Path | None = None,
    scales: Sequence[float] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """``{key: metrics}`` (:func:`benchmark_key`, :func:`benchmark_metrics` plus the ``checkpoint`` file name) of a
    trained model on a landmark benchmark read from ``<data root>/<benchmark>/`` (data root: ``data_dir``, else the
    run's ``data.data_dir``)."""
    from recallk.data.paths import resolve_data_dir

    torch_device = resolve_device(device)
    model, config, checkpoint = load_trained_model(path, torch_device)
    read = read_revisited(resolve_data_dir(data_dir or config.data.data_dir), benchmark, distractors)
    metrics = benchmark_metrics(model, config, read, torch_device, scales, progress=progress)
    metrics["checkpoint"] = checkpoint.name
    return {benchmark_key(benchmark, distractors, metrics): metrics}
