"""Checkpoints that survive crashes and refuse files that are not ours.

A checkpoint is a dict of tensors and plain Python values, tagged with ``FORMAT``. It is written to a temporary
file in the same directory, flushed to disk and renamed over the target, so a process killed mid-write leaves
the previous checkpoint intact. It is read with ``torch.load(weights_only=True)``, which never runs code from
the file: a pickle crafted to execute something is refused instead of executed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from recallk.errors import RecallkUsageError

FORMAT = "recallk-checkpoint-v1"


class CheckpointError(RecallkUsageError):
    """A checkpoint file is missing, unreadable, unsafe or not written by recallk."""


class OutputWriteError(RecallkUsageError):
    """An output file could not be written (disk full, file size limit, no permission); its old content is kept."""


class _KeepWriteErrors:
    """File proxy that remembers an ``OSError`` raised by ``write``: torch.save reports it as a vague RuntimeError."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, fsync it, then rename it to ``path``.

    On any error the temporary file is removed and ``path`` keeps its old content; a failed write to disk (disk
    full, file size limit, permissions) raises :class:`OutputWriteError` naming ``path``.
    """
    path = Path(path)
    tmp: str | None = None
    handle: _KeepWriteErrors | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as raw:
            handle = _KeepWriteErrors(raw)
            write(handle)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = handle.error if handle is not None and handle.error is not None else err
        if isinstance(err, Exception) and isinstance(cause, OSError):
            raise OutputWriteError(
                f"could not write {path}: {cause.strerror or cause}; free disk space or choose another "
                f"directory (the previous {path.name}, if any, is intact)"
            ) from cause
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


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
