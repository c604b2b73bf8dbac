"""The multi-scale deformable attention module: projections, offset/weight prediction and the MSDA core.

Parameter names, initialisation and call semantics follow mmcv's ``MultiScaleDeformableAttention`` (the module
InternImage's DINO and Mask2Former configs build), so its state dicts load strictly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..layers import Linear
from .dcnv3 import IMPLS
from .msda import SpatialShapes, ms_deform_attn

__all__ = ["MultiScaleDeformableAttention"]


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over a multi-scale feature pyramid (Deformable DETR), mmcv's module.

    Args:
        embed_dims: channels C of query and value.
        num_heads: attention heads M (C divisible by M).
        num_levels: feature levels L.
        num_points: sampling points P per head and level.
        dropout: on the projected output, before the residual.
        batch_first: (N, length, C) inputs; False (mmcv's default, every InternImage config) means (length, N, C).
        impl: MSDA core implementation ('reference', 'fast', 'triton'; None picks per device).
        im2col_step, norm_cfg, init_cfg: accepted and unused, as in mmcv, so mmcv configs construct it unchanged.
    """

    def __init__(
            self,
            embed_dims: int = 256,
            num_heads: int = 8,
            num_levels: int = 4,
            num_points: int = 4,
            dropout: float = 0.1,
            batch_first: bool = False,
            impl: Optional[str] = None,
            im2col_step: int = 64,
            norm_cfg: Optional[dict] = None,
            init_cfg: Optional[dict] = None,
    ):
        super().__init__()
        del im2col_step, norm_cfg, init_cfg  # mmcv stores and never uses them (im2col_step batches its CUDA kernel)
        if embed_dims % num_heads != 0:
            raise ValueError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")
        if impl is not None and impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS} or None, got {impl!r}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.batch_first = batch_first
        self.impl = impl
        self.dropout = nn.Dropout(dropout)
        self.sampling_offsets = Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = Linear(embed_dims, embed_dims)
        self.output_proj = Linear(embed_dims, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's init: offsets start on a per-head ray (head h at angle 2*pi*h/M, scaled so the larger of |cos|,
        |sin| is 1, point p at distance p+1), uniform attention, xavier-uniform projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        direction = torch.stack([thetas.cos(), thetas.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values
        distance = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = direction.view(self.num_heads, 1, 1, 2) * distance
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.num_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _sampling_locations(self, reference_points: torch.Tensor, offsets: torch.Tensor,
                            spatial_shapes: SpatialShapes) -> torch.Tensor:
        """(N, Q, M, L, P, 2) locations: points plus offsets in pixels of each level, or boxes (cx, cy, w, h) plus
        offsets in units of half the box over P."""
        if reference_points.shape[-1] == 2:
            size_xy = torch.as_tensor(spatial_shapes, device=offsets.device).flip(-1)  # (L, 2) as (W, H)
            return reference_points[:, :, None, :, None, :] + offsets / size_xy[None, None, None, :, None, :]
        return (reference_points[:, :, None, :, None, :2]
                + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5)

    def forward(
            self,
            query: torch.Tensor,
            key: Optional[torch.Tensor] = None,
            value: Optional[torch.Tensor] = None,
            identity: Optional[torch.Tensor] = None,
            query_pos: Optional[torch.Tensor] = None,
            key_padding_mask: Optional[torch.Tensor] = None,
            reference_points: Optional[torch.Tensor] = None,
            spatial_shapes: Optional[SpatialShapes] = None,
            level_start_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend from the queries to the multi-scale value.

        Args:
            query: (Q, N, C), or (N, Q, C) with batch_first.
            key: unused (MSDA samples the value; the argument keeps mmcv's attention call signature).
            value: (S, N, C) keys of all levels, level after level, row-major; None: the query (self-attention).
            identity: added to the output; None: the query (before query_pos).
            query_pos: added to the query only.
            key_padding_mask: (N, S) bool, True where value positions are padding (they are zeroed).
            reference_points: (N, Q, L, 2) normalised points (x, y) or (N, Q, L, 4) boxes (cx, cy, w, h).
            spatial_shapes: (L, 2) integer (H, W) per level.
            level_start_index: (L,) first key of each level (checked, not needed).

        Returns:
            (Q, N, C), or (N, Q, C) with batch_first.
        """
        if reference_points is None or spatial_shapes is None:
            raise ValueError("MultiScaleDeformableAttention needs reference_points and spatial_shapes")
        if query.dim() != 3 or query.shape[-1] != self.embed_dims:
            raise ValueError(f"query: expected a 3-D tensor with {self.embed_dims} channels last, "
                             f"got shape {tuple(query.shape)}")
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.transpose(0, 1)
            value = value.transpose(0, 1)
        n, queries, _ = query.shape
        if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4) \
                or tuple(reference_points.shape[:3]) != (n, queries, self.num_levels):
            raise ValueError(f"reference_points: expected shape (N, Q, num_levels, 2) points or (..., 4) boxes = "
                             f"({n}, {queries}, {self.num_levels}, 2 or 4), got {tuple(reference_points.shape)}")
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.unflatten(-1, (self.num_heads, -1))
        shape = (n, queries, self.num_heads, self.num_levels, self.num_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        weights = self.attention_weights(query).view(*shape[:3], -1).softmax(-1).view(shape)
        locations = self._sampling_locations(reference_points, offsets, spatial_shapes)
        out = ms_deform_attn(value, spatial_shapes, locations, weights, impl=self.impl,
                             level_start_index=level_start_index)
        out = self.output_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.dropout(out) + identity

    def extra_repr(self) -> str:
        return (f"embed_dims={self.embed_dims}, num_heads={self.num_heads}, num_levels={self.num_levels}, "
                f"num_points={self.num_points}, batch_first={self.batch_first}")
