"""Pooling and the paper's embedding head: pool -> LayerNorm -> Linear -> L2 normalisation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from recallk.registry import POOLINGS


class GeM(nn.Module):
    """Generalised-mean pooling over the spatial dimensions of a feature map.

    ``(B, C, H, W) -> (B, C)`` with ``y_c = (mean_{h,w} max(x_{c,h,w}, eps)^p)^(1/p)``. ``p = 1`` is average pooling
    and ``p -> inf`` approaches max pooling. Computed in float32 so that large ``p`` does not overflow under autocast.
    """

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM exponent p must be > 0, got {p}; use p=3 (the usual start) or p=1 for average")
        p_tensor = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, learnable={isinstance(self.p, nn.Parameter)}, eps={self.eps}"


class GlobalAvgPool(nn.Module):
    """Average over the spatial dimensions: ``(B, C, H, W) -> (B, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class EmbeddingHead(nn.Module):
    """Maps backbone output to unit-norm embeddings: ``e = normalize(W · LayerNorm(pool(f)) + b)``.

    Input: a feature map ``(B, C, H, W)`` when ``pooling`` is ``"gem"`` or ``"avg"``; already pooled features
    ``(B, C)`` (e.g. a ViT class token) when ``pooling`` is ``"cls"``. Output: ``(B, embed_dim)`` with unit L2 norm.
    """

    def __init__(
        self,
        in_features: int,
        embed_dim: int = 512,
        pooling: str = "gem",
        gem_p: float = 3.0,
        gem_learnable: bool = True,
        layernorm: bool = True,
    ) -> None:
        super().__init__()
        if in_features <= 0 or embed_dim <= 0:
            raise ValueError(f"in_features and embed_dim must be > 0, got {in_features} and {embed_dim}")
        poolers = {"gem": lambda: GeM(gem_p, learnable=gem_learnable), "avg": GlobalAvgPool, "cls": nn.Identity}
        if pooling not in poolers:
            raise ValueError(POOLINGS.unknown(pooling))
        self.pooling = pooling
        self.pool = poolers[pooling]()
        self.norm = nn.LayerNorm(in_features) if layernorm else nn.Identity()
        self.fc = nn.Linear(in_features, embed_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        expected_dims = 2 if self.pooling == "cls" else 4
        if features.dim() != expected_dims:
            # Plain f-string fields only (no !r, no tuple()): the head stays scriptable with torch.jit.script.
            raise ValueError(
                f"pooling '{self.pooling}' expects {expected_dims}-D backbone output, "
                f"got shape {features.shape}; use pooling 'gem'/'avg' for CNN feature maps "
                "and 'cls' for vision transformers"
            )
        return F.normalize(self.fc(self.norm(self.pool(features))), dim=-1)


def backbone_and_head_groups(
    backbone: Iterable[nn.Parameter], head: Iterable[nn.Parameter], lr: float, backbone_lr_mult: float = 1.0,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Optimiser parameter groups: ``backbone`` at ``lr * backbone_lr_mult``, ``head`` at ``lr``, both with
    ``weight_decay``. Frozen parameters (``requires_grad=False``) and empty groups are left out."""
    groups = [
        {"name": "backbone", "params": [p for p in backbone if p.requires_grad], "lr": lr * backbone_lr_mult,
         "weight_decay": weight_decay},
        {"name": "head", "params": [p for p in head if p.requires_grad], "lr": lr, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def with_gem_group(model: nn.Module, groups: list[dict], lr: float) -> list[dict]:
    """``groups`` with the learnable exponent ``p`` of every :class:`GeM` in ``model`` moved into a group ``gem`` at
    ``lr`` without weight decay (as the landmark-retrieval literature trains it, e.g. cirtorch: 10x the rate of the
    rest, no decay, so that ``p`` is not pulled towards 0). Groups left empty are dropped."""
    learnable = [m.p for m in model.modules() if isinstance(m, GeM) and isinstance(m.p, nn.Parameter)]
    exponents = {id(p): p for p in learnable if p.requires_grad}
    if not exponents:
        return groups
    moved = [{**g, "params": [p for p in g["params"] if id(p) not in exponents]} for g in groups]
    return [g for g in moved if g["params"]] + [
        {"name": "gem", "params": list(exponents.values()), "lr": lr, "weight_decay": 0.0}
    ]
