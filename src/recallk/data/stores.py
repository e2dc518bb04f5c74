"""Places images are read from: a folder on disk or a zip archive (opened lazily, once per process)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import IO


class DirectoryStore:
    """Images stored as files under ``root``; names are paths relative to ``root`` with ``/`` separators."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def open(self, name: str) -> IO[bytes]:
        return open(self.root / name, "rb")

    def exists(self, name: str) -> bool:
        return os.path.isfile(self.root / name)

    def describe(self, name: str) -> str:
        """Full location of ``name`` for error messages."""
        return str(self.root / name)


class ZipStore:
    """Images stored as members of one zip archive; names are member names.

    The :class:`zipfile.ZipFile` handle is opened on first use in each process (checked by pid) and dropped when
    pickled, so a dataset holding this store is safe to use with ``DataLoader(num_workers>0)`` under fork or spawn.
    """

    def __init__(self, zip_path: str | Path) -> None:
        self.zip_path = Path(zip_path)
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None
        self._names: frozenset[str] | None = None

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.zip_path)
            self._pid = os.getpid()
        return self._zip

    def namelist(self) -> list[str]:
        return self._archive().namelist()

    def open(self, name: str) -> IO[bytes]:
        return self._archive().open(name)

    def exists(self, name: str) -> bool:
        if self._names is None:
            self._names = frozenset(self.namelist())
        return name in self._names

    def describe(self, name: str) -> str:
        return f"{self.zip_path}:{name}"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"] = None
        state["_pid"] = None
        return state


ImageStore = DirectoryStore | ZipStore
