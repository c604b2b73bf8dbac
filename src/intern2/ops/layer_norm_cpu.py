"""LayerNorm over the last dimension of bfloat16 CPU tensors, compiled by numba (inference only).

ATen's CPU LayerNorm converts bfloat16 rows through float32 at ~1 ns per element for InternImage's 64-512-wide rows,
as slow as its memory-bound float32 kernel though it moves half the bytes; this kernel reads the raw bfloat16 bits,
widens them in registers (the DCNv3 kernels' helpers), takes mean and variance in float32 over a stack copy of the
row (two passes, as ATen), and rounds the affine result to nearest even: 1.3-1.8x ATen's speed (Intel Xeon, 1
thread) with the same bits in our checks (the float32 sums may differ from ATen's in order, so the last bit may).
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from .dcnv3_cpu import _FASTMATH, _bfloat16_bits, _numba_threads, _stack_array, _store, _widen

MAX_WIDTH = 4096  # a row's float32 copy lives in a stack buffer of this literal size
_ROWS_PER_ITEM = 64  # rows per parallel work item: enough work to amortise the scheduling


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def _layer_norm_kernel(x, weight, bias, out, eps, rows_per_item):
    rows, width = x.shape
    inverse_width = np.float32(1.0) / np.float32(width)
    for item in prange((rows + rows_per_item - 1) // rows_per_item):
        row_values = _stack_array(MAX_WIDTH, np.float32)
        for row in range(item * rows_per_item, min(rows, (item + 1) * rows_per_item)):
            total = np.float32(0.0)
            for c in range(width):
                value = _widen(x[row, c])
                row_values[c] = value
                total += value
            mean = total * inverse_width
            squares = np.float32(0.0)
            for c in range(width):
                centred = row_values[c] - mean
                squares += centred * centred
            rstd = np.float32(1.0) / np.sqrt(squares * inverse_width + np.float32(eps))
            for c in range(width):
                _store(out[row], c, (row_values[c] - mean) * rstd * _widen(weight[c]) + _widen(bias[c]))


def layer_norm_bfloat16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` for bfloat16 CPU tensors with C <= MAX_WIDTH (no autograd)."""
    width = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.bfloat16)  # the kernel writes every element
    with _numba_threads():
        _layer_norm_kernel(_bfloat16_bits(x).reshape(-1, width), _bfloat16_bits(weight), _bfloat16_bits(bias),
                           _bfloat16_bits(out).reshape(-1, width), float(eps), _ROWS_PER_ITEM)
    return out
