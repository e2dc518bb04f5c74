"""One assembly: a :class:`~recallk.config.Config` -> the network, data sources, sampler, loss and precision.

The trainer, ``recallk evaluate``, ``recallk embed``, :func:`~recallk.training.evaluate_run.load_trained_model` and
:func:`recallk.load_model` all build their parts here, so a run is evaluated with exactly the model, data decoding
and preprocessing it was trained with. A run's network and splits travel together as :class:`RunParts`: built from
the config (:func:`config_parts`), or given by :func:`recallk.fit` (your own model and datasets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import Tensor, nn

from recallk.config import Config
from recallk.data.factory import reader_decoding
from recallk.data.image_dataset import convert_image
from recallk.data.sampler import ClassBalancedBatchSampler
from recallk.data.sources import BatchSource, build_source
from recallk.data.transforms import build_transforms
from recallk.engine.batchnorm import batchnorm_layers_in_training_mode, freeze_batchnorm
from recallk.errors import RecallkUsageError
from recallk.losses.factory import build_loss
from recallk.models.factory import create_model_from_config

__all__ = [
    "OWN_RUN_KEYS",
    "RunParts",
    "build_loss_from_config",
    "build_network",
    "build_sampler",
    "build_split",
    "check_step_limit",
    "config_parts",
    "decode_like_the_reader",
    "eval_transform",
    "network_parameter_groups",
    "prepare_engine",
    "reader_decoding_of",
    "resolve_precision",
]

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_network(config: Config, weights_follow: bool = False, progress: bool | None = None) -> nn.Module:
    """The embedding network of ``config.model`` on the CPU.

    ``weights_follow``: the caller loads the weights (a checkpoint, a saved model), so pretrained backbone weights
    are neither downloaded nor read. ``progress``: draw loading bars (text models; ``None``: on a terminal only).
    """
    model_cfg = config.model
    if weights_follow:
        model_cfg = dataclasses.replace(model_cfg, pretrained=False, pretrained_path=None)
    return create_model_from_config(model_cfg, progress)


def build_split(
    config: Config,
    split: str,
    network: nn.Module,
    train: bool = False,
    data_dir: str | Path | None = None,
    dataset: str | None = None,
    device: torch.device | None = None,
) -> BatchSource:
    """The batches of ``split`` as ``network`` consumes them (its ``tokenize`` for text, its timm preprocessing).

    ``data_dir`` (default ``data.data_dir``) is the data root; ``dataset`` reads another data set with the same
    preprocessing (files, not ``data.in_memory`` arrays); ``device``: the training device, where ``data.decode`` may
    decode a training split.
    """
    data_cfg = config.data
    if dataset is not None:
        data_cfg = dataclasses.replace(data_cfg, dataset=dataset, in_memory=False)
    root = data_dir if data_dir is not None else config.data.data_dir
    return build_source(
        data_cfg, split, train, root, config.seed, getattr(network, "tokenize", None), config.model.backbone, device
    )


# What a run of your own model and datasets (recallk.fit) reads of the config's data and model sections; the split
# names are those of the datasets given, model.embed_dim the size the model outputs.
OWN_RUN_KEYS = (
    "data.batch_size", "data.samples_per_class", "data.small_classes", "data.num_workers", "model.compile",
)


@dataclasses.dataclass
class RunParts:
    """The network a run trains and the splits it reads.

    ``train``/``val``/``test`` are the sources of the training split, the validation split (None: no validation)
    and the test splits by name; ``untrained()`` is the network as it was before training (the baseline of the
    recall@k plot); ``own`` says what :func:`recallk.fit` was given (``{"model": "module.Class"}``, written into
    the checkpoints: such a run is reloaded with that model, not rebuilt from its config), None for a config's run.
    """

    network: nn.Module
    train: BatchSource
    val: BatchSource | None
    test: dict[str, BatchSource]
    untrained: Callable[[], nn.Module]
    own: dict[str, str] | None = None


def config_parts(
    config: Config,
    data_dir: str | Path | None,
    with_test: bool = True,
    device: torch.device | None = None,
    progress: bool | None = None,
    keep_initial: bool = False,
) -> RunParts:
    """The network of ``config.model`` (initialised from ``config.seed``'s current random state) and the splits of
    ``config.data`` (the test splits only ``with_test``: built now so that a typo fails before training); the
    training split is decoded for ``device`` (``data.decode``). ``progress``: loading bars of text models (``None``:
    on a terminal only). ``keep_initial``: ``untrained()`` reuses the pretrained weights read now, kept in memory,
    instead of reading them again."""
    network = build_network(config, progress=progress)
    pretrained = config.model.pretrained or config.model.pretrained_path is not None
    kept = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()} if (
        keep_initial and pretrained) else None
    val = config.data.split_val
    return RunParts(
        network=network,
        train=build_split(config, config.data.split_train, network, train=True, data_dir=data_dir, device=device),
        val=build_split(config, val, network, data_dir=data_dir) if val else None,
        test={split: build_split(config, split, network, data_dir=data_dir) for split in config.data.split_test}
        if with_test else {},
        untrained=lambda: _seeded_network(config, kept),
    )


def _seeded_network(config: Config, weights: dict[str, Tensor] | None = None) -> nn.Module:
    """The network of ``config`` as a run first builds it: from ``config.seed``; with ``weights`` (its initial state,
    kept in memory) instead of reading pretrained weights again."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        network = build_network(config, weights_follow=weights is not None)
    if weights is not None:
        network.load_state_dict(weights)
    return network


def network_parameter_groups(
    network: nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float
) -> list[dict[str, Any]]:
    """The network's optimiser groups: its own ``parameter_groups(lr, backbone_lr_mult, weight_decay)`` when it
    has one (recallk's models: backbone and head), else one group ``"model"`` of every trained parameter."""
    if hasattr(network, "parameter_groups"):
        return network.parameter_groups(lr, backbone_lr_mult, weight_decay)
    params = [p for p in network.parameters() if p.requires_grad]
    return [{"name": "model", "params": params, "lr": lr, "weight_decay": weight_decay}]


def build_sampler(config: Config, labels: Tensor, rank: int = 0, world_size: int = 1) -> ClassBalancedBatchSampler:
    """Class-balanced training batches of ``data.batch_size`` (``data.samples_per_class`` per class; classes with
    fewer images are padded or dropped as ``data.small_classes`` says)."""
    data = config.data
    try:
        return ClassBalancedBatchSampler(
            labels.numpy(), data.batch_size, data.samples_per_class, seed=config.seed, rank=rank,
            world_size=world_size, small_classes=data.small_classes,
        )
    except ValueError as err:
        raise RecallkUsageError(
            f"data.batch_size={data.batch_size} with data.samples_per_class={data.samples_per_class} does not fit "
            f"the training split {data.split_train!r}: {err}"
        ) from None


def check_step_limit(config: Config, steps_per_epoch: int) -> None:
    """``train.max_steps`` stops a run early; one the epochs cannot reach (more than ``train.epochs x
    steps_per_epoch``) would be ignored, so it is refused in one line naming the epochs it needs. (The schedule,
    warm-up, validation and checkpoints count epochs: extending the run silently would change all of them.)"""
    limit, epochs = config.train.max_steps, config.train.epochs
    if limit is not None and limit > epochs * steps_per_epoch:
        needed = -(-limit // steps_per_epoch)
        raise RecallkUsageError(
            f"train.max_steps={limit} is more than the {epochs * steps_per_epoch} steps of train.epochs={epochs} "
            f"({steps_per_epoch} steps per epoch of the training split), so it would never stop the run; set "
            f"train.epochs={needed}, or train.max_steps<={epochs * steps_per_epoch} (or null)"
        )


def prepare_engine(config: Config, network: nn.Module, world_size: int = 1, own: bool = False) -> bool:
    """Whether training splits each batch into chunks of ``train.chunk_size`` (the multistage engine: a batch larger
    than the chunk, or several processes). Such a run needs ``network`` without BatchNorm layers that use batch
    statistics: with ``model.freeze_batchnorm`` null they are frozen here (in place); with ``false``, or for ``own``
    a model of :func:`recallk.fit` (which does not read ``model.freeze_batchnorm``), a one-line
    :class:`~recallk.errors.RecallkUsageError` names the two ways out."""
    per_rank_batch = config.data.batch_size // world_size
    chunked = config.train.chunk_size < per_rank_batch or world_size > 1
    if chunked and config.model.freeze_batchnorm is None and not own:
        freeze_batchnorm(network)
    if chunked and batchnorm_layers_in_training_mode(network):
        freeze = "freeze them with recallk.engine.freeze_batchnorm(model)" if own else "set model.freeze_batchnorm=true"
        raise RecallkUsageError(
            f"data.batch_size {config.data.batch_size} is split into chunks of train.chunk_size "
            f"{config.train.chunk_size}, which needs frozen BatchNorm; {freeze} or train.chunk_size>={per_rank_batch}"
        )
    return chunked


def build_loss_from_config(config: Config, num_classes: int | None) -> nn.Module:
    """The training loss of ``config.loss`` (proxy losses get one proxy per class of ``num_classes``)."""
    loss = config.loss
    return build_loss(
        loss.name, num_classes=num_classes, embed_dim=config.model.embed_dim, k=loss.k, tau_rank=loss.tau_rank,
        tau_k=loss.tau_k, rank_includes_query=loss.rank_includes_query, simix=loss.simix,
        simix_pairs_per_class=loss.simix_pairs_per_class, memory_size=loss.memory_size, params=loss.params,
    )


def resolve_precision(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the network forward (``train.amp``; ``auto``: bf16 on CUDA, none on CPU)."""
    amp = config.train.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return AMP_DTYPES[amp]


def reader_decoding_of(config: Config) -> tuple[str, bool]:
    """``(image_mode, invert)``: how the reader of ``data.dataset`` decodes an image file ("L" or "RGB", inverted or
    not) before ``data.transform``; what :class:`recallk.pretrained.Preprocessing` repeats for new images."""
    return reader_decoding(config.data.dataset, config.data.options)


def decode_like_the_reader(image: Image.Image, mode: str, invert: bool) -> Image.Image:
    """``image`` decoded as the training reader decodes its files (:func:`reader_decoding_of`)."""
    image = convert_image(image, mode)
    return ImageOps.invert(image) if invert else image


def eval_transform(
    transform: str, image_size: int, backbone: str | None, mean: object = None, std: object = None
) -> Callable[[Image.Image], Tensor]:
    """The evaluation transform of ``data.transform`` (what :func:`build_split` gives a non-training split)."""
    return build_transforms(transform, image_size, False, backbone, mean=mean, std=std)  # type: ignore[arg-type]
