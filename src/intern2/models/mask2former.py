"""Mask2Former with an InternImage backbone, as the official InternImage-H segmentors
(``segmentation/configs/*/mask2former_internimage_h_*``: mmseg 0.27 ``EncoderDecoderMask2Former`` + mmdet's
``Mask2FormerHead``), with no mmcv: the pixel decoder's deformable attention is
:class:`intern2.ops.MultiScaleDeformableAttention`.

Module names are the official ones (``backbone.``, ``decode_head.pixel_decoder.input_convs.i``,
``decode_head.transformer_decoder.layers.i.attentions.0.attn``, ``decode_head.query_feat``, ...), so a published
``state_dict`` loads as it is.

Semantic inference (mmseg ``whole`` / ``slide`` test): the pixel decoder projects the three coarsest backbone levels
(strides 32/16/8, coarsest first) to ``feat_channels`` (1x1 conv + GN), encodes them together with a deformable
encoder (sine positions + level embeddings), and builds an FPN level at stride 4 (lateral 1x1 conv + GN plus the
upsampled stride-8 memory, 3x3 conv + GN + ReLU) whose 1x1 conv gives the mask features. The masked-attention decoder
starts from learned query features; each layer cross-attends to one memory level in turn (coarsest first), only where
the previous prediction's mask is on (sigmoid >= 0.5; a fully blocked query sees everything), then self-attends, then
an FFN. A prediction is a class distribution (softmax with a last "no object" logit) and a mask (query embedding . mask
features); the segmentation is the sum over queries of class probability x mask probability, upsampled to the input.

``model(images)`` returns that (B, num_classes, H, W) map at the input size, as UperNet returns logits, so the
segmentation pipeline, ``intern2 eval`` / ``predict`` / serve treat both alike (the pipeline's softmax over these
values is what mmseg's ``inference`` does for Mask2Former too).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.segmentation import IGNORE_INDEX
from ..heads.detr_losses import Mask2FormerCriterion
from ..heads.transformer import ConvGN, DeformableEncoder, FFN, MultiheadAttention, sine_position_encoding
from ..registry import register_variant
from .internimage import InternImage, checkpoint_filter_fn
from .upernet import _seg_backbone

__all__ = ["Mask2Former", "Mask2FormerHead", "MSDeformAttnPixelDecoder", "semantic_targets", "MASK2FORMER_VARIANTS"]

log = logging.getLogger(__name__)


class MSDeformAttnPixelDecoder(nn.Module):
    """mmdet's ``MSDeformAttnPixelDecoder``: deformable encoder over the ``num_encoder_levels`` coarsest levels, an
    FPN for the finer ones, the mask features from the finest."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], feat_channels: int = 256,
                 out_channels: int = 256, num_encoder_levels: int = 3, num_layers: int = 6, num_heads: int = 8,
                 num_points: int = 4, feedforward_channels: int = 1024, num_feats: int = 128, groups: int = 32):
        super().__init__()
        self.strides, self.num_feats = list(strides), num_feats
        self.num_input_levels, self.num_encoder_levels = len(in_channels), num_encoder_levels
        self.input_convs = nn.ModuleList([  # coarsest level first
            ConvGN(in_channels[len(in_channels) - 1 - i], feat_channels, 1, groups=groups, bias=True)
            for i in range(num_encoder_levels)])
        self.encoder = DeformableEncoder(num_layers, embed_dims=feat_channels, num_heads=num_heads,
                                         num_levels=num_encoder_levels, num_points=num_points,
                                         feedforward_channels=feedforward_channels)
        self.level_encoding = nn.Embedding(num_encoder_levels, feat_channels)
        finer = self.num_input_levels - num_encoder_levels
        self.lateral_convs = nn.ModuleList([ConvGN(in_channels[i], feat_channels, 1, groups=groups)
                                            for i in range(finer)])
        self.output_convs = nn.ModuleList([ConvGN(feat_channels, feat_channels, 3, groups=groups, relu=True)
                                           for _ in range(finer)])
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        """(mask features at the finest level, the encoder levels coarsest first)."""
        batch = feats[0].shape[0]
        sources, positions, points, shapes = [], [], [], []
        for i in range(self.num_encoder_levels):
            level = self.num_input_levels - 1 - i
            feat = feats[level]
            h, w = feat.shape[-2:]
            no_padding = torch.zeros((batch, h, w), dtype=torch.bool, device=feat.device)
            pos = sine_position_encoding(no_padding, self.num_feats, 10000, dtype=feat.dtype)
            pos = pos + self.level_encoding.weight[i].view(1, -1, 1, 1)
            sources.append(self.input_convs[i](feat).flatten(2).transpose(1, 2))
            positions.append(pos.flatten(2).transpose(1, 2))
            ys, xs = torch.meshgrid(torch.arange(h, dtype=feat.dtype, device=feat.device) + 0.5,
                                    torch.arange(w, dtype=feat.dtype, device=feat.device) + 0.5, indexing="ij")
            points.append(torch.stack([xs.reshape(-1) / w, ys.reshape(-1) / h], -1))  # MlvlPointGenerator, normed
            shapes.append((h, w))
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=feats[0].device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        reference = torch.cat(points)[None, :, None].expand(batch, -1, self.num_encoder_levels, -1)
        source = torch.cat(sources, 1)
        padding = torch.zeros(source.shape[:2], dtype=torch.bool, device=source.device)
        memory = self.encoder(source, query_pos=torch.cat(positions, 1), padding_mask=padding,
                              reference_points=reference, spatial_shapes=spatial_shapes,
                              level_start_index=level_start_index)
        outs = [m.transpose(1, 2).reshape(batch, -1, h, w)
                for m, (h, w) in zip(memory.split([h * w for h, w in shapes], 1), shapes)]
        for i in range(self.num_input_levels - self.num_encoder_levels - 1, -1, -1):
            lateral = self.lateral_convs[i](feats[i])
            upsampled = F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[i](lateral + upsampled))
        return self.mask_feature(outs[-1]), outs[:self.num_encoder_levels]


