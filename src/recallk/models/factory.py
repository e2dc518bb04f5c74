"""Model factory: a timm backbone (or the small Omniglot CNN) followed by the paper's embedding head.

``create_model("resnet50", embed_dim=512, pretrained=True)`` builds ResNet-50 -> GeM -> LayerNorm -> Linear(512) ->
L2 normalisation, the paper's ResNet-50 model; ``create_model("vit_base_patch16_224.augreg_in21k", pooling="cls")``
the ViT-B/16 model (class token -> LayerNorm -> Linear -> L2 normalisation).
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import nn

from recallk.engine.batchnorm import freeze_batchnorm as _freeze_batchnorm
from recallk.errors import PretrainedWeightsError, RecallkUsageError
from recallk.models.heads import EmbeddingHead, backbone_and_head_groups
from recallk.models.packaged_weights import is_packaged, packaged_weights_file
from recallk.models.small_cnn import SmallCNN
from recallk.models.text import PREFIX as TEXT_PREFIX
from recallk.models.text import SentenceEncoder, create_sentence_encoder
from recallk.models.weights_by_order import map_by_order, names_overlap, timm_reference
from recallk.models.whitening import Whitening
from recallk.registry import NORMS, POOLINGS, WHITENINGS

if TYPE_CHECKING:
    from recallk.config import ModelConfig

SMALL_CNN = "omniglot_cnn"
logger = logging.getLogger(__name__)


class EmbeddingModel(nn.Module):
    """``backbone`` followed by an :class:`EmbeddingHead` and, once learned (``recallk whiten``), a
    :class:`~recallk.models.whitening.Whitening`: images ``(B, C, H, W)`` -> embeddings ``(B, embed_dim)``.

    Every output row has unit L2 norm, so the dot product of two embeddings is their cosine similarity. The
    whitening is part of the module (its buffers are in the state dict), so every path that runs the model (saved
    checkpoints and folders, ``embed``, ``search``, TorchScript/ONNX export) applies it.
    """

    def __init__(
        self, backbone: nn.Module, head: EmbeddingHead, channels_last: bool = False,
        whitening: Whitening | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.channels_last = channels_last
        self.whitening: nn.Module = nn.Identity()
        self.embed_dim = head.fc.out_features
        if whitening is not None:
            self.set_whitening(whitening)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def set_whitening(self, whitening: Whitening | None) -> None:
        """Append ``whitening`` after the head (``None``: remove it); ``embed_dim`` becomes its output size."""
        if whitening is not None and whitening.in_dim != self.head.fc.out_features:
            raise ValueError(
                f"whitening takes {whitening.in_dim}-d descriptors but the head gives {self.head.fc.out_features}"
            )
        self.whitening = nn.Identity() if whitening is None else whitening
        self.embed_dim = self.head.fc.out_features if whitening is None else whitening.out_dim

    def unwhitened(self, images: torch.Tensor) -> torch.Tensor:
        """The head's unit-norm descriptors ``(B, head dim)`` before any whitening (what whitening is fitted on)."""
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.whitening(self.unwhitened(images))

    def parameter_groups(self, lr: float, backbone_lr_mult: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
        """The backbone at ``lr * backbone_lr_mult``, the head at ``lr`` (:func:`backbone_and_head_groups`)."""
        return backbone_and_head_groups(
            self.backbone.parameters(), self.head.parameters(), lr, backbone_lr_mult, weight_decay
        )


def list_backbones(pattern: str = "*") -> list[str]:
    """Backbone names accepted by :func:`create_model` that match a glob ``pattern`` (timm's and ``omniglot_cnn``)."""
    local = [SMALL_CNN] if fnmatch.fnmatch(SMALL_CNN, pattern) else []
    return local + timm.list_models(pattern)


def create_model(
    backbone: str,
    embed_dim: int = 512,
    pretrained: bool = False,
    pretrained_path: str | Path | None = None,
    pooling: str = "gem",
    gem_p: float = 3.0,
    gem_learnable: bool = True,
    layernorm: bool = True,
    freeze_batchnorm: bool = False,
    in_chans: int | None = None,
    widths: Sequence[int] = (64, 128, 256, 256),
    channels_last: bool = False,
    norm: str = "batch",
    whitening: str = "none",
    whitening_dim: int | None = None,
) -> EmbeddingModel:
    """Build an embedding model: backbone -> pool -> LayerNorm -> Linear(embed_dim) -> L2 normalisation.

    Args:
        backbone: a timm model name, optionally with a weights tag (``resnet50.tv_in1k``), or ``"omniglot_cnn"``.
        embed_dim: size of the output embedding.
        pretrained: load ImageNet weights through timm (downloaded, or found in the Hugging Face cache).
        pretrained_path: local file with backbone weights (``.safetensors``/``.pth``); implies pretrained loading.
        pooling: ``"gem"`` or ``"avg"`` over CNN feature maps; ``"cls"``: the class token of a vision transformer.
        gem_p, gem_learnable: initial GeM exponent and whether it is trained.
        layernorm: LayerNorm on the pooled features before the linear layer.
        freeze_batchnorm: keep every BatchNorm layer of the backbone in eval mode (fixed running statistics).
        in_chans: input channels (None: 3 for timm backbones, 1 for ``omniglot_cnn``).
        widths: channels of each conv block of ``omniglot_cnn`` (ignored for timm backbones).
        channels_last: store weights and inputs in NHWC memory format.
        norm: normalisation layers of ``omniglot_cnn``: ``"batch"`` (BatchNorm) or ``"group"`` (GroupNorm, no batch
            statistics, so it trains with chunked batches without freezing); timm backbones take ``"batch"`` only.
        whitening, whitening_dim: ``"none"``, or the kind (``"learned"``/``"pca"``) of a whitening layer with
            ``whitening_dim`` outputs (None: ``embed_dim``) appended after the head; its buffers come from the weights
            loaded afterwards (``recallk whiten`` fits them).

    Raises:
        RecallkUsageError: unknown backbone, a pooling that does not fit the backbone, or an unknown norm.
        PretrainedWeightsError: weights requested but not downloadable or not loadable.
    """
    if pooling not in POOLINGS:
        raise RecallkUsageError(POOLINGS.unknown(pooling))
    if norm not in NORMS:
        raise RecallkUsageError(NORMS.unknown(norm))
    if whitening not in WHITENINGS:
        raise RecallkUsageError(WHITENINGS.unknown(whitening))
    if backbone == SMALL_CNN:
        net: nn.Module = _create_small_cnn(in_chans or 1, widths, pretrained, pretrained_path, pooling, norm)
    else:
        if norm != "batch":
            raise RecallkUsageError(
                f"model.norm={norm} applies to {SMALL_CNN} only; timm backbone '{backbone}' keeps its own "
                "normalisation layers, so set model.norm=batch"
            )
        net = _create_timm_backbone(backbone, pretrained, pretrained_path, pooling, in_chans)
    if freeze_batchnorm:
        _freeze_batchnorm(net)
    head = EmbeddingHead(net.num_features, embed_dim, pooling, gem_p, gem_learnable, layernorm)
    layer = None if whitening == "none" else Whitening(embed_dim, whitening_dim)
    return EmbeddingModel(net, head, channels_last=channels_last, whitening=layer)


def create_model_from_config(cfg: ModelConfig, progress: bool | None = None) -> EmbeddingModel | SentenceEncoder:
    """:func:`create_model` with the fields of a :class:`~recallk.config.ModelConfig` (``compile`` is the
    trainer's job); a backbone ``st:<name>`` is a sentence-transformers text encoder
    (:func:`~recallk.models.text.create_sentence_encoder`, which draws its loading bars as ``progress`` says)."""
    if cfg.backbone.startswith(TEXT_PREFIX):
        if cfg.whitening != "none":
            raise RecallkUsageError("whitening applies to image models only; set model.whitening=none")
        return create_sentence_encoder(cfg.backbone, cfg.embed_dim, progress=progress)
    return create_model(
        cfg.backbone,
        embed_dim=cfg.embed_dim,
        pretrained=cfg.pretrained,
        pretrained_path=cfg.pretrained_path,
        pooling=cfg.pooling,
        gem_p=cfg.gem_p,
        gem_learnable=cfg.gem_learnable,
        layernorm=cfg.layernorm,
        freeze_batchnorm=bool(cfg.freeze_batchnorm),  # null: the trainer decides (training.assemble)
        in_chans=cfg.in_chans,
        widths=cfg.widths,
        channels_last=cfg.channels_last,
        norm=cfg.norm,
        whitening=cfg.whitening,
        whitening_dim=cfg.whitening_dim,
    )


def _short_error(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or "no details"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


def _checked_weights_file(pretrained_path: str | Path, backbone: str) -> Path:
    """The weights file of ``model.pretrained_path``: a path, or ``package:<name>`` (:mod:`.packaged_weights`)."""
    if is_packaged(pretrained_path):
        return packaged_weights_file(str(pretrained_path), backbone)
    path = Path(pretrained_path).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(
            f"pretrained weights file '{pretrained_path}' for backbone '{backbone}' does not exist; "
            "fix model.pretrained_path or set it to null"
        )
    return path


def _create_small_cnn(
    in_chans: int,
    widths: Sequence[int],
    pretrained: bool,
    pretrained_path: str | Path | None,
    pooling: str,
    norm: str = "batch",
) -> SmallCNN:
    if pooling == "cls":
        raise RecallkUsageError(f"pooling 'cls' needs a vision transformer, but {SMALL_CNN} is a CNN; "
                                "set model.pooling=avg or gem")
    if pretrained and pretrained_path is None:
        raise PretrainedWeightsError(f"{SMALL_CNN} has no published pretrained weights; set model.pretrained=false "
                                     "or give a weights file in model.pretrained_path")
    net = SmallCNN(in_chans, widths, norm)
    if pretrained_path is not None:
        path = _checked_weights_file(pretrained_path, SMALL_CNN)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, ValueError, KeyError) as err:
            raise PretrainedWeightsError(
                f"could not load {SMALL_CNN} weights from '{path}' ({_short_error(err)}); the file must hold the "
                f"state_dict of a SmallCNN with in_chans={in_chans}, widths={list(widths)}, norm={norm}"
            ) from err
    return net


def _create_timm_backbone(
    name: str, pretrained: bool, pretrained_path: str | Path | None, pooling: str, in_chans: int | None
) -> nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list_backbones(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RecallkUsageError(
            f"unknown backbone '{name}'; {hint}set model.backbone to a timm model name "
            f"(python -c \"import timm; print(timm.list_models('resnet*'))\") or {SMALL_CNN}"
        )
    kwargs: dict[str, Any] = {"num_classes": 0}
    if pooling != "cls":
        kwargs["global_pool"] = ""  # keep the feature map: the head pools it
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if pretrained_path is not None:
        net = _create_from_weights_file(name, _checked_weights_file(pretrained_path, name), kwargs)
    else:
        try:
            net = timm.create_model(name, pretrained=pretrained, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            if not pretrained:
                raise
            raise PretrainedWeightsError(_download_failure_message(name, err)) from err
    _check_pooling_fits(net, name, pooling)
    return net


class _LoadReport(logging.Handler):
    """Collects the missing and unexpected keys that timm's weight loader reports in its log.

    timm loads non-strictly once it has dropped the classifier (``num_classes=0``), so a file of another
    architecture would load partially without this check.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.problems: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("Missing keys", "Unexpected keys")):
            self.problems.append(message.split(" discovered")[0].split(" found")[0])


def _create_from_weights_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` loading ``path`` through timm's own pretrained path (``pretrained_cfg_overlay``).

    timm reads ``.pth``/``.safetensors`` files (and ViTs' JAX ``.npz``), unwraps training checkpoints, applies the
    family's filter (e.g. ViT position-embedding resizing) and
    adapts the input convolution to ``in_chans`` (summing RGB filters for 1 channel), then drops the
    classifier. Any other missing or unexpected key is an error. A file none of whose tensor names is timm's is
    renamed by order first (:func:`~recallk.models.weights_by_order.map_by_order`, every shape checked).
    """
    timm_logger, report = logging.getLogger("timm.models._builder"), _LoadReport()
    level = timm_logger.level
    timm_logger.addHandler(report)
    timm_logger.setLevel(logging.INFO)
    try:
        if path.suffix == ".npz":  # timm's own loader for the original JAX releases (ViTs)
            overlay: dict[str, Any] = {"file": str(path), "custom_load": True}
        else:
            overlay = {"state_dict": _state_dict_in_timm_names(name, path)}
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except PretrainedWeightsError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise PretrainedWeightsError(_weights_file_message(name, path, _short_error(err))) from err
    finally:
        timm_logger.removeHandler(report)
        timm_logger.setLevel(level)
    if report.problems:
        reason = _short_error(RuntimeError("; ".join(report.problems)))
        raise PretrainedWeightsError(_weights_file_message(name, path, reason))
    return net


def _state_dict_in_timm_names(name: str, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` (read by timm), renamed to timm's names by order if none of their names is timm's."""
    state_dict = timm.models.load_state_dict(str(path))
    reference, classifier_keys = timm_reference(name)
    if not state_dict or names_overlap(state_dict, reference):
        return state_dict
    try:
        mapped = map_by_order(state_dict, reference, classifier_keys)
    except ValueError as err:
        raise PretrainedWeightsError(
            _weights_file_message(name, path, f"no tensor name is timm's and {err}")
        ) from err
    first = next(iter(state_dict))
    logger.info("mapped %d tensors of %s by order onto timm's %s ('%s' -> '%s', ...; every shape checked)",
                len(mapped), path.name, name, first, next(iter(mapped)))
    return mapped


def _weights_file_message(name: str, path: Path, reason: str) -> str:
    return (
        f"could not load pretrained weights for backbone '{name}' from '{path}' ({reason}); "
        "give a weights file of that exact architecture or set model.pretrained_path=null"
    )


def _download_failure_message(name: str, err: BaseException) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (
        f"could not download pretrained weights for backbone '{name}' ({_short_error(err)}); "
        "set model.pretrained=false to start from random weights, or, without internet, "
        f"put the weights in the Hugging Face cache ({HF_HUB_CACHE}; fill it on a connected machine with "
        f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and copy it) "
        "or set model.pretrained_path=/path/to/weights.safetensors"
    )


def _check_pooling_fits(net: nn.Module, name: str, pooling: str) -> None:
    is_transformer = hasattr(net, "num_prefix_tokens") or hasattr(net, "cls_token")
    if pooling == "cls" and getattr(net, "global_pool", None) != "token":
        raise RecallkUsageError(
            f"pooling 'cls' needs a vision transformer with a class token, but backbone '{name}' has none; "
            "set model.pooling=gem (CNNs) or choose a ViT backbone"
        )
    if pooling != "cls" and is_transformer:
        raise RecallkUsageError(
            f"pooling '{pooling}' works on CNN feature maps, but backbone '{name}' is a transformer; "
            "set model.pooling=cls"
        )
    if pooling != "cls" and getattr(net, "output_fmt", "NCHW") != "NCHW":
        raise RecallkUsageError(
            f"backbone '{name}' outputs {net.output_fmt} feature maps, which this head does not pool; "
            "choose a CNN with NCHW output (e.g. resnet50) or a ViT with model.pooling=cls"
        )
