"""A trained model as one object: the network, its preprocessing, and how to save, share and load it.

``load_model(path)`` accepts a run directory (its ``checkpoints/best.pt``, else ``last.pt``), a checkpoint file,
a folder written by :meth:`RecallkModel.save_pretrained`, or ``hf://user/name`` (downloaded with
``huggingface_hub``, ``pip install 'recallk[hub]'``). The returned :class:`RecallkModel` is in eval mode and
embeds PIL images, image files, tensor batches or, for text models, strings::

    model = recallk.load_model("runs/demo")
    embeddings = model.embed(["a.png", "b.png"])          # (2, D) float32, unit norm
    model.save_pretrained("omniglot-rsk")                 # model.safetensors + config.json + README.md

The saved folder follows the Hugging Face Hub layout: ``model.safetensors`` holds the weights only (no pickle),
``config.json`` the resolved recallk config plus the preprocessing (enough to rebuild the model), ``README.md`` a
model card with the recipe, the data set, the test metrics and the recallk version.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch import Tensor, nn

from recallk import __version__
from recallk.config import Config, config_from_dict, config_to_dict, config_to_yaml
from recallk.data.image_dataset import too_large_message
from recallk.errors import RecallkUsageError
from recallk.evaluation.embed import embed_batches
from recallk.files import atomic_write_from_file, atomic_write_text
from recallk.training.assemble import build_network, decode_like_the_reader, eval_transform, reader_decoding_of

FORMAT = "recallk-pretrained-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
HUB_PREFIX = "hf://"

ImageItem = str | Path | Image.Image | np.ndarray | Tensor


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns an image file or PIL image into the network's input tensor ``(C, image_size, image_size)``.

    The decoding of the training data's reader and the evaluation transform, both from the one assembly
    (:mod:`recallk.training.assemble`): ``grayscale`` and ``invert`` are the reader's decoding
    (:func:`~recallk.training.assemble.reader_decoding_of`), then the eval transform of ``data.transform``,
    ``data.image_size``, the timm ``backbone`` (``data.transform: timm``) and ``data.options.mean/std``.
    """

    transform: str
    image_size: int
    invert: bool = False
    grayscale: bool = False
    backbone: str | None = None
    mean: Any = None
    std: Any = None

    @classmethod
    def from_config(cls, config: Config) -> Preprocessing:
        data, options = config.data, config.data.options
        mode, invert = reader_decoding_of(config)
        return cls(
            data.transform, data.image_size, invert=invert, grayscale=mode == "L", backbone=config.model.backbone,
            mean=options.get("mean"), std=options.get("std"),
        )

    def __call__(self, image: str | Path | Image.Image | np.ndarray) -> Tensor:
        if isinstance(image, np.ndarray):
            image = array_image(image)
        elif not isinstance(image, Image.Image):
            image = open_image(image)
        image = decode_like_the_reader(image, "L" if self.grayscale else "RGB", self.invert)
        return self.transform_fn(image)

    @functools.cached_property
    def transform_fn(self) -> Callable[[Image.Image], Tensor]:
        """The eval transform, built once (``data.transform: timm`` resolves the backbone's data config)."""
        return eval_transform(self.transform, self.image_size, self.backbone, self.mean, self.std)

    @functools.cached_property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of a preprocessed image: what the network was trained and evaluated on."""
        return tuple(self(Image.new("RGB", (self.image_size, self.image_size))).shape)


def array_image(array: np.ndarray) -> Image.Image:
    """A numpy image ``(H, W)`` or ``(H, W, C)`` (C = 1, 3 or 4; integers 0-255 or 0-65535, floats 0-1 or 0-255) as a
    PIL image with its values on 0-255, decoded like an image file of that kind."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or array.size == 0:
        raise ValueError(
            f"a numpy image must be (H, W) or (H, W, C) with C = 1, 3 or 4, got shape {array.shape}; for a batch "
            "pass a list of images"
        )
    if array.dtype == np.bool_ or array.dtype.kind not in "uif":
        raise ValueError(f"a numpy image must hold integers or floats, got dtype {array.dtype}")
    if array.dtype.kind == "f":
        pixels = np.nan_to_num(array.astype(np.float64))
        scale = 255.0 if pixels.max() <= 1.0 else 1.0  # as image files of floats are read
        array = np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        pixels = array.astype(np.float64)
        pixels = pixels * (255.0 / 65535.0) if pixels.max() > 255 else pixels  # 16-bit values, as in PNG files
        array = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))  # decoded further like a file (decode_like_the_reader)


