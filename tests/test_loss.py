"""RS@k and SiMix against brute-force loops, gradcheck, parity with the authors' convention, bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance

from recallk import FastAPLoss, RecallAtKLoss, SimilarityMixup, SmoothAPLoss
from recallk.losses import chunked_recall, same_class_pairs

from loss_reference import LargestTensor, clamped_sigmoid, rsk_loop


def unit(n: int, d: int = 6, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def value_and_grad(fn, emb: torch.Tensor) -> tuple[float, torch.Tensor]:
    emb = emb.detach().clone().requires_grad_()
    out = fn(emb)
    out.backward()
    return out.item(), emb.grad


def reference(emb: torch.Tensor, labels: torch.Tensor, **kw) -> torch.Tensor:
    return rsk_loop(emb @ emb.T, labels.tolist(), **kw)


# Unequal class sizes in shuffled order, a singleton class (query without positives) included.
LABELS = torch.tensor([3, 0, 1, 3, 0, 2, 1, 3, 0, 5, 3, 1, 0, 3, 2, 7])


@pytest.mark.parametrize("rank_includes_query", [False, True])
@pytest.mark.parametrize("tau_rank", [0.01, 0.2])
def test_loss_and_gradient_match_loops(rank_includes_query: bool, tau_rank: float) -> None:
    emb = unit(len(LABELS), seed=1)
    loss = RecallAtKLoss(tau_rank=tau_rank, rank_includes_query=rank_includes_query, query_chunk=3)
    ours, grad = value_and_grad(lambda e: loss(e, LABELS), emb)
    ref, ref_grad = value_and_grad(
        lambda e: reference(e, LABELS, tau_rank=tau_rank, rank_includes_query=rank_includes_query), emb
    )
    assert ours == pytest.approx(ref, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_label_order_does_not_matter() -> None:
    emb = unit(len(LABELS), seed=2)
    perm = torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(0))
    loss = RecallAtKLoss()
    assert loss(emb, LABELS).item() == pytest.approx(loss(emb[perm], LABELS[perm]).item(), abs=1e-12)


# The authors' training script defaulted to --k_temperatures 1 2 4 8 16 (tau_k = k) from its release until commit
# ed05202 (2024-11-04), and to 1 for every k after it: recallk must reproduce both vintages.
@pytest.mark.parametrize("tau_k", [1.0, (1.0, 2.0, 4.0, 8.0, 16.0)], ids=["since-2024-11", "until-2024-11"])
def test_parity_with_authors_convention_equal_groups(tau_k) -> None:
    """rank_includes_query=True reproduces the authors' per-query code (contiguous groups, clamped sigmoid), with
    either vintage of their recall temperatures."""
    labels = torch.arange(6).repeat_interleave(4)
    emb = unit(len(labels), seed=3)
    ours = RecallAtKLoss(tau_k=tau_k, rank_includes_query=True)(emb, labels).item()
    theirs = rsk_loop(emb @ emb.T, labels.tolist(), tau_k=tau_k, rank_includes_query=True,
                      sigmoid=clamped_sigmoid).item()
    assert ours == pytest.approx(theirs, abs=1e-12)
    paper = RecallAtKLoss(tau_k=tau_k)(emb, labels).item()
    assert abs(paper - ours) > 1e-4, "the two conventions must differ"


def test_the_two_temperature_vintages_differ() -> None:
    labels = torch.arange(6).repeat_interleave(4)
    emb = unit(len(labels), seed=3)
    one = RecallAtKLoss(tau_k=1.0, rank_includes_query=True)(emb, labels).item()
    per_k = RecallAtKLoss(tau_k=(1, 2, 4, 8, 16), rank_includes_query=True)(emb, labels).item()
    assert abs(one - per_k) > 1e-3


def test_gradcheck_embeddings_and_similarity() -> None:
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    emb = unit(len(labels), d=4, seed=4).requires_grad_()
    loss = RecallAtKLoss(k=(1, 2, 4), tau_rank=0.1, query_chunk=2)
    assert torch.autograd.gradcheck(lambda e: loss(e, labels), (emb,))
    sim = (emb @ emb.T).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: loss.from_similarity(s, labels), (sim,))


def test_reference_rows_with_query_index() -> None:
    """A subset of the batch as queries against the whole batch (one GPU's rows of a global batch)."""
    emb = unit(len(LABELS), seed=5)
    rows = torch.tensor([0, 2, 3, 7, 9, 15])  # includes the singleton class 5 and 7
    loss = RecallAtKLoss()
    ours, grad = value_and_grad(
        lambda e: loss(e[rows], LABELS[rows], ref_emb=e, ref_labels=LABELS, query_index=rows), emb
    )
    ref, ref_grad = value_and_grad(
        lambda e: rsk_loop(e[rows] @ e.T, LABELS[rows].tolist(), LABELS.tolist(), self_index=rows.tolist()), emb
    )
    assert ours == pytest.approx(ref, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    full = loss(emb, LABELS).item()
    every = loss(emb, LABELS, ref_emb=emb, ref_labels=LABELS, query_index=torch.arange(len(LABELS))).item()
    assert every == pytest.approx(full, abs=1e-12)


def test_separate_reference_set_without_query_index() -> None:
    queries, refs = unit(5, seed=6), unit(9, seed=7)
    q_labels, r_labels = torch.tensor([0, 1, 2, 0, 9]), torch.tensor([0, 0, 1, 2, 2, 1, 0, 3, 3])
    ours = RecallAtKLoss()(queries, q_labels, ref_emb=refs, ref_labels=r_labels).item()
    ref = rsk_loop(queries @ refs.T, q_labels.tolist(), r_labels.tolist(), self_index=[-1] * 5).item()
    assert ours == pytest.approx(ref, abs=1e-12)


def test_k_is_clipped_to_database_size() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1])
    emb = unit(5, seed=8)
    assert RecallAtKLoss(k=(1, 16), tau_k=1.0)(emb, labels).item() == pytest.approx(
        RecallAtKLoss(k=(1, 4), tau_k=1.0)(emb, labels).item(), abs=1e-12
    )
    assert RecallAtKLoss(k=(16,), tau_k=1.0, rank_includes_query=True)(emb, labels).item() == pytest.approx(
        RecallAtKLoss(k=(5,), tau_k=1.0, rank_includes_query=True)(emb, labels).item(), abs=1e-12
    )


