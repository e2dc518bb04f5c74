"""Augmentation of whole image batches held in memory (the fast CPU path of the Omniglot demo).

torchvision's v2 transforms draw one set of parameters per call, so a batch would share one affine warp. Here
every image gets its own random affine transform, applied to the whole batch with one ``affine_grid`` and one
``grid_sample`` call. Randomness comes only from the ``generator`` argument, so a batch is reproducible from its
seed (which is what makes a resumed run repeat an uninterrupted one exactly).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RandomAffineBatch:
    """Per-image random rotation, scale, shear and translation of an (N, C, H, W) float batch.

    Angles are drawn uniformly from ``[-degrees, degrees]``, the scale from ``scale``, shear from
    ``[-shear, shear]`` degrees and the shift from ``[-translate, translate]`` times the image size. Pixels that
    come from outside the image are 0 (the dark background of inverted Omniglot images).
    """

    def __init__(
        self,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        shear: float = 0.0,
    ) -> None:
        if degrees < 0 or translate < 0 or shear < 0 or not 0 < scale[0] <= scale[1]:
            raise ValueError(
                f"RandomAffineBatch needs degrees, translate, shear >= 0 and 0 < scale[0] <= scale[1], got "
                f"degrees={degrees}, translate={translate}, scale={scale}, shear={shear}"
            )
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, scale, shear

    def __repr__(self) -> str:
        return (
            f"RandomAffineBatch(degrees={self.degrees}, translate={self.translate}, scale={self.scale}, "
            f"shear={self.shear})"
        )

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None, offset: int = 0, total: int | None = None
    ) -> torch.Tensor:
        """Warp ``images``; they are rows ``offset:offset+N`` of a batch of ``total`` (default N) images.

        Parameters are drawn for the whole batch of ``total`` and sliced, so one process's share of a batch gets
        the same warps as in a single-process run.
        """
        n = len(images)
        total = n if total is None else total
        if not 0 <= offset <= total - n:
            raise ValueError(f"rows {offset}:{offset + n} do not fit in a batch of {total}")

        def uniform(low: float, high: float) -> torch.Tensor:
            return (low + (high - low) * torch.rand(total, generator=generator))[offset : offset + n]

        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180)
        shear = uniform(-self.shear, self.shear) * (math.pi / 180)
        scale = uniform(*self.scale)
        shift = torch.stack([uniform(-self.translate, self.translate) * 2 for _ in range(2)], dim=1)
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        # Output -> input sampling matrix: inverse of (rotate @ shear) scaled by 1/scale.
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos / scale, (sin + cos * tan) / scale
        theta[:, 1, 0], theta[:, 1, 1] = -sin / scale, (cos - sin * tan) / scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
