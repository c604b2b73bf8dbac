"""The InternVideo video ViT (VideoMAE v1/v2): classifier, masked pre-training model, masks and pixel targets.

Parameter names and constructor keywords are the official ones (MCG-NJU/VideoMAE, OpenGVLab/VideoMAEv2), so released
checkpoints load without renaming; HF transformers VideoMAE checkpoints are converted in both directions.

Layout: video (B, C, T, H, W); tokens are the Conv3d tubelet output flattened t-major, n = t*(Hp*Wp) + h*Wp + w.
Masks are bool (B, N), True = masked (hidden from the encoder), with the same count in every sample.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..layers import DropPath, LayerNorm, Linear, Mlp, check_rates, linear
from ..registry import register_variant
from ..weights import fresh_head_cfg, hf_label_names

torch.fx.wrap("linear")  # symbolic tracing records calls to it (fx.wrap applies per module namespace)

__all__ = ["VideoViT", "VideoMAEPretrain", "clip_cfg", "keep_visible", "sinusoid_table", "resize_pos_embed",
           "tube_mask", "running_cell_mask", "pixel_targets", "videomae_loss", "official_to_hf", "hf_to_official",
           "config_from_hf", "classifier_config", "VIDEO_VIT_VARIANTS", "HF_VIDEOMAE_ARCHITECTURES"]

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------------ position tables
def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """The official fixed 1-D table over all tokens, (1, N, D): angle pos / 10000^(2*(j//2)/D), sin on even
    columns and cos on odd ones (computed in float64, as the official numpy code does, then cast)."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim
    angles = position / torch.pow(10000.0, exponent)[None]
    table = torch.empty_like(angles)
    table[:, 0::2] = angles[:, 0::2].sin()
    table[:, 1::2] = angles[:, 1::2].cos()
    return table.float()[None]


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Resample a (1, T*H*W, D) table from ``old_grid`` (T, H, W) to ``new_grid``: bicubic over space per frame
    (as official fine-tuning does for other resolutions), then linear over time (other frame counts)."""
    (t0, h0, w0), (t1, h1, w1) = tuple(old_grid), tuple(new_grid)
    if (t0, h0, w0) == (t1, h1, w1):
        return pos_embed
    dim = pos_embed.shape[-1]
    x = pos_embed.reshape(t0, h0, w0, dim).permute(0, 3, 1, 2).float()
    if (h0, w0) != (h1, w1):
        x = F.interpolate(x, size=(h1, w1), mode="bicubic", align_corners=False)
    if t0 != t1:
        x = x.permute(2, 3, 1, 0).reshape(1, h1 * w1 * dim, t0)
        x = F.interpolate(x, size=t1, mode="linear", align_corners=False)
        x = x.reshape(h1, w1, dim, t1).permute(3, 2, 0, 1)
    return x.permute(0, 2, 3, 1).reshape(1, t1 * h1 * w1, dim).to(pos_embed.dtype)


# ------------------------------------------------------------------------------------------------ layers
class PatchEmbed(nn.Module):
    """Tubelet embedding: Conv3d with kernel = stride = (tubelet, P, P)."""

    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.proj = nn.Conv3d(in_chans, embed_dim, (tubelet_size, patch_size, patch_size),
                              stride=(tubelet_size, patch_size, patch_size))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])


class Attention(nn.Module):
    """BEiT-style attention: qkv Linear without bias plus learnable q and v biases (the key bias is fixed 0)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = linear(x, self.qkv.weight, bias).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # SDPA picks flash / memory-efficient kernels and never materialises the (N, N) matrix where it can.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, tokens, dim)))


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale (``gamma_1``/``gamma_2``, official names)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: float, init_values: float, norm_eps: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), "GELU", drop)
        if init_values > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    for block in blocks:
        if grad_checkpointing and x.requires_grad:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def _init_classifier_weights(module: nn.Module) -> None:
    """Official fine-tuning init: truncated-normal (0.02) Linear weights, zero biases, unit LayerNorms."""
    _init_weights(module, lambda w: nn.init.trunc_normal_(w, std=0.02))


