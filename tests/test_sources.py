"""The batch sources, tested directly: each follows BatchSource, and a planned batch's content depends only on
(seed, epoch, batch) and its rows of the global batch (resume mid-epoch, any number of ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recallk.data.folder_csv import build_folder
from recallk.data.sampler import ClassBalancedBatchSampler, PlannedBatch
from recallk.data.sources import ArraySource, BatchSource, DatasetSource, TextSource
from recallk.data.transforms import build_transforms

from data_fixtures import make_glyph_folder

CLASSES, PER_CLASS = 6, 4


def _array_source() -> ArraySource:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (CLASSES * PER_CLASS, 1, 12, 12), dtype=torch.uint8, generator=generator)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    return ArraySource.omniglot(images, labels, None, train=True)


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_glyph_folder(tmp_path_factory.mktemp("glyphs"), classes=CLASSES, per_class=PER_CLASS, size=16)


def _folder_source(root: Path, train: bool) -> DatasetSource:
    return DatasetSource(build_folder(root, "train", transform=build_transforms("omniglot", 12, train)), num_workers=0)


@pytest.fixture(scope="module")
def folder_source(glyphs: Path) -> DatasetSource:
    """Training split (random transforms)."""
    return _folder_source(glyphs, train=True)


def _text_source() -> TextSource:
    texts = [f"sentence {i}" for i in range(CLASSES * PER_CLASS)]
    labels = [f"intent{i // PER_CLASS}" for i in range(len(texts))]

    def tokenize(batch: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([[int(t.split()[1])] for t in batch])}

    return TextSource(texts, labels, [str(i) for i in range(len(texts))], tokenize)


def _sources(folder_source: DatasetSource) -> list[BatchSource]:
    return [_array_source(), folder_source, _text_source()]


def _inputs(batch: object) -> torch.Tensor:
    return batch["input_ids"] if isinstance(batch, dict) else batch  # type: ignore[return-value]


def test_every_source_follows_the_protocol(glyphs: Path) -> None:
    for source in _sources(_folder_source(glyphs, train=False)):
        assert isinstance(source, BatchSource)
        assert len(source.labels) == len(source.item_ids) == CLASSES * PER_CLASS
        assert source.num_classes == CLASSES
        rows = torch.cat([_inputs(b) for b in source.eval_batches(5)])
        assert len(rows) == CLASSES * PER_CLASS
        assert torch.equal(rows, torch.cat([_inputs(b) for b in source.eval_batches(7)]))  # in order, no augmentation


def test_a_resumed_epoch_repeats_the_same_batches(folder_source: DatasetSource) -> None:
    for source in _sources(folder_source):
        sampler = ClassBalancedBatchSampler(source.labels.numpy(), 8, 2, seed=4, batches_per_epoch=3)
        full = list(source.train_batches(sampler.planned(), seed=9))
        state = sampler.state_dict(batches_done=1)
        resumed_sampler = ClassBalancedBatchSampler(source.labels.numpy(), 8, 2, seed=4, batches_per_epoch=3)
        resumed_sampler.load_state_dict(state)
        resumed = list(source.train_batches(resumed_sampler.planned(), seed=9))
        assert len(resumed) == 2
        for (a, la), (b, lb) in zip(full[1:], resumed, strict=True):
            assert torch.equal(_inputs(a), _inputs(b)) and torch.equal(la, lb)


def test_augmentation_follows_the_seed_and_the_batch(folder_source: DatasetSource) -> None:
    for source in (_array_source(), folder_source):
        batch = PlannedBatch(epoch=0, batch=0, indices=[0, 1, 4, 5], offset=0, total=4)
        first, _ = next(source.train_batches([batch], seed=1))
        again, _ = next(source.train_batches([batch], seed=1))
        other_seed, _ = next(source.train_batches([batch], seed=2))
        other_batch, _ = next(source.train_batches([PlannedBatch(0, 1, batch.indices, 0, 4)], seed=1))
        assert torch.equal(first, again)
        assert not torch.equal(first, other_seed) and not torch.equal(first, other_batch)


def test_two_ranks_see_their_rows_of_the_single_process_batch(folder_source: DatasetSource) -> None:
    for source in (_array_source(), folder_source):
        labels = source.labels.numpy()
        single = ClassBalancedBatchSampler(labels, 8, 2, seed=3)
        whole = torch.cat([images for images, _ in source.train_batches(single.planned(), seed=5)])
        shares = []
        for rank in (0, 1):
            sampler = ClassBalancedBatchSampler(labels, 8, 2, seed=3, rank=rank, world_size=2)
            planned = list(sampler.planned())
            assert [p.offset for p in planned] == [4 * rank] * len(planned) and planned[0].total == 8
            shares.append(torch.cat([images for images, _ in source.train_batches(planned, seed=5)]))
        per_batch = [torch.cat([s[i : i + 4] for s in shares]) for i in range(0, len(shares[0]), 4)]
        torch.testing.assert_close(torch.cat(per_batch), whole)
