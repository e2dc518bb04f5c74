"""RS@k with pytorch-metric-learning's real classes: the issue's table row by row, a real two-process
DistributedLossWrapper run (torchrun, gloo), and the pytorch-metric-learning example of docs/guide/migrating.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners, reducers, regularizers
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

import pml_ddp_worker
from recallk import RecallAtKLoss
from recallk.losses import CrossBatchRecallAtK

from docs_blocks import DOCS, python_block
from run_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
LABELS = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 0, 2])


def raw_embeddings(seed: int = 0) -> torch.Tensor:
    """Unnormalised embeddings, as a PML user's model would output them."""
    return 3 * torch.randn(len(LABELS), 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_it_is_a_pml_loss_with_pmls_forward_signature() -> None:
    loss = RecallAtKLoss()
    assert isinstance(loss, BaseMetricLossFunction)
    emb = F.normalize(raw_embeddings(), dim=1)
    plain = loss(emb, LABELS)
    # positional arguments in PML's order: embeddings, labels, indices_tuple, ref_emb, ref_labels
    assert float(loss(emb, LABELS, None, emb, LABELS, query_index=torch.arange(12))) == pytest.approx(float(plain))
    assert float(loss(emb, LABELS, None, None, None)) == float(plain)


@pytest.mark.parametrize(
    "call",
    [
        lambda loss, emb: loss(emb, LABELS, miners.MultiSimilarityMiner()(emb, LABELS)),  # miner, by position
        lambda loss, emb: loss(emb, LABELS, indices_tuple=miners.TripletMarginMiner()(emb, LABELS)),
        lambda loss, emb: loss(emb, LABELS, miners.PairMarginMiner()(emb, LABELS)),
    ],
)
def test_a_miners_indices_tuple_is_one_clear_error(call) -> None:
    emb = F.normalize(raw_embeddings(), dim=1)
    with pytest.raises(ValueError, match="RS@k ranks every pair of the batch, so miners do not apply"):
        call(RecallAtKLoss(), emb)


def test_distributed_loss_wrapper_accepts_it_and_is_the_loss_in_one_process() -> None:
    emb = F.normalize(raw_embeddings(), dim=1)
    wrapped = DistributedLossWrapper(RecallAtKLoss())
    with pytest.warns(UserWarning, match="non-distributed"):
        value = wrapped(emb, LABELS)
    assert float(value) == float(RecallAtKLoss()(emb, LABELS))


def test_pmls_cross_batch_memory_refuses_it_and_recallks_memory_is_the_replacement() -> None:
    with pytest.raises(Exception, match="CrossBatchMemory not supported for RecallAtKLoss"):
        losses.CrossBatchMemory(RecallAtKLoss(), embedding_size=6)
    memory_loss = CrossBatchRecallAtK(RecallAtKLoss(distance=CosineSimilarity()), embedding_size=6, memory_size=24)
    first = memory_loss(raw_embeddings(1).float(), LABELS)
    assert float(first) == pytest.approx(float(RecallAtKLoss(distance=CosineSimilarity())(raw_embeddings(1), LABELS)))
    assert memory_loss.filled == 12 and torch.isfinite(memory_loss(raw_embeddings(2).float(), LABELS))


def test_cosine_distance_normalises_and_dot_product_is_the_default() -> None:
    emb = raw_embeddings()
    normalised = F.normalize(emb, dim=1)
    cosine = RecallAtKLoss(distance=CosineSimilarity())
    assert float(cosine(emb, LABELS)) == pytest.approx(float(RecallAtKLoss()(normalised, LABELS)), abs=1e-12)
    refs, ref_labels = raw_embeddings(5)[:7], LABELS[:7]
    assert float(cosine(emb, LABELS, ref_emb=refs, ref_labels=ref_labels)) == pytest.approx(
        float(RecallAtKLoss()(normalised, LABELS, ref_emb=F.normalize(refs, dim=1), ref_labels=ref_labels)), abs=1e-12
    )
    assert isinstance(RecallAtKLoss().distance, DotProductSimilarity)
    assert not RecallAtKLoss().distance.normalize_embeddings  # recallk's models output unit vectors already
    normalising_dot = RecallAtKLoss(distance=DotProductSimilarity())  # PML's default normalize_embeddings=True
    assert float(normalising_dot(emb, LABELS)) == pytest.approx(float(cosine(emb, LABELS)))
    with pytest.raises(ValueError, match="takes distance=CosineSimilarity"):
        RecallAtKLoss(distance=LpDistance())
    with pytest.raises(ValueError, match="power 1"):
        RecallAtKLoss(distance=CosineSimilarity(power=2))


def test_reducers_regularisers_and_multiple_losses() -> None:
    emb = raw_embeddings().requires_grad_(True)
    cosine = RecallAtKLoss(distance=CosineSimilarity())
    base = float(cosine(emb, LABELS).detach())
    for reducer in (reducers.MeanReducer(), reducers.AvgNonZeroReducer(), reducers.SumReducer()):
        # RS@k is one value for the batch (PML's "already_reduced"): every reducer passes it through
        assert float(RecallAtKLoss(distance=CosineSimilarity(), reducer=reducer)(emb, LABELS)) == base
    regularised = RecallAtKLoss(distance=CosineSimilarity(), embedding_regularizer=regularizers.LpRegularizer(),
                                embedding_reg_weight=0.1)
    expected_reg = 0.1 * emb.norm(dim=1).mean()
    assert float(regularised(emb, LABELS)) == pytest.approx(base + float(expected_reg), rel=1e-9)

    contrastive = losses.ContrastiveLoss()
    combined = losses.MultipleLosses([cosine, contrastive], weights=[1.0, 0.5])
    value = combined(emb, LABELS)
    assert float(value) == pytest.approx(base + 0.5 * float(contrastive(emb, LABELS)), rel=1e-12)
    value.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    with_miner = losses.MultipleLosses([cosine, contrastive], miners=[None, miners.MultiSimilarityMiner()])
    assert torch.isfinite(with_miner(emb, LABELS))  # the miner feeds the contrastive loss only


@pytest.fixture(scope="module")
def pml_worker_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("pml_ddp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(Path(__file__).with_name("pml_ddp_worker.py")),
        str(out_dir),
    ]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return out_dir


def test_distributed_loss_wrapper_under_two_gloo_processes_gives_the_global_batch_gradient(
    pml_worker_outputs: Path,
) -> None:
    expected = pml_ddp_worker.single_process_gradient()
    for rank in (0, 1):
        result = torch.load(pml_worker_outputs / f"pml_rank{rank}.pt")
        for name in ("pml", "own"):  # PML's wrapper and recallk's own distributed multistage step
            assert float(result[f"{name}_loss"]) == pytest.approx(float(expected["loss"]), rel=1e-12)
            for actual, reference in zip(result[f"{name}_grads"], expected["grads"], strict=True):
                torch.testing.assert_close(actual, reference, rtol=1e-9, atol=1e-12)
        assert "miners do not apply" in result["efficient_error"] and "efficient=False" in result["efficient_error"]


def test_the_docs_pml_example_runs_as_written(tmp_path: Path) -> None:
    code = python_block(DOCS / "guide" / "migrating.md", "## From pytorch-metric-learning")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss" in result.stdout
