"""Small 4-level U-Net for capillary segmentation (pure torch).

In:  float32 tensor (N, 1, H, W), the standardized green channel (see
     :func:`models.augment.standardize`); H and W multiples of 8.
Out: logits (N, n_classes, H, W) for background / capillary / blurred / haemorrhage.

``base=16`` gives ≈ 0.45 M parameters, ``base=12`` (the shipped weights) ≈ 0.25 M at ≈ 0.55× the
FLOPs. BatchNorm + ReLU, bilinear upsampling (after each decoder level's 1×1 convolution), no
padding tricks.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, in_ch: int = 1, n_classes: int = 4, base: int = 16, levels: int = 4):
        super().__init__()
        chs = [base * 2 ** i for i in range(levels)]
        self.downs = nn.ModuleList()
        c = in_ch
        for ch in chs:
            self.downs.append(conv_block(c, ch))
            c = ch
        self.ups = nn.ModuleList()
        self.upconvs = nn.ModuleList()
        for ch in reversed(chs[:-1]):
            self.upconvs.append(nn.Conv2d(c, ch, 1))
            self.ups.append(conv_block(2 * ch, ch))
            c = ch
        self.head = nn.Conv2d(c, n_classes, 1)
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, d in enumerate(self.downs):
            x = d(x)
            if i < self.levels - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, conv, skip in zip(self.upconvs, self.ups, reversed(skips)):
            # the 1×1 convolution before the upsampling, not after: the same map (bilinear weights
            # sum to 1), on half the channels at a quarter of the pixels (shipped U-Net on a
            # 352×480 input, one thread: ≈ 115 → 105 ms; labels identical on 7 keyframes and frames)
            x = F.interpolate(up(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = conv(torch.cat([x, skip], 1))
        return self.head(x)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
