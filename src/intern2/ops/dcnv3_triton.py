"""DCNv3 Triton kernels (GPU; also runnable on CPU tensors with ``TRITON_INTERPRET=1``).

DCNv4-style layout: one program per (block of output positions, group). For each of the P sampling points
the offsets and mask are loaded once and the bilinear corner indices/weights computed once, then reused
across the group's channels, read as channels-last rows (contiguous, vectorised loads). Accumulation is in
float32 (float64 for float64 tensors). Backward recomputes the sampling from (input, offset, mask), reduces
grad_offset/grad_mask over the channels inside the program and scatters grad_input with atomic adds into a
float32 (or float64) buffer.
"""
from __future__ import annotations

import torch

from .dcnv3 import DCNv3Geometry, mask_softmax

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # CPU-only installs: the custom op never routes here
    AVAILABLE = False

__all__ = ["AVAILABLE", "dcnv3_forward", "dcnv3_backward"]

BLOCK_Q = 64
MAX_BLOCK_D = 64

if AVAILABLE:

    @triton.jit
    def _sample(off_ptr, msk_ptr, q, q_mask, Ho, Wo, g, k, G, P, H, W, kh, sh, sw, ph, pw, dh, dw, half_h,
                half_w, centre, offset_scale, ACC: tl.constexpr):
        """Corner indices, validity masks and (unmasked) bilinear fractions of kernel point k for the output
        positions q (flattened n, ho, wo) of group g."""
        wo = q % Wo
        ho = (q // Wo) % Ho
        n = (q // (Wo * Ho)).to(tl.int64)
        i = k // kh
        j = k - i * kh
        p = tl.where((centre >= 0) & (k > centre), k - 1, k)  # later points shift down past a removed centre
        p_mask = q_mask & (k != centre)
        index = (q.to(tl.int64) * G + g) * P + p
        off_x = tl.load(off_ptr + 2 * index, mask=p_mask, other=0.0).to(ACC)
        off_y = tl.load(off_ptr + 2 * index + 1, mask=p_mask, other=0.0).to(ACC)
        m = tl.load(msk_ptr + index, mask=p_mask, other=0.0).to(ACC)
        x = (wo * sw - pw + half_w).to(ACC) + (i * dw - half_w + off_x) * offset_scale
        y = (ho * sh - ph + half_h).to(ACC) + (j * dh - half_h + off_y) * offset_scale
        inside = p_mask & (x > -1.0) & (y > -1.0) & (x < W) & (y < H)
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        lx = x - x0f
        ly = y - y0f
        x0 = tl.where(inside, x0f, 0.0).to(tl.int64)
        y0 = tl.where(inside, y0f, 0.0).to(tl.int64)
        vx0 = inside & (x0 >= 0)
        vx1 = inside & (x0 + 1 < W)
        vy0 = inside & (y0 >= 0)
        vy1 = inside & (y0 + 1 < H)
        top = (n * H + y0) * W
        bottom = (n * H + y0 + 1) * W
        return (index, p_mask, m, lx, ly, top + x0, top + x0 + 1, bottom + x0, bottom + x0 + 1,
                vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1)

    @triton.jit
    def _forward_kernel(inp_ptr, off_ptr, msk_ptr, out_ptr, Q, H, W, Ho, Wo, C, G, D, P, KK, kh, sh, sw, ph, pw,
                        dh, dw, half_h, half_w, centre, offset_scale, ACC: tl.constexpr, BLOCK_Q: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        g = tl.program_id(1)
        q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_mask = q < Q
        lanes = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            d_mask = (d0 + lanes) < D
            column = (g * D + d0 + lanes)[None, :]
            acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
            for k in range(0, KK):
                index, p_mask, m, lx, ly, r00, r01, r10, r11, c00, c01, c10, c11 = _sample(
                    off_ptr, msk_ptr, q, q_mask, Ho, Wo, g, k, G, P, H, W, kh, sh, sw, ph, pw, dh, dw, half_h,
                    half_w, centre, offset_scale, ACC)
                v00 = tl.load(inp_ptr + r00[:, None] * C + column, mask=c00[:, None] & d_mask[None, :], other=0.0)
                v01 = tl.load(inp_ptr + r01[:, None] * C + column, mask=c01[:, None] & d_mask[None, :], other=0.0)
                v10 = tl.load(inp_ptr + r10[:, None] * C + column, mask=c10[:, None] & d_mask[None, :], other=0.0)
                v11 = tl.load(inp_ptr + r11[:, None] * C + column, mask=c11[:, None] & d_mask[None, :], other=0.0)
                w00 = ((1.0 - ly) * (1.0 - lx) * m)[:, None]
                w01 = ((1.0 - ly) * lx * m)[:, None]
                w10 = (ly * (1.0 - lx) * m)[:, None]
                w11 = (ly * lx * m)[:, None]
                acc += (w00 * v00.to(ACC) + w01 * v01.to(ACC) + w10 * v10.to(ACC) + w11 * v11.to(ACC))
            out_index = q.to(tl.int64)[:, None] * C + column
            tl.store(out_ptr + out_index, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _corner_backward(inp_ptr, gin_ptr, row, valid, weight, grad, column, d_mask, C, ACC: tl.constexpr):
        """grad_input[corner row] += weight * grad; returns the per-position dot product <grad, corner row>."""
        pointer = row[:, None] * C + column
        corner_mask = valid[:, None] & d_mask
        value = tl.load(inp_ptr + pointer, mask=corner_mask, other=0.0).to(ACC)
        tl.atomic_add(gin_ptr + pointer, weight * grad, mask=corner_mask)
        return tl.sum(grad * value, axis=1)

    @triton.jit
    def _backward_kernel(gout_ptr, inp_ptr, off_ptr, msk_ptr, gin_ptr, goff_ptr, gmsk_ptr, Q, H, W, Ho, Wo, C, G, D,
                         P, KK, kh, sh, sw, ph, pw, dh, dw, half_h, half_w, centre, offset_scale,
                         ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        g = tl.program_id(1)
        q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_mask = q < Q
        lanes = tl.arange(0, BLOCK_D)
        for k in range(0, KK):
            index, p_mask, m, lx, ly, r00, r01, r10, r11, c00, c01, c10, c11 = _sample(
                off_ptr, msk_ptr, q, q_mask, Ho, Wo, g, k, G, P, H, W, kh, sh, sw, ph, pw, dh, dw, half_h,
                half_w, centre, offset_scale, ACC)
            s00 = tl.zeros((BLOCK_Q,), dtype=ACC)
            s01 = tl.zeros((BLOCK_Q,), dtype=ACC)
            s10 = tl.zeros((BLOCK_Q,), dtype=ACC)
            s11 = tl.zeros((BLOCK_Q,), dtype=ACC)
            w00 = ((1.0 - ly) * (1.0 - lx) * m)[:, None]
            w01 = ((1.0 - ly) * lx * m)[:, None]
            w10 = (ly * (1.0 - lx) * m)[:, None]
            w11 = (ly * lx * m)[:, None]
            for d0 in range(0, D, BLOCK_D):  # the offsets/weights above are reused for every channel tile
                d_mask = ((d0 + lanes) < D)[None, :]
                column = (g * D + d0 + lanes)[None, :]
                grad = tl.load(gout_ptr + q.to(tl.int64)[:, None] * C + column, mask=q_mask[:, None] & d_mask,
                               other=0.0).to(ACC)
                s00 += _corner_backward(inp_ptr, gin_ptr, r00, c00, w00, grad, column, d_mask, C, ACC)
                s01 += _corner_backward(inp_ptr, gin_ptr, r01, c01, w01, grad, column, d_mask, C, ACC)
                s10 += _corner_backward(inp_ptr, gin_ptr, r10, c10, w10, grad, column, d_mask, C, ACC)
                s11 += _corner_backward(inp_ptr, gin_ptr, r11, c11, w11, grad, column, d_mask, C, ACC)
            grad_mask = (1.0 - ly) * ((1.0 - lx) * s00 + lx * s01) + ly * ((1.0 - lx) * s10 + lx * s11)
            scale = m * offset_scale
            grad_x = scale * ((1.0 - ly) * (s01 - s00) + ly * (s11 - s10))
            grad_y = scale * ((1.0 - lx) * (s10 - s00) + lx * (s11 - s01))
            tl.store(gmsk_ptr + index, grad_mask.to(gmsk_ptr.dtype.element_ty), mask=p_mask)
            tl.store(goff_ptr + 2 * index, grad_x.to(goff_ptr.dtype.element_ty), mask=p_mask)
            tl.store(goff_ptr + 2 * index + 1, grad_y.to(goff_ptr.dtype.element_ty), mask=p_mask)


def _launch_args(input: torch.Tensor, offset: torch.Tensor, geo: DCNv3Geometry):
    n, h, w, c = input.shape
    ho, wo = offset.shape[1:3]
    d = c // geo.group
    centre = (geo.kernel_w // 2) * geo.kernel_h + geo.kernel_h // 2 if geo.remove_center else -1
    block_d = max(16, min(MAX_BLOCK_D, triton.next_power_of_2(d)))
    grid = (triton.cdiv(n * ho * wo, BLOCK_Q), geo.group)
    scalars = (n * ho * wo, h, w, ho, wo, c, geo.group, d, geo.points, geo.kernel_h * geo.kernel_w, geo.kernel_h,
               geo.stride_h, geo.stride_w, geo.pad_h, geo.pad_w, geo.dilation_h, geo.dilation_w,
               (geo.dilation_h * (geo.kernel_h - 1)) // 2, (geo.dilation_w * (geo.kernel_w - 1)) // 2, centre,
               geo.offset_scale)
    acc = tl.float64 if input.dtype == torch.float64 else tl.float32
    return grid, scalars, dict(ACC=acc, BLOCK_Q=BLOCK_Q, BLOCK_D=block_d)


def dcnv3_forward(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geo: DCNv3Geometry,
                  softmax_mask: bool = False) -> torch.Tensor:
    """Forward; output in the input's dtype. Mask logits (``softmax_mask``) are normalised by ATen first."""
    if softmax_mask:
        mask = mask_softmax(mask, geo.group).to(input.dtype)
    out = input.new_empty((input.shape[0], *offset.shape[1:3], input.shape[3]))
    grid, scalars, meta = _launch_args(input, offset, geo)
    _forward_kernel[grid](input, offset, mask, out, *scalars, **meta)
    return out


def dcnv3_backward(grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                   geo: DCNv3Geometry):
    """Gradients w.r.t. (input, offset, mask) of sum(output * grad_output)."""
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    grad_input = torch.zeros(input.shape, dtype=acc_dtype, device=input.device)  # atomics need full precision
    grad_offset = torch.zeros_like(offset)
    grad_mask = torch.zeros_like(mask)
    grid, scalars, meta = _launch_args(input, offset, geo)
    _backward_kernel[grid](grad_output, input, offset, mask, grad_input, grad_offset, grad_mask, *scalars, **meta)
    return grad_input.to(input.dtype), grad_offset, grad_mask
