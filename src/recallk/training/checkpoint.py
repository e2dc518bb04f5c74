"""Checkpoints that survive crashes and refuse files that are not ours.

A checkpoint is a dict of tensors and plain Python values, tagged with ``FORMAT``. It is written with
:func:`recallk.files.atomic_write`, so a process killed mid-write leaves the previous checkpoint intact. It is read
with ``torch.load(weights_only=True)``, which never runs code from the file: a pickle crafted to execute something
is refused instead of executed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from recallk.errors import RecallkUsageError
from recallk.files import atomic_write

FORMAT = "recallk-checkpoint-v1"


class CheckpointError(RecallkUsageError):
    """A checkpoint file is missing, unreadable, unsafe or not written by recallk."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save ``state`` (tensors, numbers, strings, lists, dicts) atomically, tagged as a recallk checkpoint.

    A failed write raises :class:`OutputWriteError`; the previous checkpoint at ``path`` stays intact.
    """
    atomic_write(path, lambda handle: torch.save({"format": FORMAT, **state}, handle))


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a recallk checkpoint safely (``weights_only=True``); anything else is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give a run directory or a .pt file it holds")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a safe recallk checkpoint"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refusing to load {path}: it is not a safe recallk checkpoint ({first[:200]}); "
            "only load checkpoints written by recallk from sources you trust"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a recallk checkpoint (no '{FORMAT}' tag); give a file written by `recallk train`"
        )
    return state


def weights_digest(model_state: Mapping[str, torch.Tensor], exclude_prefix: str | None = "whitening.") -> str:
    """SHA-256 (hex) of a model state dict's names, dtypes, shapes and values, in name order, leaving out the entries
    under ``exclude_prefix`` (default: a whitening layer's buffers, so that a whitened checkpoint and the checkpoint
    it was fitted on have the same digest; ``None``: every entry)."""
    digest = hashlib.sha256()
    for name in sorted(model_state):
        if exclude_prefix is not None and name.startswith(exclude_prefix):
            continue
        tensor = model_state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
