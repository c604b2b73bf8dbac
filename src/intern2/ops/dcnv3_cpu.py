"""DCNv3 CPU kernels compiled by numba (LLVM ships in the llvmlite wheel: no C compiler needed).

Design (docs/architecture.md has the measurements behind it):

* Per output pixel, the bilinear geometry of all its (group, point) samples is computed in one branch-free loop
  over a stack table (four corner rows and weights, the mask folded in), in the input's precision (float32: the
  official kernel's opmath). LLVM vectorises that loop; scalar, it was most of the forward's time. Corners
  outside the image get weight zero and a clamped index, so channel loops have no branches.
* Channels are processed in blocks of 16 lanes accumulated in a stack buffer. A fixed trip count lets LLVM's
  SLP vectoriser turn each block into whole vector registers, and the stack buffer cannot alias the input,
  so no runtime alias checks are needed. (LLVM's loop vectoriser, numba's default, leaves the usual D=16
  group width in a scalar tail loop.) Indices are unsigned: numba adds a negative-index fix-up to signed ones,
  which blocks vectorisation.
* With ``softmax_mask`` the mask holds logits: each table's softmax over its groups' points is computed as the
  mask is read (per-group max and sum in short scalar loops, the exponentials in one vectorised loop over the
  table with a polynomial exp: LLVM cannot vectorise libm's), so the normalised weights never go through memory.
  The backward takes the normalised weights (dcnv3.py applies the softmax's own backward).
* bfloat16 tensors are read and written as they are (raw bits widened to float32 on load, rounded to nearest even
  on store); float16 goes through float32 copies.
* Backward recomputes the table from (input, offset, mask), accumulates the four corner dot products of every
  sample over the channel blocks, and turns them into offset and mask gradients in a second vectorised loop over
  the table. It runs in parallel over (batch, group): each pair owns a disjoint slice of grad_input, so the
  scatter needs no atomics and is deterministic.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numba
import numpy as np
import torch
from numba import prange, types
from numba.core import cgutils
from llvmlite import ir
from numba.extending import intrinsic, overload

from .dcnv3 import DCNv3Geometry

# Reassociation lets LLVM vectorise the channel reductions; no nnan/ninf: inputs may hold inf/nan.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_JIT = dict(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
# The forward has no reductions over channels; without reassociation LLVM cannot turn its loop over points into
# per-channel vector reductions over gathers (8x slower than the fixed-width channel blocks).
_FORWARD_JIT = dict(_JIT, fastmath=_FASTMATH - {"reassoc"})
# numba's fallback 'workqueue' threading layer aborts on concurrent calls; serialise only in that case.
_WORKQUEUE_LOCK = threading.Lock()
_LANES = 16
_ULANES = np.uint64(_LANES)
_ZERO = np.uint64(0)
_ONE = np.uint64(1)
_TABLE = 256  # (group, point) entries per geometry table: stack buffers of this literal size
MAX_POINTS = _TABLE  # one group's points must fit a table


@intrinsic
def _stack_array(typingctx, size, dtype):
    """A 1-D array of a literal ``size`` on the stack, allocated once in the function's entry block.

    Stack memory provably aliases no argument array, which is what lets LLVM vectorise loops that mix
    loads from the inputs with stores to these buffers.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None
    length = size.literal_value
    element_type = dtype.dtype if isinstance(dtype, types.DType) else dtype.instance_type
    array_type = types.Array(element_type, 1, "C")

    def codegen(context, builder, signature, args):
        element = context.get_data_type(element_type)
        data = cgutils.alloca_once(builder, element, size=length)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(element))
        array = context.make_array(array_type)(context, builder)
        context.populate_array(array, data=data, shape=[context.get_constant(types.intp, length)],
                               strides=[itemsize], itemsize=itemsize, meminfo=None)
        return array._getvalue()

    return array_type(size, dtype), codegen


def _widen(x):
    """A loaded element in the compute precision: bfloat16 bits (stored as uint16) become float32, floats stay."""


