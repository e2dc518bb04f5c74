"""One rank of the DDP checks in test_distributed.py (run by torchrun with 2 or 3 processes, gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=W tests/ddp_worker.py OUT_DIR

For every scenario in SCENARIOS[W] each rank takes its rows of the same global batch, runs one distributed
multistage step on a DDP-wrapped model and an SGD step, and writes OUT_DIR/<scenario>_rank<r>.pt with the loss,
the gradients and the updated parameters. It also writes OUT_DIR/gather_rank<r>.pt, a check of
all_gather_rows with uneven rows. The test recomputes each scenario in one process with `single_process_step`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from recallk.engine.batchnorm import freeze_batchnorm
from recallk.engine.distributed import all_gather_rows, init_distributed, leave_process_group, wrap_ddp
from recallk.engine.multistage import multistage_backward
from recallk.losses.average_precision import FastAPLoss, SmoothAPLoss
from recallk.losses.recall_at_k import RecallAtKLoss
from recallk.losses.simix import SimilarityMixup

GLOBAL_ROWS = 14
CHUNK_SIZE = 3
LOSS_SEED = 1234
# world size -> scenario name -> (rows held by each rank, loss name). RS@k, Smooth-AP and FastAP are sharded over
# ranks (their sharded_loss); the contrastive loss has no sharded form and runs on rank 0.
SCENARIOS = {
    2: {
        "even_contrastive": ((7, 7), "contrastive"),
        "uneven_contrastive": ((9, 5), "contrastive"),
        "even_rsk_simix": ((7, 7), "rsk_simix"),
        "uneven_rsk": ((9, 5), "rsk"),
        "uneven_rsk_simix": ((10, 4), "rsk_simix"),
        "uneven_smooth_ap_simix": ((9, 5), "smooth_ap_simix"),
        "uneven_fast_ap": ((10, 4), "fast_ap"),
    },
    3: {
        "uneven_rsk": ((6, 3, 5), "rsk"),
        "uneven_rsk_simix": ((2, 7, 5), "rsk_simix"),
    },
}


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over queries of -log softmax probability of the positives (the query left out of its database)."""
    sim = F.normalize(embeddings, dim=1) @ F.normalize(embeddings, dim=1).T / 0.5
    is_self = torch.eye(len(sim), dtype=torch.bool)
    log_prob = sim.masked_fill(is_self, float("-inf")).log_softmax(dim=1)
    positives = (labels[:, None] == labels[None, :]) & ~is_self
    return (-(log_prob.masked_fill(~positives, 0).sum(1)) / positives.sum(1).clamp_min(1)).mean()


def make_loss(name: str):
    """The loss called ``name``; SiMix draws two pairs per class from a generator seeded by LOSS_SEED."""
    if name == "contrastive":
        return contrastive_loss
    mixup = SimilarityMixup(pairs_per_class=2) if name.endswith("_simix") else None
    if mixup is not None:
        mixup.seed(LOSS_SEED)
    if name.startswith("smooth_ap"):
        return SmoothAPLoss(temperature=0.05, mixup=mixup, query_chunk=4)
    if name.startswith("fast_ap"):
        return FastAPLoss(mixup=mixup, query_chunk=4)
    return RecallAtKLoss(k=(1, 2, 4), tau_rank=0.05, mixup=mixup, query_chunk=4)


def make_model() -> nn.Module:
    """A tiny MLP with a frozen BatchNorm whose running statistics are not the identity, in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return freeze_batchnorm(model).train()


class Normalized(nn.Module):
    """L2-normalised embeddings, as the retrieval losses expect."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=1)


def make_global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(GLOBAL_ROWS, 5, generator=generator, dtype=torch.float64)
    labels = torch.randperm(GLOBAL_ROWS, generator=generator) % 4
    return inputs, labels


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def single_process_step(loss_name: str) -> dict[str, object]:
    """The reference: one plain full-batch backward and SGD step in this process."""
    model = Normalized(make_model())
    inputs, labels = make_global_batch()
    torch.manual_seed(LOSS_SEED)
    loss = make_loss(loss_name)(model(inputs), labels)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    make_optimizer(model).step()
    return {"loss": loss.detach(), "grads": grads, "params": [p.detach().clone() for p in model.parameters()]}


def distributed_step(rank: int, rows_per_rank: tuple[int, ...], loss_name: str, context) -> dict[str, object]:
    model = wrap_ddp(Normalized(make_model()), context)
    inputs, labels = make_global_batch()
    start = sum(rows_per_rank[:rank])
    stop = start + rows_per_rank[rank]
    torch.manual_seed(LOSS_SEED)
    loss = multistage_backward(
        model, make_loss(loss_name), inputs[start:stop], labels[start:stop], CHUNK_SIZE, all_gather=True
    )
    grads = [p.grad.clone() for p in model.parameters()]
    make_optimizer(model).step()
    return {"loss": loss, "grads": grads, "params": [p.detach().clone() for p in model.parameters()]}


def check_all_gather_rows(rank: int) -> dict[str, object]:
    """Rank r holds r + 2 rows of value r; gather them (rank order, padding trimmed)."""
    local = torch.full((rank + 2, 3), float(rank), dtype=torch.float64)
    gathered, counts = all_gather_rows(local)
    return {"gathered": gathered, "counts": counts}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    context = init_distributed("gloo")
    if context.world_size not in SCENARIOS:
        raise ValueError(f"run with --nproc_per_node in {sorted(SCENARIOS)}, got world size {context.world_size}")
    for name, (rows_per_rank, loss_name) in SCENARIOS[context.world_size].items():
        result = distributed_step(context.rank, rows_per_rank, loss_name, context)
        torch.save(result, out_dir / f"{name}_rank{context.rank}.pt")
    torch.save(check_all_gather_rows(context.rank), out_dir / f"gather_rank{context.rank}.pt")
    leave_process_group()  # leave together: gloo aborts a rank whose peer hung up first


if __name__ == "__main__":
    main(Path(sys.argv[1]))
