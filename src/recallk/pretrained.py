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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch import Tensor, nn

from recallk import __version__
from recallk.config import Config, config_from_dict, config_to_dict, config_to_yaml
from recallk.errors import RecallkUsageError
from recallk.evaluation.embed import embed_batches
from recallk.files import atomic_write_from_file, atomic_write_text
from recallk.training.assemble import build_network
from recallk.training.description import Description, Preprocessing, describes_full_images, open_image

FORMAT = "recallk-pretrained-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
HUB_PREFIX = "hf://"

ImageItem = str | Path | Image.Image | np.ndarray | Tensor


class RecallkModel(nn.Module):
    """A trained embedding network together with its config, its way of describing images and test metrics.

    ``forward(inputs)`` is the network's (a batch ``(B, C, H, W)`` or a token dict -> ``(B, D)``, one scale);
    :meth:`embed` takes raw items and describes images as :attr:`description` says (a landmark model: full images
    at ``eval.scales``, whitened after the scales, :mod:`recallk.training.description`); :attr:`preprocess` is
    its :class:`Preprocessing`. ``config`` is the training :class:`~recallk.config.Config`; ``metrics`` the
    test metrics of the run (``{}`` when unknown); ``own`` is set for your own model trained by
    :func:`recallk.fit` (``{"model": "module.Class"}``): it embeds tensors shaped like its datasets' inputs, with
    no preprocessing (and has no description).
    """

    def __init__(
        self, network: nn.Module, config: Config, metrics: dict[str, Any] | None = None,
        own: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.config = config
        self.metrics = dict(metrics or {})
        self.own = dict(own) if own else None
        self.description = None if self.is_text or self.own else Description.from_config(config)
        self.preprocess = None if self.description is None else self.description.preprocessing
        self.eval()

    @property
    def is_text(self) -> bool:
        return hasattr(self.network, "tokenize")

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.network, "embed_dim", self.config.model.embed_dim))

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def forward(self, inputs: Any) -> Tensor:
        return self.network(inputs)

    def embed(self, items: Any, batch_size: int = 256, progress: bool = False) -> Tensor:
        """Float32 unit-norm embeddings ``(N, D)`` on the CPU of ``items``, in order, as :attr:`description` says
        (the same descriptors as ``recallk embed``, ``recallk search`` and, for a landmark model, the benchmarks).

        ``items``: one or a list of image file paths, PIL images or numpy images ``(H, W)`` / ``(H, W, C)``
        (uint8 0-255, or floats 0-1: preprocessed here, as image files are), a preprocessed tensor ``(C, H, W)``
        or batch ``(B, C, H, W)``; for text models a string or a list of strings; for your own model (:attr:`own`)
        a batch tensor ``(B, ...)`` or a list of inputs shaped like its datasets' (stacked as they are, no
        preprocessing). A preprocessed tensor of a recall@k model must have exactly the preprocessing's shape
        (:attr:`Preprocessing.input_shape`; other sizes or channel counts are refused, not resized:
        ``model.preprocess(image)`` makes the tensor); one of a landmark model (:attr:`Description.full_images`) is a
        full image of any size with the model's channels.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.own is not None:
            batches, total = _own_batches(items, batch_size)
            return embed_batches(self.network, batches, self.device, total=total, progress=progress)
        if self.is_text:
            texts = self._texts(items)
            tokenize = self.network.tokenize
            batches = (tokenize(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size))
            return embed_batches(self.network, batches, self.device, total=len(texts), progress=progress)
        images, total = self._images(items)
        return self.describe(images, batch_size, total, progress)

    def describe(
        self, images: Iterable[Tensor], batch_size: int = 256, total: int | None = None, progress: bool = False
    ) -> Tensor:
        """Float32 unit-norm descriptors ``(N, D)`` on the CPU of preprocessed images (``(C, H, W)`` each, made by
        :attr:`preprocess`), as :attr:`description` says; ``total`` sizes the progress bar."""
        assert self.description is not None, "a text model embeds strings"
        return self.description.descriptors(self.network, images, self.device, batch_size, total, progress,
                                            desc="embedding")

    def _texts(self, items: Any) -> list[str]:
        texts = [items] if isinstance(items, str) else list(items)
        if not texts:
            raise ValueError("nothing to embed: the list of items is empty")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("a text model embeds strings; pass a string or a list of strings")
        return texts

    def _images(self, items: Any) -> tuple[Iterator[Tensor], int]:
        preprocess = self.preprocess
        assert preprocess is not None
        if isinstance(items, Tensor):
            if items.dim() not in (3, 4):
                raise ValueError(
                    f"expected an image tensor (C, H, W) or batch (B, C, H, W), got shape {tuple(items.shape)}"
                )
            batch = items if items.dim() == 4 else items.unsqueeze(0)
            return (_check_input_shape(image, preprocess) for image in batch), len(batch)
        single = isinstance(items, (str, Path, Image.Image)) or (isinstance(items, np.ndarray) and items.ndim < 4)
        items = [items] if single else list(items)
        if not items:
            raise ValueError("nothing to embed: the list of items is empty")
        return (_image_tensor(item, preprocess) for item in items), len(items)

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
            **({"own": self.own} if self.own else {}),
            "embed_dim": self.embed_dim,
            "preprocessing": dataclasses.asdict(self.preprocess) if self.preprocess is not None else None,
            "scales": list(self.description.scales) if self.description is not None else None,
            "metrics": self.metrics,
            "config": config_to_dict(config),
        }
        # safetensors writes its file in place with mode 0600: written atomically with the usual permissions instead
        atomic_write_from_file(directory / WEIGHTS_FILE, functools.partial(save_model, self.network))
        atomic_write_text(directory / CONFIG_FILE, json.dumps(document, indent=2) + "\n")
        atomic_write_text(directory / CARD_FILE, model_card(config, self.metrics, directory.name, self.own))
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


def _own_batches(items: Any, batch_size: int) -> tuple[Any, int]:
    """Batches of ``batch_size`` rows of a batch tensor ``(B, ...)`` or of a stacked list of input tensors."""
    if not isinstance(items, Tensor):
        if not isinstance(items, (list, tuple)) or not items or not all(isinstance(t, Tensor) for t in items):
            raise ValueError(
                "a model trained by recallk.fit embeds tensors: pass a batch (B, ...) or a list of inputs shaped like "
                "its datasets' (no preprocessing is applied)"
            )
        items = torch.stack(list(items))
    if items.dim() == 0 or len(items) == 0:
        raise ValueError(f"nothing to embed: a batch (B, ...) needs B >= 1 rows, got shape {tuple(items.shape)}")
    return (items[i : i + batch_size] for i in range(0, len(items), batch_size)), len(items)


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
    if preprocess.full_image_size is not None and image.shape[0] != expected[0]:
        raise ValueError(
            f"a preprocessed image tensor must have this model's {expected[0]} channel(s), got shape "
            f"{tuple(image.shape)}; pass the image itself (a path, PIL image or numpy array) to have it preprocessed, "
            "or model.preprocess(image)"
        )
    if preprocess.full_image_size is None and tuple(image.shape) != expected:
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


def load_model(path: str | Path, device: str | torch.device = "cpu", model: nn.Module | None = None) -> RecallkModel:
    """The trained model at ``path`` in eval mode on ``device``.

    ``path``: a run directory, a checkpoint file (``.pt``), a :meth:`RecallkModel.save_pretrained` folder, or
    ``hf://user/name`` (a Hub repository in that layout; needs ``huggingface_hub``).
    ``model``: the network to load the weights into instead of the one the saved config builds; needed for your
    own model trained by :func:`recallk.fit` (files hold weights, never code): ``load_model(run, model=MyNet())``.
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
        loaded = _load_pretrained_folder(path, model)
    else:
        loaded = _load_checkpoint_model(path, model)
    return loaded.to(device).eval()


