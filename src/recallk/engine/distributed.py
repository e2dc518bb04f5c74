"""Multi-process (torchrun + DistributedDataParallel) helpers.

Launch with `torchrun --nproc_per_node=G train.py ...`; torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT, which `init_distributed` reads. Without torchrun (WORLD_SIZE unset or 1) every helper here behaves as
a single process of world size 1, so the same training code runs either way.

The gather helpers return rows in rank order: the global batch is rank 0's rows, then rank 1's, and so on. Ranks
may hold different numbers of rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from recallk.errors import RecallkUsageError

_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its global `rank`, `local_rank` on its node, `world_size`, and `device`.

    `backend` is the process-group backend ("nccl" or "gloo"), or None for a single process without one.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """The device of a single process from ``train.device``: ``auto`` is cuda when available, else cpu; ``cuda``
    needs a GPU. (Under torchrun the device follows the rank: :func:`init_distributed`.)"""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecallkUsageError("train.device is 'cuda' but no CUDA GPU is available; use train.device=cpu")
    return torch.device(name)


def init_distributed(backend: str | None = None) -> DistributedContext:
    """Initialise the default process group from torchrun's environment and return this process's context.

    `backend=None` picks "nccl" when CUDA is available, else "gloo". With nccl the process uses (and selects)
    `cuda:LOCAL_RANK`; with gloo it uses the CPU. Without torchrun's variables (or with WORLD_SIZE=1) no process
    group is created and the context is rank 0 of 1 on `cuda` if available, else `cpu`. Calling it again after
    the group exists returns the context of that group.
    """
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be None, 'nccl' or 'gloo', got {backend!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not dist.is_initialized():
        return DistributedContext(rank=0, local_rank=0, world_size=1, device=resolve_device("auto"), backend=None)
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun "
            "(python -m torch.distributed.run --nproc_per_node=N script.py)"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://")
    backend = dist.get_backend()
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistributedContext(
        rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device, backend=backend
    )


def leave_process_group() -> None:
    """Wait until every rank is here, then destroy the default process group (a no-op without one).

    The end of a run: rank 0 evaluates the test split alone, and a rank that exits while its group is busy can be
    aborted by gloo ("terminate called without an active exception"), which fails the torchrun job. A gloo
    ``barrier()`` as the last collective (as before) leaves two windows, wider under heavy load: a rank returns from
    it when its own part is done, while the last message may still be on its way to a slower peer; and the group's
    worker thread releases the finished barrier (which holds the earlier collectives' tensors, freeing them needs
    the interpreter) only after the rank has gone on, towards the interpreter's shutdown (the group outlives
    ``destroy_process_group`` once DDP used it: its threads stay until exit). So the ranks meet in the process
    group's store instead, with no collective: each adds itself to a count, the last one sets a key every rank
    waits for. A rank arrives only after its collectives have completed, so when all have arrived no message is in
    flight, and the last collective finished a store round trip earlier.
    """
    global _leaves
    if not (dist.is_available() and dist.is_initialized()):
        return
    store = dist.distributed_c10d._get_default_store()
    _leaves += 1
    count, everyone = f"recallk/leave/{_leaves}", f"recallk/leave/{_leaves}/everyone"
    if store.add(count, 1) == dist.get_world_size():
        store.set(everyone, "1")
    store.wait([everyone])
    dist.destroy_process_group()


_leaves = 0  # leave_process_group calls of this process: every rank makes the same ones, so the keys match


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def wrap_ddp(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Wrap `model` (already on `context.device`) in DistributedDataParallel; return it unchanged for 1 process.

    `broadcast_buffers=False`: frozen BatchNorm buffers never change, and skipping the per-forward buffer
    broadcast lets ranks run different numbers of chunked forward passes (uneven local batches).
    """
    if context.world_size == 1:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def all_gather_rows(tensor: Tensor) -> tuple[Tensor, list[int]]:
    """Concatenate `tensor` (n_r, ...) from every rank along dim 0, in rank order; no autograd.

    Returns the gathered tensor (sum_r n_r, ...) and the list of row counts n_r. Ranks may hold different n_r
    (rows are padded to the largest count for the collective and trimmed after). With one process returns
    `(tensor.detach(), [n])`. With nccl the tensor must be on this rank's CUDA device.
    """
    tensor = tensor.detach()
    if not is_distributed():
        return tensor, [tensor.shape[0]]
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    row_counts = [int(c.item()) for c in counts]
    padded = tensor.new_zeros((max(row_counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in row_counts]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([rows[:n] for rows, n in zip(gathered, row_counts)]), row_counts
