"""DCNv3 core operator: dynamic sparse (deformable) convolution, version 3.

Semantics follow the official InternImage operator exactly:

* channels-last tensors: ``input (N, H, W, G*D)``, ``offset (N, Ho, Wo, G*P*2)``, ``mask (N, Ho, Wo, G*P)``,
  output ``(N, Ho, Wo, G*D)`` with ``P = kh*kw - remove_center``;
* offset channel ``(g*P + p)*2 + c`` with c=0 the x (width) and c=1 the y (height) displacement in pixels;
  mask channel ``g*P + p``;
* x-major point order ``p = i*kh + j`` (i the kernel column, j the kernel row), the centre point skipped when
  ``remove_center``;
* sampling location ``x = wo*sw - pw + half_w + (i*dw - half_w + off_x) * offset_scale`` (likewise y), with
  ``half = dilation*(k-1)//2``: offset_scale multiplies the dilation grid as well as the learned offset;
* bilinear interpolation, corners outside the image contribute zero; the mask is used as given (no softmax), or
  with ``softmax_mask=True`` it holds logits, normalised by a softmax over each group's P points (what the DCNv3
  module does; in float32 for half-precision logits). The CPU kernel computes that softmax as it reads the mask.

Three implementations share this contract (``impl``):

* ``"reference"``: pure PyTorch through ``F.grid_sample``; exact in float64, autograd through every op. It is
  also the decomposition used for ONNX export (``GridSample``, opset >= 16).
* ``"fast"``: CPU kernels compiled by numba (which ships its own LLVM, so no C compiler is needed); saves only
  (input, offset, mask) for backward and never materialises the (N, G, D, HW, P) sample tensor.
* ``"triton"``: Triton GPU kernels (also runnable on CPU tensors under ``TRITON_INTERPRET=1``).

``"fast"`` and ``"triton"`` are one ``torch.library`` custom op (``intern2::dcnv3``) with a fake implementation,
so ``torch.compile`` and ``torch.export`` trace through it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["dcnv3", "dcnv3_reference", "mask_softmax", "DCNv3Geometry", "IMPLS", "dcnv3_decompositions"]

IntOrPair = Union[int, Sequence[int]]
IMPLS = ("reference", "fast", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _pair(value: IntOrPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name}: expected an int or an (h, w) pair of ints, got {value!r}")
    return pair[0], pair[1]


@dataclass(frozen=True)
class DCNv3Geometry:
    """Static configuration of one DCNv3 call (everything but the tensors)."""

    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dilation_h: int
    dilation_w: int
    group: int
    offset_scale: float
    remove_center: bool

    @classmethod
    def create(
            cls,
            kernel_size: IntOrPair,
            stride: IntOrPair,
            pad: IntOrPair,
            dilation: IntOrPair,
            group: int,
            offset_scale: float = 1.0,
            remove_center: bool = False,
    ) -> "DCNv3Geometry":
        kh, kw = _pair(kernel_size, "kernel_size")
        sh, sw = _pair(stride, "stride")
        ph, pw = _pair(pad, "pad")
        dh, dw = _pair(dilation, "dilation")
        for name, (a, b), low in (("kernel_size", (kh, kw), 1), ("stride", (sh, sw), 1),
                                  ("pad", (ph, pw), 0), ("dilation", (dh, dw), 1)):
            if a < low or b < low:
                raise ValueError(f"{name}: expected values >= {low}, got {(a, b)}")
        if not isinstance(group, int) or group < 1:
            raise ValueError(f"group: expected a positive int, got {group!r}")
        if remove_center and (kh != kw or kh % 2 == 0):
            raise ValueError(f"remove_center: needs a square odd kernel, got kernel_size {(kh, kw)}")
        return cls(kh, kw, sh, sw, ph, pw, dh, dw, group, float(offset_scale), bool(remove_center))

    @property
    def points(self) -> int:
        """Sampling points per group, P."""
        return self.kernel_h * self.kernel_w - int(self.remove_center)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Standard convolution output size."""
        ho = (height + 2 * self.pad_h - (self.dilation_h * (self.kernel_h - 1) + 1)) // self.stride_h + 1
        wo = (width + 2 * self.pad_w - (self.dilation_w * (self.kernel_w - 1) + 1)) // self.stride_w + 1
        return ho, wo

    def kernel_grid(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(P, 2) regular sampling grid relative to the window centre, (x, y), in x-major point order."""
        half_h = (self.dilation_h * (self.kernel_h - 1)) // 2
        half_w = (self.dilation_w * (self.kernel_w - 1)) // 2
        xs = torch.arange(self.kernel_w, dtype=dtype, device=device) * self.dilation_w - half_w
        ys = torch.arange(self.kernel_h, dtype=dtype, device=device) * self.dilation_h - half_h
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)  # p = i*kh + j
        if self.remove_center:
            centre = (self.kernel_w // 2) * self.kernel_h + self.kernel_h // 2
            grid = torch.cat([grid[:centre], grid[centre + 1:]])
        return grid


def _check_inputs(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geo: DCNv3Geometry) -> None:
    """Raise ValueError naming the argument whose shape, dtype or device is wrong."""
    for name, t in (("input", input), ("offset", offset), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {t.dtype}")
    if input.dim() != 4:
        raise ValueError(f"input: expected a 4-D channels-last tensor (N, H, W, group*group_channels), "
                         f"got shape {tuple(input.shape)}")
    n, h, w, c = input.shape
    if c % geo.group != 0:
        raise ValueError(f"input: channels ({c}) must be divisible by group ({geo.group})")
    ho, wo = geo.output_size(h, w)
    if ho < 1 or wo < 1:
        raise ValueError(f"input: spatial size {(h, w)} is too small for kernel {(geo.kernel_h, geo.kernel_w)}, "
                         f"dilation {(geo.dilation_h, geo.dilation_w)} and pad {(geo.pad_h, geo.pad_w)}")
    p = geo.points
    for name, t, last in (("offset", offset, geo.group * p * 2), ("mask", mask, geo.group * p)):
        expected = (n, ho, wo, last)
        if tuple(t.shape) != expected:
            raise ValueError(f"{name}: expected shape {expected} = (N, H_out, W_out, group*{p}"
                             f"{'*2' if name == 'offset' else ''}), got {tuple(t.shape)}")
        if t.device != input.device:
            raise ValueError(f"{name}: expected device {input.device} (the input's), got {t.device}")
        if t.dtype != input.dtype:
            raise ValueError(f"{name}: expected dtype {input.dtype} (the input's), got {t.dtype}")


def mask_softmax(mask: torch.Tensor, group: int, functional: bool = False) -> torch.Tensor:
    """Softmax of (N, H, W, group*P) mask logits over each group's P points; half-precision logits in float32 (the
    result stays float32).

    For inference the softmax is written out, in place: ATen's softmax kernel is ~4x slower on a 9-wide last
    dimension on CPU. Under autograd (or ``functional``, for decompositions) it is F.softmax, whose backward saves
    only its output.
    """
    logits = mask.float() if mask.dtype in (torch.float16, torch.bfloat16) else mask
    logits = logits.reshape(*mask.shape[:-1], group, mask.shape[-1] // group)
    if functional or (torch.is_grad_enabled() and logits.requires_grad):
        return F.softmax(logits, -1).reshape(mask.shape)
    weights = (logits - logits.amax(-1, keepdim=True)).exp_()
    return weights.div_(weights.sum(-1, keepdim=True)).reshape(mask.shape)


def dcnv3_reference(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geo: DCNv3Geometry,
                    softmax_mask: bool = False) -> torch.Tensor:
    """Readable pure-PyTorch DCNv3 core through ``F.grid_sample``; exact in float64 and ONNX-exportable."""
    if softmax_mask:
        mask = mask_softmax(mask, geo.group)
    if input.dtype in (torch.float16, torch.bfloat16):  # pixel coordinates need more than 8-11 mantissa bits
        return dcnv3_reference(input.float(), offset.float(), mask.float(), geo).to(input.dtype)
    n, h, w, c = input.shape
    g, p = geo.group, geo.points
    d = c // g
    ho, wo = geo.output_size(h, w)
    # Window centres in pixel coordinates of the unpadded input (integer = pixel centre).
    cy = torch.arange(ho, dtype=input.dtype, device=input.device) * geo.stride_h \
        + ((geo.dilation_h * (geo.kernel_h - 1)) // 2 - geo.pad_h)
    cx = torch.arange(wo, dtype=input.dtype, device=input.device) * geo.stride_w \
        + ((geo.dilation_w * (geo.kernel_w - 1)) // 2 - geo.pad_w)
    centres = torch.stack(torch.meshgrid(cx, cy, indexing="xy"), -1)  # (Ho, Wo, 2) as (x, y)
    kernel = geo.kernel_grid(input.dtype, input.device)  # (P, 2)
    loc = centres[:, :, None, None] + (kernel + offset.view(n, ho, wo, g, p, 2)) * geo.offset_scale
    # grid_sample with align_corners=False maps normalised u to pixel ((u + 1) * size - 1) / 2.
    grid = torch.stack(((2 * loc[..., 0] + 1) / w - 1, (2 * loc[..., 1] + 1) / h - 1), -1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * g, ho * wo, p, 2)
    value = input.view(n, h, w, g, d).permute(0, 3, 4, 1, 2).reshape(n * g, d, h, w)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = mask.view(n, ho * wo, g, p).permute(0, 2, 1, 3).reshape(n * g, 1, ho * wo, p)
    out = (sampled * weights).sum(-1)  # (N*G, D, Ho*Wo)
    return out.view(n, g, d, ho, wo).permute(0, 3, 4, 1, 2).reshape(n, ho, wo, c)


# --------------------------------------------------------------------------------------------------------------
# Custom op: one schema for the compiled kernels (numba on CPU, Triton on GPU), autograd that saves only inputs.

def _geometry_args(geo: DCNv3Geometry) -> tuple:
    return (geo.kernel_h, geo.kernel_w, geo.stride_h, geo.stride_w, geo.pad_h, geo.pad_w,
            geo.dilation_h, geo.dilation_w, geo.group, geo.offset_scale, geo.remove_center)


def _kernels(backend: str):
    if backend == "fast":
        from . import dcnv3_cpu
        return dcnv3_cpu
    if backend == "triton":
        from . import dcnv3_triton
        return dcnv3_triton
    raise ValueError(f"impl: expected one of {IMPLS}, got {backend!r}")


@torch.library.custom_op("intern2::dcnv3", mutates_args=())
def _dcnv3_op(
        input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
        kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
        dilation_h: int, dilation_w: int, group: int, offset_scale: float, remove_center: bool,
        softmax_mask: bool, backend: str,
) -> torch.Tensor:
    geo = DCNv3Geometry(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                        offset_scale, remove_center)
    return _kernels(backend).dcnv3_forward(input, offset, mask, geo, softmax_mask)


@_dcnv3_op.register_fake
def _dcnv3_fake(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                dilation_h, dilation_w, group, offset_scale, remove_center, softmax_mask, backend):
    return input.new_empty((*offset.shape[:3], input.shape[3]))


@torch.library.custom_op("intern2::dcnv3_backward", mutates_args=())
def _dcnv3_backward_op(
        grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
        kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
        dilation_h: int, dilation_w: int, group: int, offset_scale: float, remove_center: bool, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    geo = DCNv3Geometry(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                        offset_scale, remove_center)
    return _kernels(backend).dcnv3_backward(grad_output.contiguous(), input, offset, mask, geo)


@_dcnv3_backward_op.register_fake
def _dcnv3_backward_fake(grad_output, input, offset, mask, *args):
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _setup_context(ctx, inputs, output):
    input, offset, mask, *static = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.static = static


def _backward(ctx, grad_output):
    input, offset, mask = ctx.saved_tensors
    *geometry, softmax_mask, backend = ctx.static
    if not softmax_mask:
        grads = _dcnv3_backward_op(grad_output, input, offset, mask, *geometry, backend)
        return (*grads,) + (None,) * len(ctx.static)
    group = geometry[8]
    with torch.no_grad():
        weights = mask_softmax(mask, group)  # recomputed: cheaper than saving it
    # The kernels take the weights in the input's dtype (bfloat16 training: rounded once, as the official module's).
    grad_input, grad_offset, grad_weights = _dcnv3_backward_op(grad_output, input, offset, weights.to(mask.dtype),
                                                               *geometry, backend)
    # Softmax backward per group: w * (g - sum(g * w)).
    shape = (*mask.shape[:-1], group, mask.shape[-1] // group)
    w, g = weights.view(shape), grad_weights.to(weights.dtype).view(shape)
    grad_mask = (w * (g - (g * w).sum(-1, keepdim=True))).reshape(mask.shape).to(mask.dtype)
    return (grad_input, grad_offset, grad_mask) + (None,) * len(ctx.static)


_dcnv3_op.register_autograd(_backward, setup_context=_setup_context)


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from . import dcnv3_triton
    return dcnv3_triton.AVAILABLE


def _fast_supports(geo: DCNv3Geometry) -> bool:
    from . import dcnv3_cpu
    return geo.points <= dcnv3_cpu.MAX_POINTS


def _default_impl(input: torch.Tensor) -> str:
    if torch.onnx.is_in_onnx_export():
        return "reference"
    if input.device.type == "cpu":
        return "fast"
    if input.device.type == "cuda" and _triton_usable(input.device):
        return "triton"
    return "reference"


def dcnv3(
        input: torch.Tensor,
        offset: torch.Tensor,
        mask: torch.Tensor,
        kernel_size: IntOrPair,
        stride: IntOrPair,
        pad: IntOrPair,
        dilation: IntOrPair,
        group: int,
        offset_scale: float = 1.0,
        remove_center: bool = False,
        impl: Optional[str] = None,
        softmax_mask: bool = False,
) -> torch.Tensor:
    """DCNv3 core: mask-weighted bilinear sampling at learned offsets, per channel group.

    Args:
        input: (N, H, W, group*D) channels-last values.
        offset: (N, H_out, W_out, group*P*2) pixel displacements, x before y, x-major point order.
        mask: (N, H_out, W_out, group*P) per-point weights, used as given (or logits, see ``softmax_mask``).
        kernel_size, stride, pad, dilation: int or (h, w) pair.
        group: number of channel groups G.
        offset_scale: multiplies both the dilation grid and the offsets.
        remove_center: drop the kernel's centre point (square odd kernels).
        impl: "reference", "fast" (CPU) or "triton" (CUDA); None picks the best for the device.
        softmax_mask: the mask holds logits: weights are their softmax over each group's P points.

    Returns:
        (N, H_out, W_out, group*D) tensor in the input's dtype.
    """
    geo = DCNv3Geometry.create(kernel_size, stride, pad, dilation, group, offset_scale, remove_center)
    _check_inputs(input, offset, mask, geo)
    if impl is None:
        impl = _default_impl(input)
        if impl == "fast" and not _fast_supports(geo):  # larger kernels than the CPU kernels' tables hold
            impl = "reference"
    if impl == "reference":
        return dcnv3_reference(input, offset, mask, geo, softmax_mask)
    if impl == "fast" and input.device.type != "cpu":
        raise ValueError(f"impl: 'fast' runs on CPU tensors, got {input.device}; use 'triton' or 'reference'")
    if impl == "fast" and not _fast_supports(geo):
        raise ValueError(f"impl: 'fast' takes kernels of at most {_kernels('fast').MAX_POINTS} points, got "
                         f"{geo.kernel_h}x{geo.kernel_w} ({geo.points} points); use 'reference'")
    if impl == "triton" and not _triton_usable(input.device):
        raise ValueError(f"impl: 'triton' needs CUDA tensors and an importable triton (or TRITON_INTERPRET=1 "
                         f"for CPU tensors), got a tensor on {input.device}")
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS} or None, got {impl!r}")
    return _dcnv3_op(input.contiguous(), offset.contiguous(), mask.contiguous(), *_geometry_args(geo),
                     bool(softmax_mask), impl)


def _decomposed(input, offset, mask, *args):
    geo, softmax_mask = DCNv3Geometry(*args[:11]), args[11]
    if softmax_mask:  # decompositions must be functional
        mask = mask_softmax(mask, geo.group, functional=True)
    return dcnv3_reference(input, offset, mask, geo)


def dcnv3_decompositions() -> dict:
    """Decomposition table for ``ExportedProgram.run_decompositions`` replacing the custom op by standard ops."""
    return {torch.ops.intern2.dcnv3.default: _decomposed}
