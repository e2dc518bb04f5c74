"""The training loop: class-balanced batches, the multistage engine, evaluation, checkpoints and outputs.

``train(config)`` runs a whole experiment into a run directory (see :mod:`recallk.training.run_dir`):

- every step draws a class-balanced batch and accumulates the exact full-batch gradient, with the multistage
  engine when the batch is larger than ``train.chunk_size`` (or with several processes), else with one plain
  backward pass;
- every ``train.eval_every`` epochs the validation split is evaluated; the best checkpoint is chosen on it (never
  on the test split), and the test split(s) are evaluated once at the end with that checkpoint;
- training ends after ``train.epochs``, at ``train.max_steps`` (mid-epoch too: that part-epoch is validated and
  saved like a whole one, with a fractional epoch), or by early stopping (``train.early_stopping_patience``);
  ``optim.clip_grad_norm`` clips each step's gradient; with ``train.ema_decay`` the moving average of the weights
  is what is validated, saved as ``"model"`` and tested; progress goes to the console, ``train.log`` and the
  trackers of :mod:`recallk.training.tracking`;
- ``checkpoints/last.pt`` holds everything needed to continue (model, optimiser, schedule, scaler, sampler
  position, RNG states, the length of ``train.log``); Ctrl-C stops after the current step, saves it and raises
  :class:`TrainingInterrupted`; a resumed run repeats the losses of an uninterrupted one exactly (batch augmentation
  is seeded by position), and cuts ``train.log``, ``metrics.csv`` and the trackers back to the checkpoint, so that
  the steps a killed run redoes are recorded once;
- the run's paths are made absolute when it starts (:mod:`recallk.training.run_paths`), so it resumes from any
  directory; a resume that fails (a changed config, another model, a missing MLflow run) writes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from recallk import __version__
from recallk.config import Config, config_to_dict, config_to_yaml
from recallk.data.inputs import Inputs, to_device
from recallk.data.sources import BatchSource
from recallk.engine.distributed import (
    DistributedContext,
    init_distributed,
    leave_process_group,
    resolve_device,
    wrap_ddp,
)
from recallk.engine.multistage import multistage_backward
from recallk.errors import PeerProcessFailed, RecallkUsageError, TrainingDiverged, TrainingInterrupted
from recallk.evaluation.embed import embed_source, evaluate_embeddings, save_embeddings
from recallk.losses.census import positive_pair_census
from recallk.losses.temperature_schedule import TauKAnnealing
from recallk.models.heads import with_gem_group
from recallk.training.assemble import (
    OWN_RUN_KEYS,
    RunParts,
    build_loss_from_config,
    build_sampler,
    check_step_limit,
    config_parts,
    network_parameter_groups,
    prepare_engine,
    resolve_precision,
)
from recallk.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from recallk.training.console import RunLog, ending_line, final_report, show_progress
from recallk.training.evaluate_run import benchmark_metrics
from recallk.training.health import StuckTrainingCheck, gradient_norm, plateau_warning
from recallk.training.phases import PhaseClock
from recallk.training.preflight import preflight
from recallk.training.resume_config import OWN_RUN_MARK, check_resume_config, record_resume_changes
from recallk.training.run_dir import STEPS_CSV, RunDirectory, check_run_dir, new_run_name
from recallk.training.run_paths import with_absolute_paths
from recallk.training.schedule import lr_multiplier, step_warmup
from recallk.training.tracking import Trackers, flat_params

logger = logging.getLogger(__name__)

class _StopRequests:
    """Turns SIGINT/SIGTERM into a flag checked between steps (a second Ctrl-C interrupts at once)."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {}

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            logger.warning("stopping after the current step (press Ctrl-C again to stop at once)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: no handlers
                pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


class Trainer:
    """One training run; build it with :func:`train` or directly, then call :meth:`fit`.

    ``parts``: the network and splits to train (:class:`~recallk.training.assemble.RunParts`, as
    :func:`recallk.fit` gives them); None: built from the config (checked by
    :func:`~recallk.training.preflight.preflight` first).
    """

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        resume: bool = False,
        data_dir: str | Path | None = None,
        progress: bool | None = None,
        dist_context: DistributedContext | None = None,
        parts: RunParts | None = None,
    ) -> None:
        self.run: RunDirectory | None = None
        self.trackers: Trackers | None = None
        self.run_log: RunLog | None = RunLog()  # console lines, also in train.log (held until the folder exists)
        try:  # on failure, release the run directory's lock and the log (e.g. last.pt is not a recallk checkpoint)
            self._build(config, run_dir, resume, data_dir, progress, dist_context, parts)
        except BaseException:
            self.close()
            raise

    def _build(
        self,
        config: Config,
        run_dir: Path,
        resume: bool,
        data_dir: str | Path | None,
        progress: bool | None,
        dist_context: DistributedContext | None,
        parts: RunParts | None,
    ) -> None:
        config = with_absolute_paths(config, run_dir, data_dir)  # as written into config.yaml
        run_dir = Path(config.output.run_dir)
        self.cfg = config
        self.progress = show_progress(progress)
        self.dist = dist_context or init_distributed()
        self.is_main = self.dist.is_main
        if not self.is_main and self.run_log is not None:  # rank 0 writes the log
            self.run_log.close()
            self.run_log = None
        self.device = self.dist.device if self.dist.world_size > 1 else resolve_device(config.train.device)
        data_root = config.data.data_dir
        if self.is_main:
            check_run_dir(run_dir, resume)  # fail fast; the directory is created once data and model are ready
        self.resume_changes = check_resume_config(run_dir, config, own=parts is not None) if resume else {}
        # after the resume check (a changed data set is named as such); it reads the landmark benchmarks of
        # eval.benchmarks too, so a missing or bad file fails before training
        benchmarks = preflight(config, data_root, landmark_lists=False) if parts is None else {}
        self.run_path = run_dir
        _seed_everything(config.seed)

        # pretrained weights kept as read now for the untrained baseline of the recall@k plot (not read twice)
        parts = parts or config_parts(
            config, data_root, with_test=self.is_main, device=self.device, progress=self.progress and self.is_main,
            keep_initial=config.output.plots and not resume and self.is_main,
        )
        self.own, self._untrained = parts.own, parts.untrained
        model = parts.network.to(self.device)
        self.model: nn.Module = model
        self.train_source, self.val_source = parts.train, parts.val
        self.test_sources = parts.test if self.is_main else {}
        self.benchmarks = benchmarks if self.is_main else {}
        for split, source in [(config.data.split_val, self.val_source), *self.test_sources.items()]:
            if source is not None:
                _check_has_positives(source.labels, split)
        self.val_size: dict[str, int] | None = None  # database size of the split that chooses best.pt
        if self.val_source is not None and self.is_main:
            self.val_size = {"images": len(self.val_source.labels), "classes": len(self.val_source.labels.unique())}
        self.sampler = build_sampler(config, self.train_source.labels, self.dist.rank, self.dist.world_size)
        self.loss_fn = build_loss_from_config(config, self.train_source.num_classes).to(self.device)
        self.tau_schedule = None if config.loss.tau_k_start is None else TauKAnnealing(
            self.loss_fn, config.loss.tau_k_start, round(config.loss.tau_k_anneal_epochs * len(self.sampler))
        )
        optim_cls = torch.optim.AdamW if config.optim.name == "adamw" else torch.optim.Adam
        self.optimizer = optim_cls(self._parameter_groups(), lr=config.optim.lr)
        self.steps_per_epoch = len(self.sampler)
        check_step_limit(config, self.steps_per_epoch)
        mult = lr_multiplier(
            config.optim.schedule, config.train.epochs, config.optim.warmup_epochs, config.optim.step_epochs,
            config.optim.gamma,
        )
        warm = step_warmup(config.optim.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: mult(step / self.steps_per_epoch) * warm(step)
        )
        self.amp_dtype = resolve_precision(config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        self.chunked = prepare_engine(config, model, self.dist.world_size, own=self.own is not None)
        self.train_model = wrap_ddp(model, self.dist) if self.dist.world_size > 1 else model
        if config.model.compile:
            self.train_model = torch.compile(self.train_model)
        # train.ema_decay: the moving average of the weights (parameters and buffers) is what is evaluated and saved
        self.ema: AveragedModel | None = None
        if config.train.ema_decay is not None:
            self.ema = AveragedModel(model, multi_avg_fn=_ema_update(config.train.ema_decay), use_buffers=True)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.epoch_losses: list[float] = []  # losses of the current epoch's steps so far
        self.pending_steps: list[dict[str, Any]] = []  # steps.csv rows, written with the next last.pt
        # best checkpoint: highest validation train.select_metric, ties broken by MAP@R
        self.best: dict[str, Any] = {"epoch": -1, "value": -math.inf, "map@r": -math.inf}
        self.evals_since_best = 0  # validations without improvement, for train.early_stopping_patience
        self.stop_reason = "epochs"  # or "max_steps", "early_stopping": why fit() ended (summary.json)
        self.skipped_steps = 0
        self.health = StuckTrainingCheck()
        self.seconds = 0.0
        self.phases = PhaseClock(self.device)  # seconds per phase of this process, in summary.json
        self._tracker_ids: dict[str, str] = {}  # the tracker runs to continue on resume
        self._log_bytes: int | None = None  # on resume: the length of train.log when last.pt was saved
        self.run = RunDirectory(run_dir, resume=resume) if self.is_main else None
        if self.run is not None and self.run_log is not None:  # a resume holds the lines until it cannot fail
            self.run_log.open(self.run.path, held=resume)
        if resume:
            self._load(self.run_path / "checkpoints" / "last.pt")
        elif self.run is not None:
            self.run.write_text("config.yaml", _own_note(self.own) + config_to_yaml(config))
        if self.run is not None:
            self.trackers = Trackers(config, self.run.path, self._tracker_ids, self.step if resume else None)
            if resume:
                self._commit_resume()
            self.trackers.start(flat_params(config_to_dict(config)))
            self.trackers.update_params({k: new for k, (_, new) in self.resume_changes.items()}, self.step)

    # ------------------------------------------------------------------ state

    @property
    def eval_model(self) -> nn.Module:
        """The network that is evaluated, selected and saved as ``"model"``: the weight average with
        ``train.ema_decay``, else the trained network itself."""
        return self.ema.module if self.ema is not None else self.model

    def _state(self) -> dict[str, Any]:
        averaged = {} if self.ema is None else {
            "trained_model": self.model.state_dict(), "ema_updates": int(self.ema.n_averaged),
        }
        return {
            "model": self.eval_model.state_dict(),
            **averaged,
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(self.batch_in_epoch),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "epoch_losses": list(self.epoch_losses),
            "best": self.best,
            "evals_since_best": self.evals_since_best,
            "skipped_steps": self.skipped_steps,
            "seconds": self.seconds,
            "rng": _rng_state(),
            "trackers": self.trackers.ids() if self.trackers is not None else self._tracker_ids,
            "log_bytes": self.run_log.position() if self.run_log is not None else None,
            "config": config_to_dict(self.cfg),
            **({} if self.own is None else {"own": self.own}),
        }

    def _save(self, name: str) -> None:
        if self.run is not None:
            if name == "last.pt":  # steps.csv gets the steps this checkpoint holds (a crash before it: none)
                self.run.append_steps(self.pending_steps)
                self.pending_steps = []
            save_checkpoint(self.run.checkpoints / name, self._state())

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups from the config: backbone, head, GeM exponents (no weight decay,
        ``optim.lr * optim.gem_lr_mult``) and the loss's own parameters (proxies: no weight decay,
        ``optim.lr * optim.loss_lr_mult``)."""
        optim = self.cfg.optim
        groups = network_parameter_groups(self.model, optim.lr, optim.backbone_lr_mult, optim.weight_decay)
        groups = with_gem_group(self.model, groups, optim.lr * optim.gem_lr_mult)
        loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        if loss_params:
            groups.append(
                {"name": "loss", "params": loss_params, "lr": optim.lr * optim.loss_lr_mult, "weight_decay": 0.0}
            )
        return groups

    def _apply_optim_settings(self) -> None:
        """After loading a checkpoint, let learning rates and weight decay from the config win (resume overrides).

        With an unchanged config this changes nothing; ``recallk train --resume DIR optim.lr=1e-5`` takes effect.
        """
        groups = self.optimizer.param_groups
        for group, new in zip(groups, self._parameter_groups()):
            group["initial_lr"], group["weight_decay"] = new["lr"], new["weight_decay"]
        self.scheduler.base_lrs = [group["initial_lr"] for group in groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in groups:
            group["lr"] = group["initial_lr"] * factor

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path)
        try:
            self.eval_model.load_state_dict(state["model"])
            if self.ema is not None:
                self.model.load_state_dict(state["trained_model"])
                self.ema.n_averaged.fill_(state["ema_updates"])
            self.loss_fn.load_state_dict(state["loss"])
        except RuntimeError as err:
            first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
            raise CheckpointError(
                f"{path} holds another model or loss than this config builds ({first.rstrip('.')}); resume with the "
                f"run's own model and loss settings ({self.run_path / 'config.yaml'}), or start a new run"
            ) from None
        saved_groups = [group.get("name") for group in state["optimizer"]["param_groups"]]
        built_groups = [group.get("name") for group in self.optimizer.param_groups]
        if saved_groups != built_groups:  # e.g. a run started before GeM's exponent had its own group
            raise CheckpointError(
                f"{path} holds optimiser groups {saved_groups}, but this recallk builds {built_groups} for the run's "
                "config; resume with the recallk version that started the run, or start a new run"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optim_settings()
        self.scaler.load_state_dict(state["scaler"])
        saved_items = state["sampler"]["num_samples"]
        if saved_items != self.sampler.num_samples:
            logger.warning(
                "the training split has %d items, %d when this run saved its checkpoint (files removed or added, or "
                "data.skip_bad_images); continuing on the current items with the same schedule, so the batches "
                "from here on differ from those of an uninterrupted run", self.sampler.num_samples, saved_items,
            )
        self.sampler.load_state_dict(state["sampler"], allow_new_items=True)
        self.steps_per_epoch = len(self.sampler)
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.epoch_losses = list(state["epoch_losses"])
        self.best, self.skipped_steps, self.seconds = state["best"], state["skipped_steps"], state["seconds"]
        self.evals_since_best = state.get("evals_since_best", 0)
        self._tracker_ids = dict(state.get("trackers", {}))
        self._log_bytes = state.get("log_bytes")
        _set_rng_state(state["rng"])
        _check_unfinished(self.cfg, self.run_path, self.epoch, self.step)
        logger.info(  # epochs counted from 1, as the progress bar and the epoch log lines do
            "resumed from %s in epoch %d/%d after batch %d of %d (step %d)", path, self.epoch + 1,
            self.cfg.train.epochs, self.batch_in_epoch, self.steps_per_epoch, self.step,
        )

    def _commit_resume(self) -> None:
        """A resume's writes, once it can no longer fail: ``train.log``, ``metrics.csv``, ``census.jsonl`` and
        ``steps.csv`` cut back to the checkpoint (a killed run logged steps after it, which are redone), the held log
        lines, and the accepted config changes."""
        assert self.run is not None and self.run_log is not None
        # a run that finished at this checkpoint logged its test after it, which nothing redoes: its log is kept whole
        self.run_log.commit(None if self._finished_here() else self._log_bytes)
        self.run.truncate_metrics(self.step)
        self.run.truncate_census(self.step - 1)  # the census of step s is taken before step s's update
        self.run.truncate_steps(self.step)
        if self.resume_changes:
            record_resume_changes(self.run.path, self.cfg, self.resume_changes, self.epoch, self.step)
            logger.info("resumed with changed %s", ", ".join(
                f"{k} ({old!r} -> {new!r})" for k, (old, new) in self.resume_changes.items()))

    def _finished_here(self) -> bool:
        """Whether the run being resumed finished at the checkpoint's step (its ``summary.json``, written last,
        says so): a run extended with more epochs or steps, not one killed after its checkpoint."""
        assert self.run is not None
        summary = self.run.path / "summary.json"
        return summary.is_file() and json.loads(summary.read_text(encoding="utf-8")).get("steps") == self.step

    # ------------------------------------------------------------------ steps

    def _guarded_loss(self, embeddings: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The loss, or NaN when the model produced non-finite embeddings (handled by ``train.nan_policy``)."""
        if not bool(torch.isfinite(embeddings).all()):
            return embeddings.sum() * float("nan")
        every = self.cfg.output.census_every
        census_due = every and self.step % every == 0 and self.run is not None and self.dist.world_size == 1
        plateau_due = self.step == 0 and self.is_main and self.cfg.loss.name == "rsk" and self.tau_schedule is None
        if census_due or plateau_due:
            census = positive_pair_census(self.loss_fn, embeddings.detach(), labels)
            ranking = getattr(self.loss_fn, "loss", self.loss_fn)  # CrossBatchRecallAtK holds its RS@k as .loss
            if census_due:
                self.run.append_census({"step": self.step, "epoch": self.epoch,
                                        "tau_k": list(getattr(ranking, "tau_k", ())), **census})
            warning = plateau_warning(census, len(labels), ranking.k, ranking.tau_k) if plateau_due else None
            if warning:
                logger.warning(warning)
        return self.loss_fn(embeddings, labels, **kwargs)

    def _train_step(self, images: Inputs, labels: torch.Tensor) -> float:
        images = to_device(images, self.device)
        labels = labels.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        if self.tau_schedule is not None:
            self.tau_schedule.set_step(self.step)
        mixup = getattr(self.loss_fn, "mixup", None)
        if mixup is not None:
            mixup.seed(self.cfg.seed + self.step)  # one SiMix draw per step, the same on every rank
        if self.chunked:
            # RS@k shards its queries over ranks (multistage handles non-finite embeddings on that path)
            sharded = self.dist.world_size > 1 and hasattr(self.loss_fn, "sharded_loss")
            loss = multistage_backward(
                self.train_model, self.loss_fn if sharded else self._guarded_loss, images, labels,
                self.cfg.train.chunk_size,
                autocast_dtype=self.amp_dtype, scaler=self.scaler if self.scaler.is_enabled() else None,
                all_gather=self.dist.world_size > 1,
            )
        else:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                embeddings = self.train_model(images)
            loss = self._guarded_loss(embeddings.float(), labels)
            self.scaler.scale(loss).backward()
        value = float(loss.detach())
        self.phases.lap("forward_backward")
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            if self.cfg.train.nan_policy == "stop":
                raise TrainingDiverged(
                    f"the loss became {value} at step {self.step + 1} (epoch {self.epoch + 1}); the last good "
                    f"checkpoint is kept in {self.run_path / 'checkpoints'}; lower optim.lr, or set "
                    "train.nan_policy=skip to skip such steps"
                )
            self.skipped_steps += 1
            logger.warning(
                "skipped step %d: the loss is %s (%d skipped so far)", self.step + 1, value, self.skipped_steps
            )
        else:
            if self.health.watching:
                scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
                self.health.observe(value, gradient_norm(self.model.parameters()) / scale)
            if self.cfg.optim.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradient, not the loss-scaled one
                torch.nn.utils.clip_grad_norm_(
                    [p for group in self.optimizer.param_groups for p in group["params"]], self.cfg.optim.clip_grad_norm
                )
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        self.scheduler.step()
        return value

    def _train_step_of_job(self, images: Inputs, labels: torch.Tensor) -> float:
        """:meth:`_train_step`; under torchrun, a collective that fails because another rank died (gloo: connection
        closed or reset; NCCL: error or timeout) becomes one clear :class:`PeerProcessFailed` naming the resume."""
        try:
            return self._train_step(images, labels)
        except RuntimeError as err:
            if self.dist.world_size == 1 or not _is_collective_failure(err):
                raise
            cause = " ".join(str(err).split("] ", 1)[-1].split(". ")[0].split())
            raise PeerProcessFailed(
                f"rank {self.dist.rank}: another process of this torchrun job (world size {self.dist.world_size}) "
                f"died or lost its connection during step {self.step + 1} (epoch {self.epoch + 1}): {cause}; the "
                f"last checkpoint is kept in {self.run_path / 'checkpoints'}: check the other ranks' logs, then "
                f"rerun the same torchrun command with 'train --resume {self.run_path}'"
            ) from err

    # ------------------------------------------------------------------ evaluation

    def embed(self, source: BatchSource, desc: str) -> torch.Tensor:
        """Float32 embeddings of a split, whatever ``train.amp`` is (the path ``recallk evaluate`` takes too)."""
        return embed_source(
            self.eval_model, source, self.cfg.eval.batch_size, self.device, progress=self.progress and self.is_main,
            desc=desc,
        )

    def evaluate(self, source: BatchSource, desc: str) -> tuple[dict[str, float | int], torch.Tensor]:
        embeddings = self.embed(source, desc)
        return evaluate_embeddings(embeddings, source.labels, self.cfg.eval.k, progress=False), embeddings

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        """Train for ``train.epochs`` epochs (or ``train.max_steps`` steps, or until early stopping), then evaluate;
        returns the summary."""
        cfg, stop = self.cfg, _StopRequests()
        max_steps = cfg.train.max_steps
        if self.is_main:
            logger.info("recallk %s: training %s from step %d", __version__, self.run_path, self.step)
        if self.val_size is not None:
            items = "sentences" if hasattr(self.model, "tokenize") else "images"
            logger.info(
                "validation split %r: %d %s of %d classes (each a query against the other %d)",
                cfg.data.split_val, self.val_size["images"], items, self.val_size["classes"],
                self.val_size["images"] - 1,
            )
        with stop.installed():
            while self.epoch < cfg.train.epochs and self.stop_reason == "epochs":
                if max_steps and self.step >= max_steps:
                    self.stop_reason = "max_steps"
                    break
                started = time.perf_counter()
                self.sampler.set_epoch(self.epoch)  # keeps a mid-epoch position restored by _load
                batches = self.train_source.train_batches(self.sampler.planned(), cfg.seed)
                bar = tqdm(
                    batches, total=self.steps_per_epoch, initial=self.batch_in_epoch, leave=False, unit="batch",
                    desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}", disable=not (self.progress and self.is_main),
                )
                for images, labels in self.phases.timed(bar, "data"):
                    value = self._train_step_of_job(images, labels)
                    self.phases.step_done()
                    self.epoch_losses.append(value)
                    self.step += 1
                    self.batch_in_epoch += 1
                    bar.set_postfix(loss=f"{value:.4f}")
                    if self.is_main and self.step % cfg.train.log_every == 0:
                        recent = self.epoch_losses[-cfg.train.log_every:]
                        logger.info("epoch %d step %d: loss %.4f (mean of the last %d steps of this epoch)",
                                    self.epoch + 1, self.step, float(np.nanmean(recent)), len(recent))
                    self.pending_steps.append({"step": self.step, "epoch": self._epochs_done(), "loss": value,
                                               "lr": self.optimizer.param_groups[-1]["lr"]})
                    if self.trackers is not None:
                        self.trackers.log({"train/loss": value, "train/lr": self.optimizer.param_groups[0]["lr"]},
                                          self.step)
                    if stop.requested or (max_steps and self.step >= max_steps):
                        break
                bar.close()
                getattr(batches, "close", lambda: None)()  # stops loader workers and threads after max_steps
                self.seconds += time.perf_counter() - started
                if stop.requested:
                    self._save("last.pt")
                    raise TrainingInterrupted(self.run_path, self.step)
                partial = self.batch_in_epoch < self.steps_per_epoch
                if partial:  # train.max_steps ended the run mid-epoch: validate and save all the same
                    self.stop_reason = "max_steps"
                self._end_epoch(partial)
        return self._finish()

    def _epochs_done(self) -> float | int:
        """Completed epochs, with the fraction of a partly trained one (``1.5``: half-way through epoch 2)."""
        if self.batch_in_epoch == 0:
            return self.epoch
        return round(self.epoch + self.batch_in_epoch / self.steps_per_epoch, 4)

    def _end_epoch(self, partial: bool = False) -> None:
        """One ``metrics.csv`` row (training loss, learning rate, validation when due), ``best.pt`` when validation
        improves, ``last.pt``, and the early-stopping count. ``partial``: the training ends mid-epoch
        (``train.max_steps``): the row is that of the part trained and validation always runs."""
        cfg = self.cfg
        losses = self.epoch_losses
        if not partial:
            self.epoch_losses = []
            self.epoch += 1
            self.batch_in_epoch = 0
        position = self._epochs_done()
        row: dict[str, Any] = {
            "epoch": position, "step": self.step,
            "train_loss": float(np.nanmean(losses)) if losses else float("nan"),
            "lr": self.optimizer.param_groups[-1]["lr"], "seconds": round(self.seconds, 2),
        }
        last = partial or self.epoch == cfg.train.epochs
        due = cfg.train.eval_every > 0 and self.epoch % cfg.train.eval_every == 0
        patience = cfg.train.early_stopping_patience
        if self.val_source is not None and (due or last) and self.is_main:
            self.phases.mark()
            with _rng_preserved():  # validating leaves the training's random streams as they were
                metrics, _ = self.evaluate(self.val_source, "validation")
            self.phases.lap("evaluation")
            row.update({f"val_{k}": v for k, v in metrics.items() if not k.startswith("num_")})
            value = metrics[cfg.train.select_metric]
            if (value, metrics["map@r"]) > (self.best["value"], self.best["map@r"]):
                self.best = {"epoch": position, "value": value, "map@r": metrics["map@r"]}
                self.evals_since_best = 0
                self._save("best.pt")
            else:
                self.evals_since_best += 1
            if patience is not None and self.evals_since_best >= patience and not last:
                self.stop_reason = "early_stopping"  # said after this epoch's line, below
        if patience is not None and self.dist.world_size > 1:  # every rank stops with rank 0
            flag = torch.tensor([self.stop_reason == "early_stopping"], dtype=torch.int32, device=self.device)
            torch.distributed.broadcast(flag, 0)
            if bool(flag.item()):
                self.stop_reason = "early_stopping"
        if self.is_main:
            assert self.run is not None
            self.run.append_metrics(row)
            if self.trackers is not None:
                self.trackers.log({f"epoch/{k}": v for k, v in row.items() if k != "step"}, self.step)
            shown = " ".join(f"{k}={row[k]:.4f}" for k in ("train_loss", "val_recall@1") if k in row)
            logger.info("epoch %s/%d step %d %s (%.0fs)", position, cfg.train.epochs, self.step, shown, self.seconds)
            if self.stop_reason == "early_stopping":
                logger.info(
                    "early stopping after epoch %s: validation %s has not improved for %d evaluations (best %.4f at "
                    "epoch %s; train.early_stopping_patience=%d)", position, cfg.train.select_metric,
                    self.evals_since_best, self.best["value"], self.best["epoch"], patience,
                )
            stopping = last or self.stop_reason == "early_stopping"
            if stopping or (cfg.train.checkpoint_every > 0 and self.epoch % cfg.train.checkpoint_every == 0):
                self._save("last.pt")  # last: train.log's length it records includes this epoch's lines

    def _finish(self) -> dict[str, Any]:
        """Evaluate the test split(s) with the best checkpoint (the last one without validation)."""
        if not self.is_main:
            return {}
        assert self.run is not None
        cfg = self.cfg
        self.phases.mark()
        best_path = self.run.checkpoints / "best.pt"
        if self.val_source is not None and best_path.is_file():
            self.eval_model.load_state_dict(load_checkpoint(best_path)["model"])
        splits: dict[str, Any] = {}
        for split in cfg.data.split_test:
            source = self.test_sources[split]
            metrics, embeddings = self.evaluate(source, f"test ({split})")
            splits[split] = metrics
            if cfg.output.export_embeddings:
                save_embeddings(self.run.path / f"embeddings_{split}.npz", embeddings, source)
            if cfg.output.plots:
                from recallk.evaluation.plots import plot_retrievals

                plot_retrievals(self.run.plots / f"retrievals_{split}.png", embeddings, source)
        benchmarks = {
            name: benchmark_metrics(self.eval_model, cfg, benchmark, self.device, progress=False)
            for name, benchmark in self.benchmarks.items()
        }
        self.phases.lap("evaluation")
        primary = splits[cfg.data.split_test[0]] if splits else {}
        summary = {
            **primary,
            "splits": splits,
            "best_epoch": self.best["epoch"],
            "validation": self.val_size,
            "epochs": self._epochs_done(),
            "steps": self.step,
            "stop_reason": self.stop_reason,
            "skipped_steps": self.skipped_steps,
            "train_seconds": round(self.seconds, 2),
            "phase_seconds": self.phases.summary(),
            "run_dir": str(self.run.path),
        }
        if benchmarks:
            summary["benchmarks"] = benchmarks
        if self.own is not None:
            summary["own"] = self.own
        if self.device.type == "cuda":
            summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        if self.ema is not None:
            summary["weights"] = f"exponential moving average (train.ema_decay={cfg.train.ema_decay})"
        if cfg.output.plots:
            from recallk.evaluation.plots import plot_recall_curves, plot_training_curves

            validated = self.val_source is not None
            plot_training_curves(
                self.run.plots / "training_curves.png", self.run.path / "metrics.csv",
                cfg.train.select_metric if validated else None, self.best["epoch"] if validated else None,
                steps_csv=self.run.path / STEPS_CSV,
            )
            if splits:
                summary["untrained"] = self._untrained_metrics(self.test_sources[cfg.data.split_test[0]])
                plot_recall_curves(
                    self.run.plots / "recall_at_k.png", {"untrained": summary["untrained"], "trained": primary}
                )
        if self.trackers is not None:
            self.trackers.finish(splits, self.step)
        self.run.write_json("summary.json", summary)
        if self.run_log is not None:
            self.run_log.note(final_report(summary))  # the command line prints it; the log keeps it too
        return summary

    def _untrained_metrics(self, source: BatchSource) -> dict[str, float | int]:
        """Metrics on ``source`` of the network as it was before training (same seed, same initial or pretrained
        weights, pretrained ones as read at the start): the baseline of the recall@k plot."""
        model = self._untrained().to(self.device)
        embeddings = embed_source(
            model, source, self.cfg.eval.batch_size, self.device, progress=False,
        )
        return evaluate_embeddings(embeddings, source.labels, self.cfg.eval.k, progress=False)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
        if self.run_log is not None:
            self.run_log.close()
            self.run_log = None
        if self.run is not None:
            self.run.close()


