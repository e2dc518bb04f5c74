"""Smooth-AP and FastAP on the chunked kernel: brute-force loops, PML, SiMix, shards, multistage and training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from recallk import FastAPLoss, SimilarityMixup, SmoothAPLoss
from recallk.engine.multistage import multistage_backward
from recallk.losses.factory import build_loss
from recallk.training.trainer import train

from ap_reference import fast_ap_loop, smooth_ap_loop
from data_fixtures import make_glyph_folder
from loss_reference import LargestTensor
from run_fixtures import tiny_config

# Unequal class sizes in shuffled order, singleton classes (queries without positives) included.
LABELS = torch.tensor([3, 0, 1, 3, 0, 2, 1, 3, 0, 5, 3, 1, 0, 3, 2, 7])
LOSSES = {
    "smooth_ap": (lambda **kw: SmoothAPLoss(temperature=0.05, **kw), lambda s, y, **kw: smooth_ap_loop(
        s, y, temperature=0.05, **kw)),
    "fast_ap": (lambda **kw: FastAPLoss(num_bins=10, **kw), lambda s, y, **kw: fast_ap_loop(s, y, num_bins=10, **kw)),
}


def unit(n: int, d: int = 6, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def value_and_grad(fn, emb: torch.Tensor) -> tuple[float, torch.Tensor]:
    emb = emb.detach().clone().requires_grad_()
    out = fn(emb)
    out.backward()
    return out.item(), emb.grad


def assert_same(ours: tuple[float, torch.Tensor], ref: tuple[float, torch.Tensor]) -> None:
    assert ours[0] == pytest.approx(ref[0], abs=1e-12)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[float, torch.Tensor]]:
    """The loops' value and gradient of each loss on ``unit(16, seed=1)`` with LABELS (computed once)."""
    emb = unit(len(LABELS), seed=1)
    return {name: value_and_grad(lambda e, ref=ref: ref(e @ e.T, LABELS.tolist()), emb)
            for name, (_, ref) in LOSSES.items()}


@pytest.mark.parametrize("query_chunk", [1, 7, 256])
@pytest.mark.parametrize("name", list(LOSSES))
def test_value_and_gradient_match_the_loops(name: str, query_chunk: int, reference) -> None:
    make, _ = LOSSES[name]
    ours = value_and_grad(lambda e: make(query_chunk=query_chunk)(e, LABELS), unit(len(LABELS), seed=1))
    assert_same(ours, reference[name])


@pytest.mark.parametrize("name", list(LOSSES))
def test_cosine_distance_normalises_first_and_order_does_not_matter(name: str, reference) -> None:
    make, _ = LOSSES[name]
    emb = unit(len(LABELS), seed=1)
    scaled = emb * torch.linspace(0.5, 3.0, len(emb), dtype=emb.dtype)[:, None]
    value, grad = value_and_grad(lambda e: make(distance=CosineSimilarity())(e, LABELS), scaled)
    assert value == pytest.approx(reference[name][0], abs=1e-12)
    assert float((grad * scaled).sum(1).abs().max()) < 1e-12  # scale-invariant: no gradient along the rows
    perm = torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(2))
    assert make()(emb[perm], LABELS[perm]).item() == pytest.approx(reference[name][0], abs=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck_embeddings_and_similarity(name: str) -> None:
    make, _ = LOSSES[name]
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    emb = unit(6, d=3, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda e: make(query_chunk=3)(e, labels), (emb,), fast_mode=True)
    sim = (emb @ emb.T).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: make(query_chunk=2).from_similarity((s + s.T) / 2, labels), (sim,),
                                    fast_mode=True)


