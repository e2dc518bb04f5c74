"""Files that are whole or absent: one atomic writer, and the JSON and CSV files of a run.

Every file recallk writes (checkpoints, configs, metrics, embeddings, downloads, decoded-array caches) goes through
:func:`atomic_write`: the bytes go to a temporary file ``.<name>.<random>.tmp`` in the same directory, are flushed
to disk and renamed over the target, so a process killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from recallk.errors import RecallkUsageError

TEMPORARY_SUFFIX = ".tmp"  # atomic writes cut short by a crash leave ``.<name>.*.tmp`` files


class OutputWriteError(RecallkUsageError):
    """An output file could not be written (disk full, file size limit, no permission); its old content is kept."""


class _KeepWriteErrors:
    """File proxy that remembers an ``OSError`` raised by ``write``: torch.save reports it as a vague RuntimeError."""

    def __init__(self, handle: IO[bytes]) -> None:
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


def atomic_write(path: str | Path, write: Callable[[Any], object]) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, fsync it, then rename it to ``path``.

    On any error (also one raised by ``write`` itself, e.g. a failed checksum) the temporary file is removed and
    ``path`` keeps its old content. A failed write to disk (disk full, file size limit, permissions) raises
    :class:`OutputWriteError` naming ``path``; other errors raised by ``write`` propagate unchanged.
    """
    path = Path(path)
    tmp: str | None = None
    handle: _KeepWriteErrors | None = None
    in_callback = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as raw:
            handle = _KeepWriteErrors(raw)
            in_callback = True
            write(handle)
            in_callback = False
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        disk_error = handle.error if handle is not None and handle.error is not None else None
        if disk_error is None and not in_callback and isinstance(err, OSError):
            disk_error = err
        if isinstance(err, Exception) and disk_error is not None:
            raise OutputWriteError(
                f"could not write {path}: {disk_error.strerror or disk_error}; free disk space or choose another "
                f"directory (the previous {path.name}, if any, is intact)"
            ) from disk_error
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json(path: str | Path, data: Any, sort_keys: bool = True) -> Path:
    """Write ``data`` as indented JSON (one trailing newline) to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
    return path


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``metrics.csv`` as dicts of strings ([] if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
