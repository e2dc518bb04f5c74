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
import difflib
import re
import types
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from recallk.errors import ConfigError

LossName = Literal[
    "rsk", "contrastive", "triplet", "multi_similarity", "normalized_softmax", "proxy_anchor", "fastap", "smooth_ap"
]
Pooling = Literal["gem", "avg", "cls"]
OptimName = Literal["adam", "adamw"]
Schedule = Literal["none", "cosine", "step"]
AmpMode = Literal["auto", "none", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
NanPolicy = Literal["stop", "skip"]
SelectMetric = Literal["recall@1", "map@r", "r_precision"]
Norm = Literal["batch", "group"]


def _key(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    """A config field whose meaning is ``metadata["help"]`` (printed by ``recallk config --explain``)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """Dataset, splits, preprocessing and batch composition.

    A training batch holds ``batch_size // samples_per_class`` classes with ``samples_per_class`` images each.
    """

    dataset: str = _key("omniglot", "reader: omniglot, sop, cub, cars, inat2018, vehicleid, inshop, folder, csv; "
                                    "text: clinc150, banking77")
    data_dir: str | None = _key(None, "root holding the datasets; null: $RECALLK_DATA, else the user cache")
    split_train: str = _key("train", "split trained on")
    split_val: str | None = _key(None, "split evaluated during training, which picks best.pt (e.g. omniglot val); "
                                       "null: no validation")
    val_classes: int | None = _key(None, "readers that carve val out of the training classes (omniglot): how many")
    split_test: tuple[str, ...] = _key(("test",), "splits evaluated after training, one metrics table each")
    options: dict[str, Any] = _key(factory=dict, help="extra reader keyword arguments (e.g. csv_file)")
    download: bool = _key(False, "fetch missing files where the reader can (omniglot)")
    in_memory: bool = _key(False, "omniglot: decode the split once into arrays and augment whole batches")
    image_size: int = _key(224, "side of the square network input in pixels")
    transform: str = _key("imagenet", "preprocessing kind: imagenet (RGB, ImageNet mean/std), omniglot "
                                      "(one channel in [0, 1]) or timm (mean/std/crop/interpolation of "
                                      "model.backbone)")
    batch_size: int = _key(4000, "images per training batch (the global batch with several processes)")
    samples_per_class: int = _key(4, "images of each class in a batch")
    num_workers: int = _key(4, "image-loading worker processes (0: load in the main process)")
    skip_bad_images: bool = _key(False, "skip undecodable images with a warning instead of stopping")


@dataclass
class ModelConfig:
    """Backbone and embedding head: pool -> LayerNorm -> Linear(embed_dim) -> L2 normalisation."""

    backbone: str = _key("resnet50", "timm model name (optionally with .tag), omniglot_cnn, or st:<sentence model>")
    pretrained: bool = _key(False, "load ImageNet weights (downloaded by timm, or from pretrained_path)")
    pretrained_path: str | None = _key(None, "local weights file for the backbone; implies pretrained loading")
    embed_dim: int = _key(512, "size of the output embedding")
    pooling: Pooling = _key("gem", "gem/avg over CNN feature maps; cls: the class token of a ViT")
    gem_p: float = _key(3.0, "initial GeM exponent")
    gem_learnable: bool = _key(True, "learn the GeM exponent with the network")
    layernorm: bool = _key(True, "LayerNorm on the pooled features before the linear layer")
    freeze_batchnorm: bool = _key(False, "keep BatchNorm running statistics fixed during training (needed when "
                                         "batches are split into chunks)")
    in_chans: int | None = _key(None, "input channels; null: the backbone's default (3, or 1 for omniglot_cnn)")
    widths: tuple[int, ...] = _key((64, 128, 256, 256), "omniglot_cnn only: channels of each conv block")
    norm: Norm = _key("batch", "omniglot_cnn only: batch (BatchNorm) or group (GroupNorm: chunkable without "
                               "freezing)")
    channels_last: bool = _key(False, "NHWC memory format (faster convolutions on tensor cores)")
    compile: bool = _key(False, "wrap the model in torch.compile")


@dataclass
class LossConfig:
    """Training loss; ``rsk`` is the paper's Recall@k surrogate, the rest are baselines."""

    name: LossName = _key("rsk", "rsk (RS@k) or a pytorch-metric-learning baseline")
    k: tuple[int, ...] = _key((1, 2, 4, 8, 16), "recall@k values averaged by RS@k")
    tau_rank: float = _key(0.01, "sigmoid temperature of the rank estimate (tau_2 in the paper)")
    tau_k: float = _key(1.0, "sigmoid temperature of the rank < k count (tau_1 in the paper)")
    rank_includes_query: bool = _key(False, "count the query in its own rank sums (the authors' released code)")
    simix: bool = _key(False, "similarity mixup (SiMix), RS@k only")
    simix_pairs_per_class: int | None = _key(None, "mixed pairs drawn per class; null: all pairs")
    memory_size: int = _key(0, "cross-batch memory: also rank this many embeddings of earlier batches "
                                "(rsk; 0: off)")
    params: dict[str, Any] = _key(factory=dict, help="extra keyword arguments of a baseline loss")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (epochs-based)."""

    name: OptimName = _key("adam", "optimiser")
    lr: float = _key(1e-4, "learning rate of the head (and, times backbone_lr_mult, of the backbone)")
    weight_decay: float = _key(4e-4, "weight decay of the network's parameters")
    backbone_lr_mult: float = _key(1.0, "backbone learning rate = lr * backbone_lr_mult (the head uses lr)")
    loss_lr_mult: float = _key(1.0, "lr of the loss's own parameters (proxies) = lr * loss_lr_mult; proxy losses "
                                    "like 100")
    schedule: Schedule = _key("none", "learning-rate schedule over the epochs")
    warmup_epochs: int = _key(0, "linear warm-up from 0 to lr over this many epochs")
    step_epochs: tuple[int, ...] = _key((), "step schedule: multiply the lr by gamma at these epochs")
    gamma: float = _key(0.3, "step schedule: the factor applied at each step")


@dataclass
class TrainConfig:
    """Training loop settings."""

    epochs: int = _key(1, "passes over the training split")
    chunk_size: int = _key(200, "images per forward/backward chunk of the multistage engine (memory knob)")
    amp: AmpMode = _key("auto", "autocast precision of the network forward; auto: bf16 on CUDA, none on CPU")
    eval_every: int = _key(1, "evaluate on the validation split every N epochs; 0: only after the last epoch")
    checkpoint_every: int = _key(1, "save a checkpoint every N epochs; 0: only the final one")
    log_every: int = _key(10, "log the mean training loss every N steps (INFO)")
    device: Device = _key("auto", "auto: cuda when available, else cpu")
    max_steps: int | None = _key(None, "stop after this many optimiser steps (smoke tests); null: no limit")
    nan_policy: NanPolicy = _key("stop", "non-finite loss: stop with an error, or skip the step")
    select_metric: SelectMetric = _key("recall@1", "validation metric that picks checkpoints/best.pt")
    tensorboard: bool = _key(False, "also write TensorBoard events to <run_dir>/tensorboard (pip install "
                                    "tensorboard)")


@dataclass
class EvalConfig:
    """Retrieval evaluation settings."""

    k: tuple[int, ...] = _key((1, 2, 4, 8), "recall@k values reported")
    batch_size: int = _key(256, "images per forward pass when embedding")


@dataclass
class OutputConfig:
    """Where results go."""

    runs_root: str = _key("runs", "folder under which run directories are created")
    run_dir: str | None = _key(None, "this run's directory; null: <runs_root>/<name>-<timestamp>")
    export_embeddings: bool = _key(True, "save test embeddings, labels and ids after training")
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
# YAML reading


class _YamlLoader(yaml.SafeLoader):
    """Safe loader that reads ``1e-5`` as a float (YAML 1.1 needs a dot) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(
                    f"duplicate key {key!r} in {mark.name} at line {mark.line + 1}, column {mark.column + 1}; "
                    "keep only one of them"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, name: str) -> Any:
    loader = _YamlLoader(text)
    loader.name = name  # marks in errors name the file
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{name} at line {mark.line + 1}, column {mark.column + 1}" if mark else name
        problem = " ".join(str(err.problem or err.context or "invalid syntax").split())
        raise ConfigError(
            f"malformed YAML in {where}: {problem}; fix the syntax there "
            "(indentation, a ':' after each key, matching quotes and brackets)"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"malformed YAML in {name}: {' '.join(str(err).split())}; fix the syntax") from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------------------------------
# Building and type checking


class _Sources:
    """Remembers where each value came from, to say 'where' in error messages."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.overrides: dict[str, str] = {}

    def where(self, *keys: str) -> str:
        for key in keys:
            for over_key, text in self.overrides.items():
                if key == over_key or key.startswith(over_key + ".") or over_key.startswith(key + "."):
                    return f"in override '{text}'"
        return f"in {self.path}" if self.path else "in the configuration"


def _field_paths(cls: type, prefix: str = "") -> list[str]:
    """All dotted field names of a config dataclass, e.g. ``['name', ..., 'data.dataset', ...]``."""
    paths = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            paths.extend(_field_paths(hints[f.name], f"{prefix}{f.name}."))
        else:
            paths.append(prefix + f.name)
    return paths


def _unknown_key_error(key: Any, prefix: str, cls: type, sources: _Sources) -> ConfigError:
    dotted = f"{prefix}{key}"
    allowed = [f.name for f in dataclasses.fields(cls)]
    hint = ""
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    elsewhere = [p for p in _field_paths(Config) if p.rsplit(".", 1)[-1] == str(key) and p != dotted]
    if close:
        hint = f"did you mean '{prefix}{close[0]}'? "
    elif elsewhere:
        hint = f"did you mean '{elsewhere[0]}'? "
    section = f"'{prefix[:-1]}'" if prefix else "the top level"
    return ConfigError(
        f"unknown key '{dotted}' {sources.where(dotted)}; {hint}allowed keys in {section}: {', '.join(allowed)}"
    )


def _describe(annotation: Any) -> str:
    """Human description of a field type, e.g. ``a list of integers``."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in get_args(annotation) if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in get_args(annotation) else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin is tuple:
        return f"a list of {_describe(get_args(annotation)[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Any: "any value"}.get(
        annotation, str(annotation)
    )


def _coerce(value: Any, annotation: Any, key: str, sources: _Sources) -> Any:
    """Check ``value`` against a field annotation and return it in canonical form (tuples, floats)."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, sources)
            except ConfigError:
                continue
    elif origin is Literal:
        allowed = get_args(annotation)
        if isinstance(value, str) and value in allowed:
            return value
        raise ConfigError(
            f"invalid value {value!r} for '{key}' {sources.where(key)}; "
            f"allowed values: {', '.join(repr(a) for a in allowed)}"
        )
    elif origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        item_type = get_args(annotation)[0]
        if value is not None:
            try:
                return tuple(_coerce(item, item_type, key, sources) for item in items)
            except ConfigError:
                pass
    elif origin is dict:
        if value is None:
            return {}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, PurePath):  # a model location or data directory given as a pathlib.Path
            return str(value)
    else:  # pragma: no cover - a field type this module does not know is a programming error
        raise TypeError(f"unsupported config field type {annotation!r} for {key}")
    raise ConfigError(
        f"wrong type for '{key}' {sources.where(key)}: expected {_describe(annotation)}, "
        f"got {value!r} ({type(value).__name__}); change the value to {_describe(annotation)}"
    )


def _build(cls: type, raw: Any, prefix: str, sources: _Sources) -> Any:
    """Validate a raw mapping against dataclass ``cls`` (recursively) and construct it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        what = f"section '{prefix[:-1]}'" if prefix else "the top level"
        raise ConfigError(
            f"{what} {sources.where(prefix[:-1]) if prefix else sources.where()} must be a mapping of keys, "
            f"got {raw!r} ({type(raw).__name__}); write it as indented 'key: value' lines"
        )
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise _unknown_key_error(key, prefix, cls, sources)
    kwargs = {}
    for name in names & raw.keys():
        dotted = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], raw[name], dotted + ".", sources)
        else:
            kwargs[name] = _coerce(raw[name], hints[name], dotted, sources)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Cross-field validation


