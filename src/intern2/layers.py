"""Small building blocks shared by the models: layout permutes, norm and activation factories.

Norm layers are wrapped with layout permutes exactly as in the official InternImage code, so the module
indices (and hence state-dict keys such as ``dw_conv.1.1.weight``) match the released checkpoints.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import functools
import math

import torch
import torchvision
from torch import nn
from torch.nn.modules import module as _module_hooks  # the global forward hooks live there
from torch.utils.flop_counter import register_flop_formula

__all__ = ["ToChannelsFirst", "ToChannelsLast", "Linear", "linear", "linear_gelu", "linear_residual", "fusable",
           "unobserved", "onednn_linear_available", "GELU", "LayerNorm", "layer_norm", "Mlp", "residual_add",
           "DropPath", "build_norm_layer", "build_act_layer", "FeatureInfo", "take_indices"]


class ToChannelsFirst(nn.Module):
    """NHWC -> NCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class ToChannelsLast(nn.Module):
    """NCHW -> NHWC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


# oneDNN's matmul (in torch's x86 and most arm64 wheels; what Inductor's CPU backend calls for linears). On the AMD
# EPYC we measure, MKL's sgemm (what F.linear calls) reaches ~70 GFLOP/s at one thread against oneDNN's ~100, and
# MKL's few-row gemm/gemv streams the weight 1.3-3x slower.
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)

if _ONEDNN_LINEAR is not None:
    @register_flop_formula(_ONEDNN_LINEAR)
    def _onednn_linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        """FlopCounterMode's count for the oneDNN linear (both overloads): 2 per multiply-add, as for addmm."""
        return 2 * math.prod(x_shape) * out_shape[-1]


@functools.lru_cache(maxsize=None)
def _onednn_dtypes() -> Tuple[torch.dtype, ...]:
    """The dtypes oneDNN's linear runs here and agrees with F.linear on (none where the build lacks it)."""
    if _ONEDNN_LINEAR is None or not torch.backends.mkldnn.is_available():
        return ()
    dtypes = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    generator = torch.Generator().manual_seed(0)  # not the global generator: seeded runs stay as they were
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((2, 8), (4, 8), (4,)))
    try:
        return tuple(d for d in dtypes if torch.allclose(
            _ONEDNN_LINEAR(x.to(d), weight.to(d), bias.to(d), "none", [], "").float(),
            nn.functional.linear(x.to(d), weight.to(d), bias.to(d)).float(), atol=1e-2 if d != torch.float32 else 1e-5))
    except RuntimeError:
        return ()


def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether :func:`linear` can run on oneDNN in ``dtype`` here (torch built with it, and it agrees with F.linear)."""
    return dtype in _onednn_dtypes()


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`linear` may run on oneDNN: plain CPU tensors of one supported dtype, nothing for autograd to
    record (the op has no backward), no autocast, and no tracer or compiler watching (they must see ``aten.linear``;
    the ONNX exporters run under one of them). Cheap checks first: a decoding step makes ~50 of these calls."""
    if not x.is_cpu or x.dim() < 2 or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if type(x) not in _PLAIN_TENSORS or type(weight) not in _PLAIN_TENSORS or weight.dtype != x.dtype:
        return False
    if bias is not None and (type(bias) not in _PLAIN_TENSORS or bias.dtype != x.dtype):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False
    return (x.numel() > 0 and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
            and onednn_linear_available(x.dtype))


@functools.lru_cache(maxsize=None)
def _intel_cpu() -> bool:
    """Whether this is an Intel CPU (MKL picks its fast kernels by vendor)."""
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in info)
    except OSError:
        return False


# oneDNN's matmul costs ~16-20 µs per call before any work (AVX-512 EPYC; 35-60 on an AVX2-only one), MKL's ~2-3:
# float32 matmuls of at most this many rows over at most this many weight elements (256 KiB) are faster on
# F.linear at 1 and 2 threads, with warm or cold weights (64x64 at one row: 3.0 against 16.2 µs; 256x256 at 16 rows:
# 30 against 42). From a 1 MiB weight on (512x512) oneDNN streams a cold weight faster. Measured on the AVX-512 EPYC.
_MKL_MAX_ROWS, _MKL_MAX_WEIGHT = 16, 65536


