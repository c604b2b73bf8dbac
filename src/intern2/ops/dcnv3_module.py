"""The DCNv3 module: projections, offset/mask prediction and the DCNv3 core, on NHWC input.

Parameter names and initialisation follow the official ``DCNv3`` / ``DCNv3_pytorch`` modules, so their
state dicts load strictly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Linear, build_act_layer, build_norm_layer, linear_residual
from .dcnv3 import IMPLS, dcnv3

__all__ = ["DCNv3"]


@torch.fx.wrap
def _checked(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The input check, kept out of symbolic tracing (torch.fx records the call instead of its branches)."""
    if x.dim() != 4 or x.shape[-1] != channels:
        raise ValueError(f"DCNv3 input: expected (N, H, W, {channels}) channels-last, got {tuple(x.shape)}")
    return x


@torch.fx.wrap
def _sample(x_proj: torch.Tensor, offset: torch.Tensor, mask_logits: torch.Tensor, kernel_size: int, stride: int,
            pad: int, dilation: int, group: int, offset_scale: float, remove_center: bool,
            impl: Optional[str]) -> torch.Tensor:
    """The DCNv3 core with the mask softmax over each group's points (the CPU kernel computes it as it reads the
    logits): one call for torch.fx (the custom op cannot be traced symbolically)."""
    return dcnv3(x_proj, offset, mask_logits, kernel_size, stride, pad, dilation, group, offset_scale,
                 remove_center, impl=impl, softmax_mask=True)


class DCNv3(nn.Module):
    """Dynamic sparse convolution v3 on channels-last input (N, H, W, C) -> (N, H, W, C).

    Args:
        channels: input and output channels C.
        kernel_size: sampling grid size k (P = k*k points per group, minus the centre with remove_center).
        dw_kernel_size: kernel of the depthwise conv that feeds the offset/mask predictors (default k).
        stride, pad, dilation: of the sampling grid; offsets are predicted at input resolution, so the output
            must keep the input size (stride 1, pad = dilation*(k-1)//2).
        group: channel groups G; each group has its own offsets and mask.
        offset_scale: multiplies the sampling grid and the predicted offsets.
        act_layer, norm_layer: of the depthwise branch ('GELU', 'LN' as in InternImage).
        center_feature_scale: blend the output with the input projection by a learned per-group gate.
        remove_center: drop the kernel's centre point.
        impl: DCNv3 core implementation ('reference', 'fast', 'triton'; None picks per device).
    """

    def __init__(
            self,
            channels: int = 64,
            kernel_size: int = 3,
            dw_kernel_size: Optional[int] = None,
            stride: int = 1,
            pad: int = 1,
            dilation: int = 1,
            group: int = 4,
            offset_scale: float = 1.0,
            act_layer: str = "GELU",
            norm_layer: str = "LN",
            center_feature_scale: bool = False,
            remove_center: bool = False,
            impl: Optional[str] = None,
    ):
        super().__init__()
        if channels % group != 0:
            raise ValueError(f"channels ({channels}) must be divisible by group ({group})")
        if stride != 1 or 2 * pad != dilation * (kernel_size - 1):
            raise ValueError(f"DCNv3 predicts offsets at input resolution, so it needs stride=1 and "
                             f"pad=dilation*(kernel_size-1)//2; got stride={stride}, pad={pad}, "
                             f"dilation={dilation}, kernel_size={kernel_size}")
        if remove_center and kernel_size % 2 == 0:
            raise ValueError(f"remove_center needs an odd kernel_size, got {kernel_size}")
        if impl is not None and impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS} or None, got {impl!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size or kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = offset_scale
        self.center_feature_scale = center_feature_scale
        self.remove_center = bool(remove_center)
        self.impl = impl
        points = kernel_size * kernel_size - int(self.remove_center)

        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, self.dw_kernel_size, stride=1, padding=(self.dw_kernel_size - 1) // 2,
                      groups=channels),
            build_norm_layer(channels, norm_layer, "channels_first", "channels_last"),
            build_act_layer(act_layer),
        )
        self.offset = Linear(channels, group * points * 2)
        self.mask = Linear(channels, group * points)
        self.input_proj = Linear(channels, channels)
        self.output_proj = Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: zero offset/mask predictors (regular grid, uniform weights), xavier projections."""
        for layer in (self.offset, self.mask):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.center_feature_scale:
            nn.init.zeros_(self.center_feature_scale_proj_weight)
            nn.init.zeros_(self.center_feature_scale_proj_bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The module's output, or ``residual + output`` (the sum fused into the output projection at inference)."""
        x = _checked(x, self.channels)
        x_proj = self.input_proj(x)
        query = self.dw_conv(x.permute(0, 3, 1, 2))
        out = _sample(x_proj, self.offset(query), self.mask(query), self.kernel_size, self.stride, self.pad,
                      self.dilation, self.group, self.offset_scale, self.remove_center, self.impl)
        if self.center_feature_scale:
            gate = torch.sigmoid(F.linear(query, self.center_feature_scale_proj_weight,
                                          self.center_feature_scale_proj_bias))
            gate = gate.repeat_interleave(self.group_channels, dim=-1)  # (N, H, W, G) -> per channel
            out = out * (1 - gate) + x_proj * gate
        return self.output_proj(out) if residual is None else linear_residual(self.output_proj, out, residual)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, group={self.group}, "
                f"offset_scale={self.offset_scale}, center_feature_scale={self.center_feature_scale}, "
                f"remove_center={self.remove_center}")
