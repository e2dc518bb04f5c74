"""Descriptors of variable-size images at one or several scales (instance-level retrieval, e.g. ROxf / RPar).

Each image is its own batch (no padding ever enters a descriptor) and runs through :func:`~recallk.evaluation.embed.
embed_batches`, the one embedding code path (eval mode, float32, autocast off). The computation is cirtorch's
``extract_ms`` (Radenović et al., ``cnnimageretrieval-pytorch``). With scales ``s_1 .. s_S`` the image tensor ``x``
``(C, H, W)`` becomes ``x_s = interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)`` (no
antialiasing; ``floor(s H) x floor(s W)`` pixels; scale 1 leaves ``x`` as is) and the descriptor is::

    d = normalize( ( mean_s  normalize(f(x_s)) ^ p ) ^ (1/p) )

with ``p`` cirtorch's ``msp``. cirtorch sets ``msp`` to the GeM exponent only for a network that ends in GeM
pooling without a projection (its ``whitening`` layer), else 1. Every recallk image model projects after pooling
(``LayerNorm -> Linear``), so recallk describes with ``p = 1``: the mean of the unit-norm per-scale descriptors,
L2-normalised (:func:`recallk.training.description.describe`). Powers are signed (``sign(v) |v|^p``), equal to
cirtorch's ``v^p`` for non-negative descriptors (a bare GeM output), and real where cirtorch's would be NaN.
An optional ``post_process`` (e.g. a learned whitening) maps the aggregated ``(N, D)`` descriptors to ``(N, D')``;
its output is L2-normalised again, as cirtorch applies its learned whitening after the multi-scale aggregation.

:func:`parse_scales` reads scales as recallk and cirtorch spell them: ``1 0.7071 0.5`` or ``'[1, 1/2**(1/2), 1/2]'``.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from recallk.evaluation.embed import embed_batches

PostProcess = Callable[[Tensor], Tensor]

_OPERATORS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def _arithmetic(node: ast.AST) -> float:
    """The value of a parsed expression of numbers, ``+ - * / **`` and parentheses (nothing else is evaluated)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_arithmetic(node.left), _arithmetic(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_arithmetic(node.operand))
    raise ValueError("not a number")


def parse_scales(text: str) -> tuple[float, ...]:
    """Positive scales from ``text``: numbers or arithmetic (``1/2**(1/2)``) separated by commas (else by spaces), in
    optional brackets, e.g. ``"1 0.7071 0.5"`` or cirtorch's ``"[1, 1/2**(1/2), 1/2]"``. Parsed, never ``eval``-ed:
    only numbers, ``+ - * / **`` and parentheses are accepted; anything else is a one-line ``ValueError``."""
    inner = text.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    items = [item.strip() for item in inner.split(",")] if "," in inner else inner.split()
    items = [item for item in items if item]
    scales = []
    for item in items:
        try:
            value = _arithmetic(ast.parse(item, mode="eval").body)
        except (SyntaxError, ValueError, ArithmeticError):
            value = math.nan
        if not (isinstance(value, float) and math.isfinite(value) and value > 0):
            raise ValueError(f"scale {item!r} in {text!r} is not a positive number; write e.g. 1 0.7071 0.5 or "
                             "'[1, 1/2**(1/2), 1/2]'")
        scales.append(value)
    if not scales:
        raise ValueError(f"no scales in {text!r}; write e.g. 1 0.7071 0.5 or '[1, 1/2**(1/2), 1/2]'")
    return tuple(scales)


def rescale(image: Tensor, scale: float) -> Tensor:
    """``(C, H, W)`` -> ``(C, floor(scale H), floor(scale W))``, cirtorch's bilinear ``interpolate(scale_factor=scale,
    align_corners=False)`` without antialiasing; scale 1 returns ``image``. A scale that leaves no pixel is a
    one-line ``ValueError``."""
    if scale == 1.0:
        return image
    height, width = image.shape[-2:]
    if math.floor(height * scale) < 1 or math.floor(width * scale) < 1:
        raise ValueError(f"scale {scale} leaves no pixel of a {height}x{width} image; drop that scale or use larger "
                         "images (eval.image_size)")
    return F.interpolate(image[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]


def signed_power(values: Tensor, p: float) -> Tensor:
    """``sign(v) |v|^p`` elementwise."""
    return values.sign() * values.abs().pow(p)


def combine_scales(per_scale: Tensor, p: float) -> Tensor:
    """``(N, S, D)`` descriptors of S scales -> ``(N, D)``: L2-normalise each, signed power p, mean, power 1/p,
    L2-normalise."""
    powered = signed_power(F.normalize(per_scale, dim=-1), p).mean(dim=1)
    return F.normalize(signed_power(powered, 1.0 / p), dim=-1)


def iter_multiscale_descriptors(
    model: nn.Module,
    images: Iterable[Tensor],
    device: torch.device,
    scales: Sequence[float] = (1.0,),
    p: float = 1.0,
    post_process: PostProcess | None = None,
    chunk_size: int = 1024,
    total: int | None = None,
    progress: bool = True,
    desc: str = "descriptors",
) -> Iterator[Tensor]:
    """Yield float32 ``(n, D)`` descriptors of consecutive chunks of ``chunk_size`` images (``(C, H, W)`` each,
    any size), in order; memory holds one chunk, whatever the number of images.

    ``p``: cirtorch's ``msp`` (module docstring); ``post_process`` is applied to each chunk (then L2-normalised).
    ``total`` (number of images) sizes the progress bar.
    """
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive numbers, got {list(scales)}")
    iterator = iter(images)
    with tqdm(total=total, desc=desc, unit="image", disable=not progress, leave=False) as bar:
        while True:
            chunk = [image for _, image in zip(range(chunk_size), iterator)]
            if not chunk:
                return
            batches = (rescale(image, s)[None] for image in chunk for s in scales)
            per_scale = embed_batches(model, batches, device, progress=False)
            descriptors = combine_scales(per_scale.view(len(chunk), len(scales), -1), p)
            if post_process is not None:
                descriptors = F.normalize(post_process(descriptors).float(), dim=-1)
            bar.update(len(chunk))
            yield descriptors


def multiscale_descriptors(
    model: nn.Module,
    images: Iterable[Tensor],
    device: torch.device,
    scales: Sequence[float] = (1.0,),
    p: float = 1.0,
    post_process: PostProcess | None = None,
    total: int | None = None,
    progress: bool = True,
    desc: str = "descriptors",
) -> Tensor:
    """All descriptors of :func:`iter_multiscale_descriptors` at once: float32 ``(N, D)`` on the CPU."""
    chunks = list(iter_multiscale_descriptors(
        model, images, device, scales, p, post_process, total=total, progress=progress, desc=desc
    ))
    return torch.cat(chunks) if chunks else torch.empty(0, 0)
