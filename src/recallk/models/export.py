"""Exporting an image embedding network to TorchScript or ONNX, with a dynamic batch size.

Both formats map images ``(B, C, H, W)`` (already preprocessed, any ``B >= 1``) to unit-norm embeddings
``(B, D)``. TorchScript uses ``torch.jit.script`` (the model is scriptable: no Python-only constructs in
``forward``); ONNX uses ``torch.onnx.export(dynamo=True)`` (``pip install 'recallk[onnx]'``: onnx and
onnxscript), a single ``.onnx`` file with input ``images`` and output ``embeddings``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from recallk.errors import RecallkUsageError
from recallk.files import atomic_write, atomic_write_from_file

EXPORT_FORMATS = ("torchscript", "onnx")
ONNX_INPUT = "images"
ONNX_OUTPUT = "embeddings"


def export_network(network: nn.Module, example: torch.Tensor, path: str | Path, fmt: str) -> Path:
    """Write ``network`` (an image model, exported in eval mode on the CPU) to ``path`` in format ``fmt``.

    ``example``: a batch ``(B, C, H, W)`` of preprocessed images that fixes C, H and W; the batch stays dynamic.
    """
    if fmt not in EXPORT_FORMATS:
        raise RecallkUsageError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if hasattr(network, "tokenize"):
        raise RecallkUsageError(
            "export supports image models only; a sentence-transformers model is shared with save_pretrained "
            "(recallk export RUN --format pretrained)"
        )
    network = copy.deepcopy(network).cpu().eval()
    path = Path(path)
    with _torchscript_deprecation_quiet():
        if fmt == "torchscript":
            scripted = torch.jit.script(network)
            atomic_write(path, lambda handle: torch.jit.save(scripted, handle))
        else:  # the exporter writes to a file name: a scratch file, then atomically (clear errors, old file kept)
            atomic_write_from_file(path, lambda name: _export_onnx(network, example.cpu(), Path(name)))
    return path


@contextlib.contextmanager
def _torchscript_deprecation_quiet() -> Iterator[None]:
    """Without torch's FutureWarnings that ``torch.jit.script``, ``save`` and ``load`` are deprecated: TorchScript is
    the format the user asked for (``--format torchscript``), so the warning only adds noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.(script|save|load)`? is deprecated",
                                category=FutureWarning)
        yield


def _export_onnx(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    if importlib.util.find_spec("onnxscript") is None:  # torch.onnx's exporter needs it (and onnx)
        raise RecallkUsageError("ONNX export needs onnx and onnxscript; pip install 'recallk[onnx]'")
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # their graph passes log every rewrite at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints each of its stages
        torch.onnx.export(
            network, (example,), str(path), dynamo=True, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_shapes=({0: batch},), external_data=False, verbose=False,
        )


def load_exported(path: str | Path, fmt: str) -> object:
    """A callable ``images (B, C, H, W) float32 tensor -> embeddings (B, D) tensor`` for an exported file.

    ONNX files run with onnxruntime (``pip install onnxruntime``).
    """
    if fmt == "torchscript":
        with _torchscript_deprecation_quiet():
            module = torch.jit.load(str(path), map_location="cpu").eval()
        return lambda images: module(images).detach()
    try:
        import onnxruntime
    except ImportError:
        raise RecallkUsageError("running an ONNX model needs onnxruntime; pip install onnxruntime") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: images.cpu().numpy()})[0])
