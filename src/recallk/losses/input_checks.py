"""Checks on loss inputs that turn silent nonsense into one clear ``ValueError``."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from pytorch_metric_learning.distances import DotProductSimilarity


def check_embeddings(emb: torch.Tensor, name: str = "embeddings") -> None:
    """``emb`` must be a finite 2-D floating tensor (N x D)."""
    if not isinstance(emb, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, D), got {type(emb).__name__}")
    if emb.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {emb.dtype}")
    finite = torch.isfinite(emb).all(dim=1)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{name} contain NaN or Inf in {bad} of {len(emb)} rows; check the model output "
            "(learning rate too high? fp16 overflow?) before computing the loss"
        )


def check_labels(labels: torch.Tensor, length: int, name: str = "labels") -> None:
    """``labels`` must be a 1-D integer tensor with one entry per embedding."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a 1-D integer torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (e.g. torch.long), got dtype {labels.dtype}")
    if len(labels) != length:
        raise ValueError(f"{name} has {len(labels)} entries but there are {length} embeddings; they must match")


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
        raise ValueError(f"k must hold positive integers, got {values}")
    return values


def check_temperature(value: float, name: str) -> float:
    """Temperatures divide the sigmoid argument and must be positive and finite (numpy/tensor scalars too)."""
    value = _plain_number(value)
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < float(value) < float("inf")):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_tau_k(tau_k: float | Sequence[float], num_k: int) -> tuple[float, ...]:
    """One positive temperature per k: a single value (repeated) or exactly ``num_k`` values."""
    tau_k = _plain_number(tau_k)
    if isinstance(tau_k, (torch.Tensor, np.ndarray)):
        tau_k = tau_k.tolist()
    taus = (tau_k,) * num_k if isinstance(tau_k, (int, float)) else tuple(tau_k)
    if len(taus) != num_k:
        raise ValueError(f"tau_k has {len(taus)} values for {num_k} values of k; give one or one per k")
    return tuple(check_temperature(t, "tau_k") for t in taus)


def check_distance(distance: object) -> None:
    """RS@k needs dot-product similarities: PML's ``DotProductSimilarity`` or ``CosineSimilarity``, power 1."""
    if not isinstance(distance, DotProductSimilarity) or distance.power != 1:
        raise ValueError(
            f"RecallAtKLoss ranks by similarity and takes distance=CosineSimilarity() or DotProductSimilarity() "
            f"(power 1) from pytorch_metric_learning.distances, got {distance!r}"
        )
