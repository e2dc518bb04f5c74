"""``recallk.fit``: your own ``nn.Module`` on your own datasets, through the trainer ``recallk train`` runs.

::

    summary = recallk.fit(MyNet(), train_data, test_data=test_data, val_data=val_data,
                          config={"data": {"batch_size": 64, "samples_per_class": 4}, "train": {"epochs": 5}},
                          run_dir="runs/mine")
    model = recallk.load_model("runs/mine", model=MyNet())   # the best checkpoint's weights in a new MyNet

The model and the datasets replace what the config's ``model`` and ``data`` sections would build
(:class:`~recallk.training.assemble.RunParts`); everything else is the config's and the trainer's, unchanged: the
class-balanced batches (``data.batch_size``, ``data.samples_per_class``), the multistage engine
(``train.chunk_size``), loss, optimiser, schedule, validation and ``best.pt``, checkpoints, resume, trackers, test
evaluation, plots and the run directory. The datasets are read by
:func:`~recallk.data.own_dataset.own_source` (items ``(input, label)``, labels readable up front).

The model must map a batch of the datasets' inputs (what ``default_collate`` makes of them) to L2-normalised
embeddings ``(B, D)`` (recallk's losses and metrics rank by dot product). A model with a ``parameter_groups(lr,
backbone_lr_mult, weight_decay)`` method gets those optimiser groups, any other one group at ``optim.lr``.
Checkpoints hold the weights (never pickled code), so a run of your own model is loaded and resumed with an
instance of it: ``load_model(run_dir, model=MyNet())``, ``fit(MyNet(), ..., run_dir=run_dir, resume=True)``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from recallk.config import Config, config_from_dict, config_to_dict, load_config
from recallk.data.inputs import to_device
from recallk.data.own_dataset import OwnDatasetSource, own_source
from recallk.errors import RecallkUsageError
from recallk.losses.unit_norm import NORM_TOLERANCE
from recallk.training.assemble import OWN_RUN_KEYS, RunParts
from recallk.training.preflight import check_device, check_loss_params
from recallk.training.trainer import train

logger = logging.getLogger(__name__)

TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT = "train", "val", "test"  # split names of the datasets given


def fit(
    model: nn.Module,
    train_data: Dataset,
    *,
    test_data: Dataset | Mapping[str, Dataset],
    val_data: Dataset | None = None,
    config: Config | Mapping[str, Any] | str | Path | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``train_data`` with recallk's trainer; returns the summary (also ``summary.json``).

    Args:
        model: maps a batch of inputs to L2-normalised embeddings ``(B, D)``.
        train_data: items ``(input, label)``; labels readable up front (``.labels``/``.targets``, a ``Subset`` of
            such a dataset, or :class:`~recallk.data.own_dataset.LabelledDataset`).
        test_data: the held-out classes the run is scored on after training (with the best checkpoint when there
            is validation); a dataset, or ``{name: dataset}`` for several test splits.
        val_data: validation split that picks ``checkpoints/best.pt`` (and drives early stopping); None: none.
        config: a :class:`~recallk.config.Config`, a mapping of its sections, or a YAML file; None: the defaults.
            Its ``data``/``model`` keys other than ``OWN_RUN_KEYS`` are not used (a warning names any that are set).
        run_dir: the run directory; None: ``<output.runs_root>/<name>-<time>-<suffix>`` (or ``output.run_dir``).
        resume: continue ``run_dir`` from ``checkpoints/last.pt``, given the same model class and datasets.
        progress: draw progress bars (None: only on a terminal).
    """
    if not isinstance(model, nn.Module):
        raise RecallkUsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = _as_config(config)
    if resume and run_dir is None and not config.output.run_dir:
        raise RecallkUsageError("resume=True needs the run to continue: pass run_dir=")
    if config.train.early_stopping_patience is not None and val_data is None:
        raise RecallkUsageError("train.early_stopping_patience needs a validation split; pass val_data=")
    if config.eval.benchmarks:
        raise RecallkUsageError(
            f"eval.benchmarks {list(config.eval.benchmarks)} read landmark images with the config's preprocessing, "
            "which recallk.fit does not use; remove eval.benchmarks"
        )
    check_loss_params(config)
    check_device(config)
    _warn_unused_keys(config)
    workers = config.data.num_workers
    tests = dict(test_data) if isinstance(test_data, Mapping) else {TEST_SPLIT: test_data}
    if not tests:
        raise RecallkUsageError("test_data is an empty mapping; give at least one test dataset")
    train_source = own_source(train_data, "train_data", workers)
    val_source = own_source(val_data, "val_data", workers) if val_data is not None else None
    test_sources = {
        str(name): own_source(data, "test_data" if len(tests) == 1 else f"test_data[{name!r}]", workers)
        for name, data in tests.items()
    }
    embed_dim = _output_size(model, train_source)
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(
            config.data, split_train=TRAIN_SPLIT, split_val=VAL_SPLIT if val_source is not None else None,
            split_test=tuple(test_sources),
        ),
        model=dataclasses.replace(config.model, embed_dim=embed_dim),
    )
    parts = RunParts(
        network=model, train=train_source, val=val_source, test=test_sources,
        untrained=_untrained_copy(model),
        own={"model": f"{type(model).__module__}.{type(model).__qualname__}"},
    )
    return train(config, run_dir, resume=resume, progress=progress, parts=parts)


