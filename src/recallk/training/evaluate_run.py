"""Evaluating and exporting a trained model from a run directory or a checkpoint file (``recallk evaluate``,
``recallk embed``); the parts come from :mod:`recallk.training.assemble`, as in training.

:func:`benchmark_metrics` is the one code path of landmark benchmarks (ROxf / RPar): the trainer calls it after
training for ``eval.benchmarks`` and ``recallk evaluate --benchmark`` through :func:`evaluate_benchmark`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
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
from recallk.evaluation.descriptor_cache import DescriptorCache, writable_folder
from recallk.evaluation.embed import embed_source, evaluate_embeddings, save_embeddings
from recallk.evaluation.multiscale import PostProcess, iter_multiscale_descriptors
from recallk.evaluation.revisited import search_metrics
from recallk.models.factory import EmbeddingModel
from recallk.training.assemble import build_network, build_split, eval_transform, reader_decoding_of
from recallk.training.checkpoint import CheckpointError, load_checkpoint, weights_digest

logger = logging.getLogger(__name__)


WHITENED_CHECKPOINT = "whitened.pt"  # written by ``recallk whiten`` (recallk.training.whiten_run)
DESCRIPTOR_CACHE = "descriptor_cache"  # descriptors kept while a benchmark or a whitening computes them
DESCRIPTOR_CHUNK = 1024  # images per chunk of descriptors (computed, cached and scored together)
TRAINED_CHECKPOINTS = ("best.pt", "last.pt")  # a run's own checkpoints, in the order a run directory resolves them


def trained_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run directory's ``checkpoints/best.pt``, else ``last.pt`` (never the
    whitened one: what ``recallk whiten`` fits on). A run directory that is not finished is named in a warning."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = [path / "checkpoints" / name for name in TRAINED_CHECKPOINTS if (path / "checkpoints" / name).is_file()]
    if not found:
        if (path / "config.yaml").is_file():
            raise CheckpointError(
                f"run directory {path} has no checkpoint yet: its training stopped before saving one (or is still "
                f"running); start it again with 'recallk train {path / 'config.yaml'} --run-dir {path}'"
            )
        raise CheckpointError(f"{path} is not a run directory (no checkpoints/best.pt or last.pt); pass a run "
                              "directory created by 'recallk train' or a checkpoint file")
    if not (path / "summary.json").is_file():
        logger.warning("run %s is unfinished (no summary.json: interrupted, or still training); using %s as it is "
                       "now; continue it with 'recallk train --resume %s'", path, found[0], path)
    return found[0]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's ``checkpoints/whitened.pt`` (the model with its whitening), else
    :func:`trained_checkpoint`. A ``whitened.pt`` must hold the weights of the run's ``best.pt`` or ``last.pt``
    (:func:`check_whitening_source`): one fitted on another run, or on weights training has replaced since, is
    refused."""
    path = Path(path)
    whitened = path / "checkpoints" / WHITENED_CHECKPOINT
    if not path.is_dir() or not whitened.is_file():
        return trained_checkpoint(path)
    whitening = load_checkpoint(whitened).get("whitening", {})
    check_whitening_source(whitened, whitening.get("source_weights"), whitening.get("source_checkpoint"))
    return whitened


