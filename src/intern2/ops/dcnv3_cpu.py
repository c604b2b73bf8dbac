"""DCNv3 CPU kernels compiled by numba (LLVM shipped in the llvmlite wheel: no C compiler needed).

Design (see docs/architecture.md): for every (output pixel, group, point) the bilinear corner indices and
weights are computed once, with the mask folded in, then a channel loop over the group's D contiguous
channels does four loads and four FMAs per channel; LLVM vectorises that loop. Out-of-image corners get
weight zero and a clamped (valid) index, so the channel loop has no branches.

Backward recomputes the same indices and weights from (input, offset, mask). It runs in parallel over
(batch, group) pairs: each pair owns a disjoint slice of grad_input, so the scatter needs no atomics and the
result is deterministic.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import numba
import numpy as np
import torch
from numba import prange

from .dcnv3 import DCNv3Geometry

# Reassociation lets LLVM vectorise the channel reductions; no nnan/ninf: inputs may hold inf/nan.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_JIT = dict(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
# numba's fallback 'workqueue' threading layer aborts on concurrent calls; serialise only in that case.
_WORKQUEUE_LOCK = threading.Lock()


@numba.njit(inline="always")
def _sample_corners(cx, cy, i, j, dw, dh, half_w, half_h, off, n, ho, wo, q, offset_scale, height, width):
    """Bilinear corners of point (i, j) of window (cx, cy): clamped indices, fractions and validity flags.

    ``inside`` is False when the point lies fully outside the image (the official kernel skips it).
    Corners outside the image get validity 0 and an index clamped into the image, so callers can load
    unconditionally and multiply by the flag.
    """
    x = cx + (i * dw - half_w + off[n, ho, wo, 2 * q]) * offset_scale
    y = cy + (j * dh - half_h + off[n, ho, wo, 2 * q + 1]) * offset_scale
    inside = x > -1.0 and y > -1.0 and x < width and y < height
    x0f = math.floor(x) if inside else 0.0
    y0f = math.floor(y) if inside else 0.0
    x0 = int(x0f)
    y0 = int(y0f)
    vx0 = 1.0 if x0 >= 0 else 0.0
    vx1 = 1.0 if x0 + 1 < width else 0.0
    vy0 = 1.0 if y0 >= 0 else 0.0
    vy1 = 1.0 if y0 + 1 < height else 0.0
    return (inside, max(x0, 0), min(x0 + 1, width - 1), max(y0, 0), min(y0 + 1, height - 1),
            x - x0f, y - y0f, vx0, vx1, vy0, vy1)


@numba.njit(**_JIT)
def _forward_kernel(inp, off, msk, out, kh, kw, sh, sw, ph, pw, dh, dw, group, offset_scale, remove_center):
    n_batch, height, width, channels = inp.shape
    out_h, out_w = out.shape[1], out.shape[2]
    d_group = channels // group
    points = kh * kw - remove_center
    centre = (kw // 2) * kh + kh // 2 if remove_center else -1
    half_h = (dh * (kh - 1)) // 2
    half_w = (dw * (kw - 1)) // 2
    typed = inp.dtype.type  # keep the channel loop in the input dtype
    for row in prange(n_batch * out_h):
        n = row // out_h
        ho = row - n * out_h
        cy = ho * sh - ph + half_h
        for wo in range(out_w):
            cx = wo * sw - pw + half_w
            for g in range(group):
                base = g * d_group
                p = 0
                for k in range(kh * kw):
                    if k == centre:
                        continue
                    q = g * points + p
                    p += 1
                    i = k // kh
                    inside, x0, x1, y0, y1, lx, ly, vx0, vx1, vy0, vy1 = _sample_corners(
                        cx, cy, i, k - i * kh, dw, dh, half_w, half_h, off, n, ho, wo, q, offset_scale,
                        height, width)
                    if not inside:
                        continue
                    m = msk[n, ho, wo, q]
                    w00 = typed((1.0 - ly) * (1.0 - lx) * vy0 * vx0 * m)
                    w01 = typed((1.0 - ly) * lx * vy0 * vx1 * m)
                    w10 = typed(ly * (1.0 - lx) * vy1 * vx0 * m)
                    w11 = typed(ly * lx * vy1 * vx1 * m)
                    for c in range(base, base + d_group):
                        out[n, ho, wo, c] += (w00 * inp[n, y0, x0, c] + w01 * inp[n, y0, x1, c]
                                              + w10 * inp[n, y1, x0, c] + w11 * inp[n, y1, x1, c])


@numba.njit(**_JIT)
def _backward_kernel(gout, inp, off, msk, gin, goff, gmsk,
                     kh, kw, sh, sw, ph, pw, dh, dw, group, offset_scale, remove_center):
    n_batch, height, width, channels = inp.shape
    out_h, out_w = gout.shape[1], gout.shape[2]
    d_group = channels // group
    points = kh * kw - remove_center
    centre = (kw // 2) * kh + kh // 2 if remove_center else -1
    half_h = (dh * (kh - 1)) // 2
    half_w = (dw * (kw - 1)) // 2
    typed = inp.dtype.type
    for ng in prange(n_batch * group):
        n = ng // group
        g = ng - n * group
        base = g * d_group
        for ho in range(out_h):
            cy = ho * sh - ph + half_h
            for wo in range(out_w):
                cx = wo * sw - pw + half_w
                p = 0
                for k in range(kh * kw):
                    if k == centre:
                        continue
                    q = g * points + p
                    p += 1
                    i = k // kh
                    inside, x0, x1, y0, y1, lx, ly, vx0, vx1, vy0, vy1 = _sample_corners(
                        cx, cy, i, k - i * kh, dw, dh, half_w, half_h, off, n, ho, wo, q, offset_scale,
                        height, width)
                    if not inside:
                        continue
                    m = msk[n, ho, wo, q]
                    a00 = typed((1.0 - ly) * (1.0 - lx) * vy0 * vx0 * m)
                    a01 = typed((1.0 - ly) * lx * vy0 * vx1 * m)
                    a10 = typed(ly * (1.0 - lx) * vy1 * vx0 * m)
                    a11 = typed(ly * lx * vy1 * vx1 * m)
                    # Dot products of grad_output with the four corner rows (clamped rows are zeroed below).
                    s00 = s01 = s10 = s11 = typed(0.0)
                    for c in range(base, base + d_group):
                        go = gout[n, ho, wo, c]
                        s00 += go * inp[n, y0, x0, c]
                        s01 += go * inp[n, y0, x1, c]
                        s10 += go * inp[n, y1, x0, c]
                        s11 += go * inp[n, y1, x1, c]
                        gin[n, y0, x0, c] += a00 * go
                        gin[n, y0, x1, c] += a01 * go
                        gin[n, y1, x0, c] += a10 * go
                        gin[n, y1, x1, c] += a11 * go
                    v00 = s00 * vy0 * vx0
                    v01 = s01 * vy0 * vx1
                    v10 = s10 * vy1 * vx0
                    v11 = s11 * vy1 * vx1
                    gmsk[n, ho, wo, q] = ((1.0 - ly) * ((1.0 - lx) * v00 + lx * v01)
                                          + ly * ((1.0 - lx) * v10 + lx * v11))
                    scale = m * offset_scale
                    goff[n, ho, wo, 2 * q] = scale * ((1.0 - ly) * (v01 - v00) + ly * (v11 - v10))
                    goff[n, ho, wo, 2 * q + 1] = scale * ((1.0 - lx) * (v10 - v00) + lx * (v11 - v01))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextmanager
def _numba_threads():
    """Run numba's parallel loops on as many threads as torch is allowed to use."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    if _uses_workqueue():
        with _WORKQUEUE_LOCK:
            yield
    else:
        yield