@pytest.mark.parametrize("name", list(LOSSES))
def test_reference_rows_with_and_without_query_index(name: str) -> None:
    make, ref = LOSSES[name]
    queries, database = unit(6, seed=4), unit(11, seed=5)
    labels, ref_labels = torch.tensor([1, 0, 2, 1, 9, 0]), torch.tensor([0, 1, 1, 2, 0, 3, 1, 2, 0, 4, 1])
    query_index = torch.tensor([1, 4, 3, 2, 9, 0])
    ref_labels_q = ref_labels.clone()
    ref_labels_q[query_index] = labels  # a query's own column holds its label
    for index, db_labels in ((None, ref_labels), (query_index, ref_labels_q)):
        expected = ref(queries @ database.T, labels.tolist(), ref_labels=db_labels.tolist(),
                       self_index=None if index is None else index.tolist())
        got = make(query_chunk=4)(queries, labels, None, database, db_labels, query_index=index)
        assert got.item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_simix_equals_the_loop_on_the_materialised_mixed_batch(name: str) -> None:
    make, ref = LOSSES[name]
    emb = unit(len(LABELS), seed=6)
    torch.manual_seed(123)
    mixup = SimilarityMixup(1)
    ours = value_and_grad(lambda e: make(mixup=mixup, query_chunk=5)(e, LABELS), emb)
    torch.manual_seed(123)
    pairs, alphas = mixup.draw(LABELS)
    alphas = alphas.double()

    def materialised(e: torch.Tensor) -> torch.Tensor:
        full = torch.cat([e, alphas[:, None] * e[pairs[:, 0]] + (1 - alphas[:, None]) * e[pairs[:, 1]]])
        return ref(full @ full.T, torch.cat([LABELS, LABELS[pairs[:, 0]]]).tolist())

    assert_same(ours, value_and_grad(materialised, emb))


@pytest.mark.parametrize("simix", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_sharded_losses_add_up_to_the_full_batch_loss(name: str, simix: bool) -> None:
    emb = unit(len(LABELS), seed=7)
    mixup = SimilarityMixup(2) if simix else None
    loss = LOSSES[name][0](mixup=mixup, query_chunk=3)
    if mixup:
        mixup.seed(11)
    full, full_grad = value_and_grad(lambda e: loss(e, LABELS), emb)
    total, total_grad = 0.0, torch.zeros_like(emb)
    for start, stop in [(0, 7), (7, 9), (9, 16)]:
        if mixup:
            mixup.seed(11)
        share, grad = value_and_grad(lambda e, part=slice(start, stop): loss.sharded_loss(e, LABELS, part), emb)
        total, total_grad = total + share, total_grad + grad
    assert total == pytest.approx(full, abs=1e-12)
    torch.testing.assert_close(total_grad, full_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_multistage_backward_equals_a_plain_backward(name: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6)).double()
    inputs = torch.randn(len(LABELS), 5, dtype=torch.float64)
    loss_fn = LOSSES[name][0](query_chunk=4)
    embed = lambda x: F.normalize(model(x), dim=1)  # noqa: E731
    expected = loss_fn(embed(inputs), LABELS)
    expected.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    normalised = torch.nn.Sequential(model, Normalize())
    loss = multistage_backward(normalised, loss_fn, inputs, LABELS, 5)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    for got, want in zip((p.grad for p in model.parameters()), plain):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


class Normalize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


def test_fast_ap_equals_pml_fast_ap_on_unit_vectors() -> None:
    """Value and gradient of PML 2.9's FastAPLoss (its squared L2 distance of unit vectors is d = 2 - 2 s)."""
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 5, 5, 1])
    emb = unit(len(labels), d=5, seed=8)
    for num_bins in (10, 3):
        ours = value_and_grad(lambda e, b=num_bins: FastAPLoss(num_bins=b)(F.normalize(e, dim=1), labels), emb)
        pml = value_and_grad(lambda e, b=num_bins: pml_losses.FastAPLoss(num_bins=b)(e, labels), emb)
        assert ours[0] == pytest.approx(pml[0], abs=1e-12)
        torch.testing.assert_close(ours[1], pml[1], rtol=1e-8, atol=1e-12)


