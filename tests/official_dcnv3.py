"""The official pure-PyTorch DCNv3 core's arithmetic, for architecture-parity tests.

The official core builds its reference points and dilation grid in float32 normalised coordinates even for
float64 inputs, which puts samples ~1e-6 px off the exact positions. intern2's cores are exact, so model-level
float64 parity at 1e-8 with the golden fixtures needs this rounding reproduced; swapping it in isolates the
architecture (everything except the core) from that known grid error.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from intern2.ops import DCNv3Geometry
from intern2.ops.dcnv3 import mask_softmax


def official_grid_core(input, offset, mask, kernel_size, stride, pad, dilation, group, offset_scale=1.0,
                       remove_center=False, impl=None, softmax_mask=False):
    geo = DCNv3Geometry.create(kernel_size, stride, pad, dilation, group, offset_scale, remove_center)
    if softmax_mask:  # the official module's softmax, before its core
        mask = mask_softmax(mask, group)
    n, h, w, c = input.shape
    d = c // group
    ho, wo = geo.output_size(h, w)
    hp, wp = h + 2 * geo.pad_h, w + 2 * geo.pad_w
    f32 = dict(dtype=torch.float32, device=input.device)
    half_h = (geo.dilation_h * (geo.kernel_h - 1)) // 2
    half_w = (geo.dilation_w * (geo.kernel_w - 1)) // 2
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(half_h + 0.5, half_h + 0.5 + (ho - 1) * geo.stride_h, ho, **f32),
        torch.linspace(half_w + 0.5, half_w + 0.5 + (wo - 1) * geo.stride_w, wo, **f32), indexing="ij")
    ref = torch.stack((ref_x / wp, ref_y / hp), -1).reshape(1, ho, wo, 1, 2)
    gx, gy = torch.meshgrid(
        torch.linspace(-half_w, -half_w + (geo.kernel_w - 1) * geo.dilation_w, geo.kernel_w, **f32),
        torch.linspace(-half_h, -half_h + (geo.kernel_h - 1) * geo.dilation_h, geo.kernel_h, **f32), indexing="ij")
    grid = torch.stack((gx / wp, gy / hp), -1).reshape(-1, 2)
    if geo.remove_center:
        centre = (geo.kernel_w // 2) * geo.kernel_h + geo.kernel_h // 2
        grid = torch.cat([grid[:centre], grid[centre + 1:]])
    p = geo.points
    grid = grid[None].repeat(group, 1, 1).reshape(1, 1, 1, group * p, 2)
    base = (ref + grid * offset_scale).reshape(1, ho, wo, group * p * 2)  # float32, as the official code
    norm = torch.tensor([wp, hp], device=input.device).repeat(group * p)
    locations = base + offset * offset_scale / norm
    grids = (2 * locations - 1).view(n, ho * wo, group, p, 2).transpose(1, 2).flatten(0, 1)
    padded = F.pad(input, [0, 0, geo.pad_w, geo.pad_w, geo.pad_h, geo.pad_h])
    value = padded.view(n, hp * wp, c).transpose(1, 2).reshape(n * group, d, hp, wp)
    sampled = F.grid_sample(value, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = mask.view(n, ho * wo, group, p).transpose(1, 2).reshape(n * group, 1, ho * wo, p)
    out = (sampled * weights).sum(-1).view(n, c, ho * wo)
    return out.transpose(1, 2).reshape(n, ho, wo, c)
