"""ClassBalancedBatchSampler: batch shape, balance, DDP sharding, seeding and mid-epoch resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from recallk.data import ClassBalancedBatchSampler


def make_labels(num_classes: int = 12, seed: int = 0) -> np.ndarray:
    """Unequal class sizes 2..9, shuffled, with non-contiguous label values."""
    rng = np.random.default_rng(seed)
    sizes = 2 + np.arange(num_classes) % 8
    labels = np.repeat(np.arange(num_classes) * 3 + 5, sizes)
    return rng.permutation(labels)


def batches(sampler: ClassBalancedBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_batches_hold_whole_classes() -> None:
    labels = make_labels()
    sampler = ClassBalancedBatchSampler(labels, batch_size=12, samples_per_class=3, seed=1)
    out = batches(sampler, 0)
    assert len(out) == len(sampler) == len(labels) // 12
    for batch in out:
        assert len(batch) == 12
        groups = [labels[batch[i : i + 3]] for i in range(0, 12, 3)]
        assert all(len(set(g)) == 1 for g in groups)  # m consecutive indices share a class
        assert len({g[0] for g in groups}) == 4  # 4 distinct classes
        for i in range(0, 12, 3):
            class_size = int((labels == labels[batch[i]]).sum())
            assert len(set(batch[i : i + 3])) == min(3, class_size)  # repeats only in classes smaller than m


def test_small_classes_repeat_only_when_needed() -> None:
    labels = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    sampler = ClassBalancedBatchSampler(labels, batch_size=6, samples_per_class=3, batches_per_epoch=30)
    for batch in batches(sampler, 0):
        for i in range(0, 6, 3):
            group = batch[i : i + 3]
            if labels[group[0]] == 0:
                assert set(group) == {0, 1}  # both images, one repeated
            else:
                assert len(set(group)) == 3


def test_classes_equally_often_and_items_cycled() -> None:
    labels = make_labels(num_classes=10)
    sampler = ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=2, batches_per_epoch=50)
    out = np.array(batches(sampler, 3))
    class_counts = Counter(labels[out[:, ::2].ravel()].tolist())
    assert len(class_counts) == 10 and max(class_counts.values()) - min(class_counts.values()) <= 1
    item_counts = np.bincount(out.ravel(), minlength=len(labels))
    for c in np.unique(labels):
        members = item_counts[labels == c]
        assert members.max() - members.min() <= 1  # within a class, images are drawn round-robin


def test_reproducible_per_epoch_and_different_across_epochs() -> None:
    labels = make_labels()
    a = ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=2, seed=7)
    b = ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=2, seed=7)
    assert batches(a, 0) == batches(b, 0) and batches(a, 1) == batches(b, 1)
    assert batches(a, 0) != batches(a, 1)
    c = ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=2, seed=8)
    assert batches(c, 0) != batches(a, 0)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_disjoint_and_union_is_single_process_batch(world_size: int) -> None:
    labels = make_labels(num_classes=16)
    single = batches(ClassBalancedBatchSampler(labels, batch_size=16, samples_per_class=2, seed=3), 2)
    per_rank = [
        batches(ClassBalancedBatchSampler(labels, 16, 2, seed=3, rank=r, world_size=world_size), 2)
        for r in range(world_size)
    ]
    for b, full in enumerate(single):
        shares = [rank_batches[b] for rank_batches in per_rank]
        assert all(len(s) == 16 // world_size for s in shares)
        assert sum(shares, []) == full
        classes = [set(labels[s].tolist()) for s in shares]
        assert sum(len(c) for c in classes) == len(set().union(*classes)) == 8  # no class on two ranks


def test_resume_mid_epoch_yields_exactly_the_rest() -> None:
    labels = make_labels()
    full = batches(ClassBalancedBatchSampler(labels, 8, 2, seed=5), 4)
    first = ClassBalancedBatchSampler(labels, 8, 2, seed=5)
    first.set_epoch(4)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    assert state["epoch"] == 4 and state["batches_done"] == 3 and seen == full[:3]

    resumed = ClassBalancedBatchSampler(labels, 8, 2, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # what a training loop does on restart: keeps the resume point
    assert list(resumed) == full[3:]
    assert len(batches(resumed, 5)) == len(resumed)  # the next epoch is whole again


def test_resume_with_explicit_count_and_other_world_size() -> None:
    labels = make_labels(num_classes=16)
    full = batches(ClassBalancedBatchSampler(labels, 16, 2, seed=0), 1)
    saver = ClassBalancedBatchSampler(labels, 16, 2, seed=0)
    saver.set_epoch(1)
    state = saver.state_dict(batches_done=2)  # e.g. a DataLoader prefetched more than was trained
    ranks = []
    for r in range(2):
        s = ClassBalancedBatchSampler(labels, 16, 2, seed=0, rank=r, world_size=2)
        s.load_state_dict(state)
        ranks.append(list(s))
    assert [a + b for a, b in zip(*ranks)] == full[2:]


def test_state_mismatch_rejected() -> None:
    labels = make_labels()
    state = ClassBalancedBatchSampler(labels, 8, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed=0 but this sampler has seed=1"):
        ClassBalancedBatchSampler(labels, 8, 2, seed=1).load_state_dict(state)


def test_works_as_dataloader_batch_sampler() -> None:
    labels = make_labels()
    dataset = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    sampler = ClassBalancedBatchSampler(labels, 8, 4, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    got = [index.tolist() for index, _ in loader]
    assert got == batches(sampler, 0) and len(loader) == len(sampler)


def test_error_batch_not_multiple_of_m() -> None:
    message = r"batch_size 10 is not a multiple of samples_per_class 4; use batch_size 8 or 12"
    with pytest.raises(ValueError, match=message):
        ClassBalancedBatchSampler(make_labels(), batch_size=10, samples_per_class=4)


def test_error_too_many_classes_per_batch() -> None:
    message = r"= 13 classes per batch, but the labels hold only 12 classes; use batch_size <= 24"
    with pytest.raises(ValueError, match=message):
        ClassBalancedBatchSampler(make_labels(num_classes=12), batch_size=26, samples_per_class=2)


def test_error_ddp_not_whole_classes_per_rank() -> None:
    message = r"divisible by world_size \* samples_per_class = 4 \* 2 = 8.*use batch_size 8 or 16"
    with pytest.raises(ValueError, match=message):
        ClassBalancedBatchSampler(make_labels(), batch_size=12, samples_per_class=2, rank=1, world_size=4)


def test_error_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank 2 must be in 0..world_size-1"):
        ClassBalancedBatchSampler(make_labels(), batch_size=8, samples_per_class=2, rank=2, world_size=2)
