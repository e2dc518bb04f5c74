"""Input checks that turn silent nonsense into one clear ``ValueError``: the losses' and the retrieval metrics'.

The losses take tensors (:func:`check_embeddings`, :func:`check_labels`); the metrics also take numpy arrays and
convert them (:func:`as_embeddings`, :func:`as_labels`); both read ``k`` with :func:`check_k`.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from pytorch_metric_learning.distances import DotProductSimilarity


def check_embeddings(emb: torch.Tensor, name: str = "embeddings", nonempty: bool = False) -> None:
    """``emb`` must be a finite 2-D floating tensor (N x D); with ``nonempty`` also N, D >= 1."""
    if not isinstance(emb, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, D), got {type(emb).__name__}")
    if emb.dim() != 2:
        raise ValueError(f"{name} must be 2-D, shape (N, D), got shape {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise ValueError(f"{name} must hold floats, got dtype {emb.dtype}")
    _check_not_meta(emb, name)
    if nonempty and (emb.shape[0] == 0 or emb.shape[1] == 0):
        raise ValueError(f"{name} is empty (shape {tuple(emb.shape)}); pass at least one embedding")
    bad_rows = (~torch.isfinite(emb).all(dim=1)).nonzero().squeeze(1)
    if bad_rows.numel() > 0:
        raise ValueError(
            f"{name} has NaN or Inf in {bad_rows.numel()} of {len(emb)} rows (first at row {int(bad_rows[0])}); "
            "check the model output (learning rate too high? fp16 overflow?) or remove those rows"
        )


ENCODE_LABELS = "torch.as_tensor(np.unique(labels, return_inverse=True)[1]) numbers class names 0..C-1"


def _check_not_meta(tensor: torch.Tensor, name: str) -> None:
    if tensor.device.type == "meta":
        raise ValueError(
            f"{name} are on the meta device (shapes without data: a model built under torch.device('meta') or "
            "loaded with low_cpu_mem_usage/device_map and never materialised); load real weights, e.g. "
            "model.to_empty(device='cpu') then load_state_dict, and pass the tensors it computes"
        )


def _label_kind(labels: object, name: str) -> str:
    """What ``labels`` (not a tensor) are, and how to turn them into a tensor of class ids."""
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu":
        return f"a numpy array; pass torch.as_tensor({name})"
    if isinstance(labels, (np.ndarray, list, tuple)) and np.asarray(labels).dtype.kind in "USO":
        kind = "numpy array" if isinstance(labels, np.ndarray) else type(labels).__name__
        return f"a {kind} of class names; {ENCODE_LABELS}"
    return f"a {type(labels).__name__}; {ENCODE_LABELS}"


def check_labels(labels: torch.Tensor, length: int, name: str = "labels", of: str = "embeddings") -> None:
    """``labels`` must be a 1-D integer tensor with one entry per row of ``of`` (``length`` rows)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a 1-D integer torch.Tensor of class ids, got {_label_kind(labels, name)}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer tensor of class ids (e.g. torch.long), got dtype {labels.dtype}; "
            f"{ENCODE_LABELS}"
        )
    _check_not_meta(labels, name)
    if len(labels) != length:
        raise ValueError(f"{name} has {len(labels)} entries but {of} has {length} rows; they must match")


def as_embeddings(array: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """A tensor or numpy ``(N, D)`` float matrix, checked (:func:`check_embeddings`, N, D >= 1) and returned as a
    detached tensor of at least float32 precision."""
    if not isinstance(array, (torch.Tensor, np.ndarray)):
        raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(array).__name__}")
    tensor = torch.as_tensor(array).detach()
    check_embeddings(tensor, name, nonempty=True)
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def as_labels(array: torch.Tensor | np.ndarray, name: str, num_items: int, of: str) -> torch.Tensor:
    """A tensor or numpy ``(N,)`` vector of class ids matching ``num_items`` rows of ``of``, as int64."""
    names = isinstance(array, np.ndarray) and array.dtype.kind in "USO"
    if names or not isinstance(array, (torch.Tensor, np.ndarray)):
        raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray of class ids, got {_label_kind(array, name)}")
    tensor = torch.as_tensor(array)
    check_labels(tensor, num_items, name, of)
    return tensor.long()