def train(
    config: Config,
    run_dir: str | Path | None = None,
    resume: bool = False,
    data_dir: str | Path | None = None,
    progress: bool | None = None,
    parts: RunParts | None = None,
) -> dict[str, Any]:
    """Run an experiment end to end; returns the summary (also written to ``<run_dir>/summary.json``).

    ``progress``: draw progress bars (``None``: only on a terminal, see :func:`recallk.training.console.show_progress`).
    ``parts``: a given network and splits (:func:`recallk.fit`) instead of the config's.
    """
    path = Path(run_dir) if run_dir is not None else default_run_dir(config)
    owns_process_group = not torch.distributed.is_initialized()  # a caller's own group is left to the caller
    trainer = Trainer(config, path, resume=resume, data_dir=data_dir, progress=progress, parts=parts)
    try:
        summary = trainer.fit()
    except BaseException as err:
        if trainer.run_log is not None:
            level, line = ending_line(err)
            trainer.run_log.note(line, level)
        raise
    finally:
        trainer.close()
    if owns_process_group:
        leave_process_group()  # every rank waits for rank 0's test evaluation, then all leave together
    return summary


def default_run_dir(config: Config) -> Path:
    """``<output.runs_root>/<name>-<YYYYmmdd-HHMMSS>-<suffix>`` (:func:`~recallk.training.run_dir.new_run_name`:
    unique for runs started in the same second) unless ``output.run_dir`` is set."""
    if config.output.run_dir:
        return Path(config.output.run_dir)
    return Path(config.output.runs_root) / new_run_name(config.name)