def _load_checkpoint_model(path: Path, model: nn.Module | None) -> RecallkModel:
    from recallk.training.checkpoint import load_checkpoint
    from recallk.training.evaluate_run import resolve_checkpoint, trained_network

    checkpoint = resolve_checkpoint(path)
    state = load_checkpoint(checkpoint)
    network = trained_network(state, checkpoint, model).cpu()
    return RecallkModel(
        network, config_from_dict(state["config"]), _run_metrics(checkpoint.parent.parent), own=state.get("own")
    )


def _run_metrics(run_dir: Path) -> dict[str, Any]:
    """The test metrics of a finished run (its ``summary.json``), ``{}`` when the run has none."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return {}
    data = json.loads(summary.read_text(encoding="utf-8"))
    return {"splits": data.get("splits", {}), "best_epoch": data.get("best_epoch")}


def _load_pretrained_folder(directory: Path, model: nn.Module | None) -> RecallkModel:
    from safetensors.torch import load_model as load_weights

    from recallk.training.evaluate_run import weights_misfit

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
    own = document.get("own")
    if model is None and own is not None:
        raise RecallkUsageError(
            f"{directory} holds your own model ({own['model']}) trained by recallk.fit, which recallk does not "
            "rebuild from files; load it with an instance: recallk.load_model(path, model=YourModel(...))"
        )
    network = model if model is not None else build_network(config, weights_follow=True)  # weights: the file's
    try:
        load_weights(network, str(weights), strict=True)
    except RuntimeError as err:
        raise weights_misfit(network, weights, err, "the model that was saved") from None
    return RecallkModel(network.cpu(), config, document.get("metrics"), own=own)


# ---------------------------------------------------------------------------------------------------------------------
# Model card


def _output_dim(config: Config) -> int:
    """The model's embedding size: the whitening's output when it has one, else ``model.embed_dim``."""
    if config.model.whitening != "none" and config.model.whitening_dim is not None:
        return config.model.whitening_dim
    return config.model.embed_dim


def _whitening_phrase(config: Config) -> str:
    return "" if config.model.whitening == "none" else f"; {config.model.whitening} whitening after the head"


def model_card(config: Config, metrics: dict[str, Any], name: str, own: dict[str, str] | None = None) -> str:
    """The Hub model card (Markdown with YAML front matter): recipe, data set, test metrics, recallk version;
    ``own``: your own model trained by :func:`recallk.fit` (named instead of the config's backbone)."""
    task = "sentence-similarity" if config.model.backbone.startswith("st:") else "image-feature-extraction"
    front = {"library_name": "recallk", "pipeline_tag": task, "tags": ["recallk", "metric-learning", "retrieval"]}
    network = f"backbone `{config.model.backbone}`" if own is None else f"your own model `{own['model']}`"
    usage = [
        f'model = recallk.load_model("{name}")      # this folder, or "hf://<user>/{name}"',
        'embeddings = model.embed(["query.png"])' if task.startswith("image") else
        'embeddings = model.embed(["a sentence", "another one"])',
    ] if own is None else [
        f'model = recallk.load_model("{name}", model={own["model"].rsplit(".", 1)[-1]}(...))  # an instance of it',
        "embeddings = model.embed(inputs)  # a batch shaped like the training data's inputs",
    ]
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"An embedding model trained with [recallk](https://pypi.org/project/recallk/) {__version__}: "
        f"{network}, {_output_dim(config)}-d unit-norm embeddings (dot product = cosine "
        f"similarity{_whitening_phrase(config)}), loss `{config.loss.name}`{' + SiMix' if config.loss.simix else ''}.",
        "",
        "## Data set", "",
        _data_sentence(config, task) if own is None else
        f"Your own datasets (recallk.fit): trained on `{config.data.split_train}`, tested on "
        f"{', '.join(f'`{s}`' for s in config.data.split_test)}.",
        "",
        "## Test metrics", "",
        *_metrics_table(metrics),
        "",
        "## Usage", "",
        "```python",
        "import recallk",
        *usage,
        "```",
        "",
        "## Recipe", "",
        "The resolved training config (`recallk train recipe.yaml` reproduces the run):" if own is None else
        "The resolved training config (given to `recallk.fit` with the model and datasets, it reproduces the run):",
        "",
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
    if task.startswith("image") and describes_full_images(config):
        scales = ", ".join(f"{s:g}" for s in config.eval.scales)
        text += (f" Inputs: full images, longer side shrunk to {config.eval.image_size} px, `{data.transform}` "
                 f"normalisation, described at scales {scales} (`model.embed` does this).")
    elif task.startswith("image"):
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
