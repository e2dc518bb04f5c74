"""Files that are whole or absent: one atomic writer, and the JSON and CSV files of a run.

Every file recallk writes (checkpoints, configs, metrics, embeddings, downloads, decoded-array caches) goes through
:func:`atomic_write`: the bytes go to a temporary file ``.<name>.<random>.tmp`` in the same directory, are flushed
to disk and renamed over the target, so a process killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from recallk.errors import RecallkUsageError

TEMPORARY_SUFFIX = ".tmp"  # atomic writes cut short by a crash leave ``.<name>.*.tmp`` files


_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_NOT_WRITABLE = {errno.EROFS: "the folder is on a read-only file system", errno.EACCES: "no permission to write there",
                 errno.EPERM: "no permission to write there"}


class OutputWriteError(RecallkUsageError):
    """An output file could not be written (disk full, file size limit, read-only folder, no permission); its old
    content is kept.

    The message says what went wrong and how to fix it; ``option`` (e.g. ``"--out FILE"``), when known, is the
    command-line option that chooses another place (:meth:`with_option` adds it).
    """

    def __init__(self, path: Path, error: OSError, option: str | None = None) -> None:
        self.path, self.error, self.option = path, error, option
        reason = error.strerror or str(error)
        place = f"another directory (with {option})" if option else "another directory"
        if error.errno in _FULL:
            fix = f"free disk space or write to {place}"
        elif error.errno in _NOT_WRITABLE:
            reason = f"{reason}: {_NOT_WRITABLE[error.errno]}"
            fix = f"write to {place}"
        else:
            fix = f"check the folder or write to {place}"
        super().__init__(f"could not write {path}: {reason}; {fix} (the previous {path.name}, if any, is intact)")

    def with_option(self, option: str) -> OutputWriteError:
        """The same error naming ``option``, the command-line option that writes elsewhere."""
        return OutputWriteError(self.path, self.error, option)

    @classmethod
    def from_os_error(cls, error: OSError) -> OutputWriteError | None:
        """``error`` as an :class:`OutputWriteError` when it can only come from writing (a read-only file system,
        a full disk, no permission to create a path that does not exist) and names its file, e.g. a folder created
        outside :func:`atomic_write`; else None."""
        if not isinstance(error.filename, (str, bytes, os.PathLike)):
            return None
        path = Path(os.fsdecode(error.filename))
        creating = error.errno in (errno.EACCES, errno.EPERM) and not path.exists()
        return cls(path, error) if creating or error.errno in (errno.EROFS, *_FULL) else None


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
            raise OutputWriteError(path, disk_error) from disk_error
        raise


def atomic_write_from_file(path: str | Path, write_file: Callable[[str], object]) -> None:
    """Atomically write what ``write_file(filename)`` writes, for libraries that only write to a file name
    (safetensors, ONNX): :func:`atomic_write` first opens its temporary file next to ``path`` (so an unwritable
    folder fails at once, before the work), then ``write_file`` writes into a scratch folder of the system's
    temporary directory and the bytes are copied over (the usual permissions, the old file kept on failure)."""

    def copy(handle: IO[bytes]) -> None:
        with tempfile.TemporaryDirectory(prefix="recallk-") as scratch:
            scratch_file = Path(scratch) / Path(path).name
            write_file(str(scratch_file))
            with open(scratch_file, "rb") as source:
                shutil.copyfileobj(source, handle)

    atomic_write(path, copy)


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
