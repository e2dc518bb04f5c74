"""Model inputs are a tensor (images, ``(B, C, H, W)``) or a dict of tensors (tokens, ``(B, L)`` each)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from recallk.engine.multistage import Inputs

__all__ = ["Inputs", "batch_rows", "to_device"]


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """``inputs`` on ``device`` (every tensor of a dict); the model sets its own memory format (channels_last)."""
    if isinstance(inputs, Mapping):
        return {name: value.to(device, non_blocking=True) for name, value in inputs.items()}
    return inputs.to(device, non_blocking=True)


def batch_rows(inputs: Inputs) -> int:
    """The number of items B in a batch of inputs."""
    return len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) else len(inputs)
