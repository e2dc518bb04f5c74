"""Multistage backward: the exact gradient of a loss over a batch far larger than fits in memory.

The paper trains with batches of 4000 images on one GPU. A batch-level loss L(E, y) over the embeddings
E = f(X) (N, D) cannot be split into per-chunk losses, but its gradient can be split by the chain rule:

    dL/dtheta = sum_c (d e_c / d theta)^T G_c,   G = dL/dE (N, D),  e_c = f(x_c) (the rows of chunk c)

so three stages give the full-batch gradient while holding one chunk's activations at a time:

1. embed the chunks under `torch.no_grad()` (saving the RNG state before each chunk) -> E (N, D);
2. compute L on a detached copy of E and G = dL/dE;
3. for each chunk: restore its RNG state, re-embed it with autograd and backpropagate G_c.

The stages are public for callers whose own backward pass must trigger stage 3 (the sentence-transformers
loss in :mod:`recallk.integrations.sentence_transformers`): :func:`embed_without_graph` is stage 1,
:func:`loss_and_embedding_grad` stage 2 and :func:`backward_through_chunks` stage 3.

Stage 3 replays stage 1 exactly when the model's randomness (dropout, augmentations inside `forward`) comes from
torch's default CPU/CUDA generators and BatchNorm is frozen (`freeze_batchnorm`); `verify_replay=True` checks it.
Peak memory is one chunk's activations plus E, G and the loss's own memory (O(query_chunk x N) for RS@k),
independent of N
for the model. Compute is one extra forward pass: about 4/3 of a plain step if backward costs two forwards.

Precision: `autocast_dtype` (e.g. `torch.bfloat16`) runs the model's forward passes under `torch.autocast`;
with `autocast_dtype=None` they run in whatever autocast state the caller is in. The loss always runs with
autocast disabled, on embeddings upcast to at least float32. With a `GradScaler` (float16) the embedding
gradient is multiplied by the scale, exactly as `scaler.scale(loss).backward()` would; afterwards call
`scaler.step(optimizer)` and `scaler.update()` as usual. Trainable parameters of the loss itself (if any)
receive their gradient in stage 2, as with a plain backward.

Multiple processes (torchrun + DistributedDataParallel, `all_gather=True`): every rank embeds its own rows; the
embeddings and labels are gathered (rank order) into the global batch E (N_global, D). A loss with a
`sharded_loss(E, labels, rows)` method (RS@k) is sharded: each rank computes the loss terms of its own queries
`rows` against the whole global batch, normalised by the global number of valid queries, and its gradient with
respect to all of E; the shares and the gradients are summed over ranks (all-reduce), giving the global loss and
G = dL/dE, with no rank doing more than its share of the work. A loss with randomness must draw the same on every
rank (RS@k's SiMix: seed it with run seed + step, `SimilarityMixup.seed`). Any other loss is computed on rank 0
over the whole global batch and its value and G broadcast. Either way each rank backpropagates its own rows of G
times world_size; DDP averages gradients over world_size ranks, so the result equals the single-process gradient
on the global batch:
    (1 / W) * sum_r W * (d e_r / d theta)^T G_r = dL/dtheta.
Only rank 0's `loss_kwargs` are used by an unsharded loss, and trainable parameters of such a loss get a gradient
on rank 0 only: give such a loss to DDP or broadcast its gradients yourself. With a GradScaler, every rank scales
by its own scale; scalers stay equal across ranks because they see the same all-reduced gradients. Chunks other
than the last run under DDP's `no_sync()`, so gradients are all-reduced once per step.
Ranks may hold different numbers of rows if DDP was built with `broadcast_buffers=False` (as `wrap_ddp` does);
with DDP's default every forward pass broadcasts buffers, so every rank must run as many chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import get_device_states, set_device_states

from recallk.engine.batchnorm import batchnorm_layers_in_training_mode
from recallk.engine.distributed import all_gather_rows, get_rank, get_world_size
from recallk.losses.input_checks import check_labels

Inputs = Tensor | Mapping[str, Tensor]  # images (B, C, H, W), or token tensors (B, L) by name
LossFn = Callable[..., Tensor]

_REPLAY_TOLERANCE = 1e-2  # max |stage-3 - stage-1| allowed, relative to max |stage-1| of the chunk


class _RngState:
    """The default CPU generator's state and those of the accelerators in use, captured with torch's
    ``get_device_states`` and replayed inside ``torch.random.fork_rng`` (the GradCache ``RandContext`` pattern):
    a replay leaves the generators as it found them."""

    def __init__(self, cuda_devices: list[torch.device]) -> None:
        self.cpu = torch.get_rng_state()
        self.devices, self.states = get_device_states(*(torch.empty(0, device=d) for d in cuda_devices))

    @contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            set_device_states(self.devices, self.states)
            yield


def multistage_backward(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    labels: Tensor,
    chunk_size: int,
    *,
    loss_kwargs: Mapping[str, Any] | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    all_gather: bool = False,
    verify_replay: bool = False,
) -> Tensor:
    """Accumulate into `model`'s `.grad` the gradient of `loss_fn(model(inputs), labels)`, embedding in chunks.

    Args:
        model: maps a chunk of inputs to embeddings (n, D); may be DistributedDataParallel and/or `torch.compile`d.
            Its BatchNorm layers must be frozen (`freeze_batchnorm`).
        loss_fn: `loss_fn(embeddings (N, D), labels (N,), **loss_kwargs) -> scalar`.
        inputs: a tensor (N, ...) or a dict of tensors with N rows each; each chunk (rows sliced along dim 0,
            memory format such as channels_last kept) is passed to `model` as its one argument.
        labels: (N,) class labels of the rows.
        chunk_size: rows per forward pass; need not divide N.
        loss_kwargs: extra keyword arguments for `loss_fn`.
        autocast_dtype: run the forward passes under `torch.autocast(device, autocast_dtype)`.
        scaler: a float16 `torch.amp.GradScaler`; the loss is scaled by its current scale before backward.
        all_gather: with several processes, compute the loss over the global batch gathered from all ranks (see
            the module docstring); with one process it changes nothing.
        verify_replay: check that each re-embedded chunk matches its first embedding (raises RuntimeError if
            not: the model uses randomness this function cannot replay).

    Returns:
        The loss value, detached (the same on every rank with `all_gather=True`).

    Gradients are added to existing `.grad` like `loss.backward()`. Afterwards the RNG state is what embedding
    the chunks once and computing the loss leaves it at (the replay in stage 3 does not advance it).
    """
    labels = labels.detach()
    _check_inputs(inputs, labels, chunk_size)
    offending = batchnorm_layers_in_training_mode(model)
    if offending:
        raise ValueError(
            f"BatchNorm layers in training mode ({', '.join(offending[:3])}{', ...' if len(offending) > 3 else ''}): "
            "chunked forward passes would use per-chunk statistics and update the running statistics twice; "
            "call recallk.engine.freeze_batchnorm(model) first"
        )
    first = embed_without_graph(model, inputs, chunk_size, autocast_dtype, keep_chunks=verify_replay)
    labels = labels.to(first.embeddings.device)

    loss, grad = loss_and_embedding_grad(
        loss_fn, first.embeddings, labels, all_gather=all_gather, loss_kwargs=loss_kwargs, scaler=scaler
    )
    first.embeddings = first.embeddings[:0]  # free (N, D) before stage 3

    backward_through_chunks(model, inputs, first, grad, verify_replay=verify_replay)
    return loss


def loss_and_embedding_grad(
    loss_fn: LossFn,
    embeddings: Tensor,
    labels: Tensor,
    *,
    all_gather: bool = False,
    loss_kwargs: Mapping[str, Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[Tensor, Tensor]:
    """Stage 2: the detached loss and the gradient to backpropagate into this rank's rows ``embeddings`` (n, D).

    With one process (or ``all_gather=False``): ``loss_fn(embeddings, labels)`` and ``s dL/dE``, s the scaler's
    scale. With several processes and ``all_gather=True``: the loss of the global batch (sharded over ranks when
    ``loss_fn`` has ``sharded_loss``, else on rank 0; see the module docstring) and this rank's rows of its
    gradient times world_size, ready for DDP's averaging.
    """
    if not (all_gather and get_world_size() > 1):
        return _loss_and_embedding_grad(loss_fn, embeddings, labels, loss_kwargs, scaler)
    global_embeddings, row_counts = all_gather_rows(embeddings)
    global_labels, _ = all_gather_rows(labels)
    offset = sum(row_counts[: get_rank()])
    rows = slice(offset, offset + embeddings.shape[0])
    if callable(getattr(loss_fn, "sharded_loss", None)):
        loss, grad = _sharded_loss_and_embedding_grad(
            loss_fn.sharded_loss, global_embeddings, global_labels, rows, loss_kwargs, scaler
        )
    else:
        loss, grad = _loss_and_embedding_grad_on_rank0(loss_fn, global_embeddings, global_labels, loss_kwargs, scaler)
    return loss, grad[rows] * get_world_size()


@dataclass
class FirstPass:
    """What stage 1 leaves for stage 3: the embeddings and, per chunk, its rows and starting RNG state."""

    embeddings: Tensor  # (N, D), no graph
    bounds: list[tuple[int, int]]  # rows [start, stop) of each chunk
    rng_states: list[_RngState]
    cuda_devices: list[torch.device]
    autocast_dtype: torch.dtype | None
    chunk_embeddings: list[Tensor] | None  # kept for verify_replay


def embed_without_graph(
    model: nn.Module,
    inputs: Inputs,
    chunk_size: int,
    autocast_dtype: torch.dtype | None = None,
    keep_chunks: bool = False,
) -> FirstPass:
    """Stage 1: embed ``inputs`` (N rows) in chunks under ``torch.no_grad()``, saving each chunk's RNG state.

    The result feeds :func:`backward_through_chunks` once the loss gradient with respect to
    ``FirstPass.embeddings`` is known.
    """
    num_rows = next(iter(inputs.values())).shape[0] if isinstance(inputs, Mapping) else inputs.shape[0]
    bounds = [(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]
    cuda_devices = _cuda_devices(model, inputs)
    rng_states, chunks = [], []
    with torch.no_grad():
        for start, stop in bounds:
            rng_states.append(_RngState(cuda_devices))
            with _forward_context(cuda_devices, autocast_dtype):
                chunks.append(_embed(model, _slice(inputs, start, stop), stop - start))
    return FirstPass(
        torch.cat(chunks), bounds, rng_states, cuda_devices, autocast_dtype, chunks if keep_chunks else None
    )


def backward_through_chunks(
    model: nn.Module, inputs: Inputs, first: FirstPass, grad: Tensor, verify_replay: bool = False
) -> None:
    """Stage 3: re-embed each chunk with autograd under its saved RNG state and backpropagate ``grad`` (N, D).

    Gradients accumulate into the model's ``.grad``. The RNG state afterwards is the one this function found
    (the replay does not advance it). With DDP, chunks other than the last skip the gradient all-reduce.
    """
    ddp = _as_ddp(model)
    for index, (start, stop) in enumerate(first.bounds):
        is_last = index == len(first.bounds) - 1
        with ddp.no_sync() if ddp is not None and not is_last else nullcontext():
            with first.rng_states[index].replay(), _forward_context(first.cuda_devices, first.autocast_dtype):
                chunk = _embed(model, _slice(inputs, start, stop), stop - start)
            if verify_replay and first.chunk_embeddings is not None:
                _check_replay(first.chunk_embeddings[index], chunk.detach(), start, stop)
            torch.autograd.backward(chunk, grad[start:stop].to(chunk.dtype))


def _forward_context(cuda_devices: list[torch.device], autocast_dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` on the model's device type, or nothing (the caller's autocast state applies)."""
    if autocast_dtype is None:
        return nullcontext()
    return torch.autocast(cuda_devices[0].type if cuda_devices else "cpu", dtype=autocast_dtype)


