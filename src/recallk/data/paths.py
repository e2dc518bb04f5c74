"""Where recallk looks for data sets and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV_VAR = "RECALLK_DATA"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/recallk`` when that variable is set, else ``~/.cache/recallk``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "recallk"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$RECALLK_DATA``, else :func:`user_cache_dir`.

    The folder is not created or checked here; readers say which file is missing.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return user_cache_dir()


def arrays_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder for decoded-array caches: ``cache_dir`` if given, else ``<user cache>/arrays``.

    Kept apart from the data root because data roots are often read-only shared folders.
    """
    return Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir() / "arrays"
