"""Your own ``torch.utils.data.Dataset`` as a split the trainer reads (what :func:`recallk.fit` trains on).

Any dataset whose item ``i`` is ``(input, label)`` works; ``input`` is a tensor (an image ``(C, H, W)``, a vector
``(D,)``, ...) or anything ``torch.utils.data.default_collate`` batches (a dict of tensors, ...). The class-balanced
sampler plans batches from the labels alone, without reading items, so the labels must be readable up front:

- a ``.labels`` or ``.targets`` attribute with one label per item (torchvision's ``ImageFolder``, ``MNIST``, ...),
- a ``torch.utils.data.Subset`` of such a dataset, or
- :class:`LabelledDataset` ``(dataset, labels)`` around any other dataset.

Labels may be integers or strings; they are numbered ``0..C-1`` in sorted order (``class_names[label]`` is the
original label). Each item's own label is checked against the up-front one when the item is read, so a list
that disagrees with the data stops training with the first wrong index instead of training on wrong pairs.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from recallk.data.image_dataset import encode_labels
from recallk.data.sampler import PlannedBatch
from recallk.data.sources import Batch, _ignore_stop_signals, _SeededBatches
from recallk.errors import RecallkUsageError

LABEL_ATTRIBUTES = ("labels", "targets")


class LabelledDataset(Dataset):
    """``dataset`` with its ``labels`` (one per item) given up front; items are ``dataset``'s own."""

    def __init__(self, dataset: Dataset, labels: Sequence[Hashable] | np.ndarray | torch.Tensor) -> None:
        if len(labels) != len(dataset):  # type: ignore[arg-type]
            raise RecallkUsageError(
                f"got {len(labels)} labels for a dataset of {len(dataset)} items; give one label per item"  # type: ignore[arg-type]
            )
        self.dataset = dataset
        self.labels = labels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def dataset_labels(dataset: Dataset, name: str) -> list[Hashable]:
    """The label of every item of ``dataset`` as plain Python values, read without reading the items; a one-line
    error naming ``name`` (the argument of :func:`recallk.fit`) and the fix when the dataset has none."""
    if isinstance(dataset, Subset):
        parent = dataset_labels(dataset.dataset, name)
        return [parent[int(i)] for i in dataset.indices]
    for attribute in LABEL_ATTRIBUTES:
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            plain = [_plain(label) for label in labels]
            if len(plain) != len(dataset):  # type: ignore[arg-type]
                raise RecallkUsageError(
                    f"{name}.{attribute} holds {len(plain)} labels but {name} has {len(dataset)} items; "  # type: ignore[arg-type]
                    "give one label per item"
                )
            return plain
    raise RecallkUsageError(
        f"{name} ({type(dataset).__name__}) has no labels the class-balanced sampler can read; give it a .labels or "
        f".targets attribute (one label per item), or pass recallk.LabelledDataset({name}, labels)"
    )


def _plain(label: Any) -> Hashable:
    """A label as a plain hashable value (tensor and numpy scalars become Python numbers)."""
    if isinstance(label, (torch.Tensor, np.ndarray, np.generic)):
        if np.ndim(label) != 0:
            raise RecallkUsageError(f"a label must be one class (an integer or a string), got shape {np.shape(label)}")
        return label.item()
    return label


class _CheckedItems(Dataset):
    """``dataset[i]`` as ``(input, i)`` after checking that the item is ``(input, label)`` with the up-front label;
    with a ``(i, seed)`` key the item is read under ``torch.manual_seed(seed)`` (random transforms by position)."""

    def __init__(self, dataset: Dataset, labels: list[Hashable], name: str) -> None:
        self.dataset, self.labels, self.name = dataset, labels, name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        if isinstance(key, tuple):
            index, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                item = self.dataset[index]
        else:
            index, item = key, self.dataset[key]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise RecallkUsageError(
                f"{self.name}[{index}] is a {type(item).__name__}, not a pair; recallk.fit needs items (input, label)"
            )
        label = _plain(item[1])
        if label != self.labels[index]:
            raise RecallkUsageError(
                f"{self.name}[{index}] has label {label!r} but the labels given up front say {self.labels[index]!r}; "
                f"make {self.name}'s .labels/.targets (or LabelledDataset labels) match its items"
            )
        return item[0], index


class OwnDatasetSource:
    """A split of your own dataset as the trainer reads it: class-balanced planned batches, or the whole split in
    order; ``labels`` (N,) are the dataset's labels numbered ``0..C-1``, ``item_ids`` the item indices."""

    def __init__(self, dataset: Dataset, name: str, num_workers: int = 0) -> None:
        raw = dataset_labels(dataset, name)
        if not raw:
            raise RecallkUsageError(f"{name} is empty; give a dataset with items (input, label)")
        try:
            encoded, classes = encode_labels(raw)
        except TypeError:
            raise RecallkUsageError(
                f"{name}'s labels mix types ({sorted({type(v).__name__ for v in raw})}); use integers or strings"
            ) from None
        self.items = _CheckedItems(dataset, raw, name)
        self.num_workers = num_workers
        self.labels = torch.from_numpy(encoded)
        self.item_ids = [str(i) for i in range(len(raw))]
        self.num_classes = len(classes)
        self.class_names: list[str] | None = [str(c) for c in classes]

    def train_batches(self, batches: Iterable[PlannedBatch], seed: int) -> Iterator[Batch]:
        """The planned batches' inputs (each item read under its own seed: its row of the global batch) and labels."""
        loader = DataLoader(
            self.items, batch_sampler=_SeededBatches(batches, seed), num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), worker_init_fn=_ignore_stop_signals,
        )
        for inputs, indices in loader:
            yield inputs, self.labels[indices]

    def eval_batches(self, batch_size: int) -> Iterator[Any]:
        """The whole split in order, ``batch_size`` inputs at a time."""
        loader = DataLoader(
            self.items, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
            worker_init_fn=_ignore_stop_signals,
        )
        for inputs, _ in loader:
            yield inputs

    def first_batch(self) -> Any:
        """Item 0's input as a batch of one (read with the random streams left as they were)."""
        with torch.random.fork_rng(devices=[]):
            return default_collate([self.items[0][0]])


class OwnImageSource(OwnDatasetSource):
    """:class:`OwnDatasetSource` of image tensors ``(C, H, W)``, C = 1 or 3: drawn as images in retrieval plots."""

    def display_image(self, index: int) -> np.ndarray:
        """Item ``index``'s input scaled to [0, 1], ``(H, W)`` or ``(H, W, 3)``."""
        with torch.random.fork_rng(devices=[]):
            image = self.items[index][0].detach().float()
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
        return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()


class OwnItemSource(OwnDatasetSource):
    """:class:`OwnDatasetSource` of other inputs (vectors, token dicts): named by index and class in plots."""

    def display_text(self, index: int) -> str:
        assert self.class_names is not None
        return f"item {index} (class {self.class_names[int(self.labels[index])]})"


def own_source(dataset: Dataset, name: str, num_workers: int = 0) -> OwnDatasetSource:
    """The split of ``dataset`` (:class:`OwnImageSource` when its inputs are image tensors, else
    :class:`OwnItemSource`); ``name`` is the argument it came from, used in error messages."""
    first = OwnDatasetSource(dataset, name, num_workers).first_batch()
    images = isinstance(first, torch.Tensor) and first.dim() == 4 and first.shape[1] in (1, 3)
    return (OwnImageSource if images else OwnItemSource)(dataset, name, num_workers)


__all__ = ["LabelledDataset", "OwnDatasetSource", "dataset_labels", "own_source"]