def test_per_k_temperatures_match_loop() -> None:
    emb = unit(len(LABELS), seed=9)
    ours = RecallAtKLoss(k=(1, 4), tau_k=(0.5, 2.0))(emb, LABELS).item()
    # mean over k of single-k losses with the matching temperature
    one = RecallAtKLoss(k=(1,), tau_k=0.5)(emb, LABELS).item()
    four = RecallAtKLoss(k=(4,), tau_k=2.0)(emb, LABELS).item()
    assert ours == pytest.approx((one + four) / 2, abs=1e-12)


def test_chunking_does_not_change_results() -> None:
    emb = unit(64, d=8, seed=10, dtype=torch.float32)
    labels = torch.randint(0, 12, (64,), generator=torch.Generator().manual_seed(1))
    results = [value_and_grad(lambda e, c=c: RecallAtKLoss(query_chunk=c)(e, labels), emb) for c in (1, 7, 256)]
    for value, grad in results[1:]:
        assert value == pytest.approx(results[0][0], abs=1e-6)
        torch.testing.assert_close(grad, results[0][1])


def sharp_tau_k_batch(noise: float = 0.8, n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """n items of n / 4 classes, shuffled, whose positives rank from the top to far down (more with more noise)."""
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(n // 4).repeat_interleave(4)[torch.randperm(n, generator=g)]
    centers = F.normalize(torch.randn(n // 4, 6, generator=g, dtype=torch.float64), dim=1)
    noisy = centers[labels] + noise * torch.randn(n, 6, generator=g, dtype=torch.float64)
    return F.normalize(noisy, dim=1), labels


@functools.cache
def sharp_tau_k_reference(noise: float, n: int, rank_includes_query: bool) -> tuple[float, torch.Tensor]:
    """The loops' loss and gradient on :func:`sharp_tau_k_batch` (slow: computed once per batch)."""
    emb, labels = sharp_tau_k_batch(noise, n)
    kw = dict(k=(1, 2, 4), tau_k=0.005, rank_includes_query=rank_includes_query)
    return value_and_grad(lambda e: reference(e, labels, **kw), emb)


@pytest.mark.parametrize("query_chunk", [4, 16, 48])
@pytest.mark.parametrize("rank_includes_query", [False, True])
@pytest.mark.parametrize(("noise", "n"), [(0.8, 48), (3.0, 96)])
def test_pairs_without_gradient_are_left_out_exactly(
    query_chunk: int, rank_includes_query: bool, noise: float, n: int
) -> None:
    """A sharp tau_k makes the gradient of every positive ranked past k + 4 underflow even in float64: those
    pairs and all-zero rows of G are skipped (blocks where they are most or few of the pairs; chunks with all,
    some and none of their rows nonzero, gathered over chunks or not), and loss and gradient still equal the
    loops."""
    emb, labels = sharp_tau_k_batch(noise, n)
    kw = dict(k=(1, 2, 4), tau_k=0.005, rank_includes_query=rank_includes_query)
    loss = RecallAtKLoss(query_chunk=query_chunk, **kw)
    ours, grad = value_and_grad(lambda e: loss(e, labels), emb)
    ref, ref_grad = sharp_tau_k_reference(noise, n, rank_includes_query)
    assert ours == pytest.approx(ref, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    # the skipping did happen: some rows of G are all zero, others not
    settings = loss._settings(emb.device)
    side = chunked_recall.query_side(labels, labels, torch.arange(n), settings, emb.dtype)
    _, chunk_grad = chunked_recall._chunk_soft_and_grad(emb @ emb.T / 0.01, side, settings, n, True)
    assert 0 < int(chunk_grad.rows.sum()) < n


@pytest.mark.parametrize("query_chunk", [3, 16])
def test_left_out_pairs_with_reference_rows_and_from_similarity(query_chunk: int) -> None:
    """The same skipping for a subset of queries against the whole batch (separate query and database
    gradients) and for a given similarity matrix."""
    emb, labels = sharp_tau_k_batch()
    rows = torch.arange(0, 48, 2)
    kw = dict(k=(1, 2, 4), tau_k=0.005)
    loss = RecallAtKLoss(query_chunk=query_chunk, **kw)
    ours, grad = value_and_grad(
        lambda e: loss(e[rows], labels[rows], ref_emb=e, ref_labels=labels, query_index=rows), emb
    )
    ref, ref_grad = value_and_grad(
        lambda e: rsk_loop(e[rows] @ e.T, labels[rows].tolist(), labels.tolist(), self_index=rows.tolist(), **kw),
        emb,
    )
    assert ours == pytest.approx(ref, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    sim = emb @ emb.T
    ours, sim_grad = value_and_grad(lambda s: loss.from_similarity(s, labels), sim)
    ref, ref_sim_grad = value_and_grad(lambda s: rsk_loop(s, labels.tolist(), **kw), sim)
    assert ours == pytest.approx(ref, abs=1e-12)
    torch.testing.assert_close(sim_grad, ref_sim_grad, rtol=1e-9, atol=1e-12)
    assert (sim_grad == 0).all(1).any()  # some rows have no gradient at all


def test_perfect_and_reversed_embeddings() -> None:
    """Well separated classes give a loss near 0; the loss is a number in [0, 1]."""
    labels = torch.arange(4).repeat_interleave(3)
    centers = torch.eye(4, dtype=torch.float64)
    emb = F.normalize(centers[labels] + 0.01 * unit(12, d=4, seed=11), dim=1)
    # every positive ranks within the top 2 < k = 4, so a sharp tau_k gives recall 1
    assert RecallAtKLoss(k=(4,), tau_k=0.05)(emb, labels).item() < 1e-6
    worst = F.normalize(centers[(labels + torch.arange(12)) % 4] + 0.01 * unit(12, d=4, seed=11), dim=1)
    assert RecallAtKLoss(k=(1,), tau_k=0.05)(worst, labels).item() > 0.99
    random = RecallAtKLoss()(unit(12, seed=12), labels).item()
    assert RecallAtKLoss()(emb, labels).item() < random < 1.0


def test_large_batch_runs_on_cpu() -> None:
    n = 4000
    emb = F.normalize(torch.randn(n, 64, generator=torch.Generator().manual_seed(0)), dim=1).requires_grad_()
    labels = torch.arange(n // 4).repeat_interleave(4)
    loss = RecallAtKLoss()(emb, labels)
    loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_autocast_inputs_are_computed_in_float32() -> None:
    emb32 = unit(len(LABELS), d=16, seed=13, dtype=torch.float32)
    expected = RecallAtKLoss()(emb32, LABELS)
    emb16 = emb32.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = RecallAtKLoss()(emb16, LABELS)
    out.backward()
    assert out.dtype == torch.bfloat16
    assert emb16.grad.dtype == torch.bfloat16
    assert out.float().item() == pytest.approx(expected.item(), abs=2e-2)


# ---------------------------------------------------------------- SiMix


def test_same_class_pairs_enumerates_every_pair_once() -> None:
    pairs = same_class_pairs(LABELS)
    expected = {(a, b) for a in range(len(LABELS)) for b in range(a + 1, len(LABELS)) if LABELS[a] == LABELS[b]}
    assert {tuple(p) for p in pairs.tolist()} == expected
    assert len(pairs) == len(expected)


def test_pairs_per_class_limits_each_class() -> None:
    mix = SimilarityMixup(pairs_per_class=2)
    pairs = mix.sample_pairs(LABELS, torch.Generator().manual_seed(0))
    assert bool((LABELS[pairs[:, 0]] == LABELS[pairs[:, 1]]).all())
    counts = torch.bincount(LABELS[pairs[:, 0]], minlength=8)
    full = torch.bincount(LABELS[same_class_pairs(LABELS)[:, 0]], minlength=8)
    assert torch.equal(counts, torch.minimum(full, torch.tensor(2)))


def test_simix_equals_materialised_mixed_embeddings() -> None:
    emb = unit(len(LABELS), seed=14)
    pairs = same_class_pairs(LABELS)
    alphas = torch.rand(len(pairs), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sim_ext, labels_ext = SimilarityMixup().mix(emb @ emb.T, LABELS, pairs=pairs, alphas=alphas)
    mixed = alphas[:, None] * emb[pairs[:, 0]] + (1 - alphas[:, None]) * emb[pairs[:, 1]]
    materialised = torch.cat([emb, mixed])
    torch.testing.assert_close(sim_ext, materialised @ materialised.T)
    assert torch.equal(labels_ext, torch.cat([LABELS, LABELS[pairs[:, 0]]]))


def test_loss_with_simix_equals_loss_on_mixed_embeddings() -> None:
    """Virtual items are queries and database items of their class; gradients flow back to the originals."""
    emb = unit(len(LABELS), seed=15)
    torch.manual_seed(123)
    ours, grad = value_and_grad(lambda e: RecallAtKLoss(mixup=SimilarityMixup(pairs_per_class=None))(e, LABELS), emb)
    torch.manual_seed(123)
    pairs = same_class_pairs(LABELS)
    alphas = torch.rand(len(pairs)).double()

    def materialised_loss(e: torch.Tensor) -> torch.Tensor:
        mixed = alphas[:, None] * e[pairs[:, 0]] + (1 - alphas[:, None]) * e[pairs[:, 1]]
        full = torch.cat([e, mixed])
        return rsk_loop(full @ full.T, torch.cat([LABELS, LABELS[pairs[:, 0]]]).tolist())

    ref, ref_grad = value_and_grad(materialised_loss, emb)
    assert ours == pytest.approx(ref, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_simix_rejects_cross_class_pairs_and_wrong_alphas() -> None:
    sim = unit(4, seed=16) @ unit(4, seed=16).T
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="same class"):
        SimilarityMixup().mix(sim, labels, pairs=torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="one alpha per pair"):
        SimilarityMixup().mix(sim, labels, pairs=torch.tensor([[0, 1]]), alphas=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="pairs_per_class"):
        SimilarityMixup(pairs_per_class=0)


@pytest.mark.parametrize("pairs_per_class", [None, 2])
def test_virtual_embeddings_equal_mixed_similarity_matrix(pairs_per_class) -> None:
    """Appending alpha e_a + (1 - alpha) e_b to queries and database equals RS@k on M S M^T (value, gradient)."""
    emb = unit(len(LABELS), seed=18)
    mixup = SimilarityMixup(pairs_per_class)
    mixup.seed(7)
    ours, grad = value_and_grad(lambda e: RecallAtKLoss(mixup=mixup, query_chunk=4)(e, LABELS), emb)
    pairs, alphas = SimilarityMixup(pairs_per_class).draw(LABELS, generator=torch.Generator().manual_seed(7))
    plain = RecallAtKLoss(query_chunk=5)

    def mixed_matrix_loss(e: torch.Tensor) -> torch.Tensor:
        sim_ext, labels_ext = SimilarityMixup().mix(e @ e.T, LABELS, pairs=pairs, alphas=alphas)
        return plain.from_similarity(sim_ext, labels_ext)

    ref, ref_grad = value_and_grad(mixed_matrix_loss, emb)
    assert ours == pytest.approx(ref, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    mixup.seed(7)
    assert RecallAtKLoss(mixup=mixup).from_similarity(emb @ emb.T, LABELS).item() == pytest.approx(ref, abs=1e-12)


def test_simix_with_reference_rows_matches_loop() -> None:
    """Virtual items mixed from the query rows join the queries and the reference database."""
    emb = unit(len(LABELS), seed=19)
    rows = torch.tensor([0, 1, 3, 4, 6, 8, 10, 11, 12, 13])
    mixup = SimilarityMixup()
    mixup.seed(3)
    loss = RecallAtKLoss(mixup=mixup, query_chunk=4)
    ours, grad = value_and_grad(
        lambda e: loss(e[rows], LABELS[rows], ref_emb=e, ref_labels=LABELS, query_index=rows), emb
    )
    pairs, alphas = SimilarityMixup().draw(LABELS[rows], generator=torch.Generator().manual_seed(3))
    alphas = alphas.double()[:, None]

    def materialised(e: torch.Tensor) -> torch.Tensor:
        q = e[rows]
        virtual = alphas * q[pairs[:, 0]] + (1 - alphas) * q[pairs[:, 1]]
        virtual_labels = LABELS[rows][pairs[:, 0]].tolist()
        own = (len(e) + torch.arange(len(virtual))).tolist()
        return rsk_loop(
            torch.cat([q, virtual]) @ torch.cat([e, virtual]).T, LABELS[rows].tolist() + virtual_labels,
            LABELS.tolist() + virtual_labels, self_index=rows.tolist() + own,
        )

    ref, ref_grad = value_and_grad(materialised, emb)
    assert ours == pytest.approx(ref, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("simix", [False, True])
@pytest.mark.parametrize("rank_includes_query", [False, True])
def test_sharded_losses_add_up_to_the_full_batch_loss(simix: bool, rank_includes_query: bool) -> None:
    """Shares of uneven row ranges, normalised by the global valid-query count, sum to the loss and gradient."""
    emb = unit(len(LABELS), seed=20)
    mixup = SimilarityMixup(2) if simix else None
    loss = RecallAtKLoss(mixup=mixup, rank_includes_query=rank_includes_query, query_chunk=3)
    if mixup:
        mixup.seed(11)
    full, full_grad = value_and_grad(lambda e: loss(e, LABELS), emb)
    total, total_grad = 0.0, torch.zeros_like(emb)
    for start, stop in [(0, 7), (7, 9), (9, 16)]:
        if mixup:
            mixup.seed(11)  # every rank sees the same draw
        share, grad = value_and_grad(lambda e, part=slice(start, stop): loss.sharded_loss(e, LABELS, part), emb)
        total, total_grad = total + share, total_grad + grad
    assert total == pytest.approx(full, abs=1e-12)
    torch.testing.assert_close(total_grad, full_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("simix", [False, True])
def test_no_operation_creates_a_queries_by_database_matrix(simix: bool) -> None:
    """With query_chunk = 8 the largest tensor of forward + backward is about 8 x M, never N x M."""
    n, chunk = 128, 8
    emb = unit(n, d=8, seed=21).requires_grad_()
    labels = torch.arange(n) // 4
    loss = RecallAtKLoss(query_chunk=chunk, mixup=SimilarityMixup() if simix else None)
    num_db = n + (n // 4 * 6 if simix else 0)  # 6 virtual items per class of 4
    with LargestTensor() as largest:
        loss(emb, labels).backward()
    assert chunk * num_db <= largest.numel <= 2 * chunk * num_db <= num_db * num_db // 8


def test_default_query_chunk_is_256_on_the_cpu_and_1024_on_a_gpu() -> None:
    """None picks the chunk per device (bigger products pay on a GPU, BENCHMARKS.md); a given chunk is kept."""
    for loss in (RecallAtKLoss(), SmoothAPLoss(), FastAPLoss()):
        assert loss.query_chunk is None
        assert loss.chunk_for(torch.device("cpu")) == 256 and loss.chunk_for(torch.device("cuda", 0)) == 1024
    assert RecallAtKLoss(query_chunk=64).chunk_for(torch.device("cuda")) == 64
    n = 600  # on the CPU the default walks 256 queries at a time: the largest tensor is about 256 x N
    emb = unit(n, d=8, seed=22).requires_grad_()
    with LargestTensor() as largest:
        RecallAtKLoss()(emb, torch.arange(n) // 4).backward()
    assert 256 * n <= largest.numel <= 2 * 256 * n < 1024 * n


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda e, y: (torch.where(torch.arange(8)[:, None] < 2, float("nan"), e), y), "NaN or Inf in 2 of 8 rows"),
        (lambda e, y: (e.clone().index_fill_(0, torch.tensor([5]), float("inf")), y), "NaN or Inf in 1 of 8 rows"),
        (lambda e, y: (e[:, 0], y), r"shape \(N, D\)"),
        (lambda e, y: (e, y[:5]), "5 entries but embeddings has 8 rows"),
        (lambda e, y: (e, y.float()), "integer tensor"),
        (lambda e, y: (e, y[:, None]), "1-D integer tensor"),
        (lambda e, y: (e, y.tolist()), "torch.Tensor"),
        (lambda e, y: (e, torch.arange(8)), "no query in the batch has a positive"),
        (lambda e, y: (e, y, None, e[:, :3], y), "dims"),
        (lambda e, y: (e, y, None, e), "without ref_labels"),
        (lambda e, y: (e, y, None, e, y, torch.arange(8) + 3), "query_index"),
        (lambda e, y: (e, y, None, None, y), "only make sense together with ref_emb"),
        (lambda e, y: (e, y, (torch.arange(2), torch.arange(2), torch.arange(2))), "miners do not apply"),
        (lambda e, y: (e, None), "labels must be a 1-D integer torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_value_error(make_args, message: str) -> None:
    emb = unit(8, seed=17, dtype=torch.float32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    args = make_args(emb, labels)
    query_index = args[5] if len(args) > 5 else None
    with pytest.raises(ValueError, match=message):
        RecallAtKLoss()(*args[:5], query_index=query_index)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tau_rank": 0.0}, "tau_rank must be a positive number"),
        ({"tau_rank": -1}, "tau_rank must be a positive number"),
        ({"tau_k": 0}, "tau_k must be a positive number"),
        ({"tau_k": (1.0, 2.0)}, "tau_k has 2 values for 5 values of k"),
        ({"k": ()}, "k is empty"),
        ({"k": (1, 0)}, "positive integer"),
        ({"mixup": "yes"}, "SimilarityMixup"),
        ({"tau_k": np.float32(-1)}, "tau_k must be a positive number"),
        ({"k": torch.tensor([1, 0])}, "positive integer"),
        ({"distance": LpDistance()}, "takes distance=CosineSimilarity"),
        ({"query_chunk": 0}, "query_chunk must be a positive integer or None"),
    ],
)
def test_bad_settings_are_clear_value_errors(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RecallAtKLoss(**kwargs)


def test_from_similarity_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        RecallAtKLoss().from_similarity(torch.zeros(3, 4), torch.tensor([0, 0, 1]))


def test_k_and_temperatures_take_numpy_and_tensor_scalars() -> None:
    emb, labels = unit(8, seed=18), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    plain = RecallAtKLoss(k=(1, 2), tau_rank=0.05, tau_k=(1.0, 0.5))
    others = [
        RecallAtKLoss(k=np.array([1, 2]), tau_rank=np.float32(0.05), tau_k=np.array([1.0, 0.5])),
        RecallAtKLoss(k=torch.tensor([1, 2]), tau_rank=torch.tensor(0.05), tau_k=torch.tensor([1.0, 0.5])),
        RecallAtKLoss(k=[np.int64(1), torch.tensor(2)], tau_rank=np.float64(0.05), tau_k=[1.0, np.float32(0.5)]),
    ]
    for other in others:
        assert other.k == (1, 2) and all(type(v) is int for v in other.k)
        assert other.tau_k == pytest.approx((1.0, 0.5)) and other.tau_rank == pytest.approx(0.05)
        assert float(other(emb, labels)) == pytest.approx(float(plain(emb, labels)), rel=1e-6)
    assert RecallAtKLoss(k=np.int32(4)).k == (4,) and RecallAtKLoss(tau_k=torch.tensor(2.0)).tau_k == (2.0,) * 5