def _onednn_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's fixed cost per call is worth paying: not for a float32 matmul of a few rows over a small
    weight (a small model's decoding step), where F.linear's MKL call is done before oneDNN starts."""
    return not (x.dtype == torch.float32 and weight.numel() <= _MKL_MAX_WEIGHT
                and x.numel() <= _MKL_MAX_ROWS * x.shape[-1])


def _gemv_preferred(dtype: torch.dtype) -> bool:
    """Whether a one-row linear (a batch-1 decoding step) should run as ``torch.addmv`` rather than on oneDNN.

    Measured with cold weights (docs/architecture.md): on an Intel Xeon ATen's own bfloat16 gemv streams 1.3-1.6x
    faster than oneDNN's one-row matmul, and MKL's sgemv ~1.2-1.4x in float32 at 2 threads (equal at 1); on an AMD
    EPYC with AVX-512 oneDNN's one-row matmul is the faster in both dtypes (1.4-2x ATen's bfloat16 gemv, 1.3-2.5x
    MKL's sgemv).
    """
    return dtype in (torch.float32, torch.bfloat16) and _intel_cpu()


@functools.lru_cache(maxsize=None)
def _epilogues_preferred() -> bool:
    """Whether oneDNN's matmul epilogues (the fused residual sum, fp32 GELU) beat a separate in-place pass here.

    They do where torch's CPU kernels use AVX-512 (Intel Xeon with AMX: ~16 ms each of InternImage-T's batch-8
    forward). On an AVX2-only AMD EPYC oneDNN's AVX2 matmul with any post-op is slower than the plain matmul plus
    ATen's pass, at every InternImage-T shape: +1-2.5 ms per fused residual, +0.7-2.9 ns per element for the GELU
    when the input has 128 or more channels (docs/architecture.md).
    """
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


@torch.fx.wrap
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, plus ``residual`` (of the output's shape) when given, run by oneDNN's matmul
    for CPU inference in float32/bfloat16 (see :class:`Linear`).

    The residual sum is then the matmul's epilogue where that is faster (:func:`_epilogues_preferred`; one rounding
    in bfloat16, no separate pass over the output), else an in-place pass. The two paths differ only in rounding
    (the order of the sums: ~1e-7 relative in float32). Kept out of symbolic tracing: torch.fx records the call.
    """
    if _onednn_applies(x, weight, bias) and _onednn_pays(x, weight):
        if residual is None and x.numel() == x.shape[-1] and _gemv_preferred(x.dtype):
            rows = x.reshape(-1)
            out = torch.mv(weight, rows) if bias is None else torch.addmv(bias, weight, rows)
            return out.view(*x.shape[:-1], weight.shape[0])
        if residual is None or not _epilogues_preferred():
            out = _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
            return out if residual is None else residual_add(residual, out)
        if (type(residual) in _PLAIN_TENSORS and residual.dtype == x.dtype and residual.dim() == x.dim()
                and residual.shape[-1] == weight.shape[0] and residual.shape[:-1] == x.shape[:-1]
                and not (residual.requires_grad and torch.is_grad_enabled())):
            return _ONEDNN_LINEAR.binary(x, residual, weight, bias, "add")
    out = nn.functional.linear(x, weight, bias)
    return out if residual is None else residual_add(residual, out)