def check_whitening_source(whitened: Path, digest: str | None, source: str | None) -> None:
    """Refuse a whitened checkpoint ``whitened`` in a run's ``checkpoints/`` folder unless ``digest`` (the
    :func:`~recallk.training.checkpoint.weights_digest` of the weights it was fitted on, read from ``source``) is
    that of the folder's ``best.pt`` or ``last.pt``; one line names both. A folder without them checks nothing."""
    held = {}
    for name in TRAINED_CHECKPOINTS:
        if (whitened.parent / name).is_file():
            held[name] = weights_digest(load_checkpoint(whitened.parent / name)["model"])
            if held[name] == digest:
                return
    if not held:
        return
    run = whitened.parent.parent
    fitted = (f"weights {digest[:12]} of {source}" if digest else
              f"the weights of {source}, with no digest to check them by (written by an older recallk)")
    holds = " and ".join(f"{name} weights {value[:12]}" for name, value in held.items())
    raise CheckpointError(
        f"{whitened} is a whitening of {fitted}, but this run holds {holds} (another run's whitening, or training "
        f"went on after recallk whiten); fit it again with 'recallk whiten {run} --force ...', or pass "
        f"{whitened.with_name(next(iter(held)))} to use the model without whitening"
    )


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
    split: str | None = None,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Embed ``split`` of ``dataset`` (default: the training data set) and save embeddings, labels and ids. The
    default split is the run's first test split (``data.split_test``; ``test`` for another ``dataset``)."""
    torch_device = resolve_device(device)
    model, config, _ = load_trained_model(checkpoint, torch_device)
    if split is None:
        split = config.data.split_test[0] if dataset in (None, config.data.dataset) else "test"
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
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Easy/Medium/Hard mAP and mP@1/5/10 of ``model`` on ``benchmark`` (distractors included), as fractions.

    Images are decoded as the run's reader decodes, queries cropped to their box, everything scaled to
    ``eval.image_size`` (shrink only) and described at ``scales`` (default ``eval.scales``); ``post_process``
    (e.g. whitening) maps the aggregated descriptors. Distractor descriptors are scored chunk by chunk and dropped.
    With ``cache_dir``, descriptors are kept there chunk by chunk while they are computed
    (:class:`~recallk.evaluation.descriptor_cache.DescriptorCache`), so an interrupted evaluation resumes where it
    stopped; they are removed once the metrics are computed.
    Returns ``{"easy": {...}, "medium": {...}, "hard": {...}, "image_size", "scales", "database", "distractors"}``.
    """
    if hasattr(model, "tokenize"):
        raise RecallkUsageError(f"{benchmark.name} is an image benchmark but this run's model embeds text")
    scales = tuple(scales or config.eval.scales)
    describe = LandmarkDescriber(model, config, device, scales, post_process, progress, cache_dir)
    queries = torch.cat(list(describe(benchmark.queries, f"{benchmark.name} queries", benchmark.boxes)))
    database = torch.cat(list(describe(benchmark.database, f"{benchmark.name} database")))
    distractors = describe(benchmark.distractors, "distractors")
    results: dict[str, Any] = search_metrics(queries.to(device), database, benchmark.gnd, distractors)
    describe.discard()
    results.update(image_size=config.eval.image_size, scales=list(scales), database=len(benchmark.database),
                   distractors=len(benchmark.distractors))
    return results


class LandmarkDescriber:
    """``describer(paths, desc, boxes=None)``: an iterator of the descriptors ``(n, D)`` of image files, chunk by
    chunk, as the landmark benchmarks compute them (:func:`landmark_images`, the multi-scale aggregate of
    :mod:`recallk.evaluation.multiscale`, then ``post_process``). With ``cache_dir`` they go through a
    :class:`~recallk.evaluation.descriptor_cache.DescriptorCache` keyed by everything that changes them: the
    weights (and those of ``post_process`` when it is a module), ``eval.image_size``, ``scales``, the reader's
    decoding and the preprocessing."""

    def __init__(self, model: nn.Module, config: Config, device: torch.device, scales: Sequence[float],
                 post_process: PostProcess | None = None, progress: bool = True,
                 cache_dir: Path | None = None) -> None:
        self.model, self.config, self.device, self.scales = model, config, device, tuple(scales)
        self.post_process, self.progress, self.cache = post_process, progress, None
        if cache_dir is not None and not writable_folder(cache_dir):
            logger.warning("cannot keep descriptors in %s (not writable): an interruption will start again from the "
                           "first image", cache_dir)
        elif cache_dir is not None:
            whitening = post_process.state_dict() if isinstance(post_process, nn.Module) else {}
            settings = json.dumps({
                "weights": weights_digest(model.state_dict(), exclude_prefix=None),
                "post_process": None if post_process is None else weights_digest(whitening, exclude_prefix=None),
                "image_size": config.eval.image_size, "scales": list(self.scales),
                "decoding": reader_decoding_of(config), "preprocessing": repr(landmark_tensor_transform(config)),
            })
            self.cache = DescriptorCache(cache_dir, settings, DESCRIPTOR_CHUNK)

    def __call__(self, paths: Sequence[Path], desc: str, boxes: Sequence | None = None) -> Iterator[torch.Tensor]:
        def compute(indices: Sequence[int]) -> Iterator[torch.Tensor]:
            images = landmark_images(self.config, [paths[i] for i in indices],
                                     None if boxes is None else [boxes[i] for i in indices])
            return iter_multiscale_descriptors(
                self.model, images, self.device, self.scales, post_process=self.post_process,
                chunk_size=DESCRIPTOR_CHUNK, total=len(indices), progress=self.progress, desc=desc,
            )

        if self.cache is None:
            return compute(range(len(paths)))
        return self.cache.descriptors(list(paths), compute, boxes, what=desc)

    def discard(self) -> None:
        """Remove the cached descriptors (once the result they served is computed)."""
        if self.cache is not None:
            self.cache.discard()


def descriptor_cache_folder(path: str | Path) -> Path:
    """Where ``recallk evaluate --benchmark`` and ``recallk whiten`` keep descriptors while they compute them: the
    run directory's ``descriptor_cache/``, or that folder beside a checkpoint file."""
    path = Path(path)
    return (path if path.is_dir() else path.parent) / DESCRIPTOR_CACHE


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
    skip_bad_images: bool = False,
) -> dict[str, dict[str, Any]]:
    """``{key: metrics}`` (:func:`benchmark_key`, :func:`benchmark_metrics`) of a trained model on a landmark
    benchmark read from ``<data root>/<benchmark>/`` (data root: ``data_dir``, else the run's ``data.data_dir``);
    images Pillow cannot read are refused before any descriptor, or left out with ``skip_bad_images``
    (:func:`~recallk.data.revisited.read_revisited`)."""
    from recallk.data.paths import resolve_data_dir

    torch_device = resolve_device(device)
    model, config, _ = load_trained_model(path, torch_device)
    read = read_revisited(resolve_data_dir(data_dir or config.data.data_dir), benchmark, distractors,
                          skip_bad_images=skip_bad_images)
    # a learned whitening (recallk whiten) maps the multi-scale aggregate, as it was fitted on it (cirtorch's order)
    whitening = model.pop_whitening() if isinstance(model, EmbeddingModel) else None
    metrics = benchmark_metrics(model, config, read, torch_device, scales, post_process=whitening, progress=progress,
                                cache_dir=descriptor_cache_folder(path))
    metrics["whitening"] = config.model.whitening
    return {benchmark_key(benchmark, distractors): metrics}
