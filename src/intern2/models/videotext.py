"""InternVideo-MM video-text dual encoder: a video tower and a CLIP text tower aligned by symmetric InfoNCE.

Video tower (``vision``):

* ``"clip"`` (InternVideo-MM): a CLIP ViT applied to every frame (``conv1`` is a Conv3d with temporal kernel 1),
  whose last ``temporal_layers`` blocks feed UniFormerV2-style global blocks: a depth-wise 3x3x3 Conv3d position
  encoding (``dpe``) on the patch tokens and a cross-attention extractor (``dec``) in which one learnable
  ``temporal_cls_token`` queries all frames' tokens. The clip feature is
  ``(1 - sigmoid(balance)) * temporal_cls + sigmoid(balance) * mean_t(frame class token)``, then ``ln_post``
  and ``proj``.
* ``"videomae"``: the VideoMAE :class:`~intern2.models.video_vit.VideoViT` (mean-pooled tokens + ``fc_norm``) whose
  ``head`` is the projection into the joint space.

Text tower: the CLIP causal Transformer; the feature is read at the end-of-text token, the highest token id of
each sequence (CLIP's convention, kept by intern2's tokenizer), then ``text_projection``.

Parameter names mirror the official InternVideo-MM checkpoint (``clip.``-prefixed CLIP names); only the video
projection and final norm live under ``visual.`` here (``visual_proj``/``visual_ln_post`` there).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..constants import CLIP_MEAN, CLIP_STD  # noqa: F401 (re-exported)
from ..layers import DropPath, Linear
from ..registry import register_variant
from .video_vit import VideoViT, clip_cfg

__all__ = ["VideoTextModel", "VisionTransformer", "Transformer", "TemporalTransformer", "Extractor",
           "ResidualAttentionBlock", "clip_contrastive_loss", "gather_features", "checkpoint_filter_fn",
           "official_state_dict", "VIDEOTEXT_VARIANTS", "CLIP_MEAN", "CLIP_STD"]

log = logging.getLogger(__name__)



class QuickGELU(nn.Module):
    """CLIP's activation, x * sigmoid(1.702 x): the released weights were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _mlp(width: int, hidden: int, dropout: float = 0.0) -> nn.Sequential:
    layers = [("c_fc", Linear(width, hidden)), ("gelu", QuickGELU())]
    if dropout > 0:  # parameter-free, so the official names stay c_fc / c_proj either way
        layers.append(("dropout", nn.Dropout(dropout)))
    layers.append(("c_proj", Linear(hidden, width)))
    return nn.Sequential(OrderedDict(layers))


