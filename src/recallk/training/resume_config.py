"""What may change when a run is resumed: the run's ``config.yaml`` against the config of the resuming command.

``recallk train --resume RUN key=value`` continues RUN's schedule from ``checkpoints/last.pt``. Keys that only say
how long to train, how to step the optimiser, where the data lives or what to write (``SAFE_ON_RESUME``) may change;
any other change (another data set, model, loss, batch or seed) would make ``config.yaml`` describe a different
run than the checkpoint holds, so it is refused with one line listing the changed keys. Accepted changes are
written into ``config.yaml`` and appended to ``config_changes.jsonl`` (epoch, step, time, old and new values).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from recallk.config import Config, config_from_dict, config_to_dict, config_to_yaml
from recallk.errors import ConfigError, RecallkUsageError
from recallk.files import atomic_write_text

SAFE_ON_RESUME = (
    "train.epochs", "train.max_steps", "train.eval_every", "train.checkpoint_every", "train.log_every",
    "train.device", "train.nan_policy", "train.tensorboard", "train.mlflow", "train.mlflow_uri", "train.wandb",
    "train.wandb_project", "train.early_stopping_patience", "optim.clip_grad_norm",
    "optim.lr", "optim.weight_decay", "optim.backbone_lr_mult", "optim.loss_lr_mult",
    "optim.gem_lr_mult",
    "data.data_dir", "data.num_workers", "data.decode", "data.skip_bad_images", "data.max_image_pixels",
    "eval.batch_size",
    "output.runs_root", "output.run_dir", "output.export_embeddings", "output.plots",
)
CHANGES_FILE = "config_changes.jsonl"
OWN_RUN_MARK = "# trained by recallk.fit"  # how config.yaml of a run of your own model and datasets begins


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` (mappings inside a section, such as ``data.options``, stay one value)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def config_changes(saved: Mapping[str, Any], config: Config) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, new value)}`` for every key where ``config`` differs from the saved mapping."""
    try:  # normalise the saved mapping (defaults for keys it lacks, tuples, floats)
        saved = config_to_dict(config_from_dict(saved))
    except ConfigError:
        pass  # compare as written
    old, new = _flat(saved), _flat(config_to_dict(config))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def check_resume_config(run_dir: Path, config: Config, own: bool = False) -> dict[str, tuple[Any, Any]]:
    """The accepted changes of ``config`` against ``run_dir/config.yaml``; a :class:`RecallkUsageError` naming the
    changed keys when one of them is not in ``SAFE_ON_RESUME``, or when a run of :func:`recallk.fit` (your own
    model and datasets, ``own``) would be resumed from a config, or the other way round. A run without
    ``config.yaml`` is not checked."""
    saved_file = Path(run_dir) / "config.yaml"
    if not saved_file.is_file():
        return {}
    text = saved_file.read_text(encoding="utf-8")
    if text.startswith(OWN_RUN_MARK) != own:
        raise RecallkUsageError(
            f"{run_dir} was trained by recallk.fit on your own model and datasets; resume it in Python with them: "
            f"recallk.fit(model, train_data, ..., run_dir={str(run_dir)!r}, resume=True)" if not own else
            f"{run_dir} was trained from a config, not by recallk.fit; resume it with recallk train --resume {run_dir}"
        )
    saved = yaml.safe_load(text) or {}
    changes = config_changes(saved, config)
    refused = {k: v for k, v in changes.items() if k not in SAFE_ON_RESUME}
    if refused:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise RecallkUsageError(
            f"cannot resume {run_dir} with a different config ({shown}); the run was trained with "
            f"{saved_file}: drop those changes, or start a new run with another --run-dir (keys that may change on "
            f"resume: {', '.join(SAFE_ON_RESUME)})"
        )
    return changes


def record_resume_changes(
    run_dir: Path, config: Config, changes: Mapping[str, tuple[Any, Any]], epoch: int, step: int
) -> None:
    """Rewrite ``config.yaml`` as ``config`` (keeping the comment lines heading it) and append the accepted
    ``changes`` to ``config_changes.jsonl``."""
    run_dir = Path(run_dir)
    lines = (run_dir / "config.yaml").read_text(encoding="utf-8").splitlines(keepends=True)
    heading = "".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
    atomic_write_text(run_dir / "config.yaml", heading + config_to_yaml(config))
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "epoch": epoch, "step": step,
             "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}}
    with open(run_dir / CHANGES_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
