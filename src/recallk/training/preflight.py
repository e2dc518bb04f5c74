"""Checks run before a training run starts (and by ``recallk train --dry-run``): everything about a config that can
be known without training, each a one-line error with exit status 2 instead of a raw error minutes later."""

from __future__ import annotations

from pathlib import Path

import torch

from recallk.config import Config
from recallk.data.paths import resolve_data_dir
from recallk.data.revisited import RevisitedBenchmark, read_revisited
from recallk.data.sources import check_data_config
from recallk.data.split_checks import check_landmark_splits, check_user_splits
from recallk.engine.distributed import resolve_device
from recallk.errors import RecallkUsageError
from recallk.losses.factory import build_loss
from recallk.models.factory import SMALL_CNN
from recallk.models.text import PREFIX as TEXT_PREFIX
from recallk.training.assemble import (
    build_network,
    build_sampler,
    build_split,
    check_step_limit,
    prepare_engine,
)

TRANSFORM_CHANNELS = {"imagenet": 3, "omniglot": 1}  # channels of the tensors each data.transform produces


def preflight(
    config: Config, data_dir: str | Path | None = None, landmark_lists: bool = True
) -> dict[str, RevisitedBenchmark]:
    """Check the data set, transform, reader options and data root (:func:`~recallk.data.sources.check_data_config`),
    the loss parameters, that the model takes as many input channels as the transform produces, that
    ``train.device`` exists, for user data (csv, folder) the splits' listings
    (:func:`~recallk.data.split_checks.check_user_splits`: files and images exist, no split shares another's), with
    ``landmark_lists`` those of the landmark training sets (:func:`~recallk.data.split_checks.check_landmark_splits`;
    training, which reads them next, passes ``False``), and the files of the landmark benchmarks of
    ``eval.benchmarks``. Returns those benchmarks as read, by name."""
    root = data_dir if data_dir is not None else config.data.data_dir
    check_data_config(config.data, root)
    check_loss_params(config)
    check_channels(config)
    check_device(config)
    data = config.data
    splits = [data.split_train, *([data.split_val] if data.split_val else []), *data.split_test]
    check_user_splits(data, root, splits)
    if landmark_lists:
        check_landmark_splits(data, root, splits)
    return {name: read_revisited(resolve_data_dir(root), name, skip_bad_images=data.skip_bad_images)
            for name in config.eval.benchmarks}


def check_training_batches(config: Config, data_dir: str | Path | None = None, world_size: int = 1) -> None:
    """What the trainer builds before its first step, built the same way (``recallk train --dry-run``; training
    builds these parts itself): the network without pretrained weights, the training split (its listing; no image
    is decoded), the class-balanced sampler on its labels (enough classes for ``data.batch_size /
    data.samples_per_class``), ``train.max_steps`` against the steps of ``train.epochs``, and the multistage
    engine's condition (chunked batches need frozen BatchNorm)."""
    network = build_network(config, weights_follow=True)
    root = data_dir if data_dir is not None else config.data.data_dir
    # dataset= reads the file listing even with data.in_memory: the same labels, without decoding the arrays;
    # device: the training device, where data.decode=gpu must apply
    source = build_split(config, config.data.split_train, network, train=True, data_dir=root,
                         dataset=config.data.dataset, device=resolve_device(config.train.device))
    check_step_limit(config, len(build_sampler(config, source.labels, 0, world_size)))
    prepare_engine(config, network, world_size)


def check_device(config: Config) -> None:
    """``train.device=cuda`` needs a CUDA device that PyTorch can use."""
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise RecallkUsageError(
            "train.device=cuda but PyTorch finds no CUDA device (torch.cuda.is_available() is False: no GPU, no "
            "driver, or a CPU-only torch build); set train.device=auto or train.device=cpu"
        )


def check_loss_params(config: Config) -> None:
    """Build the loss once with ``loss.params`` (cheap: two classes) so that a misspelt parameter fails now."""
    loss = config.loss
    try:
        build_loss(
            loss.name, num_classes=2, embed_dim=config.model.embed_dim, k=loss.k, tau_rank=loss.tau_rank,
            tau_k=loss.tau_k, rank_includes_query=loss.rank_includes_query, simix=loss.simix,
            simix_pairs_per_class=loss.simix_pairs_per_class, params=loss.params,
        )
    except TypeError as err:
        raise RecallkUsageError(
            f"loss.params {loss.params} do not fit loss {loss.name!r} ({err}); fix or remove the parameter"
        ) from None


def model_in_channels(config: Config) -> int | None:
    """Input channels of the configured image model (None for text models)."""
    model = config.model
    if model.backbone.startswith(TEXT_PREFIX):
        return None
    if model.in_chans is not None:
        return model.in_chans
    return 1 if model.backbone == SMALL_CNN else 3


def check_channels(config: Config) -> None:
    """The model's input channels must match the channels of ``data.transform`` (the in-memory Omniglot: 1)."""
    wanted = model_in_channels(config)
    if wanted is None:
        return
    data = config.data
    given = 1 if data.in_memory else TRANSFORM_CHANNELS.get(data.transform)
    if given is not None and given != wanted:
        source = "data.in_memory=true (Omniglot arrays)" if data.in_memory else f"data.transform={data.transform}"
        fix = {1: "data.transform=omniglot", 3: "data.transform=imagenet"}[wanted] if not data.in_memory else ""
        raise RecallkUsageError(
            f"{source} gives {given}-channel images but model.backbone={config.model.backbone} takes {wanted} "
            f"channel(s); set model.in_chans={given}" + (f" or {fix}" if fix else "")
        )