class ResidualAttentionBlock(nn.Module):
    """CLIP pre-norm block; ``nn.MultiheadAttention`` holds the official ``in_proj_weight``/``out_proj`` names
    and dispatches to scaled-dot-product attention kernels."""

    def __init__(self, width: int, heads: int, drop_path: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = _mlp(width, width * 4)
        self.ln_2 = nn.LayerNorm(width)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.drop_path(self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` over batch-first tokens (B, L, width)."""

    def __init__(self, width: int, layers: int, heads: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.width, self.layers = width, layers
        rates = torch.linspace(0, drop_path_rate, layers, device="cpu").tolist()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, rates[i]) for i in range(layers))
        self.grad_checkpointing = False

    def run_block(self, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        block = self.resblocks[index]
        if self.grad_checkpointing and x.requires_grad:
            return checkpoint(block, x, attn_mask, use_reentrant=False)
        return block(x, attn_mask)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for index in range(self.layers):
            x = self.run_block(index, x, attn_mask)
        return x


class Extractor(nn.Module):
    """Global block of InternVideo-MM: the query tokens ``x`` cross-attend to the video tokens ``y``
    (``ln_1`` on the queries, ``ln_3`` on the keys/values), then an MLP. Output projections start at zero, so a
    fresh extractor leaves its query unchanged (the official initialisation)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = _mlp(width, round(mlp_ratio * width), dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.ln_3 = nn.LayerNorm(width)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        nn.init.xavier_uniform_(self.attn.in_proj_weight)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)
        nn.init.xavier_uniform_(self.mlp.c_fc.weight)
        nn.init.zeros_(self.mlp.c_proj.weight)
        nn.init.zeros_(self.mlp.c_proj.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = self.ln_3(y)
        x = x + self.drop_path(self.attn(self.ln_1(x), y, y, need_weights=False)[0])
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class TemporalTransformer(Transformer):
    """CLIP frame transformer plus the InternVideo-MM global blocks over its last ``temporal_layers`` outputs.

    Input (B*T, 1 + H*W, width) frame tokens (class token first); output the (B, width) clip feature.
    """

    def __init__(self, width: int, layers: int, heads: int, temporal_layers: int = 4, mlp_ratio: float = 4.0,
                 mlp_dropout: float = 0.5, drop_path_rate: float = 0.0, temporal_drop_path_rate: float = 0.0):
        super().__init__(width, layers, heads, drop_path_rate)
        if not 0 < temporal_layers <= layers:
            raise ValueError(f"temporal_layers must be in [1, {layers}], got {temporal_layers}")
        self.return_list = tuple(range(layers - temporal_layers, layers))
        self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.dpe = nn.ModuleList(nn.Conv3d(width, width, 3, padding=1, groups=width)
                                 for _ in range(temporal_layers))
        for conv in self.dpe:
            nn.init.zeros_(conv.bias)
        rates = torch.linspace(0, temporal_drop_path_rate, temporal_layers, device="cpu").tolist()
        self.dec = nn.ModuleList(Extractor(width, heads, mlp_ratio, mlp_dropout, rates[i])
                                 for i in range(temporal_layers))
        self.balance = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor, frames: int, grid: Tuple[int, int]) -> torch.Tensor:
        batch_frames, length, width = x.shape
        batch = batch_frames // frames
        query = self.temporal_cls_token.expand(batch, -1, -1).to(x.dtype)
        for index in range(self.layers):
            x = self.run_block(index, x)
            if index not in self.return_list:
                continue
            j = index - self.return_list[0]
            tokens = x.view(batch, frames, length, width)
            patches = tokens[:, :, 1:].permute(0, 3, 1, 2).reshape(batch, width, frames, *grid)
            position = self.dpe[j](patches).flatten(3).permute(0, 2, 3, 1)  # (B, T, H*W, width)
            tokens = torch.cat([tokens[:, :, :1], tokens[:, :, 1:] + position], dim=2)
            query = self.dec[j](query, tokens.reshape(batch, frames * length, width))
        weight = torch.sigmoid(self.balance)
        frame_cls = x.view(batch, frames, length, width)[:, :, 0].mean(1)
        return (1 - weight) * query[:, 0] + weight * frame_cls


class VisionTransformer(nn.Module):
    """CLIP ViT over the frames of a clip (B, 3, T, H, W) with InternVideo-MM temporal global blocks
    -> (B, output_dim)."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, temporal_layers: int = 4, mlp_dropout: float = 0.5, drop_path_rate: float = 0.0):
        super().__init__()
        if input_resolution % patch_size:
            raise ValueError(f"image_resolution {input_resolution} is not a multiple of the patch size {patch_size}")
        self.input_resolution, self.patch_size = input_resolution, patch_size
        self.conv1 = nn.Conv3d(3, width, (1, patch_size, patch_size), (1, patch_size, patch_size), bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = TemporalTransformer(width, layers, heads, temporal_layers, mlp_dropout=mlp_dropout,
                                               drop_path_rate=drop_path_rate, temporal_drop_path_rate=drop_path_rate)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, video: torch.Tensor) -> Tuple[torch.Tensor, int, Tuple[int, int]]:
        """(frame tokens (B*T, 1 + H'*W', width) after ``ln_pre``, T, (H', W'))."""
        size = self.input_resolution
        if video.dim() != 5 or video.shape[1] != 3 or tuple(video.shape[-2:]) != (size, size):
            raise ValueError(f"video tower input: expected (B, 3, T, {size}, {size}), got {tuple(video.shape)}")
        x = self.conv1(video)  # (B, width, T, H', W'): each frame embedded on its own
        batch, width, frames, height, wide = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(batch * frames, height * wide, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)), frames, (height, wide)

    def forward_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """Per-frame patch features of the last CLIP layer through ``ln_post`` and ``proj`` (what UMT distils
        from a CLIP teacher), (B, T, H', W', output_dim); the temporal global blocks are not run."""
        x, frames, grid = self.embed(video)
        for index in range(self.transformer.layers):
            x = self.transformer.run_block(index, x)
        x = self.ln_post(x[:, 1:]) @ self.proj
        return x.reshape(-1, frames, *grid, x.shape[-1])

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x, frames, grid = self.embed(video)
        return self.ln_post(self.transformer(x, frames, grid)) @ self.proj


def _causal_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.full((length, length), float("-inf"), device=device).triu_(1)


class VideoTextModel(nn.Module):
    """InternVideo-MM dual encoder; ``model(video, text)`` -> (L2-normalised video features, L2-normalised text
    features, logit scale), the inputs of :func:`clip_contrastive_loss`.

    ``text`` is (B, context_length) token ids in CLIP's layout (start, tokens, end-of-text = the largest id, then
    padding); ``encode_text(text, masked_indices)`` replaces masked positions by ``text_mask_embedding`` (the
    official masked-language-modelling input; loaded from checkpoints, not trained).
    """

    def __init__(self, embed_dim: int = 768, vision: str = "clip", image_resolution: int = 224,
                 vision_patch_size: int = 14, vision_width: int = 1024, vision_layers: int = 24,
                 vision_heads: int = 16, num_frames: int = 8, temporal_layers: int = 4,
                 temporal_mlp_dropout: float = 0.5, tubelet_size: int = 2, context_length: int = 77,
                 vocab_size: int = 49408, transformer_width: int = 768, transformer_heads: int = 12,
                 transformer_layers: int = 12, drop_path_rate: float = 0.0):
        super().__init__()
        self.config = dict(embed_dim=embed_dim, vision=vision, image_resolution=image_resolution,
                           vision_patch_size=vision_patch_size, vision_width=vision_width,
                           vision_layers=vision_layers, vision_heads=vision_heads, num_frames=num_frames,
                           temporal_layers=temporal_layers, temporal_mlp_dropout=temporal_mlp_dropout,
                           tubelet_size=tubelet_size, context_length=context_length, vocab_size=vocab_size,
                           transformer_width=transformer_width, transformer_heads=transformer_heads,
                           transformer_layers=transformer_layers, drop_path_rate=drop_path_rate)
        if vision == "clip":
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                            vision_heads, embed_dim, temporal_layers, temporal_mlp_dropout,
                                            drop_path_rate)
        elif vision == "videomae":
            # The classifier head is the projection into the joint space (std-0.02 init, not VideoMAE's 0.001).
            self.visual = VideoViT(img_size=image_resolution, patch_size=vision_patch_size, num_classes=embed_dim,
                                   embed_dim=vision_width, depth=vision_layers, num_heads=vision_heads,
                                   drop_path_rate=drop_path_rate, all_frames=num_frames, tubelet_size=tubelet_size,
                                   init_scale=1.0)
        else:
            raise ValueError(f"vision: expected 'clip' (InternVideo-MM frame ViT) or 'videomae' (video ViT), "
                             f"got {vision!r}")
        self.embed_dim = self.num_features = embed_dim
        self.context_length, self.vocab_size = context_length, vocab_size
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Only the official masked-language-modelling objective uses it, and intern2 does not train that one:
        # frozen, so that DDP does not wait for a gradient the contrastive loss never produces.
        self.text_mask_embedding = nn.Parameter(torch.empty(1, 1, transformer_width), requires_grad=False)
        self._init_text()

    def _init_text(self) -> None:
        """CLIP's text initialisation (depth-scaled projections)."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_mask_embedding, std=0.02)
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    # ------------------------------------------------------------------------------------------ timm surface
    def export_config(self) -> Dict:
        """Everything :func:`intern2.from_pretrained` needs to rebuild this model."""
        return dict(self.config)

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Used by :func:`intern2.load_checkpoint` to read the official InternVideo-MM layout."""
        return checkpoint_filter_fn(state_dict, self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VideoViT):
            self.visual.set_grad_checkpointing(enable)
        else:
            self.visual.transformer.grad_checkpointing = enable

    def fsdp_units(self) -> List[nn.Module]:
        visual = self.visual.blocks if isinstance(self.visual, VideoViT) else self.visual.transformer.resblocks
        return list(visual) + list(self.transformer.resblocks)

    def no_weight_decay(self) -> set:
        names = {"logit_scale", "positional_embedding", "token_embedding.weight", "text_mask_embedding"}
        if isinstance(self.visual, VideoViT):
            return names | {"visual.pos_embed"}
        return names | {"visual.class_embedding", "visual.positional_embedding", "visual.transformer.balance",
                        "visual.transformer.temporal_cls_token"}

    # ------------------------------------------------------------------------------------------ forward
    def encode_video(self, video: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, T, H, W) normalised clips -> (B, embed_dim) features."""
        features = self.visual(video)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, masked_indices: Optional[torch.Tensor] = None,
                    normalize: bool = False) -> torch.Tensor:
        """(B, L <= context_length) token ids -> (B, embed_dim) features read at each sequence's largest id."""
        if text.dim() != 2 or text.shape[1] > self.context_length or text.dtype not in (torch.long, torch.int):
            raise ValueError(f"text: expected integer token ids (B, L <= {self.context_length}), got "
                             f"{text.dtype} {tuple(text.shape)}")
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= self.vocab_size):
            raise ValueError(f"text: token ids must lie in [0, {self.vocab_size}); got [{int(text.min())}, "
                             f"{int(text.max())}] (a tokenizer for another vocabulary?)")
        x = self.token_embedding(text)
        if masked_indices is not None:
            x = torch.where(masked_indices[..., None], self.text_mask_embedding.to(x.dtype), x)
        length = text.shape[1]
        x = x + self.positional_embedding[:length].to(x.dtype)
        x = self.ln_final(self.transformer(x, _causal_mask(length, x.device)))
        features = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, video: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # CLIP's cap: a temperature below 1/100 makes the loss unstable.
        scale = self.logit_scale.exp().clamp(max=100.0)
        return self.encode_video(video, normalize=True), self.encode_text(text, normalize=True), scale


# ------------------------------------------------------------------------------------------------ loss
class _GatherWithLocalGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own shard, summed over ranks (every rank's
    loss uses every shard)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_features(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(features of every rank concatenated in rank order, offset of this rank's rows); the identity in one
    process. Gradients flow back to the local rows. Every rank must pass the same batch size."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithLocalGrad.apply(x), dist.get_rank() * x.shape[0]


def clip_contrastive_loss(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                          gather: bool = True) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Symmetric InfoNCE over normalised features: the mean of the video->text and text->video cross-entropies,
    pair i matching pair i, against the candidates of every DDP rank. Computed in float32.

    DDP averages gradients over ranks; with each rank's loss averaged over its own rows this is the gradient of
    the loss over the global batch.
    """
    video, text, logit_scale = video.float(), text.float(), logit_scale.float()
    all_video, offset = gather_features(video) if gather else (video, 0)
    all_text, _ = gather_features(text) if gather else (text, 0)
    targets = torch.arange(video.shape[0], device=video.device) + offset
    logits_v2t = logit_scale * video @ all_text.t()
    logits_t2v = logit_scale * text @ all_video.t()
    loss_v2t = F.cross_entropy(logits_v2t, targets)
    loss_t2v = F.cross_entropy(logits_t2v, targets)
    accuracy = (logits_v2t.argmax(-1) == targets).float().mean()
    return (loss_v2t + loss_t2v) / 2, {"loss_v2t": loss_v2t.item(), "loss_t2v": loss_t2v.item(),
                                       "batch_acc_v2t": accuracy.item(), "logit_scale": logit_scale.item()}


# ------------------------------------------------------------------------------------------------ checkpoints
# Official top-level names -> ours (the rest of the InternVideo-MM names are used as they are).
_RENAMES = {"visual_ln_post.": "visual.ln_post.", "visual_proj": "visual.proj"}


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt an official InternVideo-MM state dict (``clip.``-prefixed, ``visual_proj``/``visual_ln_post``) or a
    torch.compile'd one (``_orig_mod.``) to :class:`VideoTextModel`; intern2's own layout passes unchanged.
    Tensors outside ``clip.`` in an official file (training-only heads) are dropped with a log line."""
    out = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    if any(k.startswith("clip.") for k in out):
        dropped = sorted(k for k in out if not k.startswith("clip."))
        if dropped:
            log.info("ignoring %d tensors outside the 'clip.' model (%s...)", len(dropped), dropped[0])
        out = {k[len("clip."):]: v for k, v in out.items() if k.startswith("clip.")}
    renamed = {}
    for key, value in out.items():
        for old, new in _RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    conv = renamed.get("visual.conv1.weight")
    if conv is not None and conv.dim() == 4 and isinstance(getattr(model, "visual", None), VisionTransformer):
        renamed["visual.conv1.weight"] = conv[:, :, None]  # an image CLIP's Conv2d: temporal kernel 1
    return renamed


def official_state_dict(model: VideoTextModel) -> Dict[str, torch.Tensor]:
    """This model's weights in the official InternVideo-MM checkpoint layout (``clip.`` prefix, top-level
    ``visual_proj``/``visual_ln_post``), e.g. to run them in the official code."""
    reverse = {new: old for old, new in _RENAMES.items()}
    out = {}
    for key, value in model.state_dict().items():
        for new, old in reverse.items():
            if key.startswith(new):
                key = old + key[len(new):]
                break
        out["clip." + key] = value
    return out


# ------------------------------------------------------------------------------------------------ variants
VIDEOTEXT_VARIANTS: Dict[str, Dict] = {
    # For tests and the CPU demo: 32 px frames, two-layer towers, no dropout in the global block (the official
    # 0.5 slows the few minutes of training such a model gets).
    "tiny": dict(embed_dim=64, image_resolution=32, vision_patch_size=8, vision_width=64, vision_layers=2,
                 vision_heads=2, num_frames=8, temporal_layers=1, temporal_mlp_dropout=0.0, context_length=32,
                 vocab_size=1024, transformer_width=64, transformer_heads=2, transformer_layers=2),
    # CLIP ViT-B/16 + the 512-wide CLIP text encoder, global blocks over layers 8-11.
    "b16": dict(embed_dim=512, vision_patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                transformer_width=512, transformer_heads=8),
    # The released InternVideo-MM-L-14: CLIP ViT-L/14, global blocks over layers 20-23, 768-wide text encoder.
    "l14": dict(),
}


for _size, _config in VIDEOTEXT_VARIANTS.items():
    register_variant(f"internvideo_mm_{_size}", lambda kwargs, _config=_config: VideoTextModel(**{**_config, **kwargs}),
                     f"InternVideo-MM video-text dual encoder, {_size} configuration.",
                     lambda model, record: clip_cfg(model.config["num_frames"], model.config["image_resolution"],
                                                    record))
