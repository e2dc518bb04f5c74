"""A small convolutional backbone for Omniglot-sized grayscale images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from recallk.registry import NORMS

MAX_GROUPS = 32  # GroupNorm's usual group count (Wu & He, 2018)
MIN_CHANNELS_PER_GROUP = 4


def group_count(width: int) -> int:
    """GroupNorm groups for ``width`` channels: the largest divisor of ``width`` that is at most 32 and leaves at
    least 4 channels per group (1 for widths below 8), e.g. 32 -> 8, 64 -> 16, 128 -> 32, 256 -> 32, 48 -> 12."""
    limit = min(MAX_GROUPS, width // MIN_CHANNELS_PER_GROUP)
    return next((g for g in range(limit, 1, -1) if width % g == 0), 1)


def _norm_layer(norm: str, width: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(width)
    return nn.GroupNorm(group_count(width), width)


class SmallCNN(nn.Sequential):
    """Stack of ``conv3x3 -> norm -> ReLU -> maxpool2`` blocks, one per entry of ``widths``.

    ``(B, in_chans, H, W) -> (B, widths[-1], ceil(H / 2^n), ceil(W / 2^n))`` with ``n = len(widths)``; pooling rounds
    up, so small inputs never shrink to zero. ``num_features`` is the channel count of the output, as in timm.

    ``norm="batch"`` uses BatchNorm; ``norm="group"`` uses GroupNorm with :func:`group_count` groups, which
    normalises each image on its own, so the network's output does not depend on the batch: it trains from
    scratch with the multistage engine (chunked batches), where BatchNorm would have to be frozen.
    """

    def __init__(self, in_chans: int = 1, widths: Sequence[int] = (64, 128, 256, 256), norm: str = "batch") -> None:
        if in_chans <= 0 or not widths or any(w <= 0 for w in widths):
            raise ValueError(
                f"SmallCNN needs in_chans > 0 and a non-empty list of positive widths, got in_chans={in_chans}, "
                f"widths={list(widths)}; use e.g. widths=(64, 128, 256)"
            )
        if norm not in NORMS:
            raise ValueError(NORMS.unknown(norm))
        blocks = []
        channels = in_chans
        for width in widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                    _norm_layer(norm, width),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(kernel_size=2, ceil_mode=True),
                )
            )
            channels = width
        super().__init__(*blocks)
        self.num_features = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