class MaskedDecoderLayer(nn.Module):
    """cross_attn (masked), norm, self_attn, norm, ffn, norm (mmcv ``DetrTransformerDecoderLayer``)."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int):
        super().__init__()
        self.attentions = nn.ModuleList([MultiheadAttention(embed_dims, num_heads) for _ in range(2)])
        self.ffns = nn.ModuleList([FFN(embed_dims, feedforward_channels)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor,
                attn_mask: Tensor) -> Tensor:
        query = self.norms[0](self.attentions[0](query, memory, memory, query_pos, memory_pos, attn_mask))
        query = self.norms[1](self.attentions[1](query, query_pos=query_pos))
        return self.norms[2](self.ffns[0](query))


class MaskedTransformerDecoder(nn.Module):
    def __init__(self, num_layers: int, embed_dims: int, num_heads: int, feedforward_channels: int):
        super().__init__()
        self.layers = nn.ModuleList([MaskedDecoderLayer(embed_dims, num_heads, feedforward_channels)
                                     for _ in range(num_layers)])
        self.post_norm = nn.LayerNorm(embed_dims)


class Mask2FormerHead(nn.Module):
    """mmdet's ``Mask2FormerHead`` (its mmseg wrapper's names): pixel decoder, masked-attention decoder, class and
    mask embeddings; ``forward`` returns every prediction (the initial one and one per layer)."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int,
                 feat_channels: int = 256, out_channels: int = 256, num_queries: int = 100, num_heads: int = 8,
                 num_decoder_layers: int = 9, decoder_feedforward: int = 2048, num_encoder_layers: int = 6,
                 encoder_feedforward: int = 1024, num_points: int = 4, num_feats: int = 128, groups: int = 32,
                 num_transformer_levels: int = 3):
        super().__init__()
        self.num_classes, self.num_heads, self.num_feats = num_classes, num_heads, num_feats
        self.num_levels = num_transformer_levels
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels, strides, feat_channels, out_channels, num_transformer_levels, num_encoder_layers, num_heads,
            num_points, encoder_feedforward, num_feats, groups)
        self.transformer_decoder = MaskedTransformerDecoder(num_decoder_layers, feat_channels, num_heads,
                                                            decoder_feedforward)
        self.query_embed = nn.Embedding(num_queries, feat_channels)
        self.query_feat = nn.Embedding(num_queries, feat_channels)
        self.level_embed = nn.Embedding(num_transformer_levels, feat_channels)
        self.cls_embed = nn.Linear(feat_channels, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
                                        nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
                                        nn.Linear(feat_channels, out_channels))

    def predict(self, query: Tensor, mask_features: Tensor, target_size: Tuple[int, int]):
        """mmdet's ``forward_head``: class logits (B, Q, K+1), mask logits (B, Q, H, W) and the next layer's
        attention mask (B * heads, Q, h * w) at ``target_size`` (True = blocked, where sigmoid < 0.5)."""
        query = self.transformer_decoder.post_norm(query)
        cls = self.cls_embed(query)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(query), mask_features)
        attn = F.interpolate(masks, target_size, mode="bilinear", align_corners=False)
        attn = attn.flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)
        return cls, masks, (attn.sigmoid() < 0.5).detach()

    def forward(self, feats: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor], Dict[str, object]]:
        mask_features, memories = self.pixel_decoder(feats)
        batch = mask_features.shape[0]
        inputs, positions = [], []
        for i, memory in enumerate(memories):
            inputs.append(memory.flatten(2).transpose(1, 2) + self.level_embed.weight[i].view(1, 1, -1))
            no_padding = torch.zeros((batch, *memory.shape[-2:]), dtype=torch.bool, device=memory.device)
            positions.append(sine_position_encoding(no_padding, self.num_feats, 10000, dtype=memory.dtype)
                             .flatten(2).transpose(1, 2))
        query = self.query_feat.weight[None].expand(batch, -1, -1)
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        cls, masks, attn_mask = self.predict(query, mask_features, memories[0].shape[-2:])
        all_cls, all_masks = [cls], [masks]
        for i, layer in enumerate(self.transformer_decoder.layers):
            level = i % self.num_levels
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)  # a fully blocked query attends everywhere
            query = layer(query, query_pos, inputs[level], positions[level], attn_mask)
            cls, masks, attn_mask = self.predict(query, mask_features,
                                                 memories[(i + 1) % self.num_levels].shape[-2:])
            all_cls.append(cls)
            all_masks.append(masks)
        return all_cls, all_masks, dict(mask_features=mask_features, memories=memories)

    @staticmethod
    def semantic(cls: Tensor, masks: Tensor) -> Tensor:
        """(B, K, H, W): sum over queries of class probability (no-object dropped) x mask probability."""
        return torch.einsum("bqc,bqhw->bchw", cls.softmax(-1)[..., :-1], masks.sigmoid())


