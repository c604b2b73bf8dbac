"""MSDA CPU kernels compiled by numba, built from the DCNv3 kernels' blocks (ops/dcnv3_cpu.py).

Design (docs/architecture.md has the measurements behind the shared blocks):

* Per (query, head) the L*P sampling points are resolved once into a small per-thread table: four corner offsets
  (to the head's first channel) and weights with the attention weight folded in. Every block of 16 channels then
  reuses the table: at MSDA's usual D=32 the scalar corner arithmetic, which costs more than a block's vector
  work, would otherwise run twice. Points with no corner inside their map are left out of the table.
* Channels run in blocks of 16 lanes accumulated in stack buffers, indices are unsigned and LLVM's SLP vectoriser
  is on, as for DCNv3.
* Forward runs in parallel over blocks of (image, query) rows, each writing its own output rows.
* Backward recomputes the tables from the inputs and runs in parallel over (image, head): each item owns
  grad_value[n, :, m] and the (n, :, m) slices of the location and weight gradients, so there are no atomics and
  the result does not depend on the thread count. N*M items (8 for one DINO image) bound its threads.

numba's disk cache does not notice edits to the helpers imported from dcnv3_cpu: clear ``__pycache__`` after one.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import prange

from .dcnv3_cpu import (_JIT, _LANES, _ULANES, _ZERO, _as_numpy, _compute_dtype, _copy, _dot4_scatter4, _mix4,
                        _numba_threads, _stack_array)

_ROWS = 16  # (image, query) rows per forward work item: enough items to balance, few table allocations


@numba.njit(inline="always")
def _corners(x_norm, y_norm, height, width, key0, row_stride, column):
    """Bilinear corners of a normalised location on one level (pixel = location * size - 0.5).

    Returns (inside, four corner element offsets at channel ``column`` of keys ``key0 + y*width + x``, four
    bilinear weights (0 for corners outside the map), four corner validity flags, x and y fractions). ``inside``
    is False when no corner lies in the map. Corners outside get a row clamped into the map, so channel loops
    load unconditionally; offsets are unsigned (numba's negative-index fix-up blocks vectorisation).
    """
    x = x_norm * width - 0.5
    y = y_norm * height - 0.5
    inside = x > -1.0 and y > -1.0 and x < width and y < height
    x0f = math.floor(x) if inside else 0.0
    y0f = math.floor(y) if inside else 0.0
    lx = x - x0f
    ly = y - y0f
    x0 = int(x0f)
    y0 = int(y0f)
    vx0 = 1.0 if x0 >= 0 else 0.0
    vx1 = 1.0 if x0 + 1 < width else 0.0
    vy0 = 1.0 if y0 >= 0 else 0.0
    vy1 = 1.0 if y0 + 1 < height else 0.0
    top = key0 + max(y0, 0) * width
    bottom = key0 + min(y0 + 1, height - 1) * width
    left = max(x0, 0)
    right = min(x0 + 1, width - 1)
    return (inside,
            np.uint64((top + left) * row_stride + column), np.uint64((top + right) * row_stride + column),
            np.uint64((bottom + left) * row_stride + column), np.uint64((bottom + right) * row_stride + column),
            (1.0 - ly) * (1.0 - lx) * vy0 * vx0, (1.0 - ly) * lx * vy0 * vx1,
            ly * (1.0 - lx) * vy1 * vx0, ly * lx * vy1 * vx1,
            vy0 * vx0, vy0 * vx1, vy1 * vx0, vy1 * vx1, lx, ly)


@numba.njit(inline="always")
def _gather(acc, val, corner, weight, used, start, count):
    """acc[c] = sum over the table's ``used`` points of their weighted corners at channel start + c, c < count."""
    for c in range(_ULANES):
        acc[c] = 0.0
    for k in range(used):
        j = 4 * k
        _mix4(acc, val, corner[j] + start, corner[j + 1] + start, corner[j + 2] + start, corner[j + 3] + start,
              weight[j], weight[j + 1], weight[j + 2], weight[j + 3], count)


@numba.njit(**_JIT)
def _forward_kernel(value, shapes, starts, loc, attn, out, rows_per_item):
    n_batch, n_keys, heads, dim = value.shape
    n_query, levels, points = loc.shape[1], loc.shape[3], loc.shape[4]
    typed = value.dtype.type  # keep the channel loops in the value's dtype
    val = value.reshape(-1)
    loc_flat = loc.reshape(-1)
    attn_flat = attn.reshape(-1)
    out_flat = out.reshape(-1)
    row_stride = heads * dim
    udim = np.uint64(dim)
    rows = n_batch * n_query
    for item in prange((rows + rows_per_item - 1) // rows_per_item):
        corner = np.empty(4 * levels * points, dtype=np.uint64)
        weight = np.empty(4 * levels * points, dtype=value.dtype)
        acc = _stack_array(_LANES, value.dtype)
        for row in range(item * rows_per_item, min((item + 1) * rows_per_item, rows)):
            n = row // n_query
            for m in range(heads):
                used = 0
                first = (row * heads + m) * levels * points  # index of (n, q, m, level 0, point 0)
                for lvl in range(levels):
                    key0 = n * n_keys + starts[lvl]
                    for p in range(points):
                        i = first + lvl * points + p
                        inside, r00, r01, r10, r11, b00, b01, b10, b11, _, _, _, _, _, _ = _corners(
                            loc_flat[2 * i], loc_flat[2 * i + 1], shapes[lvl, 0], shapes[lvl, 1], key0, row_stride,
                            m * dim)
                        if inside:
                            a = attn_flat[i]
                            j = 4 * used
                            corner[j], corner[j + 1], corner[j + 2], corner[j + 3] = r00, r01, r10, r11
                            weight[j], weight[j + 1] = typed(b00 * a), typed(b01 * a)
                            weight[j + 2], weight[j + 3] = typed(b10 * a), typed(b11 * a)
                            used += 1
                o = np.uint64((row * heads + m) * dim)
                start = _ZERO
                while start < udim:
                    count = min(_ULANES, udim - start)
                    if count == _ULANES:  # constant trip count: one vector per corner row
                        _gather(acc, val, corner, weight, used, start, _ULANES)
                    else:
                        _gather(acc, val, corner, weight, used, start, count)
                    for c in range(count):
                        out_flat[o + start + c] = acc[c]
                    start += _ULANES


@numba.njit(**_JIT)
def _backward_kernel(gout, value, shapes, starts, loc, attn, gvalue, gloc, gattn):
    n_batch, n_keys, heads, dim = value.shape
    n_query, levels, points = loc.shape[1], loc.shape[3], loc.shape[4]
    table = levels * points
    typed = value.dtype.type
    val = value.reshape(-1)
    gval = gvalue.reshape(-1)
    gout_flat = gout.reshape(-1)
    loc_flat = loc.reshape(-1)
    attn_flat = attn.reshape(-1)
    gloc_flat = gloc.reshape(-1)
    gattn_flat = gattn.reshape(-1)
    row_stride = heads * dim
    udim = np.uint64(dim)
    for item in prange(n_batch * heads):
        n = item // heads
        m = item - n * heads
        corner = np.empty(4 * table, dtype=np.uint64)
        scatter = np.empty(4 * table, dtype=value.dtype)  # attention * bilinear weight of each corner
        bilinear = np.empty(4 * table)
        valid = np.empty(4 * table)
        dots = np.empty(4 * table, dtype=value.dtype)  # <grad_output, corner row>, summed over channel blocks
        index = np.empty(table, dtype=np.int64)  # the point's index in attention_weights
        frac = np.empty(2 * table)  # x, y fractions
        scale = np.empty(2 * table)  # attention * (W, H): d(pixel)/d(location)
        grad = _stack_array(_LANES, value.dtype)
        for q in range(n_query):
            row = n * n_query + q
            used = 0
            first = (row * heads + m) * table
            for lvl in range(levels):
                height, width = shapes[lvl, 0], shapes[lvl, 1]
                key0 = n * n_keys + starts[lvl]
                for p in range(points):
                    i = first + lvl * points + p
                    inside, r00, r01, r10, r11, b00, b01, b10, b11, v00, v01, v10, v11, lx, ly = _corners(
                        loc_flat[2 * i], loc_flat[2 * i + 1], height, width, key0, row_stride, m * dim)
                    if inside:
                        a = attn_flat[i]
                        j = 4 * used
                        corner[j], corner[j + 1], corner[j + 2], corner[j + 3] = r00, r01, r10, r11
                        scatter[j], scatter[j + 1] = typed(b00 * a), typed(b01 * a)
                        scatter[j + 2], scatter[j + 3] = typed(b10 * a), typed(b11 * a)
                        bilinear[j], bilinear[j + 1], bilinear[j + 2], bilinear[j + 3] = b00, b01, b10, b11
                        valid[j], valid[j + 1], valid[j + 2], valid[j + 3] = v00, v01, v10, v11
                        index[used] = i
                        frac[2 * used], frac[2 * used + 1] = lx, ly
                        scale[2 * used], scale[2 * used + 1] = a * width, a * height
                        used += 1
            for j in range(4 * used):
                dots[j] = 0.0
            o = np.uint64((row * heads + m) * dim)
            start = _ZERO
            while start < udim:
                count = min(_ULANES, udim - start)
                # One stack copy of this block of grad_output serves every point (and cannot alias grad_value).
                if count == _ULANES:
                    _copy(grad, gout_flat, o + start, _ULANES)
                else:
                    _copy(grad, gout_flat, o + start, count)
                for k in range(used):
                    j = 4 * k
                    r00, r01, r10, r11 = (corner[j] + start, corner[j + 1] + start, corner[j + 2] + start,
                                          corner[j + 3] + start)
                    if count == _ULANES:
                        s00, s01, s10, s11 = _dot4_scatter4(grad, val, gval, r00, r01, r10, r11, scatter[j],
                                                            scatter[j + 1], scatter[j + 2], scatter[j + 3], _ULANES)
                    else:
                        s00, s01, s10, s11 = _dot4_scatter4(grad, val, gval, r00, r01, r10, r11, scatter[j],
                                                            scatter[j + 1], scatter[j + 2], scatter[j + 3], count)
                    dots[j] += s00
                    dots[j + 1] += s01
                    dots[j + 2] += s10
                    dots[j + 3] += s11
                start += _ULANES
            for k in range(used):
                j = 4 * k
                # Corners outside the map read clamped rows: their dot products must not count.
                d00, d01 = dots[j] * valid[j], dots[j + 1] * valid[j + 1]
                d10, d11 = dots[j + 2] * valid[j + 2], dots[j + 3] * valid[j + 3]
                lx, ly = frac[2 * k], frac[2 * k + 1]
                i = index[k]
                gattn_flat[i] = bilinear[j] * d00 + bilinear[j + 1] * d01 + bilinear[j + 2] * d10 \
                    + bilinear[j + 3] * d11
                gloc_flat[2 * i] = scale[2 * k] * ((1.0 - ly) * (d01 - d00) + ly * (d11 - d10))
                gloc_flat[2 * i + 1] = scale[2 * k + 1] * ((1.0 - lx) * (d10 - d00) + lx * (d11 - d01))


def _levels(spatial_shapes: torch.Tensor):
    """(L, 2) int64 array of (H, W) and the (L,) first key of each level."""
    shapes = np.ascontiguousarray(spatial_shapes.cpu().numpy(), dtype=np.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    return shapes, np.cumsum(areas) - areas


def msda_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                 attention_weights: torch.Tensor) -> torch.Tensor:
    """Forward on CPU tensors; half types are computed in float32."""
    dtype = _compute_dtype(value.dtype)
    n, _, heads, dim = value.shape
    out = torch.empty((n, sampling_locations.shape[1], heads * dim), dtype=dtype)  # the kernel writes every element
    # LLVM's loop vectoriser would vectorise the point loop across points (gathers: 3x slower at D=32, measured) instead
    # of leaving each point's channel block to the SLP vectoriser.
    with _numba_threads(LOOP_VECTORIZE=0):
        _forward_kernel(_as_numpy(value, dtype), *_levels(spatial_shapes), _as_numpy(sampling_locations, dtype),
                        _as_numpy(attention_weights, dtype), out.numpy(), _ROWS)
    return out.to(value.dtype)


def msda_backward(grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                  sampling_locations: torch.Tensor, attention_weights: torch.Tensor):
    """Gradients w.r.t. (value, sampling_locations, attention_weights) of sum(output * grad_output)."""
    dtype = _compute_dtype(value.dtype)
    inputs = (value, sampling_locations, attention_weights)
    grads = [torch.zeros(t.shape, dtype=dtype) for t in inputs]
    with _numba_threads():
        _backward_kernel(_as_numpy(grad_output, dtype), _as_numpy(value, dtype), *_levels(spatial_shapes),
                         _as_numpy(sampling_locations, dtype), _as_numpy(attention_weights, dtype),
                         *(g.numpy() for g in grads))
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs))
