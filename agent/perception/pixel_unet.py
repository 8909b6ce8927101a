"""A small U-Net that works at a quarter of the input resolution (the sr and defects networks).

Atomic-resolution frames are sampled finely (a column spans ~4 pixels at 0.25 Å), so the first
layer folds each ``factor x factor`` block of pixels into channels (``PixelUnshuffle``) and all
convolutions run on the folded grid; the head unfolds its output back to full resolution
(``PixelShuffle``). Compared with a full-resolution U-Net this cuts the work per pixel by about
``factor²`` at the same receptive field, which is what makes a 512² frame cheap on two CPU cores.
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    """Two 3x3 convolutions with ReLU and a residual connection (``channels`` in and out)."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv2(self.act(self.conv1(x))))


class PixelUNet(nn.Module):
    """``(B, in_channels, H, W) -> (B, out_channels, H, W)``; H and W multiples of
    :meth:`multiple` (pad first). ``widths`` are the channel counts of the levels (each level
    halves the folded grid); ``dropout`` is applied at the bottleneck (MC dropout)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        factor: int = 4,
        widths: tuple[int, ...] = (32, 48, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"PixelUNet needs at least two levels, got widths={widths!r}")
        self.factor = factor
        self.levels = len(widths)
        self.unshuffle = nn.PixelUnshuffle(factor)
        self.stem = nn.Conv2d(in_channels * factor * factor, widths[0], 3, padding=1)
        self.enc = nn.ModuleList([_Block(widths[0])])
        self.down = nn.ModuleList()
        for i in range(1, len(widths)):
            self.down.append(nn.Conv2d(widths[i - 1], widths[i], 3, stride=2, padding=1))
            self.enc.append(_Block(widths[i], dilation=2 if i == len(widths) - 1 else 1))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.up.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2))
            self.dec.append(_Block(widths[i - 1]))
        self.head = nn.Conv2d(widths[0], out_channels * factor * factor, 1)
        self.shuffle = nn.PixelShuffle(factor)
        self.act = nn.ReLU(inplace=True)

    def multiple(self) -> int:
        """H and W must be multiples of this."""
        return int(self.factor * 2 ** (self.levels - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.stem(self.unshuffle(x)))
        skips = []
        for i, block in enumerate(self.enc):
            if i > 0:
                h = self.act(self.down[i - 1](h))
            h = block(h)
            skips.append(h)
        h = self.dropout(h)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1]), strict=True):
            h = dec(self.act(up(h)) + skip)
        return self.shuffle(self.head(h))