def _uses_workqueue() -> bool:
    try:
        return numba.threading_layer() == "workqueue"
    except ValueError:  # no parallel region has run yet: the layer is chosen on first use
        return True


def _as_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _geometry_args(geo: DCNv3Geometry) -> tuple:
    return (geo.kernel_h, geo.kernel_w, geo.stride_h, geo.stride_w, geo.pad_h, geo.pad_w,
            geo.dilation_h, geo.dilation_w, geo.group, geo.offset_scale, int(geo.remove_center))


def dcnv3_forward(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geo: DCNv3Geometry) -> torch.Tensor:
    """Forward on CPU tensors; half types are computed in float32."""
    dtype = _compute_dtype(input.dtype)
    n, h, w, c = input.shape
    out = torch.zeros((n, *offset.shape[1:3], c), dtype=dtype)
    with _numba_threads():
        _forward_kernel(_as_numpy(input, dtype), _as_numpy(offset, dtype), _as_numpy(mask, dtype), out.numpy(),
                        *_geometry_args(geo))
    return out.to(input.dtype)


def dcnv3_backward(grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                   geo: DCNv3Geometry):
    """Gradients w.r.t. (input, offset, mask) of sum(output * grad_output)."""
    dtype = _compute_dtype(input.dtype)
    grads = [torch.zeros(t.shape, dtype=dtype) for t in (input, offset, mask)]
    with _numba_threads():
        _backward_kernel(_as_numpy(grad_output, dtype), _as_numpy(input, dtype), _as_numpy(offset, dtype),
                         _as_numpy(mask, dtype), *(gr.numpy() for gr in grads), *_geometry_args(geo))
    return tuple(gr.to(t.dtype) for gr, t in zip(grads, (input, offset, mask)))
