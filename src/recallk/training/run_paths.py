"""A run's paths, made absolute when the run starts, so that resuming it works from any directory.

A config may name folders relative to the current directory (``--data-dir data``, ``output.runs_root: runs``, a
relative SQLite file in ``train.mlflow_uri``). The trainer fixes them once, against the directory the run starts
in, and writes them so into the run's ``config.yaml``: ``recallk train --resume /abs/run`` from another directory
reads the same data, writes into the same run and logs to the same MLflow store, and a resume that names the same
folders relatively (``--resume ../runs/x``) is no config change.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from recallk.config import Config
from recallk.data.paths import resolve_data_dir
from recallk.models.packaged_weights import is_packaged
from recallk.training.tracking import mlflow_store_uri


def absolute(path: str | Path) -> str:
    """``path`` with ``~`` expanded, made absolute and normalised (``..`` removed; symbolic links are kept)."""
    return os.path.abspath(os.path.expanduser(path))


def with_absolute_paths(config: Config, run_dir: str | Path, data_dir: str | Path | None = None) -> Config:
    """A copy of ``config`` whose paths are absolute: ``data.data_dir`` (``data_dir`` when given; null resolved as
    :func:`~recallk.data.paths.resolve_data_dir` does, from ``$RECALLK_DATA`` or the user cache),
    ``model.pretrained_path`` (a file; ``package:`` names stay), ``output.runs_root``, ``output.run_dir`` (set to
    ``run_dir``) and, with ``train.mlflow``, ``train.mlflow_uri`` (:func:`~recallk.training.tracking.mlflow_store_uri`,
    ``$MLFLOW_TRACKING_URI`` included)."""
    config = copy.deepcopy(config)
    config.data.data_dir = absolute(resolve_data_dir(data_dir if data_dir is not None else config.data.data_dir))
    if config.model.pretrained_path and not is_packaged(config.model.pretrained_path):
        config.model.pretrained_path = absolute(config.model.pretrained_path)
    config.output.runs_root = absolute(config.output.runs_root)
    config.output.run_dir = absolute(run_dir)
    if config.train.mlflow:
        config.train.mlflow_uri = mlflow_store_uri(config)
    return config
