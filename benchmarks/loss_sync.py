"""Does the loss walk wait for the device? Each loss's walk (:mod:`recallk.losses.chunked_walk`) over one batch,
forward and backward, watched for host synchronisation, both ways of taking the pairs.

The batch's query side (positive index, SiMix's virtual items) is built first, outside the watch: that is the
one read of the batch (its largest positive count). Then the walk alone runs watched:

- on CUDA under ``torch.cuda.set_sync_debug_mode("error")``, which turns every synchronising call (``item``,
  ``nonzero``, ``tolist``, a blocking copy either way) into an error;
- elsewhere on ``meta`` tensors (no data at all: reading a value fails), refusing as well any tensor on the CPU
  and any tensor built from host data (``torch.tensor``), so that a value copied either way is caught too.

The sync-free walk must run through (``none``); the compact walk is expected to read values (its first one is
printed), which shows the watch catches what it is meant to. Exit code 1 when a sync-free walk read a value.

    python benchmarks/loss_sync.py --device cuda           # on a GPU machine
    python benchmarks/loss_sync.py                         # on the CPU: the walk on meta tensors
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from loss_speed import embeddings
from recallk import FastAPLoss, RecallAtKLoss, SimilarityMixup, SmoothAPLoss
from recallk.losses.chunked_walk import embedding_terms
from recallk.losses.recall_at_k import ChunkedRankingLoss

LOSSES: dict[str, Callable[..., ChunkedRankingLoss]] = {
    "rs@k": lambda **kw: RecallAtKLoss(**kw),
    "rs@k_simix": lambda **kw: RecallAtKLoss(mixup=SimilarityMixup(pairs_per_class=None), **kw),
    "smooth_ap": lambda **kw: SmoothAPLoss(**kw),
    "fast_ap": lambda **kw: FastAPLoss(**kw),
}


HOST_READS = {torch.tensor, torch.as_tensor, torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.__float__}  # on a GPU each copies data between host and device


class NoHostData(TorchFunctionMode):
    """Refuses the calls of :data:`HOST_READS` (a tensor built from host data, a value read back)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in HOST_READS:
            raise RuntimeError(f"{getattr(func, '__name__', func)} moves data between the host and the device")
        return func(*args, **(kwargs or {}))


class NoHostTensors(TorchDispatchMode):
    """Refuses every operation with a CPU tensor among its inputs or outputs (run on ``meta`` tensors, a walk
    that copies values to or from the host hits one)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = [*args, *kwargs.values(), *(out if isinstance(out, (tuple, list)) else [out])]
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in flat):
            raise RuntimeError(f"{func} moved data between the host and the device")
        return out


@contextlib.contextmanager
def watched(device: torch.device) -> Iterator[None]:
    """Every host synchronisation inside is an error (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        with NoHostData(), NoHostTensors():
            yield


def batch(n: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_speed.py's N trained-like unit embeddings (4 per class) and their labels, in a shuffled order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n // 4).repeat_interleave(4)
    return embeddings("trained", n, dim)[order].to(device), labels[order].to(device)


def check_walk(loss: ChunkedRankingLoss, emb: torch.Tensor, labels: torch.Tensor, device: torch.device) -> str:
    """``none`` when the walk of ``loss`` over the batch ran forward and backward without reading a value on the
    host, else the first error. ``device``: where the walk runs (``meta`` for a CPU batch)."""
    self_col = torch.arange(len(emb), device=emb.device)
    database, db_labels, db_self, _ = loss._with_virtual_items(emb, labels, emb, labels, self_col)
    kernel = loss._settings(device)
    side = kernel.query_side(db_labels, db_labels, db_self, database.dtype)
    num_valid = loss._num_valid(side.num_pos)
    items = database.detach().to(device).requires_grad_()
    side, db_labels = side.to(device), db_labels.to(device)
    try:
        with watched(device):
            terms = embedding_terms(items, items, db_labels, side, kernel, num_valid)
            terms.backward()
    except Exception as error:  # noqa: BLE001 - the error is the finding
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cuda, or cpu (the walk then runs on meta tensors)")
    parser.add_argument("--n", type=int, default=4096, help="batch size")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--query-chunk", type=int, help="the losses' query_chunk (default: the device's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    walk_device = device if device.type == "cuda" else torch.device("meta")
    emb, labels = batch(args.n, args.dim, device)
    print(f"Host reads inside the loss walk, N = {args.n}, 4 per class, on {walk_device}, "
          f"torch {torch.__version__}\n")
    print("| loss | walk | host reads inside the walk |")
    print("|---|---|---|")
    failed = False
    for name, make in LOSSES.items():
        for walk, sync_free in (("sync_free", True), ("compact", False)):
            torch.manual_seed(0)
            found = check_walk(make(sync_free=sync_free, query_chunk=args.query_chunk), emb, labels, walk_device)
            failed |= sync_free and found != "none"
            print(f"| {name} | {walk} | {found} |", flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