def _check_inputs(inputs: Inputs, labels: Tensor, chunk_size: int) -> int:
    """Validate shapes and return the number of rows N."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    check_labels(labels, labels.shape[0] if labels.dim() else 0)
    num_rows = labels.shape[0]
    if num_rows == 0:
        raise ValueError("the batch is empty: labels has 0 rows")
    tensors = inputs.items() if isinstance(inputs, Mapping) else [("inputs", inputs)]
    for name, value in tensors:
        if not isinstance(value, Tensor):
            raise ValueError(f"inputs must be a tensor or a dict of tensors; {name!r} is a {type(value).__name__}")
        if value.dim() == 0 or value.shape[0] != num_rows:
            raise ValueError(
                f"{name!r} has shape {tuple(value.shape)} but labels has {num_rows} rows: every input needs N rows"
            )
    return num_rows


def _slice(inputs: Inputs, start: int, stop: int) -> Inputs:
    """Rows start:stop of a tensor or of every tensor in a dict (views; strides and memory format kept)."""
    if isinstance(inputs, Mapping):
        return {name: value[start:stop] for name, value in inputs.items()}
    return inputs[start:stop]


def _embed(model: nn.Module, chunk: Inputs, rows: int) -> Tensor:
    """Call the model on one chunk (tensor or dict, passed as the one argument); check the output is (rows, D)."""
    output = model(chunk)
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != rows:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"the model must return embeddings of shape ({rows}, D) for {rows} input rows, got {shape}")
    return output


def _loss_dtype(embeddings: Tensor) -> torch.dtype:
    """The precision the loss runs in: the embeddings', at least float32."""
    return torch.promote_types(embeddings.dtype, torch.float32)


