"""MSDA Triton kernels (GPU; also runnable on CPU tensors with ``TRITON_INTERPRET=1``).

One program per (block of (image, query) rows, head), as the DCNv3 kernels: for each of the L*P points the
location and attention weight are loaded once and the bilinear corners computed once, then reused across the
head's channels, read as contiguous rows of D values. Accumulation is in float32 (float64 for float64 tensors).
Backward recomputes the sampling from the inputs, reduces the location/weight gradients over the channels inside
the program and scatters grad_value with atomic adds into a float32 (or float64) buffer.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU-only installs: the custom op never routes here
    AVAILABLE = False

__all__ = ["AVAILABLE", "msda_forward", "msda_backward"]

BLOCK_R = 64
MAX_BLOCK_D = 64

if AVAILABLE:

    @triton.jit
    def _sample(loc_ptr, index, r_mask, height, width, ACC: tl.constexpr):
        """Fractions, corner keys (relative to the level's first key) and validity masks of the locations at
        ``index`` on a height x width level (pixel = location * size - 0.5)."""
        h = height.to(ACC)
        w = width.to(ACC)
        x = tl.load(loc_ptr + 2 * index, mask=r_mask, other=0.0).to(ACC) * w - 0.5
        y = tl.load(loc_ptr + 2 * index + 1, mask=r_mask, other=0.0).to(ACC) * h - 0.5
        inside = r_mask & (x > -1.0) & (y > -1.0) & (x < w) & (y < h)
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        x0 = tl.where(inside, x0f, 0.0).to(tl.int64)
        y0 = tl.where(inside, y0f, 0.0).to(tl.int64)
        vx0 = inside & (x0 >= 0)
        vx1 = inside & (x0 + 1 < width)
        vy0 = inside & (y0 >= 0)
        vy1 = inside & (y0 + 1 < height)
        top = y0 * width
        bottom = top + width
        return (x - x0f, y - y0f, top + x0, top + x0 + 1, bottom + x0, bottom + x0 + 1,
                vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1)

    @triton.jit
    def _forward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, R, Q, S, M, D, L, P,
                        ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        m = tl.program_id(1)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (image, query) rows
        r_mask = r < R
        r64 = r.to(tl.int64)
        image_key = (r64 // Q) * S
        lanes = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            d_mask = ((d0 + lanes) < D)[None, :]
            column = (m * D + d0 + lanes)[None, :]
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
            for lvl in range(0, L):
                height = tl.load(shapes_ptr + 2 * lvl)
                width = tl.load(shapes_ptr + 2 * lvl + 1)
                key0 = image_key + tl.load(starts_ptr + lvl)
                for p in range(0, P):
                    index = ((r64 * M + m) * L + lvl) * P + p
                    a = tl.load(attn_ptr + index, mask=r_mask, other=0.0).to(ACC)
                    lx, ly, k00, k01, k10, k11, c00, c01, c10, c11 = _sample(loc_ptr, index, r_mask, height,
                                                                             width, ACC)
                    v00 = tl.load(value_ptr + (key0 + k00)[:, None] * (M * D) + column, mask=c00[:, None] & d_mask,
                                  other=0.0).to(ACC)
                    v01 = tl.load(value_ptr + (key0 + k01)[:, None] * (M * D) + column, mask=c01[:, None] & d_mask,
                                  other=0.0).to(ACC)
                    v10 = tl.load(value_ptr + (key0 + k10)[:, None] * (M * D) + column, mask=c10[:, None] & d_mask,
                                  other=0.0).to(ACC)
                    v11 = tl.load(value_ptr + (key0 + k11)[:, None] * (M * D) + column, mask=c11[:, None] & d_mask,
                                  other=0.0).to(ACC)
                    acc += (((1.0 - ly) * (1.0 - lx) * a)[:, None] * v00 + ((1.0 - ly) * lx * a)[:, None] * v01
                            + (ly * (1.0 - lx) * a)[:, None] * v10 + (ly * lx * a)[:, None] * v11)
            tl.store(out_ptr + r64[:, None] * (M * D) + column, acc.to(out_ptr.dtype.element_ty),
                     mask=r_mask[:, None] & d_mask)

    @triton.jit
    def _corner_backward(value_ptr, gvalue_ptr, key, valid, weight, grad, column, d_mask, row_stride,
                         ACC: tl.constexpr):
        """grad_value[corner] += weight * grad; returns the per-row dot product <grad, corner value>."""
        pointer = key[:, None] * row_stride + column
        corner_mask = valid[:, None] & d_mask
        value = tl.load(value_ptr + pointer, mask=corner_mask, other=0.0).to(ACC)
        tl.atomic_add(gvalue_ptr + pointer, weight[:, None] * grad, mask=corner_mask)
        return tl.sum(grad * value, axis=1)

    @triton.jit
    def _backward_kernel(gout_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, gvalue_ptr, gloc_ptr,
                         gattn_ptr, R, Q, S, M, D, L, P, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        m = tl.program_id(1)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = r < R
        r64 = r.to(tl.int64)
        image_key = (r64 // Q) * S
        lanes = tl.arange(0, BLOCK_D)
        for lvl in range(0, L):
            height = tl.load(shapes_ptr + 2 * lvl)
            width = tl.load(shapes_ptr + 2 * lvl + 1)
            key0 = image_key + tl.load(starts_ptr + lvl)
            for p in range(0, P):
                index = ((r64 * M + m) * L + lvl) * P + p
                a = tl.load(attn_ptr + index, mask=r_mask, other=0.0).to(ACC)
                lx, ly, k00, k01, k10, k11, c00, c01, c10, c11 = _sample(loc_ptr, index, r_mask, height, width,
                                                                         ACC)
                w00 = (1.0 - ly) * (1.0 - lx)
                w01 = (1.0 - ly) * lx
                w10 = ly * (1.0 - lx)
                w11 = ly * lx
                s00 = tl.zeros((BLOCK_R,), dtype=ACC)
                s01 = tl.zeros((BLOCK_R,), dtype=ACC)
                s10 = tl.zeros((BLOCK_R,), dtype=ACC)
                s11 = tl.zeros((BLOCK_R,), dtype=ACC)
                for d0 in range(0, D, BLOCK_D):  # the corners above are reused for every channel tile
                    d_mask = ((d0 + lanes) < D)[None, :]
                    column = (m * D + d0 + lanes)[None, :]
                    grad = tl.load(gout_ptr + r64[:, None] * (M * D) + column, mask=r_mask[:, None] & d_mask,
                                   other=0.0).to(ACC)
                    s00 += _corner_backward(value_ptr, gvalue_ptr, key0 + k00, c00, w00 * a, grad, column, d_mask,
                                            M * D, ACC)
                    s01 += _corner_backward(value_ptr, gvalue_ptr, key0 + k01, c01, w01 * a, grad, column, d_mask,
                                            M * D, ACC)
                    s10 += _corner_backward(value_ptr, gvalue_ptr, key0 + k10, c10, w10 * a, grad, column, d_mask,
                                            M * D, ACC)
                    s11 += _corner_backward(value_ptr, gvalue_ptr, key0 + k11, c11, w11 * a, grad, column, d_mask,
                                            M * D, ACC)
                grad_attn = w00 * s00 + w01 * s01 + w10 * s10 + w11 * s11
                grad_x = a * width.to(ACC) * ((1.0 - ly) * (s01 - s00) + ly * (s11 - s10))
                grad_y = a * height.to(ACC) * ((1.0 - lx) * (s10 - s00) + lx * (s11 - s01))
                tl.store(gattn_ptr + index, grad_attn.to(gattn_ptr.dtype.element_ty), mask=r_mask)
                tl.store(gloc_ptr + 2 * index, grad_x.to(gloc_ptr.dtype.element_ty), mask=r_mask)
                tl.store(gloc_ptr + 2 * index + 1, grad_y.to(gloc_ptr.dtype.element_ty), mask=r_mask)


def _launch_args(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor):
    n, s, heads, dim = value.shape
    queries, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    starts = areas.cumsum(0) - areas  # on the device: no host sync
    grid = (triton.cdiv(n * queries, BLOCK_R), heads)
    scalars = (n * queries, queries, s, heads, dim, levels, points)
    acc = tl.float64 if value.dtype == torch.float64 else tl.float32
    meta = dict(ACC=acc, BLOCK_R=BLOCK_R, BLOCK_D=max(16, min(MAX_BLOCK_D, triton.next_power_of_2(dim))))
    return grid, spatial_shapes.contiguous(), starts, scalars, meta


def msda_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                 attention_weights: torch.Tensor) -> torch.Tensor:
    """Forward; output in the value's dtype."""
    out = value.new_empty((value.shape[0], sampling_locations.shape[1], value.shape[2] * value.shape[3]))
    if out.numel() == 0:
        return out
    grid, shapes, starts, scalars, meta = _launch_args(value, spatial_shapes, sampling_locations)
    _forward_kernel[grid](value, shapes, starts, sampling_locations, attention_weights, out, *scalars, **meta)
    return out


def msda_backward(grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                  sampling_locations: torch.Tensor, attention_weights: torch.Tensor):
    """Gradients w.r.t. (value, sampling_locations, attention_weights) of sum(output * grad_output)."""
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)  # atomics need full precision
    grad_locations = torch.zeros_like(sampling_locations)
    grad_weights = torch.zeros_like(attention_weights)
    if grad_output.numel() > 0:
        grid, shapes, starts, scalars, meta = _launch_args(value, spatial_shapes, sampling_locations)
        _backward_kernel[grid](grad_output, value, shapes, starts, sampling_locations, attention_weights, grad_value,
                               grad_locations, grad_weights, *scalars, **meta)
    return grad_value.to(value.dtype), grad_locations, grad_weights