def _as_config(config: Config | Mapping[str, Any] | str | Path | None) -> Config:
    """The validated config, its ``data.split_val`` naming ``val_data`` (set before validation, so that the
    cross-checks that need a validation split pass here: :func:`fit` checks ``val_data`` itself)."""
    if config is None:
        config = Config()
    if isinstance(config, Config):
        return dataclasses.replace(config, data=dataclasses.replace(config.data, split_val=VAL_SPLIT))
    if isinstance(config, Mapping):
        raw = copy.deepcopy(dict(config))
        raw["data"] = {**raw.get("data", {}), "split_val": VAL_SPLIT}
        return config_from_dict(raw, source="recallk.fit config")
    return load_config(config, [f"data.split_val={VAL_SPLIT}"])


def _warn_unused_keys(config: Config) -> None:
    """Warn about keys of the data and model sections that are set but not used with a given model and data."""
    defaults = _flat(Config())
    named_by_fit = ("data.split_train", "data.split_val", "data.split_test", "model.embed_dim")
    unused = [
        key for key, value in _flat(config).items()
        if key.split(".")[0] in ("data", "model") and key not in (*OWN_RUN_KEYS, *named_by_fit)
        and value != defaults[key]
    ]
    if unused:
        logger.warning("recallk.fit trains your own model and datasets, so these config keys are not used: %s",
                       ", ".join(unused))


def _flat(config: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config_to_dict(config).items()
            if isinstance(values, dict) for key, value in values.items()}


def _output_size(model: nn.Module, source: OwnDatasetSource) -> int:
    """D of the model's output ``(1, D)`` for the first training item (in eval mode, random streams untouched);
    a one-line error when the model does not take the dataset's inputs or does not return a batch of unit vectors."""
    parameter = next(iter(model.parameters()), None)
    if parameter is None:
        raise RecallkUsageError(f"model {type(model).__name__} has no parameters to train")
    batch = source.first_batch()
    if isinstance(batch, (torch.Tensor, Mapping)):
        batch = to_device(batch, parameter.device)
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            output = model(batch)
    except Exception as err:  # noqa: BLE001 - any failure means "this model does not take these inputs"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RecallkUsageError(
            f"model {type(model).__name__} failed on a batch of train_data's first input ({type(err).__name__}: "
            f"{first[:200]}); it must map a batch of the dataset's inputs to embeddings (B, D)"
        ) from err
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or len(output) != 1:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise RecallkUsageError(
            f"model {type(model).__name__} returned {shape} for a batch of one input; it must return embeddings "
            "(B, D), one row per input"
        )
    norm = float(output.float().norm(dim=1)[0])
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise RecallkUsageError(
            f"model {type(model).__name__} returns embeddings of L2 norm {norm:.4g}; recallk's losses and metrics rank "
            "by dot product, so end its forward with torch.nn.functional.normalize(x, dim=1)"
        )
    return int(output.shape[1])


def _untrained_copy(model: nn.Module) -> Callable[[], nn.Module]:
    """A function returning the model as it is now (the untrained baseline of the recall@k plot; its weights are
    copied to the CPU now)."""
    state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}

    def untrained() -> nn.Module:
        network = copy.deepcopy(model)
        network.load_state_dict(state)
        return network

    return untrained


__all__ = ["fit"]