def open_image(path: str | Path) -> Image.Image:
    """A decoded image file; a missing or undecodable file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist; pass the path of an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Image.DecompressionBombError as err:
        option = "--max-image-pixels {0} (recallk embed/search; in Python PIL.Image.MAX_IMAGE_PIXELS = {0})"
        raise RecallkUsageError(too_large_message(str(path), err, option)) from None
    except (OSError, ValueError) as err:
        raise RecallkUsageError(f"cannot decode image {path} ({err}); pass a PNG/JPEG image file") from None


class RecallkModel(nn.Module):
    """A trained embedding network together with its config, preprocessing and test metrics.

    ``forward(inputs)`` is the network's (a batch ``(B, C, H, W)`` or a token dict -> ``(B, D)``);
    :meth:`embed` takes raw items. ``config`` is the training :class:`~recallk.config.Config`; ``metrics`` the
    test metrics of the run (``{}`` when unknown).
    """

    def __init__(self, network: nn.Module, config: Config, metrics: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.network = network
        self.config = config
        self.metrics = dict(metrics or {})
        self.preprocess = None if self.is_text else Preprocessing.from_config(config)
        self.eval()

    @property
    def is_text(self) -> bool:
        return hasattr(self.network, "tokenize")

    @property
    def embed_dim(self) -> int:
        return int(self.network.embed_dim)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def forward(self, inputs: Any) -> Tensor:
        return self.network(inputs)

    def embed(self, items: Any, batch_size: int = 256, progress: bool = False) -> Tensor:
        """Float32 unit-norm embeddings ``(N, D)`` on the CPU of ``items``, in order.

        ``items``: one or a list of image file paths, PIL images or numpy images ``(H, W)`` / ``(H, W, C)``
        (uint8 0-255, or floats 0-1: preprocessed here, as image files are), a preprocessed tensor ``(C, H, W)``
        or batch ``(B, C, H, W)`` of exactly the preprocessing's shape (:attr:`Preprocessing.input_shape`; other
        sizes or channel counts are refused, not resized: ``model.preprocess(image)`` makes the tensor); for text
        models a string or a list of strings.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batches, total = self._batches(items, batch_size)
        return embed_batches(self.network, batches, self.device, total=total, progress=progress)

    def _batches(self, items: Any, batch_size: int) -> tuple[Any, int]:
        if isinstance(items, Tensor):
            if self.is_text or items.dim() not in (3, 4):
                raise ValueError(
                    f"expected an image tensor (C, H, W) or batch (B, C, H, W), got shape {tuple(items.shape)}"
                )
            batch = items if items.dim() == 4 else items.unsqueeze(0)
            assert self.preprocess is not None
            _check_input_shape(batch[0] if len(batch) else batch.new_empty(batch.shape[1:]), self.preprocess)
            return (batch[i : i + batch_size] for i in range(0, len(batch), batch_size)), len(batch)
        single = isinstance(items, (str, Path, Image.Image)) or (isinstance(items, np.ndarray) and items.ndim < 4)
        items = [items] if single else list(items)
        if not items:
            raise ValueError("nothing to embed: the list of items is empty")
        if self.is_text:
            if not all(isinstance(t, str) for t in items):
                raise ValueError("a text model embeds strings; pass a string or a list of strings")
            tokenize = self.network.tokenize
            return (tokenize(items[i : i + batch_size]) for i in range(0, len(items), batch_size)), len(items)
        preprocess = self.preprocess
        assert preprocess is not None

        def image_batches() -> Any:
            for start in range(0, len(items), batch_size):
                yield torch.stack([_image_tensor(item, preprocess) for item in items[start : start + batch_size]])

        return image_batches(), len(items)

    # ------------------------------------------------------------------ saving and sharing

    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``model.safetensors``, ``config.json`` and ``README.md`` (model card) into ``directory``.

        A folder that already holds a saved model is refused unless ``overwrite=True``; a folder holding any of
        those three files that is not a saved recallk model (e.g. a project's own README.md) is always refused.
        The config carries no paths of this machine (:func:`shareable_config`): the folder is meant to be shared.
        """
        from safetensors.torch import save_model

        directory = Path(directory)
        check_save_folder(directory, overwrite)
        config = shareable_config(self.config)
        document = {
            "format": FORMAT,
            "recallk_version": __version__,
            "embed_dim": self.embed_dim,
            "preprocessing": dataclasses.asdict(self.preprocess) if self.preprocess is not None else None,
            "metrics": self.metrics,
            "config": config_to_dict(config),
        }
        # safetensors writes its file in place with mode 0600: written atomically with the usual permissions instead
        atomic_write_from_file(directory / WEIGHTS_FILE, functools.partial(save_model, self.network))
        atomic_write_text(directory / CONFIG_FILE, json.dumps(document, indent=2) + "\n")
        atomic_write_text(directory / CARD_FILE, model_card(config, self.metrics, directory.name))
        return directory

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload the :meth:`save_pretrained` folder to the Hugging Face Hub repository ``repo_id``; returns its URL.

        Needs ``pip install 'recallk[hub]'`` and a token (``huggingface-cli login`` or ``token=``).
        """
        hub = _import_hub()
        api = hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as temporary:
            folder = self.save_pretrained(Path(temporary) / repo_id.rsplit("/", 1)[-1])  # the card's title
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload recallk model")
        return f"https://huggingface.co/{repo_id}"


def check_save_folder(directory: Path, overwrite: bool) -> None:
    """Refuse to write a saved model into ``directory`` over files that are not a saved recallk model, or over a
    saved model without ``overwrite``."""
    if directory.exists() and not directory.is_dir():
        raise RecallkUsageError(f"{directory} is a file; save the model into a new or empty folder")
    present = [name for name in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE) if (directory / name).exists()]
    if not present:
        return
    if not _is_saved_model(directory):
        raise RecallkUsageError(
            f"{directory} holds {' and '.join(present)} but is not a folder of a saved recallk model; save into a "
            "new or empty folder (nothing was written)"
        )
    if not overwrite:
        raise RecallkUsageError(
            f"{directory} already holds a saved model; pass overwrite=True (recallk export --overwrite) to replace "
            "it, or choose a new folder"
        )


