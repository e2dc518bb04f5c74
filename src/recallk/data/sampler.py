"""Class-balanced batches (P classes x m samples), split across DDP ranks by whole classes, resumable mid-epoch."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from recallk.registry import SMALL_CLASSES

logger = logging.getLogger(__name__)


def _nearest_multiples(value: int, unit: int) -> str:
    below = value // unit * unit
    options = [v for v in (below, below + unit) if v > 0 and v != value]
    return " or ".join(str(v) for v in options)


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of the schedule as this process sees it.

    ``indices`` are this process's dataset indices of batch ``batch`` of ``epoch``; they are rows
    ``offset : offset + len(indices)`` of the global batch of ``total`` rows (all ranks together), so random
    augmentation drawn per global batch gives every image the warp it gets in a single-process run.
    """

    epoch: int
    batch: int
    indices: list[int]
    offset: int
    total: int


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding lists of dataset indices: ``P = batch_size // samples_per_class`` classes with
    ``m = samples_per_class`` indices each, class by class (``[c1]*m + [c2]*m + ...`` in label terms).

    ``batch_size`` is the global batch over all ranks. Every rank builds the same global batch from
    ``numpy.random.default_rng([seed, epoch])`` and yields its own ``batch_size // world_size`` indices: classes
    ``rank * P/W`` to ``(rank + 1) * P/W - 1`` of it, so ranks hold whole, disjoint classes and their union in rank
    order is exactly the single-process batch. No ``torch.distributed`` calls are made.

    Classes are taken from a stream of random permutations of all classes (a class repeated across a permutation
    boundary moves to the next batch), so over an epoch every class appears equally often, give or take one.
    Within a class, indices are drawn from a reshuffled cycle through its items, never twice in one batch; a class
    with fewer than ``m`` items contributes all of them plus random repeats (drawn with replacement) up to ``m``
    (``small_classes="pad"``, logged once with the number of such classes and of repeated images), or is left out
    of training (``small_classes="drop"``, logged once with the number of classes and images dropped).

    An epoch has ``batches_per_epoch`` batches (default ``len(labels) // batch_size``, at least 1). Each new
    iteration moves to the next epoch by itself (as pytorch-metric-learning's ``MPerClassSampler`` reshuffles every
    time it is iterated); :meth:`set_epoch` (or :meth:`load_state_dict`) before an iteration chooses its epoch
    instead, as DDP samplers do, and always wins. :meth:`state_dict` / :meth:`load_state_dict` resume mid-epoch: the
    next iterator yields exactly the batches after ``batches_done``. A ``DataLoader`` with workers pulls batches ahead
    of training, so pass the number of batches actually trained: ``state_dict(batches_done=step_in_epoch)``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        samples_per_class: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int | None = None,
        small_classes: str = "pad",
    ) -> None:
        labels = np.asarray(labels).reshape(-1)
        m = samples_per_class
        if small_classes not in SMALL_CLASSES:
            raise ValueError(SMALL_CLASSES.unknown(small_classes))
        if m < 1 or batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) and samples_per_class ({m}) must be positive")
        if batch_size % m:
            raise ValueError(
                f"batch_size {batch_size} is not a multiple of samples_per_class {m}; "
                f"use batch_size {_nearest_multiples(batch_size, m)}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in 0..world_size-1 with world_size >= 1 (got {world_size})")
        if batch_size % (world_size * m):
            raise ValueError(
                f"batch_size {batch_size} must be divisible by world_size * samples_per_class = {world_size} * {m} "
                f"= {world_size * m} so every rank holds whole classes; use batch_size "
                f"{_nearest_multiples(batch_size, world_size * m)}"
            )
        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.cumsum(counts)[:-1])
        small = counts < m
        if small.any() and small_classes == "drop":
            logger.warning(
                "dropped %d of %d classes (%d images) with fewer than samples_per_class=%d images from training "
                "(data.small_classes=drop)", small.sum(), len(classes), counts[small].sum(), m,
            )
            members = [items for items, keep in zip(members, ~small) if keep]
            classes = classes[~small]
        elif small.any():
            logger.warning(
                "%d of %d classes have fewer than samples_per_class=%d images: a batch that draws one pads it with "
                "repeated images (%d repeats to fill each of them once); set data.small_classes=drop to leave them "
                "out",
                small.sum(), len(classes), m, (m - counts[small]).sum(),
            )
        if not members:
            raise ValueError(
                f"no class has samples_per_class={m} or more items; lower samples_per_class or use "
                "small_classes='pad'"
            )
        if batch_size // m > len(classes):
            dropped = f" with {m} or more items" if small_classes == "drop" else ""
            raise ValueError(
                f"batch_size {batch_size} / samples_per_class {m} = {batch_size // m} classes per batch, but the "
                f"labels hold only {len(classes)} classes{dropped}; use batch_size <= {len(classes) * m} or a "
                "larger samples_per_class"
            )
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be positive, got {batches_per_epoch}")
        self._members = members
        self.num_samples = len(labels)
        self.batch_size = batch_size
        self.samples_per_class = m
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = batches_per_epoch or max(1, sum(map(len, members)) // batch_size)
        self.epoch = 0
        self.batches_done = 0
        self._resume_at = 0
        self._epoch_chosen = True  # the first iteration is epoch 0; later ones advance unless set_epoch chose one

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields; moving to another epoch drops a pending mid-epoch resume."""
        self._epoch_chosen = True
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_at = 0
            self.batches_done = 0

    def __iter__(self) -> Iterator[list[int]]:
        if not self._epoch_chosen:
            self.set_epoch(self.epoch + 1)
        self._epoch_chosen = False
        start, self._resume_at = self._resume_at, 0
        plan = self.global_batches(self.epoch)
        share = plan.shape[1] // self.world_size
        own = plan[:, self.rank * share : (self.rank + 1) * share]
        self.batches_done = start
        for b in range(start, len(own)):
            self.batches_done = b + 1
            yield own[b].reshape(-1).tolist()

    def planned(self) -> Iterator[PlannedBatch]:
        """This iteration's batches (see ``__iter__``) with their position in the schedule and the global batch."""
        share = self.batch_size // self.world_size
        for indices in self:
            yield PlannedBatch(self.epoch, self.batches_done - 1, indices, self.rank * share, self.batch_size)

    def global_batches(self, epoch: int) -> np.ndarray:
        """All of ``epoch``'s global batches as indices, shape ``(batches_per_epoch, P, m)`` (row = one class)."""
        rng = np.random.default_rng([self.seed, epoch])
        m, per_batch = self.samples_per_class, self.batch_size // self.samples_per_class
        plan = np.empty((self.batches_per_epoch, per_batch, m), dtype=np.int64)
        queue: deque[int] = deque()
        pools: dict[int, np.ndarray] = {}
        for b in range(self.batches_per_epoch):
            chosen: dict[int, None] = {}  # insertion-ordered set
            deferred: list[int] = []
            while len(chosen) < per_batch:
                if not queue:
                    queue.extend(rng.permutation(len(self._members)).tolist())
                c = queue.popleft()
                if c in chosen:
                    deferred.append(c)
                else:
                    chosen[c] = None
            queue.extendleft(reversed(deferred))
            for j, c in enumerate(chosen):
                plan[b, j] = self._draw(rng, c, pools)
        return plan

    def _draw(self, rng: np.random.Generator, c: int, pools: dict[int, np.ndarray]) -> np.ndarray:
        """``m`` distinct indices of class ``c`` from its reshuffled cycle (repeats only when it has fewer than m)."""
        items, m = self._members[c], self.samples_per_class
        if len(items) < m:
            return np.concatenate([rng.permutation(items), rng.choice(items, m - len(items))])
        pool = pools.get(c)
        if pool is None:
            pool = rng.permutation(items)
        elif len(pool) < m:
            fresh = rng.permutation(items)
            pool = np.concatenate([pool, fresh[~np.isin(fresh, pool)], pool])
        pools[c] = pool[m:]
        return pool[:m]

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """Position to resume from: ``epoch`` and ``batches_done`` (default: batches this sampler has yielded)."""
        done = self.batches_done if batches_done is None else batches_done
        if not 0 <= done <= self.batches_per_epoch:
            raise ValueError(f"batches_done {done} must be in 0..{self.batches_per_epoch}")
        return {
            "epoch": self.epoch,
            "batches_done": done,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "samples_per_class": self.samples_per_class,
            "num_samples": self.num_samples,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any], allow_new_items: bool = False) -> None:
        """Resume: the next iterator yields the batches of ``state["epoch"]`` after ``state["batches_done"]``.

        The global batch plan does not depend on ``world_size``, so a run may resume on a different number of ranks.
        ``allow_new_items``: accept labels of another length (images removed from or added to the split since the
        state was saved): the epoch length of the state is kept, so the schedule stays the same, and the remaining
        batches are drawn from the current items (they differ from those an uninterrupted run would have drawn).
        """
        if allow_new_items and state["num_samples"] != self.num_samples:
            self.batches_per_epoch = int(state["batches_per_epoch"])
            state = {**state, "num_samples": self.num_samples}
        for key in ("seed", "batch_size", "samples_per_class", "num_samples", "batches_per_epoch"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has {key}={getattr(self, key)}; "
                    "resume with the same data and sampler settings"
                )
        self.epoch = int(state["epoch"])
        self._resume_at = self.batches_done = int(state["batches_done"])
        self._epoch_chosen = True
