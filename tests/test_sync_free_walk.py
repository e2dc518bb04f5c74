"""The sync-free walk of the ranking losses (issue 32, item 3): a padded positive table with fixed shapes, no
value read on the host inside the walk, and the same values and gradients as the compact walk and the loops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recallk import FastAPLoss, RecallAtKLoss, SimilarityMixup, SmoothAPLoss
from recallk.losses.chunked_walk import chunk_pairs, positive_index, positive_table
from recallk.losses.recall_at_k import ChunkedRankingLoss
from recallk.losses.walk_graph import WalkGraphs

from loss_reference import LargestTensor, rsk_loop
from run_fixtures import load_benchmark

REPO = Path(__file__).resolve().parents[1]
# Unequal class sizes in shuffled order (a class of 7, of 1, of 2 ...): padding of every width gets used.
LABELS = torch.tensor([3, 0, 1, 3, 0, 2, 1, 3, 0, 5, 3, 1, 0, 3, 2, 7, 3, 3, 1, 0])
LOSSES = {
    "rs@k": lambda **kw: RecallAtKLoss(k=(1, 2, 4), **kw),
    "rs@k_authors": lambda **kw: RecallAtKLoss(k=(1, 2, 4), tau_k=1.0, rank_includes_query=True, **kw),
    "rs@k_sharp": lambda **kw: RecallAtKLoss(k=(1, 2, 4), tau_k=0.005, **kw),  # most pairs without gradient
    "smooth_ap": lambda **kw: SmoothAPLoss(temperature=0.05, **kw),
    "fast_ap": lambda **kw: FastAPLoss(num_bins=10, **kw),
}


def unit(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def value_and_grad(fn, *inputs: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward()
    return out.item(), [x.grad for x in leaves]


def both_walks(make, fn, *inputs: torch.Tensor) -> None:
    """``fn(loss, *inputs)`` gives the same value and gradients with the compact and the sync-free walk."""
    torch.manual_seed(0)
    compact = value_and_grad(lambda *x: fn(make(sync_free=False), *x), *inputs)
    torch.manual_seed(0)
    padded = value_and_grad(lambda *x: fn(make(sync_free=True), *x), *inputs)
    assert padded[0] == pytest.approx(compact[0], abs=1e-12)
    for ours, theirs in zip(padded[1], compact[1]):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-13)


def test_positive_table_lists_every_querys_positives_ascending_and_pads_the_rest() -> None:
    g = torch.Generator().manual_seed(5)
    ref_labels = torch.randint(0, 6, (40,), generator=g)
    labels = torch.cat([ref_labels[:10], torch.tensor([9, 2, 4])])  # 9: no item of its class
    # own columns: the first ten are database items themselves; then none, and one of another class
    self_col = torch.cat([torch.arange(10), torch.tensor([-1, -1, int((ref_labels != 4).nonzero()[0])])])
    rows = positive_index(labels, ref_labels, self_col)
    side = RecallAtKLoss()._settings(torch.device("cpu")).query_side(labels, ref_labels, self_col, torch.float64)
    columns, real = positive_table(side)
    expected = [[x for x in range(40) if ref_labels[x] == labels[q] and x != self_col[q]] for q in range(13)]
    assert rows.num_pos.tolist() == [len(e) for e in expected]
    assert side.index.max_pos == columns.shape[1] == max(map(len, expected))
    for q in range(13):
        assert columns[q][real[q]].tolist() == expected[q]
        assert real[q].tolist() == [j < len(expected[q]) for j in range(columns.shape[1])]  # real slots first
    row, col, none = chunk_pairs(side, padded=False)
    assert none is None and list(zip(row.tolist(), col.tolist())) == [(q, x) for q in range(13) for x in expected[q]]
    row, col, padded_real = chunk_pairs(side.rows(3, 7), padded=True)
    assert len(row) == 4 * columns.shape[1] and padded_real.tolist() == real[3:7].reshape(-1).tolist()


@pytest.mark.parametrize("query_chunk", [1, 3, 256])  # 1 and 3: queries with more pairs than a block
@pytest.mark.parametrize("name", list(LOSSES))
def test_both_walks_agree_on_a_batch_reference_rows_and_a_similarity_matrix(name: str, query_chunk: int) -> None:
    make = lambda **kw: LOSSES[name](query_chunk=query_chunk, **kw)  # noqa: E731
    emb, n = unit(len(LABELS), seed=1), len(LABELS)
    both_walks(make, lambda loss, e: loss(e, LABELS), emb)
    rows = torch.arange(0, n, 3)
    both_walks(make, lambda loss, e: loss(e[rows], LABELS[rows], ref_emb=e, ref_labels=LABELS, query_index=rows), emb)
    both_walks(make, lambda loss, q, r: loss(q, LABELS[:7], ref_emb=r, ref_labels=LABELS), unit(7, seed=2), emb)
    both_walks(make, lambda loss, e: loss.from_similarity(e @ e.T, LABELS), emb)


@pytest.mark.parametrize("name", ["rs@k", "smooth_ap", "fast_ap"])
def test_both_walks_agree_with_simix_and_in_shards(name: str) -> None:
    make = lambda **kw: LOSSES[name](mixup=SimilarityMixup(pairs_per_class=3), query_chunk=4, **kw)  # noqa: E731
    emb = unit(len(LABELS), seed=4)
    both_walks(make, lambda loss, e: loss(e, LABELS), emb)
    both_walks(make, lambda loss, e: loss.from_similarity(e @ e.T, LABELS), emb)

    def shards(loss: ChunkedRankingLoss, e: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for rows in (slice(0, 7), slice(7, 20)):
            loss.mixup.seed(11)  # every share sees the same draw
            total = total + loss.sharded_loss(e, LABELS, rows)
        return total

    both_walks(make, shards, emb)


@pytest.mark.parametrize("rank_includes_query", [False, True])
def test_sync_free_rs_at_k_equals_the_loop(rank_includes_query: bool) -> None:
    emb = unit(len(LABELS), seed=6)
    kw = dict(k=(1, 2, 4), tau_k=(1.0, 2.0, 3.0), rank_includes_query=rank_includes_query)
    loss = RecallAtKLoss(query_chunk=2, sync_free=True, **kw)
    ours = value_and_grad(lambda e: loss(e, LABELS), emb)
    ref = value_and_grad(lambda e: rsk_loop(e @ e.T, LABELS.tolist(), **kw), emb)
    assert ours[0] == pytest.approx(ref[0], abs=1e-12)
    torch.testing.assert_close(ours[1][0], ref[1][0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["rs@k", "smooth_ap", "fast_ap"])
def test_sync_free_walk_keeps_memory_at_query_chunk_by_batch(name: str) -> None:
    n, chunk = 64, 4
    emb = unit(n, d=8, seed=21).requires_grad_()
    with LargestTensor() as largest:
        LOSSES[name](query_chunk=chunk, sync_free=True)(emb, torch.arange(n) // 4).backward()
    assert largest.numel <= 2 * chunk * n <= n * n // 8


@pytest.mark.parametrize("query_chunk", [2, 32])
def test_sync_free_walk_reads_no_value_on_the_host_and_the_check_can_fail(query_chunk: int) -> None:
    """Each loss's walk runs forward and backward on meta tensors (no data) refusing host tensors and host data
    (``benchmarks/loss_sync.py``, which the GPU suite runs under CUDA's sync debug mode); the compact walk,
    which reads values, is caught."""
    loss_sync = load_benchmark(REPO / "benchmarks" / "loss_sync.py")
    emb, labels = loss_sync.batch(96, 16, torch.device("cpu"))
    for name, make in loss_sync.LOSSES.items():  # with SiMix (all pairs) a query has 9 positives
        torch.manual_seed(0)
        assert loss_sync.check_walk(make(sync_free=True, query_chunk=query_chunk), emb, labels,
                                    torch.device("meta")) == "none", name
        found = loss_sync.check_walk(make(sync_free=False, query_chunk=query_chunk), emb, labels, torch.device("meta"))
        assert found != "none", name


def test_the_walk_is_chosen_per_device_and_checked() -> None:
    loss = RecallAtKLoss()
    assert not loss._settings(torch.device("cpu")).sync_free
    assert loss._settings(torch.device("cuda")).sync_free and loss._settings(torch.device("meta")).sync_free
    assert not RecallAtKLoss(sync_free=False)._settings(torch.device("cuda")).sync_free
    assert SmoothAPLoss(sync_free=True)._settings(torch.device("cpu")).sync_free
    assert "sync_free=None" in repr(loss)
    with pytest.raises(ValueError, match="sync_free must be True, False or None"):
        FastAPLoss(sync_free="yes")


def test_cuda_graph_is_refused_off_a_cuda_device_with_the_fix_in_the_message() -> None:
    emb, labels = unit(8), torch.arange(8) // 2
    with pytest.raises(ValueError, match=r"cuda_graph=True replays the sync-free walk on a CUDA device, but this "
                                         r"call runs on cpu; set cuda_graph=False"):
        RecallAtKLoss(cuda_graph=True, sync_free=True)(emb, labels)
    with pytest.raises(ValueError, match=r"has sync_free=False \(on cpu\); set cuda_graph=False or sync_free=None"):
        SmoothAPLoss(cuda_graph=True)(emb, labels)
    with pytest.raises(ValueError, match="cuda_graph must be True or False"):
        RecallAtKLoss(cuda_graph=None)


class EagerReplay:
    """A replay without a graph: the walk on static copies of the inputs, refilled at each replay (what a
    captured walk does on a GPU), so that WalkGraphs' keys, buffers and rebuilt query side run on the CPU."""

    made = 0

    def __init__(self, inputs: list[torch.Tensor], run) -> None:
        self.inputs, self.run = [t.detach().clone() for t in inputs], run
        EagerReplay.made += 1

    def replay(self, inputs: list[torch.Tensor]) -> tuple:
        for static, new in zip(self.inputs, inputs):
            static.copy_(new)
        return self.run(self.inputs)


@pytest.mark.parametrize("name", ["rs@k", "smooth_ap", "fast_ap"])
def test_walk_graphs_key_reuse_and_rebuilt_inputs_give_the_eager_values(name: str) -> None:
    graphed = LOSSES[name](query_chunk=5, sync_free=True, mixup=SimilarityMixup(pairs_per_class=2))
    graphed._walker = WalkGraphs(capacity=2, capture=EagerReplay)
    EagerReplay.made = 0
    eager = LOSSES[name](query_chunk=5, sync_free=True, mixup=SimilarityMixup(pairs_per_class=2))
    calls = [("batch", 1, 40), ("batch", 2, 40), ("batch", 3, 24), ("batch", 4, 40), ("batch", 5, 16),
             ("reference_rows", 6, 40), ("reference_rows", 6, 40)]
    for call, seed, n in calls:
        emb = unit(n, seed=seed)
        labels = torch.arange(n)[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] // 4
        results = []
        for loss in (graphed, eager):
            torch.manual_seed(seed)
            run = (lambda e, loss=loss, y=labels: loss(e, y)) if call == "batch" else (
                lambda e, loss=loss, y=labels: loss(e[:10], y[:10], ref_emb=e, ref_labels=y))
            results.append(value_and_grad(run, emb))
        (ours, (grad,)), (theirs, (their_grad,)) = results
        assert ours == pytest.approx(theirs, abs=1e-12), (seed, call)
        torch.testing.assert_close(grad, their_grad, rtol=1e-9, atol=1e-13)
    # the 40-item batches (same shape, SiMix's 20 virtual items) share one capture, and so do the two calls with
    # reference rows; the two newest kept, the 24-item batch's capture dropped when the 16-item one came
    assert len(graphed._walker.captured) == 2 and EagerReplay.made == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["rs@k", "smooth_ap", "fast_ap"])
