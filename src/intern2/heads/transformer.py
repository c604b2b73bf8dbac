"""mmcv/mmdet transformer building blocks with their checkpoint names, as the official DETR-family heads use them
(DINO, Mask2Former): sine positional encoding, ConvModule(conv, GN), FFN, multi-head attention, the deformable
encoder. Batch first throughout (mmcv's are sequence first; the parameters are the same)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Linear
from ..ops.msda_module import MultiScaleDeformableAttention

__all__ = ["sine_position_encoding", "ConvGN", "FFN", "MultiheadAttention", "DeformableEncoderLayer",
           "DeformableEncoder"]


def sine_position_encoding(mask: Tensor, num_feats: int, temperature: float, scale: float = 2 * math.pi,
                           eps: float = 1e-6, dtype: torch.dtype = torch.float32) -> Tensor:
    """mmdet's ``SinePositionalEncoding`` (normalize=True): (B, H, W) padding mask -> (B, 2 * num_feats, H, W),
    y channels first; positions are cumulative counts of valid pixels normalised by the last one."""
    valid = (~mask).to(dtype)
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=dtype, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class ConvGN(nn.Module):
    """mmcv ``ConvModule(conv, GN[, ReLU])``: mmcv gives the conv no bias when a norm follows, unless asked."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 32,
                 relu: bool = False, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=bias)
        self.gn = nn.GroupNorm(groups, out_channels)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class FFN(nn.Module):
    """mmcv's FFN (2 FCs, ReLU, identity added): ``layers.0.0`` and ``layers.1`` as in the checkpoints."""

    def __init__(self, embed_dims: int, feedforward_channels: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True)),
                                    Linear(feedforward_channels, embed_dims))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class MultiheadAttention(nn.Module):
    """mmcv's ``MultiheadAttention`` (``attn`` = torch's, batch first here): key defaults to the query, value to
    the key (both before positions), positions are added to query and key only, the query is the residual."""

    def __init__(self, embed_dims: int, num_heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, batch_first=True)

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None, key_pos: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        key = query if key is None else key
        value = key if value is None else value
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
        q = query if query_pos is None else query + query_pos
        k = key if key_pos is None else key + key_pos
        return query + self.attn(q, k, value, attn_mask=attn_mask, need_weights=False)[0]


class DeformableEncoderLayer(nn.Module):
    """mmcv ``BaseTransformerLayer`` (self_attn (deformable), norm, ffn, norm): the value is the query without
    positions, padded positions are masked."""

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, feedforward_channels: int):
        super().__init__()
        self.attentions = nn.ModuleList([MultiScaleDeformableAttention(embed_dims, num_heads, num_levels, num_points,
                                                                       dropout=0.0, batch_first=True)])
        self.ffns = nn.ModuleList([FFN(embed_dims, feedforward_channels)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(2)])

    def forward(self, query: Tensor, query_pos: Tensor, padding_mask: Tensor, reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        query = self.norms[0](self.attentions[0](query, query_pos=query_pos, key_padding_mask=padding_mask,
                                                 reference_points=reference_points, spatial_shapes=spatial_shapes,
                                                 level_start_index=level_start_index))
        return self.norms[1](self.ffns[0](query))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` (mmdet's ``DetrTransformerEncoder`` without a post norm)."""

    def __init__(self, num_layers: int, **layer):
        super().__init__()
        self.layers = nn.ModuleList([DeformableEncoderLayer(**layer) for _ in range(num_layers)])

    def forward(self, query: Tensor, **kwargs) -> Tensor:
        for layer in self.layers:
            query = layer(query, **kwargs)
        return query