def _nearest_multiples(value: int, step: int) -> str:
    lower = value // step * step
    return f"{lower} or {lower + step}" if lower > 0 else str(step * 2)


def _check_increasing_positive(values: tuple[int, ...], key: str, sources: _Sources) -> None:
    if not values or any(v <= 0 for v in values) or list(values) != sorted(set(values)):
        raise ConfigError(
            f"'{key}' must be a non-empty list of increasing positive integers, got {list(values)} "
            f"{sources.where(key)}; write e.g. {key}=[1,2,4,8]"
        )


def validate_config(cfg: Config, source: str | None = None) -> None:
    """Run the cross-field and range checks on ``cfg``; raise ConfigError naming the keys and a fix.

    Config files and overrides are checked by :func:`load_config`; call this after building a Config in code.
    """
    _validate(cfg, _Sources(source))


def _validate(cfg: Config, sources: _Sources) -> None:  # noqa: C901 - a flat list of independent checks
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
    if "val_classes" in d.options or "seed" in d.options:
        fail(("data.options",), "'data.options' repeats 'val_classes' or 'seed', which have their own keys",
             "set data.val_classes and the top-level seed instead")
    if d.batch_size % d.samples_per_class:
        fail(("data.batch_size", "data.samples_per_class"),
             f"data.batch_size={d.batch_size} is not a multiple of data.samples_per_class={d.samples_per_class}",
             f"use data.batch_size={_nearest_multiples(d.batch_size, d.samples_per_class)}")
    if d.batch_size // d.samples_per_class < 2:
        fail(("data.batch_size", "data.samples_per_class"),
             f"a batch of {d.batch_size} with {d.samples_per_class} samples per class holds a single class",
             f"use data.batch_size >= {2 * d.samples_per_class} so that each batch has negatives")

    m = cfg.model
    positive("model.embed_dim", m.embed_dim)
    positive("model.gem_p", m.gem_p)
    positive("model.in_chans", m.in_chans)
    if not m.widths or any(w <= 0 for w in m.widths):
        fail(("model.widths",), f"'model.widths' must be a non-empty list of positive integers, got {list(m.widths)}",
             "write e.g. model.widths=[64,128,256]")

    loss = cfg.loss
    _check_increasing_positive(loss.k, "loss.k", sources)
    positive("loss.tau_rank", loss.tau_rank)
    positive("loss.tau_k", loss.tau_k)
    positive("loss.simix_pairs_per_class", loss.simix_pairs_per_class)
    positive("loss.memory_size", loss.memory_size, allow_zero=True)
    if loss.memory_size and (loss.name != "rsk" or loss.simix):
        fail(("loss.memory_size", "loss.name", "loss.simix"),
             "'loss.memory_size' (the cross-batch memory) works with loss 'rsk' without SiMix",
             "set loss.memory_size=0, or loss.name=rsk and loss.simix=false")
    if loss.simix and loss.name != "rsk":
        fail(("loss.simix", "loss.name"), f"'loss.simix' works with loss 'rsk' only, not {loss.name!r}",
             "set loss.simix=false or loss.name=rsk")
    if loss.simix_pairs_per_class is not None and not loss.simix:
        fail(("loss.simix_pairs_per_class", "loss.simix"), "'loss.simix_pairs_per_class' is set but SiMix is off",
             "set loss.simix=true or loss.simix_pairs_per_class=null")
    if loss.name == "rsk" and d.samples_per_class < 2:
        fail(("data.samples_per_class",), "loss 'rsk' needs positives in the batch but data.samples_per_class=1",
             "use data.samples_per_class=4 (the paper's setting)")

    o, t = cfg.optim, cfg.train
    positive("optim.lr", o.lr)
    positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    positive("optim.backbone_lr_mult", o.backbone_lr_mult, allow_zero=True)
    positive("optim.loss_lr_mult", o.loss_lr_mult)
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
    if o.warmup_epochs >= t.epochs > 0 and o.warmup_epochs > 0:
        fail(("optim.warmup_epochs", "train.epochs"),
             f"optim.warmup_epochs={o.warmup_epochs} leaves no epoch after warm-up (train.epochs={t.epochs})",
             "use fewer warm-up epochs or more epochs")

    for key in ("epochs", "chunk_size", "log_every"):
        positive(f"train.{key}", getattr(t, key))
    positive("train.eval_every", t.eval_every, allow_zero=True)
    positive("train.checkpoint_every", t.checkpoint_every, allow_zero=True)
    positive("train.max_steps", t.max_steps)

    _check_increasing_positive(cfg.eval.k, "eval.k", sources)
    positive("eval.batch_size", cfg.eval.batch_size)
    if not cfg.output.runs_root:
        fail(("output.runs_root",), "'output.runs_root' is empty", "set it to a directory, e.g. output.runs_root=runs")


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(
            f"cannot read override {text!r}; write overrides as dotted.key=value, e.g. optim.lr=1e-5"
        )
    try:
        value = _parse_yaml(value_text, f"override '{text}'")
    except ConfigError:
        raise ConfigError(
            f"cannot parse the value of override {text!r} as YAML; quote strings and write lists as [1, 2, 4]"
        ) from None
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any, text: str) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            parent = ".".join(parts[: i + 1])
            raise ConfigError(
                f"override '{text}' sets a key inside '{parent}', which is a value, not a section; "
                f"set {parent}=... instead"
            )
        node = child
    node[parts[-1]] = value


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
    merged: dict[str, Any] = _deep_copy_mapping(raw or {})
    sources = _Sources(source)
    for text in overrides:
        key, value = _parse_override(text)
        _set_dotted(merged, key, value, text)
        sources.overrides[key] = text
    for key, value in (set_values or {}).items():
        text = f"{key}={value}"
        _set_dotted(merged, key, value, text)
        sources.overrides[key] = text
    cfg = _build(Config, merged, "", sources)
    _validate(cfg, sources)
    return cfg