@overload(_widen, inline="always")
def _widen_overload(x):
    if isinstance(x, types.Float):
        return lambda x: x
    if x == types.uint16:
        return lambda x: _bfloat16_to_float32(x)
    return None


def _store(array, index, value):
    """array[index] = value, rounding to bfloat16 (round to nearest even, NaN kept quiet) for uint16 arrays."""


@overload(_store, inline="always")
def _store_overload(array, index, value):
    if isinstance(array.dtype, types.Float):
        def store(array, index, value):
            array[index] = value
        return store
    if array.dtype == types.uint16:
        def store_bfloat16(array, index, value):
            bits = _float32_to_bits(np.float32(value))
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            array[index] = np.uint16(rounded) if value == value else np.uint16(0x7FC0)
        return store_bfloat16
    return None


@intrinsic
def _bfloat16_to_float32(typingctx, bits):
    """The float32 of bfloat16 ``bits`` (uint16): the same value, its bits in the upper half."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        upper = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(upper, ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _float32_to_bits(typingctx, value):
    """The IEEE bits (uint32) of a float32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(value), codegen


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())
    return types.float32(bits), codegen


def _exp_nonpositive(x):
    """exp(x) for x <= 0 (a softmax's shifted logits): 0 below float32's normal range, NaN kept."""


@overload(_exp_nonpositive, inline="always")
def _exp_nonpositive_overload(x):
    if x == types.float64:
        return lambda x: np.exp(x)
    if x != types.float32:
        return None

    def exp_float32(x):
        # Cephes' expf: x = n*ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact n*ln2), a degree-7
        # polynomial for e^r, 2^n assembled in the exponent bits. ~1 ulp; branch-free, so LLVM vectorises it.
        clamped = max(x, np.float32(-87.0))
        n = np.floor(clamped * np.float32(1.44269504088896341) + np.float32(0.5))
        r = clamped - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
        r2 = r * r
        poly = np.float32(1.9875691500e-4)
        poly = poly * r + np.float32(1.3981999507e-3)
        poly = poly * r + np.float32(8.3334519073e-3)
        poly = poly * r + np.float32(4.1665795894e-2)
        poly = poly * r + np.float32(1.6666665459e-1)
        poly = poly * r + np.float32(5.0000001201e-1)
        poly = poly * r2 + r + np.float32(1.0)
        scale = _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
        value = poly * scale
        return value if x >= np.float32(-87.0) else (np.float32(0.0) if x == x else x)
    return exp_float32


@numba.njit(inline="always")
def _softmax_points(logits, weights, shift, entries, points):
    """weights[j] = softmax over each group's ``points`` consecutive entries of ``logits[j]``, j < entries."""
    for first in range(0, entries, points):
        top = logits[first]
        for j in range(first + 1, first + points):
            top = max(top, logits[j])
        for j in range(first, first + points):
            shift[j] = top
    for j in range(entries):  # the one vectorised loop: the exponentials
        weights[j] = _exp_nonpositive(logits[j] - shift[j])
    for first in range(0, entries, points):
        total = weights[first]
        for j in range(first + 1, first + points):
            total += weights[j]
        inverse = 1.0 / total
        for j in range(first, first + points):
            weights[j] *= inverse


