"""The sync-free walk of a batch replayed from a CUDA graph: one launch instead of thousands.

The sync-free walk (:mod:`recallk.losses.chunked_walk`) has shapes fixed by the batch and never waits for the
device, so its whole sequence of kernels, forward and gradient, can be captured once in a CUDA graph
(``torch.cuda.CUDAGraph``) and replayed for every later batch of the same kind: the host's cost per batch
becomes copying the inputs into the graph's buffers and one launch, where the eager walk launches a few dozen
small kernels per block of pairs. What fixes a captured walk (:func:`walk_key`): the shapes of the queries,
the database and their labels, whether they are one tensor, the dtype and device, the kernel's settings, the
batch's largest positive count P, the number of queries with a positive, and which gradients are needed. A
class-balanced sampler gives every full batch the same key; the last, smaller batch of an epoch gets its own.

Memory: a captured walk keeps its working memory (the walk's few ``query_chunk x M`` blocks) reserved in the
graph's private pool between replays, plus a copy of its inputs; :class:`WalkGraphs` keeps the ``capacity``
most recently used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

import torch
from torch import Tensor

from recallk.losses.chunked_walk import ChunkKernel, QuerySide, walk


def walk_key(
    queries: Tensor, database: Tensor, ref_labels: Tensor, side: QuerySide, kernel: ChunkKernel, num_valid: int,
    need_queries: bool, need_database: bool,
) -> Hashable:
    """What a captured walk is valid for (module docstring)."""
    same = queries is database
    return (tuple(queries.shape), None if same else tuple(database.shape), tuple(ref_labels.shape), queries.dtype,
            queries.device, kernel, side.index.max_pos, num_valid, need_queries, need_database)


class CapturedWalk:
    """One walk captured in a CUDA graph, with the buffers it reads its inputs from.

    ``run(inputs)`` is the walk on the static copies of ``inputs`` (a list of tensors); capture first runs it
    once on a side stream (lazy initialisation, e.g. of cuBLAS, must not happen during capture)."""

    def __init__(self, inputs: list[Tensor], run: Callable[[list[Tensor]], tuple[Tensor | None, ...]]) -> None:
        if inputs[0].device.type != "cuda":
            raise ValueError(f"cuda_graph=True replays the sync-free walk on a CUDA device, but this call runs on "
                             f"{inputs[0].device.type}; set cuda_graph=False")
        self.inputs = [t.detach().clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run(self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # e.g. pin-memory threads go on
            self.outputs = run(self.inputs)

    def replay(self, inputs: list[Tensor]) -> tuple[Tensor | None, ...]:
        """The walk on ``inputs`` (shapes as captured): copied in, replayed, outputs copied out (so that a later
        replay does not overwrite what the caller holds)."""
        for static, new in zip(self.inputs, inputs):
            static.copy_(new)
        self.graph.replay()
        return tuple(None if t is None else t.clone() for t in self.outputs)


class Replay(Protocol):
    """What :class:`WalkGraphs` keeps per key: built from the inputs and the walk on their static copies,
    then ``replay(inputs)`` (e.g. :class:`CapturedWalk`)."""

    def replay(self, inputs: list[Tensor]) -> tuple[Tensor | None, ...]: ...


class WalkGraphs:
    """A :class:`~recallk.losses.chunked_walk.Walker` that replays captured walks, capturing a walk the first
    time its :func:`walk_key` is met and keeping the ``capacity`` most recently used.

    Only for the sync-free walk on a CUDA device (anything else is refused with a ValueError); values equal the
    eager walk's (the same kernels run). ``capture`` builds a replay (:class:`CapturedWalk`; a test can give
    one that replays eagerly, to check the bookkeeping where no GPU is)."""

    def __init__(
        self, capacity: int = 2,
        capture: Callable[[list[Tensor], Callable[[list[Tensor]], tuple[Tensor | None, ...]]], Replay] = CapturedWalk,
    ) -> None:
        self.capacity = capacity
        self.capture = capture
        self.captured: OrderedDict[Hashable, Replay] = OrderedDict()

    def __call__(
        self, queries: Tensor, database: Tensor, ref_labels: Tensor, side: QuerySide, kernel: ChunkKernel,
        num_valid: int, need_queries: bool, need_database: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if not kernel.sync_free:
            raise ValueError(f"cuda_graph=True replays the sync-free walk on a CUDA device, but this call has "
                             f"sync_free=False (on {queries.device.type}); set cuda_graph=False or sync_free=None")
        same = queries is database
        inputs = [queries, *([] if same else [database]), ref_labels, *side.tensors()]

        def run(static: list[Tensor]) -> tuple[Tensor | None, ...]:
            q, d = static[0], static[0] if same else static[1]
            labels, *side_tensors = static[1 if same else 2 :]
            return walk(q, d, labels, side.with_tensors(side_tensors), kernel, num_valid, need_queries,
                        need_database)

        key = walk_key(queries, database, ref_labels, side, kernel, num_valid, need_queries, need_database)
        if key in self.captured:
            self.captured.move_to_end(key)
        else:
            self.captured[key] = self.capture(inputs, run)
            while len(self.captured) > self.capacity:
                self.captured.popitem(last=False)
        terms, grad_queries, grad_database = self.captured[key].replay(inputs)
        return terms, grad_queries, grad_queries if same else grad_database