def _deep_copy_mapping(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy_mapping(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


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
        raw = _parse_yaml(text, source)
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


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again with :func:`load_config`) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path


def explain_config(section: str | None = None) -> str:
    """Every config key (of ``section``, or all) with its type, default and meaning, read from the dataclasses.

    One block per section (its docstring first), one line per key:
    ``  key  type (default: value)`` followed by the meaning on the next line.
    """
    hints = get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])]
    if section is not None and section not in sections and section != "top":
        raise ConfigError(f"unknown config section {section!r}; choose one of top, {', '.join(sections)}")
    blocks = []
    if section in (None, "top"):
        blocks.append(_explain_fields(Config, "", "Top level: the experiment's name and seed."))
    for name in sections if section is None else [s for s in sections if s == section]:
        cls = hints[name]
        blocks.append(_explain_fields(cls, f"{name}.", " ".join((cls.__doc__ or "").split())))
    return "\n\n".join(blocks)


def _explain_fields(cls: type, prefix: str, title: str) -> str:
    hints = get_type_hints(cls)
    lines = [f"[{prefix[:-1] or 'top'}] {title}"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = yaml.safe_dump(list(default) if isinstance(default, tuple) else default,
                               default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {prefix}{f.name}: {_describe(hints[f.name])} (default: {shown})")
        lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)