def _plain_number(value: object) -> object:
    """A numpy scalar, 0-d array or one-element tensor as the Python number it holds; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() <= 1:
        return value.item()
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    return value


def check_k(k: int | Sequence[int] | torch.Tensor | np.ndarray) -> tuple[int, ...]:
    """k must be a positive integer or a non-empty sequence of them (numpy and tensor scalars/arrays included)."""
    k = _plain_number(k)
    if isinstance(k, (torch.Tensor, np.ndarray)):
        k = k.tolist()
    values = (k,) if isinstance(k, (int, float)) else tuple(_plain_number(v) for v in k)
    if not values:
        raise ValueError("k is empty; give at least one positive integer, e.g. k=(1, 2, 4, 8, 16)")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"every k must be a positive integer (>= 1), got {values}")
    return values


def check_temperature(value: float, name: str) -> float:
    """Temperatures divide the sigmoid argument and must be positive and finite (numpy/tensor scalars too)."""
    value = _plain_number(value)
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < float(value) < float("inf")):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_tau_k(tau_k: float | str | Sequence[float], k: Sequence[int]) -> tuple[float, ...]:
    """One positive temperature per k: a single value (repeated), exactly ``len(k)`` values, or ``"k"`` for
    tau_k = k (the authors' first default)."""
    if isinstance(tau_k, str):
        if tau_k != "k":
            raise ValueError(f"tau_k must be a positive number, one per k, or 'k' (tau_k = k), got {tau_k!r}")
        return tuple(float(value) for value in k)
    tau_k = _plain_number(tau_k)
    if isinstance(tau_k, (torch.Tensor, np.ndarray)):
        tau_k = tau_k.tolist()
    taus = (tau_k,) * len(k) if isinstance(tau_k, (int, float)) else tuple(tau_k)
    if len(taus) != len(k):
        raise ValueError(f"tau_k has {len(taus)} values for {len(k)} values of k; give one, one per k, or 'k'")
    return tuple(check_temperature(t, "tau_k") for t in taus)


def check_distance(distance: object, loss_name: str) -> None:
    """The chunked losses rank by dot-product similarity: PML's ``DotProductSimilarity`` or ``CosineSimilarity``,
    power 1. ``loss_name`` (the class) starts the message."""
    if not isinstance(distance, DotProductSimilarity) or distance.power != 1:
        raise ValueError(
            f"{loss_name} ranks by similarity and takes distance=CosineSimilarity() or DotProductSimilarity() "
            f"(power 1) from pytorch_metric_learning.distances, got {distance!r}"
        )


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses to build a graph: a loss with a closed-form gradient has no second one."""

    @staticmethod
    def forward(ctx: object, loss: torch.Tensor) -> torch.Tensor:
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # backward(create_graph=True) / autograd.grad(create_graph=True)
            raise RuntimeError(
                "RecallAtKLoss computes its gradient in closed form and has no second derivative, so "
                "create_graph=True (double backward: gradient penalties, MAML, Hessian-vector products) is not "
                "supported; call backward() / torch.autograd.grad without create_graph for this loss"
            )
        return grad


def first_order_only(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` unchanged, whose backward with ``create_graph=True`` raises a clear error instead of returning a
    gradient that silently has no graph."""
    return _FirstOrderOnly.apply(loss) if loss.requires_grad else loss


def warn_if_k_exceeds(k: Sequence[int], num_ranked: int) -> None:
    """Warn (once per process with Python's default warning filter) when the largest k is not smaller than
    ``num_ranked``, the items each query is ranked against: recall@k is then about 1 whatever the ranking."""
    largest = max(k)
    if num_ranked <= largest:
        warnings.warn(
            f"the largest k ({largest}) is not smaller than the number of items each query is ranked against (the "
            f"batch, or ref_emb, without the query), so recall@{largest} is about 1 whatever the ranking and adds "
            f"almost no gradient; use batches of more than {largest + 1} items or smaller k",
            UserWarning,
            stacklevel=2,
        )
