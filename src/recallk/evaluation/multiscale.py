"""Descriptors of variable-size images at one or several scales (instance-level retrieval, e.g. ROxf / RPar).

Each image is its own batch (no padding ever enters a descriptor) and runs through :func:`~recallk.evaluation.embed.
embed_batches`, the one embedding code path (eval mode, float32, autocast off). With scales ``s_1 .. s_S`` the
image ``x`` is resized to ``round(s H) x round(s W)`` (bilinear, antialiased when shrinking; scale 1 leaves it
as is) and the descriptor is the generalised mean of the per-scale descriptors::

    d = normalize( ( mean_s  normalize(f(x_s)) ^ p ) ^ (1/p) )

with ``p`` the model's GeM exponent (:func:`gem_exponent`; 1 without GeM), as cirtorch aggregates multi-scale
GeM. Powers are signed (``sign(v) |v|^p``), so descriptors with negative entries (a linear head) stay real; for
non-negative descriptors this is exactly ``v^p``. An optional ``post_process`` (e.g. a learned whitening) maps the
aggregated ``(N, D)`` descriptors to ``(N, D')``; its output is L2-normalised again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from recallk.evaluation.embed import embed_batches
from recallk.models.heads import GeM

PostProcess = Callable[[Tensor], Tensor]


def gem_exponent(model: nn.Module) -> float:
    """The ``p`` of the model's (first) GeM pooling, or 1.0 when it has none."""
    gem = next((m for m in model.modules() if isinstance(m, GeM)), None)
    return 1.0 if gem is None else float(gem.p.detach())


def rescale(image: Tensor, scale: float) -> Tensor:
    """``(C, H, W)`` -> ``(C, round(scale H), round(scale W))`` (at least 1 pixel); scale 1 returns ``image``."""
    if scale == 1.0:
        return image
    height, width = image.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]


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
    p: float | None = None,
    post_process: PostProcess | None = None,
    chunk_size: int = 1024,
    total: int | None = None,
    progress: bool = True,
    desc: str = "descriptors",
) -> Iterator[Tensor]:
    """Yield float32 ``(n, D)`` descriptors of consecutive chunks of ``chunk_size`` images (``(C, H, W)`` each,
    any size), in order; memory holds one chunk, whatever the number of images.

    ``p`` defaults to :func:`gem_exponent` of ``model``; ``post_process`` is applied to each chunk (then
    L2-normalised). ``total`` (number of images) sizes the progress bar.
    """
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive numbers, got {list(scales)}")
    p = gem_exponent(model) if p is None else p
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
    p: float | None = None,
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