@numba.njit
def _point_tables(kh, kw, dh, dw, remove_center, group, d_group, dtype):
    """Per entry j = g * P + p of a pixel's (group, point) table: the point's (x, y) in the kernel window before its
    learned offset, and its group's first channel.

    Points run column-major over the window (the official order); a removed centre shifts later points. Computed
    once per call, so the per-sample geometry has no integer division and no branch on the centre.
    """
    points = kh * kw - remove_center
    centre = (kw // 2) * kh + kh // 2 if remove_center else -1
    window_x = np.empty(group * points, dtype)
    window_y = np.empty(group * points, dtype)
    column = np.empty(group * points, np.uint64)
    for p in range(points):
        k = p + 1 if 0 <= centre <= p else p
        i = k // kh
        for g in range(group):
            window_x[g * points + p] = i * dw
            window_y[g * points + p] = (k - i * kh) * dh
            column[g * points + p] = g * d_group
    return window_x, window_y, column, points


@numba.njit(inline="always")
def _corners(x, y, height, width, height_f, width_f, row0, channels, column, zero, one):
    """Bilinear corners of the sample at pixel (x, y) of the image whose first row is ``row0``.

    Returns (inside, four corner element offsets at channel ``column``, four bilinear weights, four corner validity
    flags, x and y fractions). ``inside`` is False when the sample lies fully outside the image (the official
    kernel skips it). Corners outside the image get weight and validity 0 and a row clamped into the image, so
    channel loops load unconditionally. Branch-free, in the precision of ``x`` (``zero``/``one`` carry it), with
    unsigned offsets (numba's negative-index fix-up blocks vectorisation): called in loops over a pixel's whole
    (group, point) table, which LLVM vectorises.
    """
    inside = (x > -one) & (y > -one) & (x < width_f) & (y < height_f)
    x_in = x if inside else zero
    y_in = y if inside else zero
    x0f = np.floor(x_in)
    y0f = np.floor(y_in)
    lx = x_in - x0f
    ly = y_in - y0f
    x0 = np.int64(x0f)
    y0 = np.int64(y0f)
    vx0 = one if x0 >= 0 else zero
    vx1 = one if x0 + 1 < width else zero
    vy0 = one if y0 >= 0 else zero
    vy1 = one if y0 + 1 < height else zero
    row_stride = width * channels
    top = (row0 + max(y0, 0)) * row_stride + column
    bottom = (row0 + min(y0 + 1, height - 1)) * row_stride + column
    left = max(x0, 0) * channels
    right = min(x0 + 1, width - 1) * channels
    return (inside, np.uint64(top + left), np.uint64(top + right), np.uint64(bottom + left), np.uint64(bottom + right),
            (one - ly) * (one - lx) * vy0 * vx0, (one - ly) * lx * vy0 * vx1,
            ly * (one - lx) * vy1 * vx0, ly * lx * vy1 * vx1,
            vy0 * vx0, vy0 * vx1, vy1 * vx0, vy1 * vx1, lx, ly)


@numba.njit(inline="always")
def _mix4(acc, inp, r00, r01, r10, r11, w00, w01, w10, w11, count):
    """acc[c] += bilinear mix of the four corner rows, c < count."""
    for c in range(count):
        acc[c] += (w00 * _widen(inp[r00 + c]) + w01 * _widen(inp[r01 + c]) + w10 * _widen(inp[r10 + c])
                   + w11 * _widen(inp[r11 + c]))


@numba.njit(inline="always")
def _dot(grad, inp, row, count):
    """sum(grad[c] * inp[row + c]) for c < count."""
    total = grad.dtype.type(0.0)
    for c in range(count):
        total += grad[c] * _widen(inp[row + c])
    return total


@numba.njit(inline="always")
def _copy(dst, src, start, count):
    for c in range(count):
        dst[c] = _widen(src[start + c])


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


@numba.njit(inline="always")
def _window_origin(index, stride, pad, dilation, kernel, offset_scale, typed):
    """Pixel coordinate of kernel point (0, 0) for output index ``index``, as the official kernel rounds it."""
    half = (dilation * (kernel - 1)) // 2
    return typed(half - pad + index * stride) - typed(half) * offset_scale


@numba.njit(**_FORWARD_JIT)
def _forward_kernel(inp, off, msk, out, proto, kh, kw, sh, sw, ph, pw, dh, dw, group, offset_scale, remove_center,
                    softmax_mask):
    n_batch, height, width, channels = inp.shape
    out_h, out_w = out.shape[1], out.shape[2]
    d_group = channels // group
    # Geometry and channel loops in proto's dtype: the input's, float32 for bfloat16 (the official opmath).
    compute = proto.dtype
    typed = compute.type
    zero, one, scale = typed(0.0), typed(1.0), typed(offset_scale)
    height_f, width_f = typed(height), typed(width)
    window_x, window_y, column, points = _point_tables(kh, kw, dh, dw, remove_center, group, d_group, compute)
    groups_per_table = max(1, _TABLE // max(points, 1))  # 1x1 without its centre has no points
    in_flat = inp.reshape(-1)
    out_flat = out.reshape(-1)
    off_flat = off.reshape(-1)
    msk_flat = msk.reshape(-1)
    dim = np.uint64(d_group)
    for row in prange(n_batch * out_h):
        n = row // out_h
        ho = row - n * out_h
        acc = _stack_array(_LANES, compute)
        inside = _stack_array(_TABLE, np.uint8)
        r00, r01 = _stack_array(_TABLE, np.uint64), _stack_array(_TABLE, np.uint64)
        r10, r11 = _stack_array(_TABLE, np.uint64), _stack_array(_TABLE, np.uint64)
        w00, w01 = _stack_array(_TABLE, compute), _stack_array(_TABLE, compute)
        w10, w11 = _stack_array(_TABLE, compute), _stack_array(_TABLE, compute)
        logits, weights, shift = (_stack_array(_TABLE, compute), _stack_array(_TABLE, compute),
                                  _stack_array(_TABLE, compute))
        y_origin = _window_origin(ho, sh, ph, dh, kh, scale, typed)
        for wo in range(out_w):
            x_origin = _window_origin(wo, sw, pw, dw, kw, scale, typed)
            pixel = (n * out_h + ho) * out_w + wo
            for g_first in range(0, group, groups_per_table):
                g_end = min(g_first + groups_per_table, group)
                j_first = np.uint64(g_first * points)
                q_first = np.uint64(pixel * group * points) + j_first
                entries = np.uint64((g_end - g_first) * points)
                for j in range(entries):
                    logits[j] = _widen(msk_flat[q_first + j])
                if softmax_mask:
                    _softmax_points(logits, weights, shift, entries, np.uint64(points))
                else:
                    for j in range(entries):
                        weights[j] = logits[j]
                # The whole table at once: a loop LLVM vectorises (the scalar version dominated the run time).
                for j in range(entries):
                    q = q_first + j
                    x = x_origin + (window_x[j_first + j] + _widen(off_flat[q + q])) * scale
                    y = y_origin + (window_y[j_first + j] + _widen(off_flat[q + q + _ONE])) * scale
                    ins, r00[j], r01[j], r10[j], r11[j], b00, b01, b10, b11, _, _, _, _, _, _ = _corners(
                        x, y, height, width, height_f, width_f, n * height, channels, column[j_first + j], zero, one)
                    m = weights[j]
                    inside[j] = ins
                    w00[j], w01[j], w10[j], w11[j] = b00 * m, b01 * m, b10 * m, b11 * m
                for g in range(g_first, g_end):
                    o = np.uint64(pixel * channels + g * d_group)
                    j0 = np.uint64((g - g_first) * points)
                    start = _ZERO
                    while start < dim:
                        count = min(_ULANES, dim - start)
                        for c in range(_ULANES):
                            acc[c] = 0.0
                        for j in range(j0, j0 + np.uint64(points)):
                            if not inside[j]:
                                continue
                            if count == _ULANES:  # constant trip count: one vector per corner row
                                _mix4(acc, in_flat, r00[j] + start, r01[j] + start, r10[j] + start, r11[j] + start,
                                      w00[j], w01[j], w10[j], w11[j], _ULANES)
                            else:
                                _mix4(acc, in_flat, r00[j] + start, r01[j] + start, r10[j] + start, r11[j] + start,
                                      w00[j], w01[j], w10[j], w11[j], count)
                        for c in range(count):
                            _store(out_flat, o + start + c, acc[c])
                        start += _ULANES


@numba.njit(**_JIT)
def _backward_kernel(gout, inp, off, msk, gin, goff, gmsk,
                     kh, kw, sh, sw, ph, pw, dh, dw, group, offset_scale, remove_center, group_chunks):
    n_batch, height, width, channels = inp.shape
    out_h, out_w = gout.shape[1], gout.shape[2]
    d_group = channels // group
    compute = gin.dtype  # grad_input accumulates in the compute precision
    typed = compute.type
    zero, one, scale = typed(0.0), typed(1.0), typed(offset_scale)
    height_f, width_f = typed(height), typed(width)
    window_x, window_y, column, points = _point_tables(kh, kw, dh, dw, remove_center, group, d_group, compute)
    groups_per_table = max(1, _TABLE // max(points, 1))  # 1x1 without its centre has no points
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
        g_item = (item - n * group_chunks) * chunk
        g_item_end = min(g_item + chunk, group)
        grad = _stack_array(_LANES, compute)
        inside = _stack_array(_TABLE, np.uint8)
        r00, r01 = _stack_array(_TABLE, np.uint64), _stack_array(_TABLE, np.uint64)
        r10, r11 = _stack_array(_TABLE, np.uint64), _stack_array(_TABLE, np.uint64)
        b00, b01 = _stack_array(_TABLE, compute), _stack_array(_TABLE, compute)
        b10, b11 = _stack_array(_TABLE, compute), _stack_array(_TABLE, compute)
        v00, v01 = _stack_array(_TABLE, compute), _stack_array(_TABLE, compute)
        v10, v11 = _stack_array(_TABLE, compute), _stack_array(_TABLE, compute)
        s00, s01 = _stack_array(_TABLE, compute), _stack_array(_TABLE, compute)
        s10, s11 = _stack_array(_TABLE, compute), _stack_array(_TABLE, compute)
        lx, ly, m = _stack_array(_TABLE, compute), _stack_array(_TABLE, compute), _stack_array(_TABLE, compute)
        for ho in range(out_h):
            y_origin = _window_origin(ho, sh, ph, dh, kh, scale, typed)
            for wo in range(out_w):
                x_origin = _window_origin(wo, sw, pw, dw, kw, scale, typed)
                pixel = (n * out_h + ho) * out_w + wo
                for g_first in range(g_item, g_item_end, groups_per_table):
                    g_end = min(g_first + groups_per_table, g_item_end)
                    entries = np.uint64((g_end - g_first) * points)
                    j_first = np.uint64(g_first * points)
                    q_first = np.uint64(pixel * group * points) + j_first
                    for j in range(entries):
                        q = q_first + j
                        x = x_origin + (window_x[j_first + j] + _widen(off_flat[q + q])) * scale
                        y = y_origin + (window_y[j_first + j] + _widen(off_flat[q + q + _ONE])) * scale
                        (ins, r00[j], r01[j], r10[j], r11[j], b00[j], b01[j], b10[j], b11[j],
                         v00[j], v01[j], v10[j], v11[j], lx[j], ly[j]) = _corners(
                            x, y, height, width, height_f, width_f, n * height, channels, column[j_first + j],
                            zero, one)
                        inside[j] = ins
                        m[j] = _widen(msk_flat[q])
                        s00[j], s01[j], s10[j], s11[j] = zero, zero, zero, zero
                    for g in range(g_first, g_end):
                        o = np.uint64(pixel * channels + g * d_group)
                        j0 = np.uint64((g - g_first) * points)
                        start = _ZERO
                        while start < dim:
                            count = min(_ULANES, dim - start)
                            # One stack copy of this block of grad_output serves all P points (and cannot alias
                            # grad_input). Gradients are linear in the per-block dot products: accumulate them.
                            if count == _ULANES:
                                _copy(grad, gout_flat, o + start, _ULANES)
                            else:
                                _copy(grad, gout_flat, o + start, count)
                            for j in range(j0, j0 + np.uint64(points)):
                                if not inside[j]:
                                    continue
                                a00, a01, a10, a11 = b00[j] * m[j], b01[j] * m[j], b10[j] * m[j], b11[j] * m[j]
                                c00, c01, c10, c11 = r00[j] + start, r01[j] + start, r10[j] + start, r11[j] + start
                                # The dot products take the runtime block width, outside the full-block branch:
                                # with a constant 16 LLVM unrolls them and SLP packs the four reductions into
                                # shuffle-bound 4-wide vectors; as loops the loop vectoriser reduces each in
                                # whole registers (backward 10-20% faster).
                                s00[j] += _dot(grad, in_flat, c00, count)
                                s01[j] += _dot(grad, in_flat, c01, count)
                                s10[j] += _dot(grad, in_flat, c10, count)
                                s11[j] += _dot(grad, in_flat, c11, count)
                                if count == _ULANES:
                                    _scatter4(grad, gin_flat, c00, c01, c10, c11, a00, a01, a10, a11, _ULANES)
                                else:
                                    _scatter4(grad, gin_flat, c00, c01, c10, c11, a00, a01, a10, a11, count)
                            start += _ULANES
                    # Offset and mask gradients from the dot products, again a whole table at once. Each entry
                    # belongs to this (pixel, group, point) alone: plain stores.
                    for j in range(entries):
                        q = q_first + j
                        # Corners outside the image were read from clamped rows: their dot products must not count.
                        t00, t01, t10, t11 = s00[j] * v00[j], s01[j] * v01[j], s10[j] * v10[j], s11[j] * v11[j]
                        gmsk_flat[q] = b00[j] * t00 + b01[j] * t01 + b10[j] * t10 + b11[j] * t11
                        step = m[j] * scale
                        goff_flat[q + q] = step * ((one - ly[j]) * (t01 - t00) + ly[j] * (t11 - t10))
                        goff_flat[q + q + _ONE] = step * ((one - lx[j]) * (t10 - t00) + lx[j] * (t11 - t01))


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


def _kernel_array(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``t`` as the kernels read it: bfloat16 as its raw bits (uint16, widened to float32 as it is loaded), other
    dtypes converted to the compute ``dtype`` (float16: numba has no such type, so a float32 copy)."""
    if t.dtype == torch.bfloat16:
        return _bfloat16_bits(t)
    return _as_numpy(t, dtype)


def _bfloat16_bits(t: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's raw bits as a uint16 array (the tensor's own memory when it is contiguous)."""
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def dcnv3_forward(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geo: DCNv3Geometry,
                  softmax_mask: bool = False) -> torch.Tensor:
    """Forward on CPU tensors; ``softmax_mask``: the mask holds logits (softmax over each group's points, computed
    here). bfloat16 is read and written as such with float32 arithmetic; float16 is computed in float32 copies."""
    dtype = _compute_dtype(input.dtype)
    n, h, w, c = input.shape
    out_dtype = torch.bfloat16 if input.dtype == torch.bfloat16 else dtype
    out = torch.empty((n, *offset.shape[1:3], c), dtype=out_dtype)  # the kernel writes every element
    with _numba_threads():
        _forward_kernel(*(_kernel_array(t, dtype) for t in (input, offset, mask)), _kernel_array(out, dtype),
                        np.empty(0, torch.empty(0, dtype=dtype).numpy().dtype), *_geometry_args(geo),
                        int(softmax_mask))
    return out.to(input.dtype)


def dcnv3_backward(grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                   geo: DCNv3Geometry):
    """Gradients w.r.t. (input, offset, mask) of sum(output * grad_output), accumulated in float32 for half types
    (bfloat16 tensors are read as such)."""
    dtype = _compute_dtype(input.dtype)
    # The kernel accumulates into grad_input and writes every offset and mask gradient exactly once.
    grads = [torch.zeros(input.shape, dtype=dtype), torch.empty(offset.shape, dtype=dtype),
             torch.empty(mask.shape, dtype=dtype)]
    with _numba_threads() as threads:
        # Work items are (image, block of groups); split groups only as far as needed to feed every thread,
        # since a whole pixel's channels are contiguous in memory.
        group_chunks = min(geo.group, -(-2 * threads // max(1, input.shape[0])))
        _backward_kernel(*(_kernel_array(t, dtype) for t in (grad_output, input, offset, mask)),
                         *(gr.numpy() for gr in grads), *_geometry_args(geo), group_chunks)
    return tuple(gr.to(t.dtype) for gr, t in zip(grads, (input, offset, mask)))
