"""Evaluating and exporting a trained model from a run directory or a checkpoint file (``recallk evaluate``,
``recallk embed``); the parts come from :mod:`recallk.training.assemble`, as in training.

:func:`benchmark_metrics` is the one code path of landmark benchmarks (ROxf / RPar): the trainer calls it after
training for ``eval.benchmarks`` and ``recallk evaluate --benchmark`` through :func:`evaluate_benchmark`."""

from __future__ import annotations

import json
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
from recallk.evaluation.descriptor_cache import DescriptorCache, writable_folder
from recallk.evaluation.embed import embed_source, evaluate_embeddings, save_embeddings
from recallk.evaluation.revisited import search_metrics
from recallk.training.assemble import build_network, build_split
from recallk.training.checkpoint import CheckpointError, load_checkpoint, weights_digest
from recallk.training.description import Description

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
        raise weights_misfit(model, source, err, "the model the run trained") from None


def weights_misfit(model: nn.Module, source: str | Path, err: RuntimeError, expected: str) -> RecallkUsageError:
    """The one-line error for weights in ``source`` that strict loading into ``model`` refused with ``err``: its
    first reason, and that ``expected`` (e.g. "the model the run trained") is what to pass."""
    first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
    return RecallkUsageError(
        f"the weights in {source} do not fit {type(model).__name__} ({first.rstrip('.')}); pass {expected}, built "
        "with the same arguments"
    )


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
    describe: LandmarkDescriber, benchmark: RevisitedBenchmark
) -> tuple[torch.Tensor, torch.Tensor, Iterator[torch.Tensor]]:
    """``(queries (Q, D), database (N, D), distractor chunks)``: the descriptors of a landmark benchmark's images.

    Every image is described as a landmark model describes it (``describe``: :class:`LandmarkDescriber`, the
    :class:`~recallk.training.description.Description` with full images, what ``recallk embed`` and
    :meth:`recallk.RecallkModel.embed` give a landmark model): decoded as the run's reader decodes, queries cropped
    to their box, scaled to ``eval.image_size`` (shrink only), described at the describer's scales and whitened
    after the scales when the model has a whitening. The distractors are described lazily, chunk by chunk, while
    the iterator is consumed.
    """
    queries = torch.cat(list(describe(benchmark.queries, f"{benchmark.name} queries", benchmark.boxes)))
    database = torch.cat(list(describe(benchmark.database, f"{benchmark.name} database")))
    return queries, database, describe(benchmark.distractors, "distractors")


def benchmark_metrics(
    model: nn.Module,
    config: Config,
    benchmark: RevisitedBenchmark,
    device: torch.device,
    scales: Sequence[float] | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Easy/Medium/Hard mAP and mP@1/5/10 of ``model`` on ``benchmark`` (distractors included), as fractions, from
    :func:`benchmark_descriptors`; distractor descriptors are scored chunk by chunk and dropped. With ``cache_dir``,
    descriptors are kept there chunk by chunk while they are computed (:class:`LandmarkDescriber`), so an
    interrupted evaluation resumes where it stopped; they are removed once the metrics are computed. Returns
    ``{"easy": {...}, "medium": {...}, "hard": {...}, "image_size", "scales", "whitening", "database",
    "distractors"}``."""
    if hasattr(model, "tokenize"):
        raise RecallkUsageError(f"{benchmark.name} is an image benchmark but this run's model embeds text")
    describe = LandmarkDescriber(model, config, device, scales, progress, cache_dir)
    queries, database, distractors = benchmark_descriptors(describe, benchmark)
    results: dict[str, Any] = search_metrics(queries.to(device), database, benchmark.gnd, distractors)
    describe.discard()
    results.update(image_size=config.eval.image_size, scales=list(describe.description.scales),
                   whitening=whitening_name(config), database=len(benchmark.database),
                   distractors=len(benchmark.distractors))
    return results


class LandmarkDescriber:
    """``describer(paths, desc, boxes=None)``: an iterator of the descriptors ``(n, D)`` of image files (queries
    cropped to ``boxes``), chunk by chunk, as a landmark model describes them: the full-image
    :class:`~recallk.training.description.Description` of ``config`` at ``scales`` (default ``eval.scales``),
    :attr:`description`. With ``cache_dir`` they go through a
    :class:`~recallk.evaluation.descriptor_cache.DescriptorCache` keyed by everything that changes them: the weights
    (the whitening's included) and the description's fields (decoding, preprocessing, ``eval.image_size``, scales);
    a folder that cannot be written is used without a cache, with a warning."""

    def __init__(self, model: nn.Module, config: Config, device: torch.device, scales: Sequence[float] | None = None,
                 progress: bool = True, cache_dir: Path | None = None) -> None:
        self.model, self.device, self.progress, self.cache = model, device, progress, None
        self.description = Description.from_config(config, full_images=True, scales=scales)
        self.num_workers = config.data.num_workers
        if cache_dir is not None and not writable_folder(cache_dir):
            logger.warning("cannot keep descriptors in %s (not writable): an interruption will start again from the "
                           "first image", cache_dir)
        elif cache_dir is not None:
            settings = json.dumps({"weights": weights_digest(model.state_dict(), exclude_prefix=None),
                                   "description": repr(self.description)})
            self.cache = DescriptorCache(cache_dir, settings, DESCRIPTOR_CHUNK)

    def __call__(self, paths: Sequence[Path], desc: str, boxes: Sequence | None = None) -> Iterator[torch.Tensor]:
        def compute(indices: Sequence[int]) -> Iterator[torch.Tensor]:
            images = landmark_images(self.description, [paths[i] for i in indices],
                                     None if boxes is None else [boxes[i] for i in indices], self.num_workers)
            return self.description.iter_descriptors(self.model, images, self.device, total=len(indices),
                                                     progress=self.progress, desc=desc, chunk_size=DESCRIPTOR_CHUNK)

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
    skip_bad_images: bool = False,
) -> dict[str, dict[str, Any]]:
    """``{key: metrics}`` (:func:`benchmark_key`, :func:`benchmark_metrics` plus the ``checkpoint`` file name) of a
    trained model on a landmark benchmark read from ``<data root>/<benchmark>/`` (data root: ``data_dir``, else the
    run's ``data.data_dir``); images Pillow cannot read are refused before any descriptor, or left out with
    ``skip_bad_images`` (:func:`~recallk.data.revisited.read_revisited`). Descriptors are kept in the run's
    ``descriptor_cache/`` while they are computed (:func:`descriptor_cache_folder`)."""
    from recallk.data.paths import resolve_data_dir

    torch_device = resolve_device(device)
    model, config, checkpoint = load_trained_model(path, torch_device)
    read = read_revisited(resolve_data_dir(data_dir or config.data.data_dir), benchmark, distractors,
                          skip_bad_images=skip_bad_images)
    metrics = benchmark_metrics(model, config, read, torch_device, scales, progress=progress,
                                cache_dir=descriptor_cache_folder(path))
    metrics["checkpoint"] = checkpoint.name
    return {benchmark_key(benchmark, distractors, metrics): metrics}