@torch.fx.wrap
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact (erf) GELU of ``F.linear(x, weight, bias)``. In float32 CPU inference oneDNN applies the GELU in the
    matmul's epilogue: the separate pass over a 4x-wide MLP hidden tensor is memory-bound where that tensor leaves
    the cache (InternImage-T's stage 1: ~5 ms of a 14 ms fc1 + GELU at batch 8). Not in bfloat16: there oneDNN's
    epilogue GELU is slower than ATen's own pass (measured on an Intel Xeon with AMX); nor where oneDNN's epilogues
    are slow (:func:`_epilogues_preferred`). Kept out of symbolic tracing."""
    # _onednn_applies first: it is False under torch.compile, which must not trace the CPU-capability query.
    if (x.dtype == torch.float32 and _onednn_applies(x, weight, bias) and _epilogues_preferred()
            and _onednn_pays(x, weight)):
        return _ONEDNN_LINEAR(x, weight, bias, "gelu", [], "none")
    return _gelu(linear(x, weight, bias), "none")


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state dict) whose CPU inference runs on oneDNN's matmul.

    Under autograd, on other devices, while tracing/compiling/exporting, or where torch lacks oneDNN, it is
    ``nn.Linear``. Measured on an AMD EPYC at one thread: InternImage-T's linears 1.1-1.5x faster than F.linear's
    MKL sgemm; batch-1 gemv 2-3x. ``forward(x, residual)`` returns ``residual + linear(x)``, the sum fused into the
    matmul where oneDNN runs it.
    """

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear(x, self.weight, self.bias, residual)


def unobserved(*modules: nn.Module) -> bool:
    """Whether no forward hook (a module's own, or a global one from ``register_module_forward_hook``) sees these
    modules' inputs or outputs, so a sum may be fused into their calls or written over their outputs unnoticed."""
    if _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def fusable(*modules: nn.Module) -> bool:
    """Whether work may be fused into these modules' calls: each exactly an intern2 ``Linear`` or ``GELU`` (not a
    replacement such as ``quantize_dynamic``'s) and :func:`unobserved`, so nobody sees their separate inputs and
    outputs and a fused call gives what the separate ones would."""
    return all(type(m) in (Linear, GELU) for m in modules) and unobserved(*modules)


def linear_residual(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + layer(x)``, the sum fused into the matmul where :func:`fusable` allows it."""
    if fusable(layer):
        return layer(x, residual)
    return residual + layer(x)  # not into the output: a hook may hold it


@torch.fx.wrap
def layer_norm(x: torch.Tensor, normalized_shape: Tuple[int, ...], weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """``F.layer_norm``; for bfloat16 CPU inference over the last dimension, a numba kernel that reads bfloat16 as
    it is (``ops/layer_norm_cpu.py``: 1.3-1.8x ATen's). Kept out of symbolic tracing: torch.fx records the call."""
    if (x.dtype == torch.bfloat16 and x.is_cpu and weight is not None and bias is not None
            and weight.dtype == bias.dtype == torch.bfloat16 and len(normalized_shape) == 1
            and x.dim() >= 1 and x.numel() > 0
            and type(x) in _PLAIN_TENSORS and type(weight) in _PLAIN_TENSORS and type(bias) in _PLAIN_TENSORS
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad))
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()):
        from .ops import layer_norm_cpu  # numba: imported on first use
        if x.shape[-1] <= layer_norm_cpu.MAX_WIDTH:
            return layer_norm_cpu.layer_norm_bfloat16(x, weight, bias, eps)
    return nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state dict) whose bfloat16 CPU inference runs :func:`layer_norm`'s
    kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


_FORMATS = ("channels_first", "channels_last")


def build_norm_layer(dim: int, norm_layer: str, in_format: str = "channels_last",
                     out_format: str = "channels_last", eps: float = 1e-6) -> nn.Sequential:
    """'LN' (LayerNorm over channels, run channels-last) or 'BN' (BatchNorm2d, run channels-first)."""
    if in_format not in _FORMATS or out_format not in _FORMATS:
        raise ValueError(f"in_format/out_format: expected one of {_FORMATS}, got {in_format!r}/{out_format!r}")
    layers = []
    if norm_layer == "BN":
        if in_format == "channels_last":
            layers.append(ToChannelsFirst())
        layers.append(nn.BatchNorm2d(dim))
        if out_format == "channels_last":
            layers.append(ToChannelsLast())
    elif norm_layer == "LN":
        if in_format == "channels_first":
            layers.append(ToChannelsLast())
        layers.append(LayerNorm(dim, eps=eps))
        if out_format == "channels_first":
            layers.append(ToChannelsFirst())
    else:
        raise ValueError(f"norm_layer: expected 'LN' or 'BN', got {norm_layer!r}")
    return nn.Sequential(*layers)


@torch.fx.wrap
def _gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU, in place when autograd does not need the input (kept out of symbolic tracing: fx records the call)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return nn.functional.gelu(x, approximate=approximate)
    return torch.ops.aten.gelu_(x, approximate=approximate)


