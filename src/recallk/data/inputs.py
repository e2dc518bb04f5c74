"""Model inputs are a tensor (images, ``(B, C, H, W)``) or a dict of tensors (tokens, ``(B, L)`` each)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def to_device(inputs: Inputs, device: torch.device, channels_last: bool = False) -> Inputs:
    """``inputs`` on ``device`` (every tensor of a dict); 4-d image tensors optionally in channels_last."""
    if isinstance(inputs, Mapping):
        return {name: value.to(device, non_blocking=True) for name, value in inputs.items()}
    inputs = inputs.to(device, non_blocking=True)
    if channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def batch_rows(inputs: Inputs) -> int:
    """The number of items B in a batch of inputs."""
    return len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) else len(inputs)
