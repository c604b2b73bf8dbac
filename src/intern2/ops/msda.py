"""Multi-scale deformable attention (MSDA) core: the sampling operator of Deformable DETR, DINO and Mask2Former.

Semantics follow mmcv's ``multi_scale_deformable_attn_pytorch`` (and its CUDA op) exactly:

* ``value (N, S, M, D)``: M heads of D channels over L levels, concatenated in order and each row-major (level l,
  pixel (y, x) is key ``start_l + y*W_l + x``), ``S = sum_l H_l*W_l``; ``spatial_shapes (L, 2)`` integer rows
  ``(H_l, W_l)``; ``level_start_index`` (optional) must be the cumulative starts ``start_l``;
* ``sampling_locations (N, Q, M, L, P, 2)``: ``(x, y)`` normalised to the map's edges (0 the left/top edge, 1 the
  right/bottom one: pixel centre i sits at ``(i + 0.5) / W_l``, grid_sample's ``align_corners=False``); locations
  outside [0, 1] are valid;
* bilinear interpolation at pixel ``(x*W_l - 0.5, y*H_l - 0.5)``; corners outside the map contribute zero;
* ``attention_weights (N, Q, M, L, P)`` used as given (the module softmaxes them over L*P);
* output ``(N, Q, M*D)``, channel ``m*D + d``: ``sum_{l,p} attention_weights[n,q,m,l,p] * sample(l, m, d)``.

Three implementations share this contract (``impl``):

* ``"reference"``: pure PyTorch, one ``F.grid_sample`` per level; exact in float64, autograd through every op.
  It is also what ONNX export records (``GridSample``, opset >= 16): pass ``spatial_shapes`` as Python ints
  there, since the per-level split needs the sizes while tracing.
* ``"fast"``: CPU kernels compiled by numba; saves only the inputs for backward and never materialises the
  (N, M, D, Q, L*P) sample tensor.
* ``"triton"``: Triton GPU kernels (also runnable on CPU tensors under ``TRITON_INTERPRET=1``).

``"fast"`` and ``"triton"`` are one ``torch.library`` custom op (``intern2::ms_deform_attn``) with a fake
implementation, so ``torch.compile`` traces through it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .dcnv3 import _FLOAT_DTYPES, IMPLS, _default_impl, _triton_usable

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]

SpatialShapes = Union[torch.Tensor, Sequence[Sequence[int]]]


def _tracing() -> bool:
    """True while torch.compile / torch.export / ONNX export trace: tensor values cannot be read then."""
    return torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def _shapes_tensor(spatial_shapes: SpatialShapes, device: torch.device) -> torch.Tensor:
    """spatial_shapes as an (L, 2) int64 tensor on ``device``."""
    try:
        shapes = torch.as_tensor(spatial_shapes)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"spatial_shapes: expected an (L, 2) integer tensor or sequence of (H, W), "
                         f"got {spatial_shapes!r}") from error
    if shapes.dtype.is_floating_point or shapes.dtype.is_complex or shapes.dtype == torch.bool:
        raise ValueError(f"spatial_shapes: expected integer (H, W) rows, got dtype {shapes.dtype}")
    if shapes.dim() != 2 or shapes.shape[1] != 2 or shapes.shape[0] < 1:
        raise ValueError(f"spatial_shapes: expected shape (L, 2) with L >= 1 rows (H, W), "
                         f"got {tuple(shapes.shape)}")
    return shapes.to(device=device, dtype=torch.int64)


def _level_sizes(spatial_shapes: SpatialShapes, shapes: torch.Tensor) -> List[Tuple[int, int]]:
    """The (H, W) pairs as Python ints (reads the tensor when the caller gave one)."""
    rows = spatial_shapes if not isinstance(spatial_shapes, torch.Tensor) else shapes.tolist()
    return [(int(h), int(w)) for h, w in rows]


def _check_inputs(value: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                  attention_weights: torch.Tensor) -> torch.Tensor:
    """Raise ValueError naming the argument whose rank, shape, dtype or device is wrong; return the shapes as an
    (L, 2) int64 tensor on the value's device."""
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {t.dtype}")
    if value.dim() != 4:
        raise ValueError(f"value: expected a 4-D tensor (N, S, num_heads, head_dim), got shape {tuple(value.shape)}")
    n, _, heads, _ = value.shape
    shapes = _shapes_tensor(spatial_shapes, value.device)
    levels = shapes.shape[0]
    loc_shape = tuple(sampling_locations.shape)
    if len(loc_shape) != 6 or loc_shape[0] != n or loc_shape[2:4] != (heads, levels) or loc_shape[5] != 2:
        raise ValueError(f"sampling_locations: expected shape (N, Q, num_heads, num_levels, num_points, 2) = "
                         f"({n}, Q, {heads}, {levels}, P, 2), got {loc_shape}")
    expected = loc_shape[:5]
    if tuple(attention_weights.shape) != expected:
        raise ValueError(f"attention_weights: expected shape (N, Q, num_heads, num_levels, num_points) = "
                         f"{expected}, got {tuple(attention_weights.shape)}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise ValueError(f"{name}: expected device {value.device} (the value's), got {t.device}")
        if t.dtype != value.dtype:
            raise ValueError(f"{name}: expected dtype {value.dtype} (the value's), got {t.dtype}")
    return shapes


def _check_levels(sizes: List[Tuple[int, int]], num_keys: int, level_start_index: Optional[torch.Tensor]) -> None:
    """The level sizes must tile value's S keys, and level_start_index (if given) must be their starts."""
    if any(h < 1 or w < 1 for h, w in sizes):
        raise ValueError(f"spatial_shapes: expected positive (H, W) rows, got {sizes}")
    areas = [h * w for h, w in sizes]
    if sum(areas) != num_keys:
        raise ValueError(f"spatial_shapes: levels {sizes} hold sum(H*W) = {sum(areas)} keys, but value has "
                         f"S = {num_keys}")
    if level_start_index is None:
        return
    starts = [sum(areas[:i]) for i in range(len(areas))]
    given = torch.as_tensor(level_start_index).tolist()
    if given != starts:
        raise ValueError(f"level_start_index: expected the cumulative level starts {starts} (levels stored one "
                         f"after the other in value), got {given}")


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: Sequence[Tuple[int, int]],
                             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Readable pure-PyTorch MSDA core, one ``F.grid_sample`` per level; exact in float64 and ONNX-exportable.

    ``spatial_shapes`` here are Python (H, W) ints (the per-level split needs them).
    """
    if value.dtype in (torch.float16, torch.bfloat16):  # locations on ~100-px maps need more than 8-11 bits
        return ms_deform_attn_reference(value.float(), spatial_shapes, sampling_locations.float(),
                                        attention_weights.float()).to(value.dtype)
    n, keys, heads, dim = value.shape
    queries, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    # grid_sample batches over (image, head): maps (N*M, D, H, W), grids (N*M, Q, P, 2) in [-1, 1].
    maps = value.permute(0, 2, 3, 1).reshape(n * heads, dim, keys).split([h * w for h, w in spatial_shapes], -1)
    grids = (2 * sampling_locations - 1).transpose(1, 2).reshape(n * heads, queries, levels, points, 2)
    samples = torch.cat([
        F.grid_sample(level.unflatten(-1, size), grids[:, :, i], mode="bilinear", padding_mode="zeros",
                      align_corners=False)
        for i, (level, size) in enumerate(zip(maps, spatial_shapes))], -1)  # (N*M, D, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, queries, levels * points)
    out = (samples * weights).sum(-1)  # (N*M, D, Q)
    return out.view(n, heads * dim, queries).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Custom op: one schema for the compiled kernels (numba on CPU, Triton on GPU), autograd that saves only inputs.

def _kernels(backend: str):
    if backend == "fast":
        from . import msda_cpu
        return msda_cpu
    if backend == "triton":
        from . import msda_triton
        return msda_triton
    raise ValueError(f"impl: expected one of {IMPLS}, got {backend!r}")


@torch.library.custom_op("intern2::ms_deform_attn", mutates_args=())
def _msda_op(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
             attention_weights: torch.Tensor, backend: str) -> torch.Tensor:
    return _kernels(backend).msda_forward(value, spatial_shapes, sampling_locations, attention_weights)


@_msda_op.register_fake
def _msda_fake(value, spatial_shapes, sampling_locations, attention_weights, backend):
    return value.new_empty((value.shape[0], sampling_locations.shape[1], value.shape[2] * value.shape[3]))


@torch.library.custom_op("intern2::ms_deform_attn_backward", mutates_args=())
def _msda_backward_op(grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                      sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                      backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels(backend).msda_backward(grad_output.contiguous(), value, spatial_shapes, sampling_locations,
                                           attention_weights)


@_msda_backward_op.register_fake
def _msda_backward_fake(grad_output, value, spatial_shapes, sampling_locations, attention_weights, backend):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    *tensors, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.backend = backend


def _backward(ctx, grad_output):
    value, spatial_shapes, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = _msda_backward_op(grad_output, value, spatial_shapes,
                                                                 sampling_locations, attention_weights, ctx.backend)
    return grad_value, None, grad_locations, grad_weights, None


_msda_op.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn(
        value: torch.Tensor,
        spatial_shapes: SpatialShapes,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        impl: Optional[str] = None,
        level_start_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MSDA core: attention-weighted bilinear samples of every level at normalised locations, per head.

    Args:
        value: (N, S, num_heads, head_dim) keys of all levels, concatenated, each level row-major.
        spatial_shapes: (L, 2) integer (H, W) per level, a tensor or a sequence of pairs.
        sampling_locations: (N, Q, num_heads, L, P, 2) (x, y), 0 and 1 the map's edges.
        attention_weights: (N, Q, num_heads, L, P), used as given.
        impl: "reference", "fast" (CPU) or "triton" (CUDA); None picks the best for the device.
        level_start_index: (L,) first key of each level; only checked (levels must be contiguous).

    Returns:
        (N, Q, num_heads*head_dim) tensor in the value's dtype.

    The checks that read ``spatial_shapes`` / ``level_start_index`` values run eagerly, not while torch.compile
    or an exporter traces.
    """
    shapes = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    sizes = None
    if not _tracing():
        sizes = _level_sizes(spatial_shapes, shapes)
        _check_levels(sizes, value.shape[1], level_start_index)
    impl = impl or _default_impl(value)
    if impl == "reference":
        return ms_deform_attn_reference(value, sizes or _level_sizes(spatial_shapes, shapes), sampling_locations,
                                        attention_weights)
    if impl == "fast" and value.device.type != "cpu":
        raise ValueError(f"impl: 'fast' runs on CPU tensors, got {value.device}; use 'triton' or 'reference'")
    if impl == "triton" and not _triton_usable(value.device):
        raise ValueError(f"impl: 'triton' needs CUDA tensors and an importable triton (or TRITON_INTERPRET=1 "
                         f"for CPU tensors), got a tensor on {value.device}")
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS} or None, got {impl!r}")
    return _msda_op(value.contiguous(), shapes, sampling_locations.contiguous(), attention_weights.contiguous(),
                    impl)