@torch.fx.wrap
def residual_add(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch`` for a residual block whose ``branch`` is a fresh tensor of x's shape. When autograd does not
    need them (inference) the sum is written into ``branch``: no new buffer to allocate and fault in, and the same
    bits (float addition is commutative). Kept out of symbolic tracing: torch.fx records the call."""
    if torch.is_grad_enabled() and (x.requires_grad or branch.requires_grad):
        return x + branch
    return branch.add_(x)


class GELU(nn.GELU):
    """Exact GELU that overwrites its input when autograd does not need that input (inference), as the factory's
    ReLU and SiLU always do: on CPU the in-place pass is ~1.6x faster (no new buffer to allocate and fault in).
    Under autograd it is nn.GELU, whose backward needs the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gelu(x, self.approximate)


_ACTIVATIONS = {"ReLU": lambda: nn.ReLU(inplace=True), "SiLU": lambda: nn.SiLU(inplace=True), "GELU": GELU}


def build_act_layer(act_layer: Union[str, Callable[[], nn.Module]]) -> nn.Module:
    """'GELU', 'ReLU', 'SiLU' or a module factory."""
    if callable(act_layer):
        return act_layer()
    if act_layer not in _ACTIVATIONS:
        raise ValueError(f"act_layer: expected one of {sorted(_ACTIVATIONS)}, got {act_layer!r}")
    return _ACTIVATIONS[act_layer]()


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout: the feed-forward block of InternImage and the video ViT."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Union[str, Callable[[], nn.Module]] = "GELU",
                 drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = build_act_layer(act_layer)
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block's output, or ``residual + output`` (the sum fused into fc2 where dropout is inactive)."""
        dropout_off = self.drop.p == 0 or not self.training
        if dropout_off and fusable(self.fc1, self.act) and type(self.act) is GELU and self.act.approximate == "none":
            hidden = linear_gelu(x, self.fc1.weight, self.fc1.bias)
        else:
            hidden = self.drop(self.act(self.fc1(x)))
        if residual is None:
            return self.drop(self.fc2(hidden))
        if dropout_off:
            return linear_residual(self.fc2, hidden, residual)
        return residual_add(residual, self.drop(self.fc2(hidden)))


def check_rates(**rates: float) -> None:
    """Refuse a dropout / drop-path rate outside [0, 1) at construction, naming the field (torch would say so only
    at the first training step, or train on NaN)."""
    for name, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"{name}: expected a rate in [0, 1), got {rate!r}")


class DropPath(nn.Module):
    """Stochastic depth per sample (row mode), rescaled by 1/keep_prob."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torchvision.ops.stochastic_depth(x, self.p, "row", self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def take_indices(num_levels: int, indices: Union[None, int, Sequence[int]]) -> Tuple[int, ...]:
    """timm's level selection: None is every level, an int n the last n, a sequence those levels (negative
    counting from the end); a ValueError names what is out of range."""
    if indices is None:
        return tuple(range(num_levels))
    if isinstance(indices, int):
        if not 0 < indices <= num_levels:
            raise ValueError(f"indices: expected the number of last levels in 1..{num_levels}, got {indices}")
        return tuple(range(num_levels - indices, num_levels))
    chosen = tuple(int(i) + num_levels if int(i) < 0 else int(i) for i in indices)
    if not chosen or not all(0 <= i < num_levels for i in chosen):
        raise ValueError(f"indices {tuple(indices)}: expected level indices in [{-num_levels}, {num_levels})")
    return chosen


class FeatureInfo:
    """timm's ``FeatureInfo`` contract without timm: one dict (num_chs, reduction, module) per level; the
    accessors ``channels()``, ``reduction()``, ``module_name()`` and ``get_dicts()`` answer for the selected
    ``out_indices`` (or one position of them with ``idx``), and indexing / ``len`` address every level."""

    def __init__(self, info: List[Dict[str, Any]], out_indices: Sequence[int]):
        self.info = [dict(entry) for entry in info]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: Optional[Union[int, Sequence[int]]] = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[self.out_indices[i]][key] for i in idx]
        return self.info[self.out_indices[idx]][key]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx: Optional[int] = None) -> Any:
        chosen = [self.info[i] for i in self.out_indices] if idx is None else [self.info[self.out_indices[idx]]]
        dicts = [d if keys is None else {k: d[k] for k in keys} for d in chosen]
        return dicts if idx is None else dicts[0]

    def channels(self, idx: Optional[int] = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: Optional[int] = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: Optional[int] = None) -> Any:
        return self.get("module", idx)

    def __getitem__(self, item: int) -> Dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)