def test_pml_smooth_ap_groups_classes_wrongly_and_recallk_follows_the_formula() -> None:
    """PML 2.9's SmoothAPLoss reshapes the batch into ``batch_size // number_of_unique_labels`` groups, i.e. as many
    groups as samples per class: with 8 classes of 4 it scores 4 "classes" of 8 items. On well-separated classes
    (true Smooth-AP about 1) it reports a large loss; recallk's equals the brute-force loop."""
    labels = torch.arange(8).repeat_interleave(4)
    gen = torch.Generator().manual_seed(9)
    centres = torch.eye(8, 16, dtype=torch.float64).repeat_interleave(4, 0)
    emb = F.normalize(centres + 0.1 * torch.randn(32, 16, generator=gen, dtype=torch.float64), dim=1)
    direct = smooth_ap_loop(emb @ emb.T, labels.tolist(), temperature=0.01).item()
    ours = SmoothAPLoss(temperature=0.01)(emb, labels).item()
    pml = pml_losses.SmoothAPLoss(temperature=0.01)(emb, labels).item()
    assert ours == pytest.approx(direct, abs=1e-12)
    assert direct < 0.01 and pml > 0.2


@pytest.mark.parametrize("name", list(LOSSES))
def test_no_operation_creates_a_queries_by_database_matrix(name: str) -> None:
    n, chunk = 64, 4
    emb = unit(n, d=8, seed=21).requires_grad_()
    labels = torch.arange(n) // 4
    with LargestTensor() as largest:
        LOSSES[name][0](query_chunk=chunk)(emb, labels).backward()
    assert chunk * n <= largest.numel <= 2 * chunk * n <= n * n // 8


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda e, y: (torch.where(torch.arange(8)[:, None] < 2, float("nan"), e), y), "NaN or Inf in 2 of 8 rows"),
        (lambda e, y: (e, y[:5]), "5 entries but embeddings has 8 rows"),
        (lambda e, y: (e, y.float()), "integer tensor"),
        (lambda e, y: (e, torch.arange(8)), "no query in the batch has a positive"),
        (lambda e, y: (e, y, None, e[:, :3], y), "dims"),
        (lambda e, y: (e, y, None, e, y, torch.arange(8) + 3), "query_index"),
        (lambda e, y: (e, y, (torch.arange(2), torch.arange(2), torch.arange(2))), "ranks every pair"),
    ],
)
def test_bad_input_is_a_clear_value_error(name: str, make_args, message: str) -> None:
    args = make_args(unit(8, seed=17, dtype=torch.float32), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    with pytest.raises(ValueError, match=message):
        LOSSES[name][0]()(*args[:5], query_index=args[5] if len(args) > 5 else None)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SmoothAPLoss(temperature=0), "temperature must be a positive number"),
        (lambda: FastAPLoss(num_bins=0), "num_bins must be a positive integer"),
        (lambda: FastAPLoss(num_bins=2.5), "num_bins must be a positive integer"),
        (lambda: SmoothAPLoss(query_chunk=0), "query_chunk must be a positive integer or None"),
        (lambda: FastAPLoss(mixup="yes"), "SimilarityMixup"),
        (lambda: build_loss("fastap", simix=True), "SiMix works with recallk's losses"),
        (lambda: SmoothAPLoss(distance=LpDistance()), "^SmoothAPLoss ranks by similarity"),
        (lambda: FastAPLoss(distance=LpDistance()), "^FastAPLoss ranks by similarity"),
    ],
)
def test_bad_settings_are_clear_value_errors(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_the_factory_builds_recallk_losses_with_simix() -> None:
    smooth = build_loss("smooth_ap", simix=True, params={"temperature": 0.02})
    fast = build_loss("fast_ap", params={"num_bins": 5})
    assert isinstance(smooth, SmoothAPLoss) and smooth.temperature == 0.02 and smooth.mixup is not None
    assert isinstance(fast, FastAPLoss) and fast.num_bins == 5 and fast.mixup is None


@pytest.mark.parametrize("name", list(LOSSES))
def test_training_runs_with_the_loss(tmp_path: Path, name: str) -> None:
    """Two chunked steps (chunks of 6 through the multistage engine) with SiMix, then evaluation."""
    data_dir = make_glyph_folder(tmp_path / "glyphs")
    config = tiny_config(tmp_path, loss__name=name, loss__simix=True, train__epochs=1, train__max_steps=2,
                         output__plots=False, output__export_embeddings=False)
    summary = train(config, tmp_path / "run", data_dir=data_dir, progress=False)
    assert 0.0 <= summary["recall@1"] <= 1.0
