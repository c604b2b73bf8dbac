"""InternImage (T, S, B, L, XL, H, G): the general image model of INTERN 2.0, built on DCNv3.

The module tree mirrors the official ``classification/models/intern_image.py`` state-dict keys, so official
checkpoints load strictly. Constructor keywords are the official config names (``InternImage(**official_cfg)``
builds the same model). ``features_only=True`` gives the detection/segmentation backbone: per-level NCHW maps
after the level norm and before downsampling (strides 4, 8, 16, 32), without the classification head.
"""
from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..fields import coerce, describe
from ..layers import (DropPath, FeatureInfo, Linear, Mlp, build_act_layer, build_norm_layer, check_rates, linear,
                      residual_add, take_indices, unobserved)
from ..ops import DCNv3
from ..registry import register_variant
from ..weights import fresh_head_cfg

# Symbolic tracing records calls to these (fx.wrap applies per module namespace).
torch.fx.wrap("linear")
torch.fx.wrap("residual_add")

__all__ = ["InternImage", "InternImageConfig", "checkpoint_filter_fn", "INTERNIMAGE_VARIANTS"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class InternImageConfig:
    """Architecture of one InternImage variant; field names are those of the official configs."""

    channels: int = 64
    depths: Tuple[int, ...] = (4, 4, 18, 4)
    groups: Tuple[int, ...] = (4, 8, 16, 32)
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    drop_path_type: str = "linear"
    act_layer: str = "GELU"
    norm_layer: str = "LN"
    layer_scale: Optional[float] = None
    offset_scale: float = 1.0
    post_norm: bool = False
    cls_scale: float = 1.5
    with_cp: bool = False
    dw_kernel_size: Optional[int] = None
    use_clip_projector: bool = False
    level2_post_norm: bool = False
    level2_post_norm_block_ids: Optional[Tuple[int, ...]] = None
    res_post_norm: bool = False
    center_feature_scale: bool = False
    remove_center: bool = False

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # JSON / YAML / HF configs: lists for tuples, and anything at all
            try:
                object.__setattr__(self, f.name, coerce(getattr(self, f.name), hints[f.name]))
            except TypeError:
                raise ValueError(f"{f.name}: expected {describe(hints[f.name])}, got {getattr(self, f.name)!r}") \
                    from None
        if self.channels < 1 or min(self.depths, default=0) < 1 or min(self.groups, default=0) < 1:
            raise ValueError(f"channels, depths and groups: expected positive integers, got {self.channels}, "
                             f"{self.depths}, {self.groups}")
        if len(self.depths) != len(self.groups):
            raise ValueError(f"depths {self.depths} and groups {self.groups} must have the same length")
        for i, group in enumerate(self.groups):
            if (self.channels * 2 ** i) % group:
                raise ValueError(f"groups[{i}]={group} must divide the level's channels {self.channels * 2 ** i}")
        check_rates(drop_rate=self.drop_rate, drop_path_rate=self.drop_path_rate)
        if self.drop_path_type not in ("linear", "uniform"):
            raise ValueError(f"drop_path_type: expected 'linear' or 'uniform', got {self.drop_path_type!r}")
        if self.use_clip_projector and len(self.depths) != 4:
            raise ValueError("use_clip_projector needs 4 levels")

    @classmethod
    def from_dict(cls, values: Dict) -> "InternImageConfig":
        """Build from an official or HF config dict; keys that are not architecture fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> Dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def num_features(self) -> int:
        return int(self.channels * 2 ** (len(self.depths) - 1))


class StemLayer(nn.Module):
    """Two stride-2 3x3 convs with norms: NCHW image -> NHWC features at stride 4."""

    def __init__(self, in_chans: int, out_chans: int, act_layer: str, norm_layer: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1)
        self.norm1 = build_norm_layer(out_chans // 2, norm_layer, "channels_first", "channels_first")
        self.act = build_act_layer(act_layer)
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1)
        self.norm2 = build_norm_layer(out_chans, norm_layer, "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last in: the convolutions then write NHWC, so the channel LayerNorms read contiguous rows
        # instead of first copying a transposed 112x112 map (a third of the stem's CPU time at batch 8).
        x = x.contiguous(memory_format=torch.channels_last)
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class DownsampleLayer(nn.Module):
    """NHWC -> NHWC at half resolution and twice the channels."""

    def __init__(self, channels: int, norm_layer: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.norm = build_norm_layer(2 * channels, norm_layer, "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))


class InternImageLayer(nn.Module):
    """DCNv3 + MLP residual block in one of the official layouts.

    * pre-norm (T): ``x + dcn(norm1(x))``;
    * post-norm (G): ``x + norm1(dcn(x))``;
    * res_post_norm "sandwich" (H): ``x + res_post_norm1(dcn(norm1(x)))``;
    * layer scale (S-XL cls, every det/seg backbone): ``x + gamma1 * norm1(dcn(x))`` with post-norm, else
      ``x + gamma1 * dcn(norm1(x))``; res_post_norm is ignored, as in the official code.
    """

    def __init__(self, channels: int, group: int, cfg: InternImageConfig, drop_path: float,
                 dcn_impl: Optional[str] = None):
        super().__init__()
        self.post_norm = cfg.post_norm
        self.res_post_norm = cfg.res_post_norm
        self.with_cp = cfg.with_cp
        self.norm1 = build_norm_layer(channels, "LN")
        self.dcn = DCNv3(channels, kernel_size=3, dw_kernel_size=cfg.dw_kernel_size, stride=1, pad=1, dilation=1,
                         group=group, offset_scale=cfg.offset_scale, act_layer=cfg.act_layer,
                         norm_layer=cfg.norm_layer, center_feature_scale=cfg.center_feature_scale,
                         remove_center=cfg.remove_center, impl=dcn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = build_norm_layer(channels, "LN")
        self.mlp = Mlp(channels, int(channels * cfg.mlp_ratio), cfg.act_layer, cfg.drop_rate)
        self.layer_scale = cfg.layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((channels,), float(cfg.layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((channels,), float(cfg.layer_scale)))
        if self.res_post_norm:
            self.res_post_norm1 = build_norm_layer(channels, "LN")
            self.res_post_norm2 = build_norm_layer(channels, "LN")

    def _dcn_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_scale:
            return self.gamma1 * (self.norm1(self.dcn(x)) if self.post_norm else self.dcn(self.norm1(x)))
        if self.post_norm:
            return self.norm1(self.dcn(x))
        if self.res_post_norm:
            return self.res_post_norm1(self.dcn(self.norm1(x)))
        return self.dcn(self.norm1(x))

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_scale:
            return self.gamma2 * (self.norm2(self.mlp(x)) if self.post_norm else self.mlp(self.norm2(x)))
        if self.post_norm:
            return self.norm2(self.mlp(x))
        if self.res_post_norm:
            return self.res_post_norm2(self.mlp(self.norm2(x)))
        return self.mlp(self.norm2(x))

    def _branches_unobserved(self) -> bool:
        """Whether no forward hook sees a module whose output is (or passes on) a residual branch: the DCNv3 and
        MLP modules and their last linears, the norms and the drop path. Only then may the sums be fused into
        those outputs or written over them; a hooked block adds out of place, so every hook sees what the
        official code computes."""
        children = self._modules  # direct: nn.Module.__getattr__ would make this check ~3x as slow
        names = ("dcn", "mlp", "drop_path", "norm1", "norm2") + (
            ("res_post_norm1", "res_post_norm2") if self.res_post_norm else ())
        modules = [children["dcn"]._modules["output_proj"], children["mlp"]._modules["fc2"]]
        for name in names:
            modules.append(children[name])
            if isinstance(children[name], nn.Sequential):  # a norm: its layers pass the output on
                modules.extend(children[name]._modules.values())
        return unobserved(*modules)

    def _residuals(self, x: torch.Tensor) -> torch.Tensor:
        if not self._branches_unobserved():
            x = x + self.drop_path(self._dcn_branch(x))
            return x + self.drop_path(self._mlp_branch(x))
        plain = not (self.layer_scale or self.post_norm or self.res_post_norm)
        if plain and (isinstance(self.drop_path, nn.Identity) or not self.training):  # sums fused into the last linears
            x = self.dcn(self.norm1(x), residual=x)
            return self.mlp(self.norm2(x), residual=x)
        x = residual_add(x, self.drop_path(self._dcn_branch(x)))
        return residual_add(x, self.drop_path(self._mlp_branch(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return checkpoint(self._residuals, x, use_reentrant=False)
        return self._residuals(x)


class InternImageBlock(nn.Module):
    """One level: ``depth`` layers, optional extra post norms after given blocks, level norm, downsample."""

    def __init__(self, channels: int, depth: int, group: int, cfg: InternImageConfig, drop_path: Sequence[float],
                 downsample: bool, post_norm_block_ids: Optional[Tuple[int, ...]], dcn_impl: Optional[str]):
        super().__init__()
        self.blocks = nn.ModuleList(
            InternImageLayer(channels, group, cfg, drop_path[i], dcn_impl) for i in range(depth))
        self.has_norm = not cfg.post_norm or cfg.center_feature_scale
        if self.has_norm:
            self.norm = build_norm_layer(channels, "LN")
        self.post_norm_block_ids = post_norm_block_ids
        if post_norm_block_ids is not None:
            self.post_norms = nn.ModuleList(build_norm_layer(channels, "LN") for _ in post_norm_block_ids)
        self.downsample = DownsampleLayer(channels, cfg.norm_layer) if downsample else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (output after downsample, NHWC features before downsample)."""
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.post_norm_block_ids is not None and i in self.post_norm_block_ids:
                x = self.post_norms[self.post_norm_block_ids.index(i)](x)
        if self.has_norm:
            x = self.norm(x)
        return (self.downsample(x) if self.downsample is not None else x), x


class CrossAttention(nn.Module):
    """Multi-head cross attention with separate q/k/v biases (official clip-projector naming)."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim, bias=False)
        self.k = Linear(dim, dim, bias=False)
        self.v = Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def heads(t: torch.Tensor, layer: nn.Linear, bias: torch.Tensor) -> torch.Tensor:
            b, n, _ = t.shape
            return linear(t, layer.weight, bias).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(heads(x, self.q, self.q_bias), heads(k, self.k, self.k_bias),
                                             heads(v, self.v, self.v_bias))
        return self.proj(out.transpose(1, 2).flatten(2))


class AttentionPoolingBlock(nn.Module):
    """Attention pooling: the mean token queries all tokens (InternImage-H/G clip projector)."""

    def __init__(self, dim: int, num_heads: int, out_dim: int, norm_layer: str):
        super().__init__()
        self.norm1_q = build_norm_layer(dim, norm_layer)
        self.norm1_k = build_norm_layer(dim, norm_layer)
        self.norm1_v = build_norm_layer(dim, norm_layer)
        self.cross_dcn = CrossAttention(dim, num_heads, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.norm1_q(x.mean(1, keepdim=True))
        return self.cross_dcn(query, self.norm1_k(x), self.norm1_v(x)).squeeze(1)


@torch.fx.wrap
def _check_input(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """The input check, kept out of symbolic tracing (torch.fx records the call instead of its branches)."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"InternImage input: expected (N, {in_chans}, H, W), got {tuple(x.shape)}")
    return x


class InternImage(nn.Module):
    """InternImage image classifier / dense-prediction backbone, with timm's model contract.

    Keyword arguments are the fields of :class:`InternImageConfig` (the official config names), plus:

    Args:
        in_chans: input image channels (official weights adapt to it on load, as timm does).
        global_pool: 'avg' (the official head) or '' (no pooling: with ``num_classes=0`` the model returns the
            head's unpooled map, or for the clip-projector head of H/G the fused level-2/3 map).
        features_only: build the det/seg backbone (no head); forward returns a list of NCHW maps.
        out_indices: levels returned when ``features_only`` (timm's forms: a sequence, negatives from the end,
            or an int n for the last n levels).
        feature_cls: accepted as timm passes it ('getter', 'fx', 'hook' or None all give the same native
            list of maps).
        dcn_impl: DCNv3 core implementation for every layer (None: best for the device).
        core_op: accepted for official configs ('DCNv3' or 'DCNv3_pytorch'; both compute the same function).

    ``num_features`` is the channel count of :meth:`forward_features` (for H/G, whose head pools the fused
    level-2/3 map at stride 16, 1024: the official logits are unchanged) and ``head_hidden_size`` that of
    ``forward_head(x, pre_logits=True)``. TorchScript is not supported (the DCNv3 core is a ``torch.library``
    custom op): ``torch.jit.script`` refuses with a message; ``torch.compile``, ``torch.export``, ONNX export and
    ``torch.fx`` (the input checks are wrapped leaves) work.
    """

    # Head modules (absent in the det/seg backbone).
    HEAD_PREFIXES = ("conv_head.", "head.", "dcnv3_head_x4.", "dcnv3_head_x3.", "clip_projector.", "fc_norm.")
    CLIP_DIM, CLIP_HEADS, CLIP_OUT_DIM = 1024, 16, 768  # fixed in the official code
    FEATURE_CLASSES = (None, "getter", "fx", "hook")

    def __init__(self, *, in_chans: int = 3, global_pool: str = "avg", features_only: bool = False,
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3), feature_cls: Optional[str] = None,
                 dcn_impl: Optional[str] = None, core_op: str = "DCNv3", **config):
        super().__init__()
        if core_op not in ("DCNv3", "DCNv3_pytorch"):
            raise ValueError(f"core_op: expected 'DCNv3' or 'DCNv3_pytorch', got {core_op!r}")
        if feature_cls not in self.FEATURE_CLASSES:
            raise ValueError(f"feature_cls: expected one of {list(self.FEATURE_CLASSES)}, got {feature_cls!r}")
        known = {f.name for f in dataclasses.fields(InternImageConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"InternImage got unknown config keys {unknown}; valid keys: {sorted(known)}")
        cfg = InternImageConfig(**config)
        self.config = cfg
        self.in_chans = in_chans
        self.features_only = features_only
        self.num_levels = len(cfg.depths)
        self.out_indices = take_indices(self.num_levels, out_indices) if features_only else tuple(
            range(self.num_levels))
        levels = [dict(num_chs=cfg.channels * 2 ** i, reduction=4 * 2 ** i, module=f"levels.{i}")
                  for i in range(self.num_levels)]
        # timm: a features_only model's FeatureInfo (selected levels), a classifier's plain list of every level
        self.feature_info = FeatureInfo(levels, self.out_indices) if features_only else levels

        self.patch_embed = StemLayer(in_chans, cfg.channels, cfg.act_layer, cfg.norm_layer)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        total = sum(cfg.depths)
        dpr = (torch.linspace(0, cfg.drop_path_rate, total, device="cpu").tolist() if cfg.drop_path_type == "linear"
               else [cfg.drop_path_rate] * total)
        self.levels = nn.ModuleList()
        for i, (depth, group) in enumerate(zip(cfg.depths, cfg.groups)):
            start = sum(cfg.depths[:i])
            self.levels.append(InternImageBlock(
                cfg.channels * 2 ** i, depth, group, cfg, dpr[start:start + depth],
                downsample=i < self.num_levels - 1,
                post_norm_block_ids=cfg.level2_post_norm_block_ids if cfg.level2_post_norm and i == 2 else None,
                dcn_impl=dcn_impl))
        self.num_classes = 0 if features_only else cfg.num_classes
        self.num_features = self.CLIP_DIM if cfg.use_clip_projector else cfg.num_features
        self.global_pool = self._check_pool(global_pool, self.num_classes)
        if not features_only:
            self._build_head(cfg)
        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, DCNv3):
                module.reset_parameters()

    def _build_head(self, cfg: InternImageConfig) -> None:
        last = cfg.num_features
        if cfg.use_clip_projector:
            self.dcnv3_head_x4 = nn.Sequential(nn.Conv2d(last, self.CLIP_DIM * 4, 1), nn.PixelShuffle(2))
            self.dcnv3_head_x3 = nn.Conv2d(last // 2, self.CLIP_DIM, 1)
            self.clip_projector = AttentionPoolingBlock(self.CLIP_DIM, self.CLIP_HEADS, self.CLIP_OUT_DIM,
                                                        cfg.norm_layer)
            self.fc_norm = build_norm_layer(self.CLIP_OUT_DIM, cfg.norm_layer)
            self.head_hidden_size = self.CLIP_OUT_DIM
        else:
            self.head_hidden_size = int(last * cfg.cls_scale)
            self.conv_head = nn.Sequential(
                nn.Conv2d(last, self.head_hidden_size, 1, bias=False),
                build_norm_layer(self.head_hidden_size, "BN", "channels_first", "channels_first"),
                build_act_layer(cfg.act_layer))
        self.head = Linear(self.head_hidden_size, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

    @staticmethod
    def _check_pool(global_pool: str, num_classes: int) -> str:
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool: expected 'avg' or '' (no pooling), got {global_pool!r}")
        if not global_pool and num_classes:
            raise ValueError(f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}")
        return global_pool

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Used by :func:`intern2.load_checkpoint` to adapt official layouts."""
        return checkpoint_filter_fn(state_dict, self)

    def export_config(self) -> Dict:
        """Everything :func:`intern2.from_pretrained` needs to rebuild this model."""
        return dict(self.config.to_dict(), num_classes=self.num_classes if not self.features_only else
                    self.config.num_classes, in_chans=self.in_chans, global_pool=self.global_pool,
                    features_only=self.features_only, out_indices=list(self.out_indices))

    @property
    def default_cfg(self) -> Dict:
        """timm's older name of ``pretrained_cfg``."""
        return self.pretrained_cfg

    def __prepare_scriptable__(self):
        raise RuntimeError("InternImage cannot be compiled by torch.jit.script: its DCNv3 core is a torch.library "
                           "custom op with Python checks. Use torch.compile, torch.export or intern2 export onnx.")

    # ---------------------------------------------------------------------------------------------- timm surface
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for level in self.levels:
            for block in level.blocks:
                block.with_cp = enable

    def group_matcher(self, coarse: bool = False) -> Dict:
        """timm's parameter groups (layer-wise lr decay, freezing): the stem, then each level (coarse) or each
        block, with a level's norms and downsample after its last block; the head is last."""
        return dict(stem=r"^patch_embed", blocks=r"^levels\.(\d+)" if coarse else [
            (r"^levels\.(\d+)\.blocks\.(\d+)", None),
            (r"^levels\.(\d+)\.(?:norm|post_norms|downsample)", (99999,))])

    def fsdp_units(self) -> List[nn.Module]:
        """Modules to wrap with FSDP2 ``fully_shard`` one by one (each residual block)."""
        return [block for level in self.levels for block in level.blocks]

    @property
    def num_layer_ids(self) -> int:
        return sum(self.config.depths) + 2

    def layer_id(self, name: str) -> int:
        """Depth index for layer-wise lr decay: stem 0, residual blocks 1..sum(depths) in order, a level's norms
        and downsample with its last block, the head last."""
        if name.startswith("patch_embed."):
            return 0
        if name.startswith("levels."):
            parts = name.split(".")
            level = int(parts[1])
            before = sum(self.config.depths[:level])
            block = int(parts[3]) if parts[2] == "blocks" else self.config.depths[level] - 1
            return before + block + 1
        return self.num_layer_ids - 1

    def no_weight_decay(self) -> set:
        """Parameter names exempt from weight decay beyond the usual 1-D tensors (none for InternImage)."""
        return set()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the last Linear by a fresh one with ``num_classes`` outputs (0: identity); ``global_pool``
        'avg' or '' (no pooling, with 0 classes) as timm's."""
        if self.features_only:
            raise ValueError("reset_classifier: a features_only backbone has no classifier")
        self.global_pool = self._check_pool(self.global_pool if global_pool is None else global_pool, num_classes)
        self.num_classes = num_classes
        self.head = Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)
        self.pretrained_cfg = fresh_head_cfg(getattr(self, "pretrained_cfg", {}), num_classes)

    def _levels(self, x: torch.Tensor, stop: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run the stem and levels 0..stop; returns (last output, per-level NHWC maps before downsampling)."""
        x = self.pos_drop(self.patch_embed(_check_input(x, self.in_chans)))
        maps = []
        for level in self.levels[:stop + 1]:
            x, before_downsample = level(x)
            maps.append(before_downsample)
        return x, maps

    def _fused(self, maps: List[torch.Tensor]) -> torch.Tensor:
        """What the head consumes from every level's map: the last level (NCHW), or for the clip-projector head
        the fused level-2/3 map (N, 1024, H/16, W/16)."""
        if self.config.use_clip_projector and hasattr(self, "dcnv3_head_x4"):
            return self.dcnv3_head_x4(maps[3].permute(0, 3, 1, 2)) + self.dcnv3_head_x3(maps[2].permute(0, 3, 1, 2))
        return maps[-1].permute(0, 3, 1, 2)

    def forward_intermediates(self, x: torch.Tensor, indices: Union[None, int, Sequence[int]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's contract: the per-level NCHW maps (after the level norm, before downsampling) of ``indices``
        (None: all; int n: the last n; negatives from the end), and unless ``intermediates_only`` the final
        features first, ``(final, intermediates)``. ``stop_early`` skips the levels after the last one asked for
        (the final features are then that level's map). ``norm`` is accepted: the maps are already normalised."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt: InternImage gives 'NCHW' maps, got {output_fmt!r}")
        chosen = take_indices(len(self.levels), indices)
        stop = max(chosen) if stop_early or intermediates_only else len(self.levels) - 1
        _, maps = self._levels(x, stop)
        intermediates = [maps[i].permute(0, 3, 1, 2).contiguous() for i in chosen]
        if intermediates_only:
            return intermediates
        final = self._fused(maps) if stop == self.num_levels - 1 else maps[stop].permute(0, 3, 1, 2).contiguous()
        return final, intermediates

    def prune_intermediate_layers(self, indices: Union[None, int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's contract: drop the levels after the last of ``indices`` and (with ``prune_head``) the head, so
        that ``forward_intermediates`` computes no more than it returns and ``forward`` gives the last kept
        level's map; returns the indices."""
        chosen = take_indices(len(self.levels), indices)
        self.levels = self.levels[:max(chosen) + 1]
        if prune_head:
            for name in ("conv_head", "dcnv3_head_x4", "dcnv3_head_x3", "clip_projector", "fc_norm"):
                if hasattr(self, name):
                    delattr(self, name)
            self.reset_classifier(0, "")
            self.num_features = self.head_hidden_size = self.feature_info[len(self.levels) - 1]["num_chs"]
        return list(chosen)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features the head consumes, ``num_features`` channels: the last level's NCHW map (stride
        32), or for the clip-projector head the fused level-2/3 map (stride 16)."""
        if self.features_only:
            raise ValueError("forward_features: a features_only backbone returns its maps from forward()")
        _, maps = self._levels(x, self.num_levels - 1)
        return self._fused(maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.config.use_clip_projector:
            if not self.global_pool or not hasattr(self, "clip_projector"):  # no pooling, or a pruned head
                return x
            x = self.fc_norm(self.clip_projector(x.flatten(2).transpose(1, 2)))
        else:
            x = self.conv_head(x) if hasattr(self, "conv_head") else x
            if not self.global_pool:
                return x
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.features_only:
            _, maps = self._levels(x, max(self.out_indices))
            return [maps[i].permute(0, 3, 1, 2).contiguous() for i in self.out_indices]
        return self.forward_head(self.forward_features(x))


def _strip_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmdet/mmseg files keep the backbone under 'backbone.' beside the heads (intern2's torchvision Mask R-CNN
    under 'backbone.body.'); OpenGVLab's HF-hub folders prefix every key with 'model.'; distillation checkpoints
    with 'student.'."""
    if any(k.startswith("backbone.body.") for k in state_dict):
        return {k[len("backbone.body."):]: v for k, v in state_dict.items() if k.startswith("backbone.body.")}
    if any(k.startswith("backbone.") for k in state_dict):
        return {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    for prefix in ("model.", "student."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: InternImage) -> Dict[str, torch.Tensor]:
    """Adapt an official InternImage state dict (classification, det/seg or HF-hub layout) to ``model``.

    * prefixes are stripped ('backbone.' of mmcv files, 'model.' of HF-hub folders, 'student.');
    * a features_only backbone drops the classification head keys;
    * layer-scale models loaded from checkpoints without ``gamma`` keys (the det/seg T backbone fine-tuned
      from the ImageNet T weights) get gamma = 1.0, the identity, as the official det code does.
    """
    out = _strip_prefixes(state_dict)
    if model.features_only:
        dropped = [k for k in out if k.startswith(InternImage.HEAD_PREFIXES)]
        for key in dropped:
            del out[key]
        if dropped:
            log.info("features_only backbone: ignoring %d classification-head keys of the checkpoint", len(dropped))
    model_keys = model.state_dict()
    missing_gamma = [k for k in model_keys if k.rsplit(".", 1)[-1] in ("gamma1", "gamma2") and k not in out]
    if missing_gamma and len(missing_gamma) == sum(k.endswith((".gamma1", ".gamma2")) for k in model_keys):
        log.info("checkpoint has no layer-scale gamma keys: setting %d gammas to 1.0 (identity)", len(missing_gamma))
        for key in missing_gamma:
            out[key] = torch.ones_like(model_keys[key], device="cpu")
    return out


# ------------------------------------------------------------------------------------------------ variants
# The official architecture of each variant; its pretrained tags (files, protocols, labels) are in intern2.weights.
INTERNIMAGE_VARIANTS: Dict[str, InternImageConfig] = {
    "internimage_t": InternImageConfig(64, (4, 4, 18, 4), (4, 8, 16, 32), drop_path_rate=0.1),
    "internimage_s": InternImageConfig(80, (4, 4, 21, 4), (5, 10, 20, 40), drop_path_rate=0.4, layer_scale=1e-5,
                                       post_norm=True),
    "internimage_b": InternImageConfig(112, (4, 4, 21, 4), (7, 14, 28, 56), drop_path_rate=0.5, layer_scale=1e-5,
                                       post_norm=True),
    "internimage_l": InternImageConfig(160, (5, 5, 22, 5), (10, 20, 40, 80), drop_path_rate=0.1, layer_scale=1e-5,
                                       offset_scale=2.0, post_norm=True),
    "internimage_xl": InternImageConfig(192, (5, 5, 24, 5), (12, 24, 48, 96), drop_path_rate=0.2,
                                        layer_scale=1e-5, offset_scale=2.0, post_norm=True),
    "internimage_h": InternImageConfig(320, (6, 6, 32, 6), (10, 20, 40, 80), drop_path_rate=0.2,
                                       dw_kernel_size=5, res_post_norm=True, level2_post_norm=True,
                                       level2_post_norm_block_ids=(5, 11, 17, 23, 29), center_feature_scale=True,
                                       use_clip_projector=True),
    "internimage_g": InternImageConfig(512, (2, 2, 48, 4), (16, 32, 64, 128), drop_path_rate=0.4,
                                       post_norm=True, dw_kernel_size=5, level2_post_norm=True,
                                       level2_post_norm_block_ids=tuple(range(5, 48, 6)),
                                       center_feature_scale=True, use_clip_projector=True),
}

for _name, _cfg in INTERNIMAGE_VARIANTS.items():
    register_variant(_name, lambda kwargs, _cfg=_cfg: InternImage(**{**_cfg.to_dict(), **kwargs}),
                     f"{_name} with the official configuration; kwargs override config fields.")