def _is_saved_model(directory: Path) -> bool:
    """Whether ``directory/config.json`` is a recallk model config (what :func:`load_model` reads)."""
    try:
        document = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        return False
    card = directory / CARD_FILE
    return not card.exists() or "library_name: recallk" in card.read_text(encoding="utf-8", errors="replace")


def shareable_config(config: Config) -> Config:
    """``config`` without the paths of this machine: no data root, run directory, local weights file or MLflow store,
    and only the file name of any absolute path in ``data.options`` (they would be uploaded with the model)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(strip(item) for item in value)
        if isinstance(value, str) and Path(value).is_absolute():
            return Path(value).name
        return value

    output_defaults = type(config.output)()
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, data_dir=None, options=strip(dict(config.data.options))),
        model=dataclasses.replace(config.model, pretrained_path=None),
        train=dataclasses.replace(config.train, mlflow_uri=None),
        output=dataclasses.replace(config.output, run_dir=None, runs_root=output_defaults.runs_root),
    )


def _image_tensor(item: Any, preprocess: Preprocessing) -> Tensor:
    if isinstance(item, Tensor):
        if item.dim() != 3:
            raise ValueError(f"expected image tensors (C, H, W) in a list, got shape {tuple(item.shape)}")
        return _check_input_shape(item, preprocess)
    if isinstance(item, (str, Path, Image.Image, np.ndarray)):
        return preprocess(item)
    raise ValueError(f"cannot embed a {type(item).__name__}; pass image paths, PIL images, numpy images or tensors")


def _check_input_shape(image: Tensor, preprocess: Preprocessing) -> Tensor:
    """``image`` (C, H, W) when it has the preprocessing's shape; else a one-line error (no silent resizing: a
    network that accepts other sizes would return other embeddings)."""
    expected = preprocess.input_shape
    if tuple(image.shape) != expected:
        what = "number of channels" if image.shape[0] != expected[0] else "size"
        raise ValueError(
            f"a preprocessed image tensor must have this model's input shape (C, H, W) = {expected}, got "
            f"{tuple(image.shape)} (another {what}); pass the image itself (a path, PIL image or numpy array) to "
            "have it preprocessed, or model.preprocess(image)"
        )
    return image


def _import_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise RecallkUsageError(
            "sharing on the Hugging Face Hub needs huggingface_hub; pip install 'recallk[hub]'"
        ) from None
    return huggingface_hub


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_model(path: str | Path, device: str | torch.device = "cpu") -> RecallkModel:
    """The trained model at ``path`` in eval mode on ``device``.

    ``path``: a run directory, a checkpoint file (``.pt``), a :meth:`RecallkModel.save_pretrained` folder, or
    ``hf://user/name`` (a Hub repository in that layout; needs ``huggingface_hub``).
    """
    text = str(path)
    if text.startswith(HUB_PREFIX):
        repo_id = text[len(HUB_PREFIX):]
        try:
            path = Path(_import_hub().snapshot_download(repo_id))
        except Exception as err:  # noqa: BLE001 - network, authentication and cache errors alike
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RecallkUsageError(
                f"cannot download {text} from the Hugging Face Hub ({first[:200]}); check the name, the network "
                "and your token (huggingface-cli login), or pass a local folder"
            ) from err
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"model path {path} does not exist; pass a run directory, a checkpoint .pt file, a folder written by "
            "save_pretrained, or hf://user/name"
        )
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        model = _load_pretrained_folder(path)
    else:
        model = _load_checkpoint_model(path)
    return model.to(device).eval()


def _load_checkpoint_model(path: Path) -> RecallkModel:
    from recallk.training.evaluate_run import load_trained_model

    network, config, checkpoint = load_trained_model(path, torch.device("cpu"))
    return RecallkModel(network, config, _run_metrics(checkpoint.parent.parent))


def _run_metrics(run_dir: Path) -> dict[str, Any]:
    """The test metrics of a finished run (its ``summary.json``), ``{}`` when the run has none."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return {}
    data = json.loads(summary.read_text(encoding="utf-8"))
    return {"splits": data.get("splits", {}), "best_epoch": data.get("best_epoch")}