def _loss_and_embedding_grad(
    loss_fn: LossFn,
    embeddings: Tensor,
    labels: Tensor,
    loss_kwargs: Mapping[str, Any] | None,
    scaler: torch.amp.GradScaler | None,
) -> tuple[Tensor, Tensor]:
    """The detached loss L and G = d(s L)/dE (N, D), s the scaler's scale (1 without one).

    Runs with autocast disabled on embeddings of >= float32 precision. The backward pass also accumulates
    s dL/dphi into any trainable parameters phi of the loss, as a plain backward would.
    """
    with torch.enable_grad(), torch.autocast(embeddings.device.type, enabled=False):
        leaf = embeddings.detach().to(_loss_dtype(embeddings)).requires_grad_(True)
        loss = loss_fn(leaf, labels, **(loss_kwargs or {}))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar tensor, got {loss!r}")
        (loss if scaler is None else scaler.scale(loss)).backward()
    return loss.detach().to(leaf.dtype), torch.zeros_like(leaf) if leaf.grad is None else leaf.grad


def _sharded_loss_and_embedding_grad(
    sharded_loss: LossFn,
    embeddings: Tensor,
    labels: Tensor,
    rows: slice,
    loss_kwargs: Mapping[str, Any] | None,
    scaler: torch.amp.GradScaler | None,
) -> tuple[Tensor, Tensor]:
    """Each rank's share `sharded_loss(E, labels, rows)` and its gradient w.r.t. all of E, summed over ranks.

    Non-finite embeddings (a diverged model; every rank sees the same global batch) give a NaN loss and a zero
    gradient on every rank, without calling the loss.
    """
    if not bool(torch.isfinite(embeddings).all()):
        dtype = _loss_dtype(embeddings)
        nan = torch.tensor(float("nan"), dtype=dtype, device=embeddings.device)
        return nan, torch.zeros(embeddings.shape, dtype=dtype, device=embeddings.device)

    def share(leaf: Tensor, leaf_labels: Tensor, **kwargs: Any) -> Tensor:
        return sharded_loss(leaf, leaf_labels, rows, **kwargs)

    loss, grad = _loss_and_embedding_grad(share, embeddings, labels, loss_kwargs, scaler)
    dist.all_reduce(grad)
    dist.all_reduce(loss)
    return loss, grad


