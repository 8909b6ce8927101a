"""A re-implementation of AtomAI's default segmentation U-Net (``atomai.nets.Unet``) for speed
and accuracy comparisons; AtomAI itself is not a dependency.

Defaults of ``atomai.nets.Unet``: 16 filters doubling per level, blocks of (1, 2, 2, 3) 3x3
convolutions, each followed by LeakyReLU(0.1) and batch norm; max-pooling between levels;
bilinear upsampling followed by a 1x1 convolution; skip connections by concatenation; a 1x1
convolution head. About 0.5 M parameters, all at full resolution in the outer level.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(n_layers: int, c_in: int, c_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [
            nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.BatchNorm2d(c_out),
        ]
    return nn.Sequential(*layers)


class _Upsample(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(
            nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        )


class AtomAIUnet(nn.Module):
    """``(B, in_channels, H, W) -> (B, nb_classes, H, W)``; H, W multiples of 8."""

    def __init__(self, in_channels: int = 1, nb_classes: int = 4, nb_filters: int = 16) -> None:
        super().__init__()
        f = nb_filters
        self.c1 = _conv_block(1, in_channels, f)
        self.c2 = _conv_block(2, f, 2 * f)
        self.c3 = _conv_block(2, 2 * f, 4 * f)
        self.bn = _conv_block(3, 4 * f, 8 * f)
        self.up1 = _Upsample(8 * f, 4 * f)
        self.c4 = _conv_block(2, 8 * f, 4 * f)
        self.up2 = _Upsample(4 * f, 2 * f)
        self.c5 = _conv_block(2, 4 * f, 2 * f)
        self.up3 = _Upsample(2 * f, f)
        self.c6 = _conv_block(1, 2 * f, f)
        self.px = nn.Conv2d(f, nb_classes, 1)

    def multiple(self) -> int:
        return 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.c1(x)
        c2 = self.c2(nn.functional.max_pool2d(c1, 2))
        c3 = self.c3(nn.functional.max_pool2d(c2, 2))
        bn = self.bn(nn.functional.max_pool2d(c3, 2))
        u3 = self.c4(torch.cat([c3, self.up1(bn)], dim=1))
        u2 = self.c5(torch.cat([c2, self.up2(u3)], dim=1))
        u1 = self.c6(torch.cat([c1, self.up3(u2)], dim=1))
        return self.px(u1)
