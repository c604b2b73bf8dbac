"""DCNv3 CPU kernels compiled by numba (LLVM ships in the llvmlite wheel: no C compiler needed).

Design (docs/architecture.md has the measurements behind it):

* For every (output pixel, group, point) the four bilinear corner rows and weights are computed once (the mask
  folded in); corners outside the image get weight zero and a clamped index, so channel loops have no branches.
* Channels are processed in blocks of 16 lanes accumulated in a stack buffer. A fixed trip count lets LLVM's
  SLP vectoriser turn each block into whole vector registers, and the stack buffer cannot alias the input,
  so no runtime alias checks are needed. (LLVM's loop vectoriser, numba's default, leaves the usual D=16
  group width in a scalar tail loop.) Indices are unsigned: numba adds a negative-index fix-up to signed ones,
  which blocks vectorisation.
* Backward recomputes indices and weights from (input, offset, mask) and runs in parallel over (batch, group):
  each pair owns a disjoint slice of grad_input, so the scatter needs no atomics and is deterministic.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import numba
import numpy as np
import torch
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .dcnv3 import DCNv3Geometry

# Reassociation lets LLVM vectorise the channel reductions; no nnan/ninf: inputs may hold inf/nan.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_JIT = dict(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
# numba's fallback 'workqueue' threading layer aborts on concurrent calls; serialise only in that case.
_WORKQUEUE_LOCK = threading.Lock()
_LANES = 16
_ULANES = np.uint64(_LANES)
_ZERO = np.uint64(0)


@intrinsic
def _stack_array(typingctx, size, dtype):
    """A 1-D array of a literal ``size`` on the stack, allocated once in the function's entry block.

    Stack memory provably aliases no argument array, which is what lets LLVM vectorise loops that mix
    loads from the inputs with stores to these buffers.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None
    length = size.literal_value
    array_type = types.Array(dtype.dtype, 1, "C")

    def codegen(context, builder, signature, args):
        element = context.get_data_type(dtype.dtype)
        data = cgutils.alloca_once(builder, element, size=length)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(element))
        array = context.make_array(array_type)(context, builder)
        context.populate_array(array, data=data, shape=[context.get_constant(types.intp, length)],
                               strides=[itemsize], itemsize=itemsize, meminfo=None)
        return array._getvalue()

    return array_type(size, dtype), codegen