def _loss_and_embedding_grad_on_rank0(
    loss_fn: LossFn,
    embeddings: Tensor,
    labels: Tensor,
    loss_kwargs: Mapping[str, Any] | None,
    scaler: torch.amp.GradScaler | None,
) -> tuple[Tensor, Tensor]:
    """`_loss_and_embedding_grad` on rank 0, broadcast to every rank (one draw of any randomness in the loss)."""
    if get_rank() == 0:
        loss, grad = _loss_and_embedding_grad(loss_fn, embeddings, labels, loss_kwargs, scaler)
    else:
        dtype = _loss_dtype(embeddings)
        grad = torch.empty(embeddings.shape, dtype=dtype, device=embeddings.device)
        loss = torch.empty((), dtype=dtype, device=embeddings.device)
    dist.broadcast(grad, src=0)
    dist.broadcast(loss, src=0)
    return loss, grad


def _cuda_devices(model: nn.Module, inputs: Inputs) -> list[torch.device]:
    """The CUDA devices holding the model's parameters or the inputs (their RNGs are saved and replayed)."""
    tensors = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
    devices = {t.device for t in [*model.parameters(), *tensors] if t.device.type == "cuda"}
    return sorted(devices, key=lambda d: d.index if d.index is not None else -1)


def _as_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The outermost DistributedDataParallel module in `model` (itself, behind `torch.compile`, or inside a
    wrapper such as recallk's SentenceEncoder around a DDP-wrapped SentenceTransformer), if any."""
    return next((m for m in model.modules() if isinstance(m, DistributedDataParallel)), None)


def _check_replay(first: Tensor, again: Tensor, start: int, stop: int) -> None:
    """Raise RuntimeError when the re-embedded rows start:stop differ from their stage-1 embeddings."""
    scale = first.abs().max().float().clamp_min(1e-12)
    error = (again.float() - first.float()).abs().max() / scale
    if error > _REPLAY_TOLERANCE:
        raise RuntimeError(
            f"re-embedding rows {start}:{stop} gave different embeddings (max relative difference {error:.2e}): "
            "the model's randomness is not driven by torch's default generators, or BatchNorm is not frozen"
        )
