"""UperNet decode head and FCN auxiliary head with mmseg-compatible module names.

The module tree mirrors mmseg 0.x ``UPerHead`` / ``FCNHead`` (``psp_modules.i.1.conv/bn``, ``bottleneck``,
``lateral_convs.i``, ``fpn_convs.i``, ``fpn_bottleneck``, ``conv_seg``; ``convs.0`` for the FCN head), so the
official InternImage UperNet checkpoints load with their ``decode_head.`` / ``auxiliary_head.`` prefixes.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvModule", "UPerHead", "FCNHead"]


class ConvModule(nn.Module):
    """conv (no bias) + BatchNorm + ReLU, named like mmcv's ConvModule (``conv``, ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _SegHead(nn.Module):
    """Dropout + 1x1 classifier shared by both heads."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(_SegHead):
    """Pyramid pooling on the last level + FPN fusion of all levels (UperNet)."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels[-1], channels, 1))
            for scale in pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        last = features[-1]
        pooled = [_resize(ppm(last), last.shape[2:]) for ppm in self.psp_modules]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.bottleneck(torch.cat([last, *pooled], 1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1))
        return self.classify(fused)


class FCNHead(_SegHead):
    """Auxiliary head: ``num_convs`` 3x3 ConvModules on one level, then the classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(*(ConvModule(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.convs(x))