def _load_pretrained_folder(directory: Path) -> RecallkModel:
    from safetensors.torch import load_model as load_weights

    config_file = directory / CONFIG_FILE
    try:
        document = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecallkUsageError(
            f"cannot read {config_file} ({err}); save the model again with save_pretrained"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise RecallkUsageError(
            f"{config_file} is not a recallk model config (no format '{FORMAT}'); give a folder written by "
            "save_pretrained or 'recallk export --format pretrained'"
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; the folder must hold {WEIGHTS_FILE} next to {CONFIG_FILE}")
    config = config_from_dict(document["config"], source=str(config_file))
    network = build_network(config, weights_follow=True)  # the weights come from the file
    load_weights(network, str(weights), strict=True)
    return RecallkModel(network, config, document.get("metrics"))


# ---------------------------------------------------------------------------------------------------------------------
# Model card


def _output_dim(config: Config) -> int:
    """The model's embedding size: the whitening's output when it has one, else ``model.embed_dim``."""
    if config.model.whitening != "none" and config.model.whitening_dim is not None:
        return config.model.whitening_dim
    return config.model.embed_dim


def _whitening_phrase(config: Config) -> str:
    return "" if config.model.whitening == "none" else f"; {config.model.whitening} whitening after the head"


def model_card(config: Config, metrics: dict[str, Any], name: str) -> str:
    """The Hub model card (Markdown with YAML front matter): recipe, data set, test metrics, recallk version."""
    task = "sentence-similarity" if config.model.backbone.startswith("st:") else "image-feature-extraction"
    front = {"library_name": "recallk", "pipeline_tag": task, "tags": ["recallk", "metric-learning", "retrieval"]}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"An embedding model trained with [recallk](https://pypi.org/project/recallk/) {__version__}: "
        f"backbone `{config.model.backbone}`, {_output_dim(config)}-d unit-norm embeddings (dot product = cosine "
        f"similarity{_whitening_phrase(config)}), loss `{config.loss.name}`{' + SiMix' if config.loss.simix else ''}.",
        "",
        "## Data set", "",
        _data_sentence(config, task),
        "",
        "## Test metrics", "",
        *_metrics_table(metrics),
        "",
        "## Usage", "",
        "```python",
        "import recallk",
        f'model = recallk.load_model("{name}")      # this folder, or "hf://<user>/{name}"',
        'embeddings = model.embed(["query.png"])' if task.startswith("image") else
        'embeddings = model.embed(["a sentence", "another one"])',
        "```",
        "",
        "## Recipe", "",
        "The resolved training config (`recallk train recipe.yaml` reproduces the run):", "",
        "```yaml", config_to_yaml(config).strip(), "```", "",
        f"recallk version: {__version__}", "",
    ]
    return "\n".join(lines)


def _data_sentence(config: Config, task: str) -> str:
    data = config.data
    text = f"`{data.dataset}`: trained on split `{data.split_train}`"
    if data.split_val:
        text += f", best epoch chosen on `{data.split_val}` by {config.train.select_metric}"
    text += f", tested on {', '.join(f'`{s}`' for s in data.split_test)}."
    if task.startswith("image"):
        text += f" Inputs: `{data.transform}` preprocessing at {data.image_size} px."
    return text


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    splits: dict[str, dict[str, Any]] = metrics.get("splits") or {}
    if not splits:
        return ["No test metrics were recorded for this model."]
    names = [m for m in next(iter(splits.values())) if not m.startswith("num_")]
    rows = ["| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for metric in names:
        cells = [splits[s].get(metric) for s in splits]
        rows.append(f"| {metric} | " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in cells) + " |")
    if metrics.get("best_epoch") is not None:
        rows += ["", f"Best epoch: {metrics['best_epoch']}."]
    return rows


__all__ = ["Preprocessing", "RecallkModel", "load_model", "model_card", "open_image"]
