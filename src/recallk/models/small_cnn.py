"""A small convolutional backbone for Omniglot-sized grayscale images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class SmallCNN(nn.Sequential):
    """Stack of ``conv3x3 -> BatchNorm -> ReLU -> maxpool2`` blocks, one per entry of ``widths``.

    ``(B, in_chans, H, W) -> (B, widths[-1], ceil(H / 2^n), ceil(W / 2^n))`` with ``n = len(widths)``; pooling rounds
    up, so small inputs never shrink to zero. ``num_features`` is the channel count of the output, as in timm.
    """

    def __init__(self, in_chans: int = 1, widths: Sequence[int] = (64, 128, 256, 256)) -> None:
        if in_chans <= 0 or not widths or any(w <= 0 for w in widths):
            raise ValueError(
                f"SmallCNN needs in_chans > 0 and a non-empty list of positive widths, got in_chans={in_chans}, "
                f"widths={list(widths)}; use e.g. widths=(64, 128, 256)"
            )
        blocks = []
        channels = in_chans
        for width in widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
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