def _init_pretrain_weights(module: nn.Module) -> None:
    """Official pre-training init: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    _init_weights(module, nn.init.xavier_uniform_)


def _init_weights(module: nn.Module, init_linear) -> None:
    if isinstance(module, nn.Linear):
        init_linear(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------------------------ classifier / encoder
class VideoViT(nn.Module):
    """Video ViT: tubelet embedding, position table, pre-norm blocks, pooling and a linear head.

    ``use_mean_pooling``: feature = fc_norm(mean of tokens) (``norm`` is the identity); otherwise
    feature = norm(tokens)[:, 0] (the first patch token; there is no class token). With ``num_classes=0`` and
    no mean pooling this is the VideoMAE pre-training encoder (``forward_features(video, mask)``).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 400,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, fc_drop_rate: float = 0.0, init_values: float = 0.0,
                 use_learnable_pos_emb: bool = False, init_scale: float = 0.001, all_frames: int = 16,
                 tubelet_size: int = 2, use_mean_pooling: bool = True, norm_eps: float = 1e-6,
                 fc_norm_eps: Optional[float] = None):
        super().__init__()
        if img_size % patch_size or all_frames % tubelet_size:
            raise ValueError(f"VideoViT: img_size {img_size} must be a multiple of patch_size {patch_size} and "
                             f"all_frames {all_frames} of tubelet_size {tubelet_size}")
        check_rates(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                    fc_drop_rate=fc_drop_rate)
        if embed_dim % num_heads:
            raise ValueError(f"VideoViT: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                           drop_path_rate=drop_path_rate, fc_drop_rate=fc_drop_rate, init_values=init_values,
                           use_learnable_pos_emb=use_learnable_pos_emb, init_scale=init_scale,
                           all_frames=all_frames, tubelet_size=tubelet_size, use_mean_pooling=use_mean_pooling,
                           norm_eps=norm_eps, fc_norm_eps=fc_norm_eps)
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.grid = (all_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        num_tokens = math.prod(self.grid)
        self.patch_embed = PatchEmbed(patch_size, tubelet_size, in_chans, embed_dim)
        if use_learnable_pos_emb:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            # A fixed function of the token count: not saved (absent from official checkpoints too).
            self.register_buffer("pos_embed", sinusoid_table(num_tokens, embed_dim), persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                          rates[i], init_values, norm_eps) for i in range(depth))
        self.norm = nn.Identity() if use_mean_pooling else LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = LayerNorm(embed_dim, eps=norm_eps if fc_norm_eps is None else fc_norm_eps) \
            if use_mean_pooling else None
        self.fc_dropout = nn.Dropout(fc_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.apply(_init_classifier_weights)
        self._scale_head()

    def _scale_head(self) -> None:
        """Near-zero initial logits: the head scaled by ``init_scale`` (the official fine-tuning default 0.001)."""
        if self.num_classes > 0:
            with torch.no_grad():
                self.head.weight.mul_(self.config["init_scale"])
                self.head.bias.mul_(self.config["init_scale"])

    # ------------------------------------------------------------------------------------------ timm surface
    def export_config(self) -> Dict:
        """Everything :func:`intern2.from_pretrained` needs to rebuild this model."""
        return dict(self.config, num_classes=self.num_classes)

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Used by :func:`intern2.load_checkpoint` to adapt official, pre-training and HF layouts."""
        return checkpoint_filter_fn(state_dict, self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def fsdp_units(self) -> List[nn.Module]:
        return list(self.blocks)

    @property
    def num_layer_ids(self) -> int:
        return len(self.blocks) + 2

    def layer_id(self, name: str) -> int:
        """Depth index for layer-wise lr decay: embeddings 0, block i -> i + 1, norms and head last."""
        if name.startswith(("patch_embed.", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layer_ids - 1

    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a fresh Linear with ``num_classes`` outputs (0: identity), initialised as when built."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_classifier_weights)
        self._scale_head()
        self.pretrained_cfg = fresh_head_cfg(getattr(self, "pretrained_cfg", {}), num_classes)

    # ------------------------------------------------------------------------------------------ forward
    def _check_input(self, video: torch.Tensor) -> None:
        in_chans = self.patch_embed.proj.in_channels
        if video.dim() != 5 or video.shape[1] != in_chans:
            raise ValueError(f"VideoViT input: expected (B, {in_chans}, T, H, W), got {tuple(video.shape)}")
        t, p = self.patch_embed.tubelet_size, self.patch_embed.patch_size
        if video.shape[2] % t or video.shape[3] % p or video.shape[4] % p:
            raise ValueError(f"VideoViT input {tuple(video.shape)}: frames must be a multiple of the tubelet size "
                             f"{t} and height/width multiples of the patch size {p}")

    def pos_embed_for(self, grid: Sequence[int]) -> torch.Tensor:
        """The position table for a token grid (T', H', W'), resampled when it differs from the built one."""
        return resize_pos_embed(self.pos_embed, self.grid, grid)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """Tokens with position embedding, (B, N, D)."""
        self._check_input(video)
        x, grid = self.patch_embed(video)
        return x + self.pos_embed_for(grid).to(x.dtype)

    def forward_features(self, video: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token features after ``norm``: all tokens, or with ``mask`` (bool (B, N), True = hidden) only the
        visible ones in ascending token order, (B, N_visible, D)."""
        x = self.embed(video)
        if mask is not None:
            x = keep_visible(x, mask)
        x = _run_blocks(self.blocks, self.pos_drop(x), self.grad_checkpointing)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(x.mean(1)) if self.fc_norm is not None else x[:, 0]
        return x if pre_logits else self.head(self.fc_dropout(x))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(video))


def keep_visible(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x[~mask]`` reshaped to (B, N_visible, D); every sample must hide the same number of tokens."""
    if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor of shape {tuple(x.shape[:2])}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    return x[~mask].reshape(x.shape[0], -1, x.shape[-1])


# ------------------------------------------------------------------------------------------------ pre-training
class VideoMAEDecoder(nn.Module):
    """Decoder blocks, norm and the pixel head applied to the last ``return_token_num`` tokens."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, num_classes: int, mlp_ratio: float,
                 qkv_bias: bool, drop_path_rate: float, init_values: float, norm_eps: float,
                 final_norm_eps: Optional[float] = None):
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, 0.0, 0.0, rates[i],
                                          init_values, norm_eps) for i in range(depth))
        self.norm = LayerNorm(embed_dim, eps=norm_eps if final_norm_eps is None else final_norm_eps)
        self.head = nn.Linear(embed_dim, num_classes)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, return_token_num: int) -> torch.Tensor:
        x = _run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.head(self.norm(x[:, -return_token_num:]))


class VideoMAEPretrain(nn.Module):
    """VideoMAE masked autoencoder (v1 tube masking; v2 dual masking through ``decode_mask``).

    ``model(video, mask)`` predicts every masked token; ``model(video, mask, decode_mask)`` (VideoMAEv2) predicts
    the tokens where ``decode_mask`` is False, each through a mask token even when the encoder saw it. Predictions
    are in ascending token order, (B, N_decoded, decoder_num_classes).

    Beyond the official keywords, for HF transformers' ``VideoMAEForPreTraining`` layouts: ``decoder_mlp_ratio``
    (HF's ``decoder_intermediate_size``; default ``mlp_ratio``), ``encoder_norm`` (False: no final encoder norm,
    HF's ``use_mean_pooling=True``) and ``decoder_norm_eps`` (HF's decoder norm keeps LayerNorm's 1e-5).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, encoder_in_chans: int = 3,
                 encoder_embed_dim: int = 768, encoder_depth: int = 12, encoder_num_heads: int = 12,
                 decoder_num_classes: Optional[int] = None, decoder_embed_dim: int = 384, decoder_depth: int = 4,
                 decoder_num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, init_values: float = 0.0, use_learnable_pos_emb: bool = False,
                 tubelet_size: int = 2, all_frames: int = 16, norm_eps: float = 1e-6,
                 decoder_mlp_ratio: Optional[float] = None, encoder_norm: bool = True,
                 decoder_norm_eps: Optional[float] = None):
        super().__init__()
        pixels_per_token = encoder_in_chans * tubelet_size * patch_size ** 2
        decoder_num_classes = decoder_num_classes or pixels_per_token
        if decoder_num_classes != pixels_per_token:
            raise ValueError(f"VideoMAEPretrain: decoder_num_classes {decoder_num_classes} must equal "
                             f"in_chans*tubelet*patch^2 = {pixels_per_token} (one pixel target per value)")
        self.config = dict(img_size=img_size, patch_size=patch_size, encoder_in_chans=encoder_in_chans,
                           encoder_embed_dim=encoder_embed_dim, encoder_depth=encoder_depth,
                           encoder_num_heads=encoder_num_heads, decoder_num_classes=decoder_num_classes,
                           decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                           decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           drop_path_rate=drop_path_rate, init_values=init_values,
                           use_learnable_pos_emb=use_learnable_pos_emb, tubelet_size=tubelet_size,
                           all_frames=all_frames, norm_eps=norm_eps, decoder_mlp_ratio=decoder_mlp_ratio,
                           encoder_norm=encoder_norm, decoder_norm_eps=decoder_norm_eps)
        self.encoder = VideoViT(img_size=img_size, patch_size=patch_size, in_chans=encoder_in_chans, num_classes=0,
                                embed_dim=encoder_embed_dim, depth=encoder_depth, num_heads=encoder_num_heads,
                                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
                                init_values=init_values, use_learnable_pos_emb=use_learnable_pos_emb,
                                all_frames=all_frames, tubelet_size=tubelet_size, use_mean_pooling=False,
                                norm_eps=norm_eps)
        if not encoder_norm:
            self.encoder.norm = nn.Identity()
        self.decoder = VideoMAEDecoder(decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_num_classes,
                                       decoder_mlp_ratio or mlp_ratio, qkv_bias, drop_path_rate, init_values, norm_eps,
                                       decoder_norm_eps)
        self.encoder_to_decoder = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("pos_embed", sinusoid_table(math.prod(self.encoder.grid), decoder_embed_dim),
                             persistent=False)
        self.apply(_init_pretrain_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def grid(self) -> Tuple[int, int, int]:
        return self.encoder.grid

    def export_config(self) -> Dict:
        return dict(self.config)

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def fsdp_units(self) -> List[nn.Module]:
        return list(self.encoder.blocks) + list(self.decoder.blocks)

    def no_weight_decay(self) -> set:
        return {"mask_token", "encoder.pos_embed"}

    def forward(self, video: torch.Tensor, mask: torch.Tensor,
                decode_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x_vis = self.encoder_to_decoder(self.encoder.forward_features(video, mask))
        batch, _, dim = x_vis.shape
        grid = tuple(s // p for s, p in zip(video.shape[2:], (self.encoder.patch_embed.tubelet_size,
                                                               self.encoder.patch_embed.patch_size,
                                                               self.encoder.patch_embed.patch_size)))
        pos = resize_pos_embed(self.pos_embed, self.grid, grid).to(x_vis.dtype).expand(batch, -1, -1)
        decoded = mask if decode_mask is None else ~decode_mask
        pos_vis = keep_visible(pos, mask)
        pos_dec = keep_visible(pos, ~decoded)
        x = torch.cat([x_vis + pos_vis, self.mask_token.to(x_vis.dtype) + pos_dec], dim=1)
        return self.decoder(x, pos_dec.shape[1])


# ------------------------------------------------------------------------------------------------ masks
def tube_mask(batch: int, grid: Sequence[int], ratio: float = 0.9, generator: Optional[torch.Generator] = None,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """VideoMAE tube masking: ``int(ratio * H*W)`` spatial positions hidden per sample, the same in every
    temporal slice. bool (B, T*H*W), True = masked; drawn with ``generator`` on ``device``."""
    frames, height, width = grid
    spatial = height * width
    num_masked = int(ratio * spatial)
    if not 0 <= num_masked < spatial:
        raise ValueError(f"tube_mask: ratio {ratio} leaves no visible token on a {height}x{width} grid")
    order = torch.rand(batch, spatial, generator=generator, device=device).argsort(dim=1)
    per_frame = order < num_masked  # a uniformly random subset of num_masked positions
    return per_frame[:, None, :].expand(batch, frames, spatial).reshape(batch, -1)


def running_cell_mask(batch: int, grid: Sequence[int], ratio: float = 0.5,
                      generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """VideoMAEv2 decoder ("running cell") masking: a 2x2 cell holding ``int(4*ratio)`` masked slots shifts by
    one slot per frame and is tiled over the frame. bool (B, T*H*W), True = NOT reconstructed; one of four
    start phases per sample."""
    frames, height, width = grid
    num_masked = int(4 * ratio)
    if not 0 < num_masked < 4 or height % 2 or width % 2:
        raise ValueError(f"running_cell_mask: needs 0 < int(4*ratio) < 4 and an even grid, got ratio {ratio}, "
                         f"grid {tuple(grid)}")
    queue = torch.arange(4, device=device) < num_masked
    phase = torch.randint(4, (batch,), generator=generator, device=device)
    # At frame t the cell reads queue[(slot + phase + t + 1) % 4] for its four slots in row-major order.
    shift = phase[:, None, None] + torch.arange(1, frames + 1, device=device)[None, :, None]
    cells = queue[(torch.arange(4, device=device)[None, None, :] + shift) % 4]  # (B, T, 4)
    cells = cells.reshape(batch, frames, 1, 2, 1, 2).expand(batch, frames, height // 2, 2, width // 2, 2)
    return cells.reshape(batch, -1)


# ------------------------------------------------------------------------------------------------ targets / loss
def pixel_targets(video: torch.Tensor, patch_size: int, tubelet_size: int, normalize: bool = True,
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Reconstruction targets per token, (B, N, tubelet*P*P*C), channel-last within a token.

    The normalised input is mapped back to [0, 1]; with ``normalize`` each tubelet is standardised per channel
    (unbiased std + 1e-6). Computed in float32 whatever the autocast state.
    """
    with torch.autocast(video.device.type, enabled=False):
        video = video.float()
        shape = (1, -1, 1, 1, 1)
        video = video * torch.tensor(std, device=video.device).view(shape) + \
            torch.tensor(mean, device=video.device).view(shape)
        b, c, t, h, w = video.shape
        p0, p = tubelet_size, patch_size
        x = video.reshape(b, c, t // p0, p0, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (t // p0) * (h // p) * (w // p), p0 * p * p, c)
        if normalize:
            x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
        return x.reshape(b, x.shape[1], -1)


def videomae_loss(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  decode_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between decoder predictions and pixel targets, in float32.

    v1 (``decode_mask`` None): mean over all masked tokens. v2: the decoded tokens (``~decode_mask``) are
    predicted, and the loss averages the per-token MSE over those that the encoder did not see.
    """
    pred = pred.float()
    if decode_mask is None:
        return F.mse_loss(pred, keep_visible(targets, ~mask))
    labels = keep_visible(targets, decode_mask)
    loss_mask = mask[~decode_mask].reshape(mask.shape[0], -1).float()
    per_token = (pred - labels).pow(2).mean(dim=-1)
    return (per_token * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------------ checkpoints
_HF_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
             "attn.q_bias": "attention.attention.query.bias", "attn.v_bias": "attention.attention.value.bias"}


def official_to_hf(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official VideoMAE names -> HF transformers (v5) VideoMAEForVideoClassification / ForPreTraining names.

    ``qkv.weight`` is split row-wise into query/key/value; the classification head becomes ``classifier``.
    Learnable position tables and layer scales have no HF counterpart and raise.
    """
    pretrain = any(k.startswith("encoder.") for k in state_dict)
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key[len("encoder."):] if pretrain and key.startswith("encoder.") else key
        if pretrain and not key.startswith("encoder."):
            if key.startswith("decoder.blocks."):
                _, _, index, rest = key.split(".", 3)
                out.update(_hf_block(f"decoder.decoder_layers.{index}", rest, value))
            else:
                out[key] = value  # decoder.norm/head, encoder_to_decoder, mask_token: same names
            continue
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            out.update(_hf_block(f"videomae.encoder.layer.{index}", rest, value))
        elif name.startswith("patch_embed.proj."):
            out["videomae.embeddings.patch_embeddings.projection." + name.rsplit(".", 1)[1]] = value
        elif name.startswith("norm."):
            out["videomae.layernorm." + name.rsplit(".", 1)[1]] = value
        elif name.startswith("fc_norm."):
            out[name] = value
        elif name.startswith("head."):
            out["classifier." + name.rsplit(".", 1)[1]] = value
        else:
            raise ValueError(f"official_to_hf: {key!r} has no HF VideoMAE counterpart (learnable position "
                             f"embeddings and layer scale are not representable in transformers' VideoMAE)")
    return out


def _hf_block(prefix: str, rest: str, value: torch.Tensor) -> Dict[str, torch.Tensor]:
    if rest == "attn.qkv.weight":
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}.attention.attention.{n}.weight": t for n, t in zip(("query", "key", "value"), (q, k, v))}
    if rest in _HF_BLOCK:
        return {f"{prefix}.{_HF_BLOCK[rest]}": value}
    module, _, param = rest.rpartition(".")
    if module not in _HF_BLOCK:
        raise ValueError(f"official_to_hf: block parameter {rest!r} has no HF VideoMAE counterpart")
    return {f"{prefix}.{_HF_BLOCK[module]}.{param}": value}


def hf_to_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF transformers VideoMAE names (v4 ``q_bias``/``v_bias`` or v5 ``query.bias``/``value.bias``) -> official.

    A pre-training checkpoint (has ``decoder.``) gets the official ``encoder.`` prefix on encoder keys.
    """
    pretrain = any(k.startswith("decoder.") for k in state_dict)
    enc = "encoder." if pretrain else ""
    reverse = {v: k for k, v in _HF_BLOCK.items()}
    reverse.update({"attention.attention.q_bias": "attn.q_bias", "attention.attention.v_bias": "attn.v_bias"})
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        layer = None
        for hf_prefix, prefix in (("videomae.encoder.layer.", f"{enc}blocks."), ("decoder.decoder_layers.",
                                                                                "decoder.blocks.")):
            if key.startswith(hf_prefix):
                index, rest = key[len(hf_prefix):].split(".", 1)
                layer = (f"{prefix}{index}", rest)
        if layer is not None:
            prefix, rest = layer
            part = rest.split(".")
            if rest.startswith("attention.attention.") and part[2] in ("query", "key", "value") and \
                    part[3] == "weight":
                qkv.setdefault(prefix, {})[part[2]] = value
            elif rest in reverse:
                out[f"{prefix}.{reverse[rest]}"] = value
            elif rest.rsplit(".", 1)[0] in reverse:
                module, param = rest.rsplit(".", 1)
                out[f"{prefix}.{reverse[module]}.{param}"] = value
            else:
                raise ValueError(f"hf_to_official: unexpected HF VideoMAE key {key!r}")
        elif key.startswith("videomae.embeddings.patch_embeddings.projection."):
            out[f"{enc}patch_embed.proj.{key.rsplit('.', 1)[1]}"] = value
        elif key.startswith("videomae.layernorm."):
            out[f"{enc}norm.{key.rsplit('.', 1)[1]}"] = value
        elif key.startswith("classifier."):
            out["head." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(("fc_norm.", "decoder.norm.", "decoder.head.", "encoder_to_decoder.")) or \
                key == "mask_token":
            out[key] = value
        elif key.startswith("videomae.embeddings.position_embeddings"):
            continue  # a fixed sinusoid table (only some exports save it); rebuilt by the model
        else:
            raise ValueError(f"hf_to_official: unexpected HF VideoMAE key {key!r}")
    for prefix, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"hf_to_official: {prefix} lacks one of query/key/value weights (has {sorted(parts)})")
        out[f"{prefix}.attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


_DROP_FOR_CLASSIFIER = ("decoder.", "encoder_to_decoder.", "mask_token")


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt an official VideoMAE / VideoMAEv2 / InternVideo or HF VideoMAE state dict to ``model``.

    * HF transformers names are converted; torch.compile's ``_orig_mod.`` is stripped;
    * for a classifier, the ``encoder.``/``backbone.`` prefix is stripped and pre-training-only tensors
      (decoder, mask token) are dropped; norms and head absent from a pre-training file keep their init
      (official fine-tuning does the same), with a log line;
    * a learnable position table of another grid is resampled (bicubic in space, linear in time).
    """
    out = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    if any(k.startswith(("videomae.", "decoder.decoder_layers.")) for k in out):
        out = hf_to_official(out)
    own = model.state_dict()
    if isinstance(model, VideoViT):
        for prefix in ("encoder.", "backbone."):
            if any(k.startswith(prefix) for k in out):
                dropped = [k for k in out if not k.startswith(prefix)]
                if dropped:
                    log.info("ignoring %d pre-training-only tensors (%s...)", len(dropped), dropped[0])
                out = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
        out = {k: v for k, v in out.items() if not k.startswith(_DROP_FOR_CLASSIFIER)}
        if model.fc_norm is not None and "fc_norm.weight" not in out:
            out = {k: v for k, v in out.items() if not k.startswith("norm.")}
        kept = [k for k in own if k.startswith(("fc_norm.", "norm.", "head.")) and k not in out]
        if kept:
            log.info("checkpoint has no %s: keeping their initialisation", ", ".join(sorted(kept)))
            out.update({k: own[k] for k in kept})
        if any(k.startswith("head.") for k in kept):  # a random head: the tag's class names are not its own
            model.pretrained_cfg = fresh_head_cfg(getattr(model, "pretrained_cfg", {}), model.num_classes)
    prefix = "encoder." if isinstance(model, VideoMAEPretrain) else ""
    encoder = model.encoder if isinstance(model, VideoMAEPretrain) else model
    key = prefix + "pos_embed"
    if key in out and key in own and out[key].shape != own[key].shape:
        grid = _grid_of(out[key].shape[1], encoder.grid)
        log.info("resampling the position table %s from grid %s to %s", key, grid, encoder.grid)
        out[key] = resize_pos_embed(out[key], grid, encoder.grid)
    return out


def _grid_of(num_tokens: int, like: Sequence[int]) -> Tuple[int, int, int]:
    """The (T, H, W) of a square-frame token table of ``num_tokens``, preferring the model's frame count."""
    frames = like[0]
    for t in [frames] + [t for t in range(1, num_tokens + 1) if t != frames]:
        side = math.isqrt(num_tokens // t) if num_tokens % t == 0 else 0
        if side and t * side * side == num_tokens:
            return t, side, side
    raise ValueError(f"cannot infer the token grid of a position table with {num_tokens} tokens")


# ------------------------------------------------------------------------------------------------ HF configs
HF_VIDEOMAE_ARCHITECTURES = ("VideoMAEForVideoClassification", "VideoMAEForPreTraining", "VideoMAEModel")


def config_from_hf(hf: Dict) -> Tuple[str, Dict, Optional[List[str]]]:
    """(registered architecture, keyword arguments, class names or None) of an HF transformers VideoMAE
    ``config.json``, so that the folder's weights load into an intern2 model that computes what transformers
    computes: the same shapes, and LayerNorm eps as transformers sets them (``layer_norm_eps`` in the blocks
    and the encoder norm; LayerNorm's default 1e-5 in ``fc_norm`` and the decoder norm)."""
    architectures = hf.get("architectures") or ["VideoMAEForVideoClassification"]
    if not any(a in HF_VIDEOMAE_ARCHITECTURES for a in architectures):
        raise ValueError(f"HF VideoMAE architectures {architectures}: expected one of "
                         f"{list(HF_VIDEOMAE_ARCHITECTURES)}")
    hidden, layers = hf.get("hidden_size", 768), hf.get("num_hidden_layers", 12)
    heads = hf.get("num_attention_heads", 12)
    size = next((s for s, (enc, _) in VIDEO_VIT_VARIANTS.items()
                 if (enc["embed_dim"], enc["depth"], enc["num_heads"]) == (hidden, layers, heads)), "b")
    common = dict(img_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
                  tubelet_size=hf.get("tubelet_size", 2), all_frames=hf.get("num_frames", 16),
                  mlp_ratio=hf.get("intermediate_size", 4 * hidden) / hidden, qkv_bias=hf.get("qkv_bias", True),
                  norm_eps=hf.get("layer_norm_eps", 1e-12))
    mean_pooling = hf.get("use_mean_pooling", True)
    if "VideoMAEForPreTraining" in architectures:
        decoder = hf.get("decoder_hidden_size", 384)
        return f"videomae_pretrain_vit_{size}", dict(
            common, encoder_in_chans=hf.get("num_channels", 3), encoder_embed_dim=hidden, encoder_depth=layers,
            encoder_num_heads=heads, decoder_embed_dim=decoder, decoder_depth=hf.get("decoder_num_hidden_layers", 4),
            decoder_num_heads=hf.get("decoder_num_attention_heads", 6),
            decoder_mlp_ratio=hf.get("decoder_intermediate_size", 4 * decoder) / decoder,
            encoder_norm=not mean_pooling, decoder_norm_eps=1e-5), None
    names = hf_label_names(hf)
    num_classes = len(names) if names and "VideoMAEForVideoClassification" in architectures else 0
    return f"videomae_vit_{size}", dict(common, in_chans=hf.get("num_channels", 3), num_classes=num_classes,
                                        embed_dim=hidden, depth=layers, num_heads=heads,
                                        use_mean_pooling=mean_pooling, fc_norm_eps=1e-5), names


# The encoder geometry a fine-tune takes from the model it starts from; the clip size, dropout, drop path and head
# initialisation are the new run's settings.
_ENCODER_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                   "init_values", "use_learnable_pos_emb", "tubelet_size", "norm_eps")


def classifier_config(config: Dict[str, Any]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(``videomae_vit_*`` name, encoder fields) of the classifier that fine-tunes the model a folder's
    ``config.json`` describes: a classifier or UMT student (``videomae_vit_*``; its pooling too), a VideoMAE
    pre-training model (``videomae_pretrain_vit_*``: its ``encoder_*`` fields) or an HF VideoMAE folder. None for
    a config of another model."""
    arch = config.get("architecture")
    if arch is None and config.get("model_type") == "videomae":
        arch, config, _ = config_from_hf(config)
    if not isinstance(arch, str):
        return None
    if arch.startswith("videomae_pretrain_vit_"):
        encoder = {**config, **{k[len("encoder_"):]: v for k, v in config.items() if k.startswith("encoder_")}}
        return f"videomae_vit_{arch.rsplit('_', 1)[1]}", {k: encoder[k] for k in _ENCODER_FIELDS if k in encoder}
    if arch.startswith("videomae_vit_"):
        keys = (*_ENCODER_FIELDS, "use_mean_pooling", "fc_norm_eps")
        return arch, {k: config[k] for k in keys if k in config}
    return None


# ------------------------------------------------------------------------------------------------ variants
# size -> encoder kwargs, decoder kwargs of the pre-training model as InternVideo released it (decoders: B 384/6
# heads/4 blocks, L 512/8/12, H 512/8/8; S as VideoMAE's, g as VideoMAEv2's, 4 blocks). VideoMAE v1's own ViT-H
# decoder (640/8/12) and VideoMAEv2's L/H (4 blocks) differ: pass decoder_embed_dim / decoder_depth for those.
VIDEO_VIT_VARIANTS: Dict[str, Tuple[Dict, Dict]] = {
    "s": (dict(embed_dim=384, depth=12, num_heads=6), dict(decoder_embed_dim=192, decoder_num_heads=3)),
    "b": (dict(embed_dim=768, depth=12, num_heads=12), dict(decoder_embed_dim=384, decoder_num_heads=6)),
    "l": (dict(embed_dim=1024, depth=24, num_heads=16),
          dict(decoder_embed_dim=512, decoder_num_heads=8, decoder_depth=12)),
    "h": (dict(embed_dim=1280, depth=32, num_heads=16),
          dict(decoder_embed_dim=512, decoder_num_heads=8, decoder_depth=8)),
    "g": (dict(embed_dim=1408, depth=40, num_heads=16, patch_size=14, mlp_ratio=48 / 11),
          dict(decoder_embed_dim=512, decoder_num_heads=8)),
}


def clip_cfg(frames: int, size: int, record: Any) -> Dict:
    """The pretrained-config entries of a video model that follow its built clip size (frames, resolution); the
    weights ``record``'s test resize (``short_side``) keeps its ratio to the crop at another resolution."""
    cfg = dict(num_frames=frames, img_size=size, input_size=[3, frames, size, size])
    protocol = record.protocol
    if getattr(protocol, "short_side", None) is not None and size != protocol.img_size:
        cfg["short_side"] = max(size, round(protocol.short_side * size / protocol.img_size))
    return cfg


def _pretrain_config(size: str) -> Dict:
    encoder, decoder = VIDEO_VIT_VARIANTS[size]
    return {**{f"encoder_{k}" if k in ("embed_dim", "depth", "num_heads") else k: v for k, v in encoder.items()},
            **decoder}


for _size, (_encoder, _) in VIDEO_VIT_VARIANTS.items():
    register_variant(f"videomae_vit_{_size}", lambda kwargs, _encoder=_encoder: VideoViT(**{**_encoder, **kwargs}),
                     f"Video ViT-{_size.upper()} classifier (official VideoMAE/VideoMAEv2 configuration).",
                     lambda model, record: clip_cfg(model.config["all_frames"], model.config["img_size"], record))
    register_variant(f"videomae_pretrain_vit_{_size}",
                     lambda kwargs, _size=_size: VideoMAEPretrain(**{**_pretrain_config(_size), **kwargs}),
                     f"VideoMAE ViT-{_size.upper()} masked autoencoder; VideoMAEv2 dual masking is the same model "
                     f"called with a decode mask.",
                     lambda model, record: clip_cfg(model.config["all_frames"], model.config["img_size"], record))
