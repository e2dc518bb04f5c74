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
A run killed after its last checkpoint redoes the steps since then, so a resumed run keeps one value per step:
TensorBoard hides the killed process's events from the checkpoint's step on (``purge_step``); MLflow cannot delete a
logged point, so a resumed MLflow run does not log again a step its metric already holds (a resume repeats those
steps exactly, :mod:`recallk.training.trainer`); W&B ignores steps below its run's current step itself.

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
from urllib.parse import urlparse

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
    """Event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir <run_dir>``); its id is that folder's name.

    ``purge_step``: a resumed run's first step; TensorBoard hides the events that earlier files hold from that step
    on (those a killed process logged after its last checkpoint)."""

    def __init__(self, path: Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard", "train.tensorboard") from None
        self.writer = SummaryWriter(str(path), purge_step=purge_step)
        self.run_id: str | None = path.name

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
    """One MLflow run in experiment ``config.name`` of the store :func:`mlflow_store_uri` names.

    MLflow metric names cannot hold ``@``: ``val_recall@1`` is logged as ``val_recall_at_1``. A resumed run
    (``run_id``) logs no point at a step its metric already has (see the module docstring).
    """

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None) -> None:
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow", "train.mlflow") from None
        local = _local_store_path(uri)
        if run_id is not None and local is not None and not local.exists():  # opening it would create an empty one
            raise _not_in_store(uri, run_id)
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked (a reader needs MLFLOW_ALLOW_FILE_STORE=true as well)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if run_id is None:
                found = self.client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
                run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
                self.logged: dict[str, int] = {}
            else:
                self.logged = self._last_steps(run_id)
                self.client.update_run(run_id, status="RUNNING")
        except MlflowException as err:
            if run_id is not None and err.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise _not_in_store(uri, run_id) from None
            raise _unusable_store(uri, err) from None
        except ImportError as err:  # e.g. the SQL stores' sqlalchemy with mlflow-skinny alone
            raise RecallkUsageError(
                f"the MLflow store train.mlflow_uri={uri} needs the {err.name} package; pip install 'recallk[mlflow]'"
            ) from None
        except (OSError, RuntimeError) as err:  # a folder that cannot be created, a database driver's error
            raise _unusable_store(uri, err) from None
        self.run_id: str | None = run_id
        self.finished = False

    def _last_steps(self, run_id: str) -> dict[str, int]:
        """``{metric: last step logged}`` of a run being resumed."""
        metrics = self.client.get_run(run_id).data.metrics
        return {key: max(m.step for m in self.client.get_metric_history(run_id, key)) for key in metrics}

    def start(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def update_params(self, changes: Mapping[str, Any], step: int) -> None:
        """MLflow params cannot change: each changed key becomes a tag of the same name holding its current value
        (the param keeps the value the run started with)."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, f"{v} (from step {step})") for k, v in changes.items()])

    def log(self, values: Mapping[str, float], step: int) -> None:
        self._log({k: v for k, v in values.items() if step > self.logged.get(_mlflow_name(k), -1)}, step)

    def _log(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_name(k), float(v), now, step) for k, v in values.items() if math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, splits: Mapping[str, Mapping[str, float]], step: int) -> None:
        # at the last step; each finish logs its table (a finished run resumed for more epochs is tested again)
        self._log({f"test/{split}/{k}": v for split, metrics in splits.items() for k, v in metrics.items()}, step)
        self.client.set_terminated(self.run_id)
        self.finished = True

    def close(self) -> None:
        if not self.finished:  # interrupted or failed: KILLED until a resume sets it RUNNING again
            self.client.set_terminated(self.run_id, status="KILLED")


MLFLOW_STORE = "mlflow.db"  # the default store: one SQLite file under output.runs_root, shared by its runs


def mlflow_store_uri(config: Config) -> str:
    """The MLflow store of a run, absolute: ``train.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<output.runs_root>/mlflow.db``. A relative SQLite file or file-store folder is taken from the current
    directory (MLflow would take it from the directory of each process that opens it)."""
    uri = config.train.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (
        f"sqlite:///{Path(config.output.runs_root) / MLFLOW_STORE}"
    )
    path = _local_store_path(uri)
    if path is None:
        return uri  # a server, a database server, or an in-memory SQLite database
    absolute = os.path.abspath(path)
    if uri.startswith("sqlite:"):
        _, question, query = uri.partition("?")  # driver options, e.g. ?timeout=30
        return f"sqlite:///{absolute}{question}{query}"
    return Path(absolute).as_uri()


def _local_store_path(uri: str) -> Path | None:
    """The file (SQLite) or folder (file store) of a local MLflow store; None for any other store."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?")[0]
        return Path(path).expanduser() if path and path != ":memory:" else None
    parsed = urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(parsed.path).expanduser()
    return Path(uri).expanduser() if not parsed.scheme else None


def _not_in_store(uri: str, run_id: str) -> RecallkUsageError:
    return RecallkUsageError(
        f"the MLflow run {run_id} this run logs to is not in train.mlflow_uri={uri}; resume with the store it was "
        "logged to (train.mlflow_uri=..., in the run's config.yaml; runs started before the SQLite default logged to "
        "file:<output.runs_root>/mlruns), or with train.mlflow=false"
    )


def _unusable_store(uri: str, err: BaseException) -> RecallkUsageError:
    reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return RecallkUsageError(
        f"cannot open the MLflow store train.mlflow_uri={uri} ({reason}); set train.mlflow_uri to a store this "
        f"process can open (e.g. sqlite:///runs/{MLFLOW_STORE}), or train.mlflow=false"
    )


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
    """The trackers a config turns on (``train.tensorboard``, ``train.mlflow``, ``train.wandb``), called as one.

    ``resume_step``: the step of the checkpoint a resumed run starts from (None: a new run). TensorBoard is opened
    last: its event file is the one thing a tracker writes before the others could refuse to start.
    """

    def __init__(
        self, config: Config, run_dir: Path, ids: Mapping[str, str | None] | None = None,
        resume_step: int | None = None,
    ) -> None:
        ids = ids or {}
        t = config.train
        self.trackers: dict[str, Tracker] = {}
        try:
            if t.mlflow:
                uri = mlflow_store_uri(config)
                self.trackers["mlflow"] = MLflowTracker(uri, config.name, run_dir.name, ids.get("mlflow"))
            if t.wandb:
                self.trackers["wandb"] = WandbTracker(t.wandb_project, run_dir.name, run_dir, ids.get("wandb"))
            if t.tensorboard:
                purge = None if resume_step is None else resume_step + 1
                self.trackers["tensorboard"] = TensorBoardTracker(run_dir / "tensorboard", purge)
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