def test_cuda_graph_replays_equal_the_eager_walk(name: str) -> None:
    """Captured at the first batch of a shape, replayed for the next ones (new values, same shape), captured
    again for another shape; SiMix and reference rows too; values and gradients as the eager sync-free walk."""
    cuda = torch.device("cuda")
    graphed = LOSSES[name](query_chunk=8, cuda_graph=True, mixup=SimilarityMixup(pairs_per_class=2))
    eager = LOSSES[name](query_chunk=8, sync_free=True, mixup=SimilarityMixup(pairs_per_class=2))
    def batch(loss: ChunkedRankingLoss, e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(e, y)

    def reference_rows(loss: ChunkedRankingLoss, e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(e[:10], y[:10], ref_emb=e, ref_labels=y)

    for seed, n in ((1, 40), (2, 40), (3, 40), (4, 24)):
        emb, labels = unit(n, seed=seed).float().to(cuda), (torch.arange(n) // 4).to(cuda)
        for call in (batch, reference_rows):
            results = []
            for loss in (graphed, eager):
                torch.manual_seed(seed)
                results.append(value_and_grad(lambda e, loss=loss, call=call, y=labels: call(loss, e, y), emb))
            (ours, (grad,)), (theirs, (their_grad,)) = results
            assert ours == pytest.approx(theirs, abs=1e-6)
            torch.testing.assert_close(grad, their_grad, rtol=1e-5, atol=1e-7)
    assert 1 <= len(graphed._walker.captured) <= graphed._walker.capacity