@numba.njit
def _point_bases(kh, kw, dh, dw, remove_center):
    """Each sampling point's position relative to the window centre, (x, y), before its learned offset.

    Points run column-major over the kernel window (the official order); a removed centre shifts later points.
    Computed once per call, so the per-sample geometry has no integer division and no branch on the centre.
    """
    points = kh * kw - remove_center
    centre = (kw // 2) * kh + kh // 2 if remove_center else -1
    half_h = (dh * (kh - 1)) // 2
    half_w = (dw * (kw - 1)) // 2
    bases = np.empty((points, 2))
    for p in range(points):
        k = p + 1 if 0 <= centre <= p else p
        i = k // kh
        bases[p, 0] = i * dw - half_w
        bases[p, 1] = (k - i * kh) * dh - half_h
    return bases


@numba.njit(inline="always")
def _sample_point(bx, by, q, cx, cy, off, offset_scale, n, height, width, channels, column):
    """Bilinear sampling of the point at (bx, by) from the window centre (cx, cy), offset index q.

    Returns (inside, four corner row offsets from channel ``column``, four unmasked bilinear weights, four corner
    validity flags, x and y fractions). ``inside`` is False when the point lies fully outside the image (the
    official kernel skips it). Corners outside the image get weight and validity 0 and a row clamped into the
    image, so channel loops load unconditionally. Row offsets are unsigned: numba adds a negative-index fix-up to
    signed indices, which blocks vectorisation.
    """
    x = cx + (bx + off[2 * q]) * offset_scale
    y = cy + (by + off[2 * q + 1]) * offset_scale
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
    top = (n * height + max(y0, 0)) * width
    bottom = (n * height + min(y0 + 1, height - 1)) * width
    left = max(x0, 0)
    right = min(x0 + 1, width - 1)
    return (inside,
            np.uint64((top + left) * channels + column), np.uint64((top + right) * channels + column),
            np.uint64((bottom + left) * channels + column), np.uint64((bottom + right) * channels + column),
            (1.0 - ly) * (1.0 - lx) * vy0 * vx0, (1.0 - ly) * lx * vy0 * vx1,
            ly * (1.0 - lx) * vy1 * vx0, ly * lx * vy1 * vx1,
            vy0 * vx0, vy0 * vx1, vy1 * vx0, vy1 * vx1, lx, ly)


@numba.njit(inline="always")
def _mix4(acc, inp, r00, r01, r10, r11, w00, w01, w10, w11, count):
    """acc[c] += bilinear mix of the four corner rows, c < count."""
    for c in range(count):
        acc[c] += w00 * inp[r00 + c] + w01 * inp[r01 + c] + w10 * inp[r10 + c] + w11 * inp[r11 + c]


@numba.njit(inline="always")
def _dot(grad, inp, row, count):
    """sum(grad[c] * inp[row + c]) for c < count."""
    total = inp.dtype.type(0.0)
    for c in range(count):
        total += grad[c] * inp[row + c]
    return total


@numba.njit(inline="always")
def _copy(dst, src, start, count):
    for c in range(count):
        dst[c] = src[start + c]


@numba.njit(inline="always")
def _scatter4(grad, grad_in, r00, r01, r10, r11, a00, a01, a10, a11, count):
    """grad_in[row] += weight * grad for the four corner rows; c < count."""
    for c in range(count):  # rows may coincide after clamping: update them one after the other
        grad_in[r00 + c] += a00 * grad[c]
    for c in range(count):
        grad_in[r01 + c] += a01 * grad[c]
    for c in range(count):
        grad_in[r10 + c] += a10 * grad[c]
    for c in range(count):
        grad_in[r11 + c] += a11 * grad[c]


@numba.njit(inline="always")
def _dot4_scatter4(grad, inp, grad_in, r00, r01, r10, r11, a00, a01, a10, a11, count):
    """Dot products of ``grad`` with the four corner rows, then grad_in[row] += weight * grad; c < count."""
    dots = (_dot(grad, inp, r00, count), _dot(grad, inp, r01, count), _dot(grad, inp, r10, count),
            _dot(grad, inp, r11, count))
    _scatter4(grad, grad_in, r00, r01, r10, r11, a00, a01, a10, a11, count)
    return dots


@numba.njit(**_JIT)
def _forward_kernel(inp, off, msk, out, kh, kw, sh, sw, ph, pw, dh, dw, group, offset_scale, remove_center):
    n_batch, height, width, channels = inp.shape
    out_h, out_w = out.shape[1], out.shape[2]
    d_group = channels // group
    bases = _point_bases(kh, kw, dh, dw, remove_center)
    points = bases.shape[0]
    half_h = (dh * (kh - 1)) // 2
    half_w = (dw * (kw - 1)) // 2
    typed = inp.dtype.type  # keep the channel loops in the input dtype
    in_flat = inp.reshape(-1)
    out_flat = out.reshape(-1)
    off_flat = off.reshape(-1)
    msk_flat = msk.reshape(-1)
    dim = np.uint64(d_group)
    for row in prange(n_batch * out_h):
        n = row // out_h
        ho = row - n * out_h
        acc = _stack_array(_LANES, inp.dtype)
        cy = ho * sh - ph + half_h
        for wo in range(out_w):
            cx = wo * sw - pw + half_w
            for g in range(group):
                pixel = (n * out_h + ho) * out_w + wo
                o = np.uint64(pixel * channels + g * d_group)
                q0 = np.uint64(pixel * group * points + g * points)  # first mask index of this group
                start = _ZERO
                while start < dim:
                    count = min(_ULANES, dim - start)
                    for c in range(_ULANES):
                        acc[c] = 0.0
                    for p in range(points):
                        q = q0 + np.uint64(p)
                        inside, r00, r01, r10, r11, b00, b01, b10, b11, _, _, _, _, _, _ = _sample_point(
                            bases[p, 0], bases[p, 1], q, cx, cy, off_flat, offset_scale, n, height, width, channels,
                            g * d_group + int(start))
                        if not inside:
                            continue
                        m = msk_flat[q]
                        w00, w01, w10, w11 = typed(b00 * m), typed(b01 * m), typed(b10 * m), typed(b11 * m)
                        if count == _ULANES:  # constant trip count: one vector per corner row
                            _mix4(acc, in_flat, r00, r01, r10, r11, w00, w01, w10, w11, _ULANES)
                        else:
                            _mix4(acc, in_flat, r00, r01, r10, r11, w00, w01, w10, w11, count)
                    for c in range(count):
                        out_flat[o + start + c] = acc[c]
                    start += _ULANES


@numba.njit(**_JIT)
def _backward_kernel(gout, inp, off, msk, gin, goff, gmsk,
                     kh, kw, sh, sw, ph, pw, dh, dw, group, offset_scale, remove_center, group_chunks):
    n_batch, height, width, channels = inp.shape
    out_h, out_w = gout.shape[1], gout.shape[2]
    d_group = channels // group
    bases = _point_bases(kh, kw, dh, dw, remove_center)
    points = bases.shape[0]
    half_h = (dh * (kh - 1)) // 2
    half_w = (dw * (kw - 1)) // 2
    typed = inp.dtype.type
    in_flat = inp.reshape(-1)
    gin_flat = gin.reshape(-1)
    gout_flat = gout.reshape(-1)
    off_flat = off.reshape(-1)
    msk_flat = msk.reshape(-1)
    goff_flat = goff.reshape(-1)
    gmsk_flat = gmsk.reshape(-1)
    dim = np.uint64(d_group)
    chunk = (group + group_chunks - 1) // group_chunks
    for item in prange(n_batch * group_chunks):
        n = item // group_chunks
        g_first = (item - n * group_chunks) * chunk
        grad = _stack_array(_LANES, inp.dtype)
        for ho in range(out_h):
            cy = ho * sh - ph + half_h
            for wo in range(out_w):
                cx = wo * sw - pw + half_w
                for g in range(g_first, min(g_first + chunk, group)):
                    pixel = (n * out_h + ho) * out_w + wo
                    o = np.uint64(pixel * channels + g * d_group)
                    q0 = np.uint64(pixel * group * points + g * points)  # first mask index of this group
                    start = _ZERO
                    while start < dim:
                        count = min(_ULANES, dim - start)
                        # One stack copy of this block of grad_output serves all P points (and cannot alias
                        # grad_input). Gradients are linear in the per-block dot products: accumulate them.
                        if count == _ULANES:
                            _copy(grad, gout_flat, o + start, _ULANES)
                        else:
                            _copy(grad, gout_flat, o + start, count)
                        for p in range(points):
                            q = q0 + np.uint64(p)
                            inside, r00, r01, r10, r11, b00, b01, b10, b11, v00, v01, v10, v11, lx, ly = \
                                _sample_point(bases[p, 0], bases[p, 1], q, cx, cy, off_flat, offset_scale, n, height,
                                              width, channels, g * d_group + int(start))
                            if not inside:
                                continue
                            m = msk_flat[q]
                            a00, a01, a10, a11 = typed(b00 * m), typed(b01 * m), typed(b10 * m), typed(b11 * m)
                            # The dot products take the runtime block width, outside the full-block branch:
                            # with a constant 16 LLVM unrolls them and SLP packs the four reductions into
                            # shuffle-bound 4-wide vectors; as loops the loop vectoriser reduces each in
                            # whole registers (backward 10-20% faster).
                            s00, s01, s10, s11 = (_dot(grad, in_flat, r00, count), _dot(grad, in_flat, r01, count),
                                                  _dot(grad, in_flat, r10, count), _dot(grad, in_flat, r11, count))
                            if count == _ULANES:
                                _scatter4(grad, gin_flat, r00, r01, r10, r11, a00, a01, a10, a11, _ULANES)
                            else:
                                _scatter4(grad, gin_flat, r00, r01, r10, r11, a00, a01, a10, a11, count)
                            # Corners outside the image hold zeros: their dot products must not count.
                            s00, s01, s10, s11 = s00 * v00, s01 * v01, s10 * v10, s11 * v11
                            gmsk_flat[q] += b00 * s00 + b01 * s01 + b10 * s10 + b11 * s11
                            scale = m * offset_scale
                            goff_flat[2 * q] += scale * ((1.0 - ly) * (s01 - s00) + ly * (s11 - s10))
                            goff_flat[2 * q + 1] += scale * ((1.0 - lx) * (s10 - s00) + lx * (s11 - s01))
                        start += _ULANES


@contextmanager
def _compiler_settings(**settings):
    """numba.config values for the kernels compiled inside (numba reads them at each compile)."""
    previous = {name: getattr(numba.config, name) for name in settings}
    for name, setting in settings.items():
        setattr(numba.config, name, setting)
    try:
        yield
    finally:
        for name, setting in previous.items():
            setattr(numba.config, name, setting)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextmanager
def _numba_threads(**settings):
    """Run numba's parallel loops on as many threads as torch is allowed to use; kernels compiled inside get LLVM's
    SLP vectoriser (numba leaves it off by default; the fixed-width channel blocks above need it) and the
    numba.config ``settings``."""
    torch_threads = torch.get_num_threads()
    threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    if torch.get_num_threads() != torch_threads:  # launching numba's OpenMP pool resets OpenMP's, i.e. torch's, count
        torch.set_num_threads(torch_threads)
    with _compiler_settings(SLP_VECTORIZE=1, **settings):
        if _uses_workqueue():
            with _WORKQUEUE_LOCK:
                yield threads
        else:
            yield threads


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
    out = torch.empty((n, *offset.shape[1:3], c), dtype=dtype)  # the kernel writes every element
    with _numba_threads():
        _forward_kernel(_as_numpy(input, dtype), _as_numpy(offset, dtype), _as_numpy(mask, dtype), out.numpy(),
                        *_geometry_args(geo))
    return out.to(input.dtype)


def dcnv3_backward(grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                   geo: DCNv3Geometry):
    """Gradients w.r.t. (input, offset, mask) of sum(output * grad_output)."""
    dtype = _compute_dtype(input.dtype)
    grads = [torch.zeros(t.shape, dtype=dtype) for t in (input, offset, mask)]
    with _numba_threads() as threads:
        # Work items are (image, block of groups); split groups only as far as needed to feed every thread,
        # since a whole pixel's channels are contiguous in memory.
        group_chunks = min(geo.group, -(-2 * threads // max(1, input.shape[0])))
        _backward_kernel(_as_numpy(grad_output, dtype), _as_numpy(input, dtype), _as_numpy(offset, dtype),
                         _as_numpy(mask, dtype), *(gr.numpy() for gr in grads), *_geometry_args(geo),
                         group_chunks)
    return tuple(gr.to(t.dtype) for gr, t in zip(grads, (input, offset, mask)))