def semantic_targets(labels: Tensor, num_classes: int) -> Tuple[List[Tensor], List[Tensor]]:
    """Per image of a (B, H, W) label map: the classes present (sorted; ``IGNORE_INDEX`` and out-of-range values
    excluded) and one binary mask each (mmseg_custom's ``ToMask``): Mask2Former's instance-style targets."""
    classes, masks = [], []
    for label in labels:
        present = torch.unique(label)
        present = present[(present != IGNORE_INDEX) & (present >= 0) & (present < num_classes)]
        classes.append(present)
        masks.append(label[None] == present[:, None, None])
    return classes, masks


class Mask2Former(nn.Module):
    """Mask2Former + InternImage for semantic segmentation, configured like the official InternImage-H models.

    Args:
        backbone: InternImage config (the det/seg flavour).
        num_classes: classes (no "no object": the head adds it).
        feat_channels, num_queries, num_heads, decoder / encoder layers and FFN widths, num_points, num_feats: the
            head (official H: 1024, 200 (100 for some datasets), 32, 9 / 6 layers, 4096 / 4096, 4, 512).
    """

    def __init__(self, backbone: Dict, num_classes: int = 150, feat_channels: int = 1024, num_queries: int = 200,
                 num_heads: int = 32, num_decoder_layers: int = 9, decoder_feedforward: int = 4096,
                 num_encoder_layers: int = 6, encoder_feedforward: int = 4096, num_points: int = 4,
                 num_feats: int = 512, groups: int = 32, train_points: int = 12544):
        super().__init__()
        self.criterion = Mask2FormerCriterion(num_classes, train_points)
        self.backbone = InternImage(**backbone, features_only=True)
        self.decode_head = Mask2FormerHead(self.backbone.feature_info.channels(),
                                           self.backbone.feature_info.reduction(), num_classes, feat_channels,
                                           feat_channels, num_queries, num_heads, num_decoder_layers,
                                           decoder_feedforward, num_encoder_layers, encoder_feedforward, num_points,
                                           num_feats, groups)
        self.num_classes = num_classes
        self.backbone_config = dict(backbone)
        self.head_config = dict(num_classes=num_classes, feat_channels=feat_channels, num_queries=num_queries,
                                num_heads=num_heads, num_decoder_layers=num_decoder_layers,
                                decoder_feedforward=decoder_feedforward, num_encoder_layers=num_encoder_layers,
                                encoder_feedforward=encoder_feedforward, num_points=num_points,
                                num_feats=num_feats, groups=groups, train_points=train_points)

    def forward(self, images: Tensor, labels: Optional[Tensor] = None):
        """(B, num_classes, H, W) at the input size (mmseg's ``encode_decode``); given (B, H, W) ``labels``
        (``IGNORE_INDEX`` ignored), the loss dict of every prediction (``loss_cls/mask/dice``, ``d{i}.``)."""
        all_cls, all_masks, _ = self.decode_head(self.backbone(images))
        if labels is not None:
            return self.criterion(all_cls, all_masks, *semantic_targets(labels, self.num_classes))
        segmentation = self.decode_head.semantic(all_cls[-1], all_masks[-1])
        return F.interpolate(segmentation, size=images.shape[2:], mode="bilinear", align_corners=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def fsdp_units(self) -> List[nn.Module]:
        return self.backbone.fsdp_units()

    def checkpoint_filter(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The official mmseg layout is ours (backbone names go through InternImage's filter); any other state dict
        (a classifier, an UperNet or detector with an InternImage under ``backbone.``) initialises the backbone only."""
        if not any(k.startswith("decode_head.pixel_decoder.") for k in state_dict):  # not a Mask2Former
            log.info("checkpoint has no segmentor keys: loading it into the backbone only")
            state_dict = {f"backbone.{k}": v for k, v in checkpoint_filter_fn(state_dict, self.backbone).items()}
            return {**{k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}, **state_dict}
        body = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        rest = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
        return {**{f"backbone.{k}": v for k, v in checkpoint_filter_fn(body, self.backbone).items()}, **rest}

    def export_config(self) -> Dict:
        return dict(backbone=self.backbone_config, **self.head_config)


MASK2FORMER_VARIANTS = {
    "mask2former_internimage_h": ("internimage_h", dict(drop_path_rate=0.5)),
}


def _builder(variant: str, overrides: Dict):
    def build(kwargs: Dict) -> Mask2Former:
        backbone = kwargs.pop("backbone", None) or {}
        return Mask2Former(_seg_backbone(variant, **{**overrides, **backbone}), **kwargs)
    return build


for _name, (_variant, _overrides) in MASK2FORMER_VARIANTS.items():
    register_variant(_name, _builder(_variant, _overrides),
                     f"Mask2Former + {_variant} (official mmseg configuration); backbone={{...}} overrides its config.")