def _is_collective_failure(err: RuntimeError) -> bool:
    """Whether ``err`` comes from a torch.distributed collective whose peer is gone (gloo, NCCL or c10d)."""
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err)
    return any(mark in text for mark in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer"))


def _own_note(own: dict[str, str] | None) -> str:
    """The comment heading ``config.yaml`` of a :func:`recallk.fit` run: which config keys it did not use."""
    if own is None:
        return ""
    return (f"{OWN_RUN_MARK} on your own model ({own['model']}) and datasets: of the data and model "
            f"sections it used {', '.join(OWN_RUN_KEYS)} (the split names and model.embed_dim are the datasets' and "
            "the model's)\n")


def _ema_update(decay: float) -> Any:
    """``AveragedModel``'s ``multi_avg_fn`` for ``train.ema_decay``: floating-point parameters and buffers move to
    ``decay * average + (1 - decay) * current``; integer buffers (BatchNorm's ``num_batches_tracked``) are counts,
    not averaged: they take the trained network's value (torch's EMA function averaged and truncated them)."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _: torch.Tensor) -> None:
        if averaged[0].is_floating_point() or averaged[0].is_complex():  # one dtype per call (grouped by torch)
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:
            for count, trained in zip(averaged, current):
                count.copy_(trained)

    return update


def _check_unfinished(config: Config, run: Path, epochs_done: int, step: int) -> None:
    """A resumed run must have steps left under ``train.epochs`` and ``train.max_steps``; else one line says how to
    extend it (there is nothing to continue: the run would only evaluate again)."""
    epochs, limit = config.train.epochs, config.train.max_steps
    if epochs_done >= epochs:
        raise RecallkUsageError(
            f"run {run} has finished: it trained all train.epochs={epochs} epochs; to continue it, resume with more "
            f"epochs (e.g. train.epochs={epochs + 1}); to measure it, use 'recallk evaluate {run}'"
        )
    if limit is not None and step >= limit:
        raise RecallkUsageError(
            f"run {run} has finished: it stopped at train.max_steps={limit}; to continue it, resume with "
            f"train.max_steps=null or a larger value; to measure it, use 'recallk evaluate {run}'"
        )


def _check_has_positives(labels: torch.Tensor, split: str | None) -> None:
    """A split whose classes all hold one item has no query with a positive: say so before training, not after."""
    if len(labels) == 0 or int(torch.bincount(labels).max()) < 2:
        raise RecallkUsageError(
            f"split {split!r} has no class with two or more items, so no query has a positive to retrieve; "
            "use a split with several items per class (data.split_val / data.split_test)"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _rng_preserved() -> Iterator[None]:
    """Restore every random generator's state on exit (e.g. data loaders draw seeds from torch's)."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state((state["numpy"][0], np.asarray(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(state: tuple) -> list:
    return [state[0], torch.from_numpy(state[1].astype(np.int64)), int(state[2]), int(state[3]), float(state[4])]


def _python_state_to_plain(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


