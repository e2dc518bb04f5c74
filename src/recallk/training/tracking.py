"""Experiment trackers: TensorBoard, MLflow and Weights & Biases behind one small interface.

The trainer reports five things, whatever the trackers (:class:`Trackers` forwards each to every tracker that is on):

- ``start(params)``: the run's config, flattened to ``{"section.key": value}`` (on a fresh run only);
- ``update_params(changes, step)``: the keys a resume changed, in a continuing run (W&B: its config; MLflow, whose
  params cannot change: a tag of the same name with the current value; TensorBoard: a config text at ``step``);
  they are in ``config_changes.jsonl`` too;
- ``log(values, step)``: scalars at an optimiser step (``train/loss`` every step; ``epoch/...`` per epoch: the
  training loss, learning rate and validation metrics of the ``metrics.csv`` row);
- ``finish(splits, step)``: the final test table, ``{split: {metric: value}}``, as ``test/<split>/<metric>`` at the
  last optimiser step;
- ``close()``.

Each tracker resumes its own run: :meth:`Trackers.ids` goes into the checkpoint and comes back on ``--resume``.
The libraries are imported only when their tracker is on; a missing one is a :class:`RecallkUsageError` naming the
``pip install 'recallk[...]'`` that fixes it.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from recallk.config import Config
from recallk.errors import RecallkUsageError


class Tracker(Protocol):
    """What :class:`Trackers` calls on each tracker (see the module docstring)."""

    run_id: str | None

    def start(self, params: Mapping[str, Any]) -> None: ...

    def update_params(self, changes: Mapping[str, Any], step: int) -> None: ...

    def log(self, values: Mapping[str, float], step: int) -> None: ...

    def finish(self, splits: Mapping[str, Mapping[str, float]], step: int) -> None: ...

    def close(self) -> None: ...


def _missing(package: str, extra: str, key: str) -> RecallkUsageError:
    return RecallkUsageError(
        f"{key}=true needs the {package} package; pip install 'recallk[{extra}]' or set {key}=false"
    )


class TensorBoardTracker:
    """Event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir <run_dir>``)."""

    run_id = None

    def __init__(self, path: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard", "train.tensorboard") from None
        self.writer = SummaryWriter(str(path))

    def start(self, params: Mapping[str, Any]) -> None:
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def update_params(self, changes: Mapping[str, Any], step: int) -> None:
        self.writer.add_text("config", "\n".join(f"    {k}: {v} (from step {step})" for k, v in changes.items()), step)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # on disk at once: a killed run keeps its curves up to the last step

    def finish(self, splits: Mapping[str, Mapping[str, float]], step: int) -> None:
        for split, metrics in splits.items():
            for key, value in metrics.items():
                self.writer.add_scalar(f"test/{split}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run in experiment ``config.name`` of ``train.mlflow_uri`` (default: a local file store in
    ``<output.runs_root>/mlruns``; view it with ``mlflow ui --backend-store-uri <runs_root>/mlruns``).

    MLflow metric names cannot hold ``@``: ``val_recall@1`` is logged as ``val_recall_at_1``.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow", "train.mlflow") from None
        if "://" not in uri or uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked; it is the store that needs no database server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id: str | None = run_id
        self.finished = False

    def start(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def update_params(self, changes: Mapping[str, Any], step: int) -> None:
        """MLflow params cannot change: each changed key becomes a tag of the same name holding its current value
        (the param keeps the value the run started with)."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, f"{v} (from step {step})") for k, v in changes.items()])

    def log(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_name(k), float(v), now, step) for k, v in values.items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, splits: Mapping[str, Mapping[str, float]], step: int) -> None:
        self.log({f"test/{split}/{k}": v for split, metrics in splits.items() for k, v in metrics.items()}, step)
        self.client.set_terminated(self.run_id)
        self.finished = True

    def close(self) -> None:
        if not self.finished:  # interrupted or failed: KILLED until a resume sets it RUNNING again
            self.client.set_terminated(self.run_id, status="KILLED")


def _mlflow_name(key: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", key.replace("@", "_at_"))


class WandbTracker:
    """One Weights & Biases run in project ``train.wandb_project``, its files in ``<run_dir>/wandb``.

    ``WANDB_MODE=offline`` keeps it on this machine (``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later).
    """

    def __init__(self, project: str, run_name: str, path: Path, run_id: str | None) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb", "train.wandb") from None
        path.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, dir=str(path), id=run_id, resume="allow")
        self.run_id: str | None = self.run.id
        self.finished = False

    def start(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def update_params(self, changes: Mapping[str, Any], step: int) -> None:
        self.run.config.update(dict(changes), allow_val_change=True)

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def finish(self, splits: Mapping[str, Mapping[str, float]], step: int) -> None:
        self.run.summary.update(
            {f"test/{split}/{k}": v for split, metrics in splits.items() for k, v in metrics.items()}
        )
        self.finished = True

    def close(self) -> None:
        self.run.finish(exit_code=0 if self.finished else 1)


class Trackers:
    """The trackers a config turns on (``train.tensorboard``, ``train.mlflow``, ``train.wandb``), called as one."""

    def __init__(self, config: Config, run_dir: Path, ids: Mapping[str, str | None] | None = None) -> None:
        ids = ids or {}
        t = config.train
        self.trackers: dict[str, Tracker] = {}
        try:
            if t.tensorboard:
                self.trackers["tensorboard"] = TensorBoardTracker(run_dir / "tensorboard")
            if t.mlflow:
                uri = t.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or str(
                    Path(config.output.runs_root).resolve() / "mlruns"
                )
                self.trackers["mlflow"] = MLflowTracker(uri, config.name, run_dir.name, ids.get("mlflow"))
            if t.wandb:
                self.trackers["wandb"] = WandbTracker(t.wandb_project, run_dir.name, run_dir, ids.get("wandb"))
        except BaseException:
            self.close()
            raise
        self.fresh = [name for name in self.trackers if not ids.get(name)]  # runs that have not logged params yet

    def ids(self) -> dict[str, str | None]:
        """Each tracker's run id, saved in the checkpoint so that a resumed training continues the same runs."""
        return {name: tracker.run_id for name, tracker in self.trackers.items() if tracker.run_id is not None}

    def start(self, params: Mapping[str, Any]) -> None:
        """Log ``params`` to the trackers whose run starts now (not to those continuing a resumed run)."""
        for name in self.fresh:
            self.trackers[name].start(params)

    def update_params(self, changes: Mapping[str, Any], step: int) -> None:
        """Record the keys a resume changed (``{key: new value}``) in the runs that continue, from ``step`` on (new
        runs got the current values from :meth:`start`)."""
        for name, tracker in self.trackers.items():
            if name not in self.fresh and changes:
                tracker.update_params(changes, step)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers.values():
            tracker.log(values, step)

    def finish(self, splits: Mapping[str, Mapping[str, float]], step: int) -> None:
        """The test metrics of each split, at the run's last optimiser ``step`` (on the same axis as training)."""
        for tracker in self.trackers.values():
            tracker.finish(splits, step)

    def close(self) -> None:
        for tracker in self.trackers.values():
            tracker.close()
        self.trackers = {}


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` of a nested config mapping (lists stay one value)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
