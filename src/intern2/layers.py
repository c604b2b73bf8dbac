"""Small building blocks shared by the models: layout permutes, norm and activation factories.

Norm layers are wrapped with layout permutes exactly as in the official InternImage code, so the module
indices (and hence state-dict keys such as ``dw_conv.1.1.weight``) match the released checkpoints.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torchvision
from torch import nn

__all__ = ["ToChannelsFirst", "ToChannelsLast", "DropPath", "build_norm_layer", "build_act_layer"]


class ToChannelsFirst(nn.Module):
    """NHWC -> NCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class ToChannelsLast(nn.Module):
    """NCHW -> NHWC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


_FORMATS = ("channels_first", "channels_last")


def build_norm_layer(dim: int, norm_layer: str, in_format: str = "channels_last",
                     out_format: str = "channels_last", eps: float = 1e-6) -> nn.Sequential:
    """'LN' (LayerNorm over channels, run channels-last) or 'BN' (BatchNorm2d, run channels-first)."""
    if in_format not in _FORMATS or out_format not in _FORMATS:
        raise ValueError(f"in_format/out_format: expected one of {_FORMATS}, got {in_format!r}/{out_format!r}")
    layers = []
    if norm_layer == "BN":
        if in_format == "channels_last":
            layers.append(ToChannelsFirst())
        layers.append(nn.BatchNorm2d(dim))
        if out_format == "channels_last":
            layers.append(ToChannelsLast())
    elif norm_layer == "LN":
        if in_format == "channels_first":
            layers.append(ToChannelsLast())
        layers.append(nn.LayerNorm(dim, eps=eps))
        if out_format == "channels_first":
            layers.append(ToChannelsFirst())
    else:
        raise ValueError(f"norm_layer: expected 'LN' or 'BN', got {norm_layer!r}")
    return nn.Sequential(*layers)


_ACTIVATIONS = {"ReLU": lambda: nn.ReLU(inplace=True), "SiLU": lambda: nn.SiLU(inplace=True), "GELU": nn.GELU}


def build_act_layer(act_layer: Union[str, Callable[[], nn.Module]]) -> nn.Module:
    """'GELU', 'ReLU', 'SiLU' or a module factory."""
    if callable(act_layer):
        return act_layer()
    if act_layer not in _ACTIVATIONS:
        raise ValueError(f"act_layer: expected one of {sorted(_ACTIVATIONS)}, got {act_layer!r}")
    return _ACTIVATIONS[act_layer]()


class DropPath(nn.Module):
    """Stochastic depth per sample (row mode), rescaled by 1/keep_prob."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torchvision.ops.stochastic_depth(x, self.p, "row", self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
