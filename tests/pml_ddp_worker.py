"""One rank of the two-process pytorch-metric-learning check in test_pml.py (torchrun, gloo backend, CPU).

    python -m torch.distributed.run --nproc_per_node=2 tests/pml_ddp_worker.py OUT_DIR

Each rank takes its 7 rows of the same 14-row global batch (PML's all_gather needs equal rows per rank) and
computes RS@k (cosine distance) through PML's ``DistributedLossWrapper`` on a DDP-wrapped model, then through
recallk's own distributed multistage step. It writes OUT_DIR/pml_rank<r>.pt with both losses and the
DDP-averaged parameter gradients, and the message of ``DistributedLossWrapper(..., efficient=True)``.
The test recomputes the full-batch gradient in one process with :func:`single_process_gradient`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from recallk.engine.distributed import init_distributed, leave_process_group, wrap_ddp
from recallk.engine.multistage import multistage_backward
from recallk.losses.recall_at_k import RecallAtKLoss

from ddp_worker import make_global_batch, make_model

ROWS_PER_RANK = 7


def make_loss() -> RecallAtKLoss:
    return RecallAtKLoss(k=(1, 2, 4), tau_rank=0.05, distance=CosineSimilarity())


def single_process_gradient() -> dict[str, object]:
    """The reference: RS@k of the whole global batch in one process, one plain backward."""
    model = make_model()
    inputs, labels = make_global_batch()
    loss = make_loss()(model(inputs), labels)
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.parameters()]}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    context = init_distributed("gloo")
    rows = slice(context.rank * ROWS_PER_RANK, (context.rank + 1) * ROWS_PER_RANK)
    inputs, labels = make_global_batch()
    model = wrap_ddp(make_model(), context)

    wrapped = DistributedLossWrapper(make_loss())
    pml_loss = wrapped(model(inputs[rows]), labels[rows])  # the global-batch loss times the world size
    pml_loss.backward()
    pml_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    own_loss = multistage_backward(model, make_loss(), inputs[rows], labels[rows], 3, all_gather=True)
    own_grads = [p.grad.clone() for p in model.parameters()]

    try:
        DistributedLossWrapper(make_loss(), efficient=True)(model(inputs[rows]), labels[rows])
        efficient_error = ""
    except ValueError as err:
        efficient_error = str(err)
    result = {"pml_loss": pml_loss.detach() / context.world_size, "pml_grads": pml_grads, "own_loss": own_loss,
              "own_grads": own_grads, "efficient_error": efficient_error}
    torch.save(result, out_dir / f"pml_rank{context.rank}.pt")
    leave_process_group()  # leave together: gloo aborts a rank whose peer hung up first


if __name__ == "__main__":
    main(Path(sys.argv[1]))
