"""Checks on loss inputs that turn silent nonsense into one clear ``ValueError``."""

from __future__ import annotations

from typing import Sequence

import torch


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


def check_k(k: Sequence[int]) -> tuple[int, ...]:
    """k must be a non-empty sequence of positive integers."""
    values = (k,) if isinstance(k, int) else tuple(k)
    if not values:
        raise ValueError("k is empty; give at least one positive integer, e.g. k=(1, 2, 4, 8, 16)")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"k must hold positive integers, got {values}")
    return values


def check_temperature(value: float, name: str) -> float:
    """Temperatures divide the sigmoid argument and must be positive and finite."""
    if not (isinstance(value, (int, float)) and 0 < float(value) < float("inf")):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
