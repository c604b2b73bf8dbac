"""DINO (4-scale) with an InternImage backbone, as the official InternImage COCO detectors
(``detection/configs/coco/dino_4scale_internimage_*``: mmdet 2.28 ``DINO`` + InternImage's ``DINOHead`` /
``DinoTransformer``), with no mmcv: the deformable attention is :class:`intern2.ops.MultiScaleDeformableAttention`.

Module names are the official ones (``backbone.``, ``neck.convs.i.conv``, ``bbox_head.transformer.encoder.layers.i.
attentions.0.sampling_offsets``, ``bbox_head.cls_branches.i``, ...), so a published ``state_dict`` loads as it is.

Inference (mmdet ``simple_test``): a ChannelMapper maps backbone levels (strides 8/16/32) to ``embed_dims`` channels
(1x1 conv + GroupNorm) and adds a 4th level (3x3 stride-2 conv + GN on the last backbone map); a 6-layer deformable
encoder (sine positions + level embeddings, padding masked) encodes all levels; every encoder position proposes a box
(centre of its cell, size 0.05 * 2^level, through ``enc_output`` + LayerNorm and the extra class / box branches) and the
``num_query`` best (max class logit) become the decoder's initial reference boxes (mixed query selection: content
queries are the learned ``query_embed``); a 6-layer decoder (self-attention, deformable cross-attention, FFN) refines
the boxes layer by layer (look forward twice: a layer's prediction uses the reference that entered it); the last layer's
sigmoid scores give the top ``max_per_img`` (query, class) pairs. Classes are sigmoid (no background logit).

``model(images)`` takes what torchvision detectors take (a list of (3, H, W) float images in [0, 1]) and returns their
per-image dicts (``boxes`` x1 y1 x2 y2 in the image's pixels, ``labels`` 1..K, ``scores``), so the detection pipeline,
``intern2 eval`` / ``predict`` / serve and the ONNX exporter treat it like Mask R-CNN (no masks).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..heads.detection import KeepRatioTransform, test_size_cfg
from ..heads.transformer import ConvGN, DeformableEncoder, FFN, MultiheadAttention, sine_position_encoding
from ..heads.detr_losses import DenoisingQueries, DinoCriterion, box_cxcywh_to_xyxy, cdn_queries, inverse_sigmoid
from ..ops.msda_module import MultiScaleDeformableAttention
from ..registry import register_variant
from .internimage import InternImage, checkpoint_filter_fn
from .upernet import _seg_backbone

__all__ = ["InternImageDINO", "DINOHead", "DinoTransformer", "DinoOutputs", "ChannelMapper", "DINO_VARIANTS"]

log = logging.getLogger(__name__)




def sine_box_embedding(boxes: Tensor, embed_dims: int) -> Tensor:
    """DINO's ``gen_sineembed_for_position`` for (B, Q, 4) boxes -> (B, Q, 2 * embed_dims): (y, x, w, h) blocks."""
    half = embed_dims // 2
    dim_t = torch.arange(half, dtype=boxes.dtype, device=boxes.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / half)

    def embed(values: Tensor) -> Tensor:
        pos = values[..., None] * (2 * math.pi) / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=3).flatten(2)
    x, y, w, h = boxes.unbind(-1)
    return torch.cat([embed(y), embed(x), embed(w), embed(h)], dim=2)


class ChannelMapper(nn.Module):
    """mmdet's ChannelMapper as DINO configures it: a 1x1 conv + GN per input, then ``num_outs - len(in_channels)``
    extra levels (3x3 stride-2 conv + GN), the first on the last *input*, later ones on the previous output."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 4, groups: int = 32):
        super().__init__()
        self.convs = nn.ModuleList([ConvGN(c, out_channels, 1, groups=groups) for c in in_channels])
        self.extra_convs = nn.ModuleList([
            ConvGN(in_channels[-1] if i == 0 else out_channels, out_channels, 3, 2, groups)
            for i in range(num_outs - len(in_channels))])

    def forward(self, inputs: Sequence[Tensor]) -> List[Tensor]:
        outs = [conv(x) for conv, x in zip(self.convs, inputs)]
        for i, conv in enumerate(self.extra_convs):
            outs.append(conv(inputs[-1] if i == 0 else outs[-1]))
        return outs


class DecoderLayer(nn.Module):
    """self_attn, norm, cross_attn (deformable, over the encoder memory), norm, ffn, norm."""

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, feedforward_channels: int):
        super().__init__()
        self.attentions = nn.ModuleList([
            MultiheadAttention(embed_dims, num_heads),
            MultiScaleDeformableAttention(embed_dims, num_heads, num_levels, num_points, dropout=0.0,
                                          batch_first=True)])
        self.ffns = nn.ModuleList([FFN(embed_dims, feedforward_channels)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor, padding_mask: Tensor,
                reference_points: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                attn_mask: Optional[Tensor]) -> Tensor:
        query = self.norms[0](self.attentions[0](query, query_pos=query_pos, attn_mask=attn_mask))
        query = self.norms[1](self.attentions[1](query, value=memory, query_pos=query_pos,
                                                 key_padding_mask=padding_mask, reference_points=reference_points,
                                                 spatial_shapes=spatial_shapes, level_start_index=level_start_index))
        return self.norms[2](self.ffns[0](query))


class DinoDecoder(nn.Module):
    """Box-refining decoder: each layer's query position is an MLP of the sine embedding of its reference box; each
    layer moves the box (``reg_branches[layer]`` on its un-normalised output), the next layer sees it detached."""

    def __init__(self, num_layers: int, embed_dims: int, **layer):
        super().__init__()
        self.embed_dims = embed_dims
        self.layers = nn.ModuleList([DecoderLayer(embed_dims=embed_dims, **layer) for _ in range(num_layers)])
        self.ref_point_head = nn.Sequential(nn.Linear(2 * embed_dims, embed_dims), nn.ReLU(),
                                            nn.Linear(embed_dims, embed_dims))
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, query: Tensor, reference: Tensor, valid_ratios: Tensor, reg_branches: nn.ModuleList,
                **kwargs) -> Tuple[Tensor, Tensor]:
        states, references = [], [reference]
        for index, layer in enumerate(self.layers):
            scaled = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            query_pos = self.ref_point_head(sine_box_embedding(scaled[:, :, 0], self.embed_dims))
            query = layer(query, query_pos, reference_points=scaled, **kwargs)
            refined = (reg_branches[index](query) + inverse_sigmoid(reference, eps=1e-3)).sigmoid()
            reference = refined.detach()
            states.append(self.norm(query))
            references.append(refined)
        return torch.stack(states), torch.stack(references)


@dataclass
class DinoOutputs:
    """What one DINO forward computes (batch first). ``all_*`` have one entry per decoder layer; in training the
    first ``pad_size`` queries are the denoising ones."""
    all_cls_scores: Tensor  # (Ld, B, Q, K) logits
    all_bbox_preds: Tensor  # (Ld, B, Q, 4) sigmoid (cx, cy, w, h) relative to each image's valid size
    enc_topk_scores: Tensor  # (B, num_query, K)
    enc_topk_anchors: Tensor  # (B, num_query, 4) sigmoid
    memory: Tensor  # (B, S, E) encoder output
    enc_output_memory: Tensor
    enc_output_proposals: Tensor  # (B, S, 4) inverse-sigmoid proposals (+inf where invalid)
    enc_outputs_class: Tensor
    enc_outputs_coord_unact: Tensor
    enc_topk_indices: Tensor  # (B, num_query)
    inter_states: Tensor  # (Ld, B, Q, E) normed layer outputs
    inter_references: Tensor  # (Ld + 1, B, Q, 4)


class DinoTransformer(nn.Module):
    """The official ``DinoTransformer`` (two-stage): encoder, proposal generation, query selection, decoder."""

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, feedforward_channels: int = 2048,
                 num_query: int = 900):
        super().__init__()
        layer = dict(num_heads=num_heads, num_levels=num_levels, num_points=num_points,
                     feedforward_channels=feedforward_channels)
        self.embed_dims, self.num_levels, self.num_query = embed_dims, num_levels, num_query
        self.level_embeds = nn.Parameter(torch.empty(num_levels, embed_dims).normal_())
        self.encoder = DeformableEncoder(num_encoder_layers, embed_dims=embed_dims, **layer)
        self.decoder = DinoDecoder(num_decoder_layers, embed_dims, **layer)
        self.enc_output = nn.Linear(embed_dims, embed_dims)
        self.enc_output_norm = nn.LayerNorm(embed_dims)
        self.query_embed = nn.Embedding(num_query, embed_dims)

    @staticmethod
    def valid_ratio(mask: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, H, W) padding mask -> (B, 2) valid (width, height) fractions."""
        height, width = mask.shape[1:]
        valid_h = (~mask[:, :, 0]).sum(1).to(dtype)
        valid_w = (~mask[:, 0, :]).sum(1).to(dtype)
        return torch.stack([valid_w / width, valid_h / height], -1)

    @staticmethod
    def encoder_reference_points(spatial_shapes: Sequence[Tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalised by that level's valid size -> (B, S, L, 2)."""
        points = []
        for level, (h, w) in enumerate(spatial_shapes):
            # arange + 0.5 = mmdet's linspace(0.5, n - 0.5, n) exactly (unit steps), and exports as ONNX Range
            ys, xs = torch.meshgrid(torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                                    torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                                    indexing="ij")
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((xs, ys), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def encoder_proposals(self, memory: Tensor, padding_mask: Tensor,
                          spatial_shapes: Sequence[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
        """One (cx, cy, w, h) proposal per encoder position (cell centre over the image's valid cells, size
        0.05 * 2^level), as inverse sigmoid, +inf where padded or too close to an edge; the memory there is zeroed
        before ``enc_output`` + LayerNorm."""
        batch = memory.shape[0]
        proposals, start = [], 0
        for level, (h, w) in enumerate(spatial_shapes):
            mask = padding_mask[:, start:start + h * w].view(batch, h, w)
            valid_h, valid_w = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
            ys, xs = torch.meshgrid(torch.arange(h, dtype=memory.dtype, device=memory.device),
                                    torch.arange(w, dtype=memory.dtype, device=memory.device), indexing="ij")
            grid = torch.stack([xs, ys], -1)
            scale = torch.stack([valid_w, valid_h], 1).view(batch, 1, 1, 2)
            grid = (grid[None].expand(batch, -1, -1, -1) + 0.5) / scale
            size = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            proposals.append(torch.cat((grid, size), -1).view(batch, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = padding_mask[..., None] | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        memory = memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals

    def forward(self, feats: Sequence[Tensor], masks: Sequence[Tensor], positions: Sequence[Tensor],
                cls_branches: nn.ModuleList, reg_branches: nn.ModuleList, dn_label_query: Optional[Tensor] = None,
                dn_bbox_query: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        shapes = [tuple(f.shape[-2:]) for f in feats]
        source = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        padding = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embeds[i].view(1, 1, -1)
                         for i, p in enumerate(positions)], 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=source.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.valid_ratio(m, source.dtype) for m in masks], 1)
        memory = self.encoder(source, query_pos=pos, padding_mask=padding,
                              reference_points=self.encoder_reference_points(shapes, valid_ratios),
                              spatial_shapes=spatial_shapes, level_start_index=level_start_index)

        output_memory, proposals = self.encoder_proposals(memory, padding, shapes)
        enc_class = cls_branches[self.decoder_layers](output_memory)
        enc_coord = reg_branches[self.decoder_layers](output_memory) + proposals
        topk = torch.topk(enc_class.max(-1)[0], self.num_query, dim=1)[1]
        topk_score = torch.gather(enc_class, 1, topk[..., None].expand(-1, -1, enc_class.shape[-1]))
        topk_coords = torch.gather(enc_coord, 1, topk[..., None].expand(-1, -1, 4))
        topk_anchor = topk_coords.sigmoid()

        batch = source.shape[0]
        query = self.query_embed.weight[None].expand(batch, -1, -1)
        reference = topk_coords.detach()
        if dn_label_query is not None:
            query = torch.cat([dn_label_query, query], 1)
            reference = torch.cat([dn_bbox_query, reference], 1)
        states, references = self.decoder(query, reference.sigmoid(), valid_ratios, reg_branches, memory=memory,
                                          padding_mask=padding, spatial_shapes=spatial_shapes,
                                          level_start_index=level_start_index, attn_mask=attn_mask)
        return dict(memory=memory, enc_output_memory=output_memory, enc_output_proposals=proposals,
                    enc_outputs_class=enc_class, enc_outputs_coord_unact=enc_coord, enc_topk_indices=topk,
                    enc_topk_scores=topk_score, enc_topk_anchors=topk_anchor, inter_states=states,
                    inter_references=references)

    @property
    def decoder_layers(self) -> int:
        return len(self.decoder.layers)


class DINOHead(nn.Module):
    """The official ``DINOHead``: transformer, per-layer class / box branches (one more for the encoder's
    proposals), the label embedding of the denoising queries, sine positions, top-k post-processing."""

    def __init__(self, num_classes: int = 80, embed_dims: int = 256, num_query: int = 900, num_feats: int = 128,
                 temperature: float = 20, max_per_img: int = 100, num_dn_queries: int = 100, **transformer):
        super().__init__()
        self.num_classes, self.num_feats, self.temperature = num_classes, num_feats, temperature
        self.max_per_img, self.num_dn_queries = max_per_img, num_dn_queries
        self.criterion = DinoCriterion(num_classes)
        self.transformer = DinoTransformer(embed_dims=embed_dims, num_query=num_query, **transformer)
        predictions = self.transformer.decoder_layers + 1
        self.cls_branches = nn.ModuleList([nn.Linear(embed_dims, num_classes) for _ in range(predictions)])
        self.reg_branches = nn.ModuleList([
            nn.Sequential(nn.Linear(embed_dims, embed_dims), nn.ReLU(), nn.Linear(embed_dims, embed_dims), nn.ReLU(),
                          nn.Linear(embed_dims, 4)) for _ in range(predictions)])
        self.label_embedding = nn.Embedding(num_classes, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """mmdet's order: xavier for the transformer's matrices, MSDA's own init, normal level and query embeddings;
        class biases at prior probability 0.01, the last box layers zero."""
        for p in self.transformer.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.transformer.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.init_weights()
        nn.init.normal_(self.transformer.level_embeds)
        nn.init.normal_(self.transformer.query_embed.weight)
        prior = -math.log((1 - 0.01) / 0.01)
        for branch in self.cls_branches:
            nn.init.constant_(branch.bias, prior)
        for branch in self.reg_branches:
            nn.init.zeros_(branch[-1].weight)
            nn.init.zeros_(branch[-1].bias)

    def forward(self, feats: Sequence[Tensor], image_sizes: Sequence[Tuple[int, int]], input_size: Tuple[int, int],
                dn_label_query: Optional[Tensor] = None, dn_bbox_query: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> DinoOutputs:
        """``feats``: the neck's levels; ``image_sizes``: each image's (h, w) inside the padded ``input_size``."""
        image_masks = feats[0].new_ones((feats[0].shape[0], *input_size))
        for index, (h, w) in enumerate(image_sizes):
            image_masks[index, :h, :w] = 0
        masks = [F.interpolate(image_masks[None], size=f.shape[-2:])[0].to(torch.bool) for f in feats]
        positions = [sine_position_encoding(m, self.num_feats, self.temperature, dtype=feats[0].dtype) for m in masks]
        out = self.transformer(feats, masks, positions, self.cls_branches, self.reg_branches, dn_label_query,
                               dn_bbox_query, attn_mask)
        states, references = out["inter_states"], out["inter_references"]
        if dn_label_query is not None and dn_label_query.shape[1] == 0:  # no gt in the batch: keep DDP's graph whole
            states = torch.cat([states[:1] + self.label_embedding.weight[0, 0] * 0.0, states[1:]])
        classes, coords = [], []
        for layer in range(states.shape[0]):
            classes.append(self.cls_branches[layer](states[layer]))
            coords.append((self.reg_branches[layer](states[layer])
                           + inverse_sigmoid(references[layer], eps=1e-3)).sigmoid())
        return DinoOutputs(all_cls_scores=torch.stack(classes), all_bbox_preds=torch.stack(coords), **{
            k: out[k] for k in ("enc_topk_scores", "enc_topk_anchors", "memory", "enc_output_memory",
                                "enc_output_proposals", "enc_outputs_class", "enc_outputs_coord_unact",
                                "enc_topk_indices", "inter_states", "inter_references")})

    def denoising_queries(self, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                          image_sizes: Sequence[Tuple[int, int]]) -> DenoisingQueries:
        """The training batch's contrastive denoising queries (labels 0-based)."""
        return cdn_queries(gt_boxes, gt_labels, image_sizes, self.label_embedding, self.transformer.num_query,
                           self.num_classes, self.num_dn_queries)

    def loss(self, out: DinoOutputs, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
             image_sizes: Sequence[Tuple[int, int]], denoising: Optional[DenoisingQueries]) -> Dict[str, Tensor]:
        """The official loss dict (``interm_loss_*``, ``loss_*``, ``d{i}.loss_*``, ``dn_loss_*``, ``d{i}.dn_loss_*``);
        boxes xyxy in the resized images' pixels, labels 0-based."""
        return self.criterion(out.all_cls_scores, out.all_bbox_preds, out.enc_topk_scores, out.enc_topk_anchors,
                              gt_boxes, gt_labels, image_sizes, denoising)

    def detections(self, cls_scores: Tensor, bbox_preds: Tensor,
                   image_sizes: Sequence[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """mmdet's ``get_bboxes`` (without rescaling): the top ``max_per_img`` sigmoid scores over (query, class)
        of one layer's outputs, boxes in the resized image's pixels, clamped to it; labels 1..K."""
        results = []
        for scores, boxes, (height, width) in zip(cls_scores, bbox_preds, image_sizes):
            top, index = scores.sigmoid().reshape(-1).topk(min(self.max_per_img, scores.numel()))
            labels = index % self.num_classes
            xyxy = box_cxcywh_to_xyxy(boxes[index // self.num_classes])
            scale = xyxy.new_tensor([width, height, width, height])
            xyxy = torch.minimum((xyxy * scale).clamp(min=0), scale)
            results.append({"boxes": xyxy, "labels": labels + 1, "scores": top})
        return results


class InternImageDINO(nn.Module):
    """DINO-4scale + InternImage, configured like the official COCO detectors.

    Args:
        backbone: InternImage config (the det flavour); levels 1..3 (strides 8/16/32) feed the neck.
        num_classes: object classes (80 for COCO; sigmoid, no background).
        min_size, max_size: the keep-ratio test resize (mmdet's 1333 x 800), batch padded to a multiple of 32.
        embed_dims, num_query, max_per_img, num_feats, temperature: the head (official 256, 900, 100, 128, 20).
        **transformer: DinoTransformer options (num_encoder_layers, num_decoder_layers, feedforward_channels,
            num_heads, num_points).
    """

    def __init__(self, backbone: Dict, num_classes: int = 80, min_size: int = 800, max_size: int = 1333,
                 embed_dims: int = 256, num_query: int = 900, max_per_img: int = 100, num_feats: int = 128,
                 temperature: float = 20, neck_groups: int = 32, num_dn_queries: int = 100, **transformer):
        super().__init__()
        self.backbone = InternImage(**backbone, features_only=True, out_indices=(1, 2, 3))
        self.neck = ChannelMapper(self.backbone.feature_info.channels(), embed_dims, 4, neck_groups)
        self.bbox_head = DINOHead(num_classes, embed_dims, num_query, num_feats, temperature, max_per_img,
                                  num_dn_queries, **transformer)
        self.transform = KeepRatioTransform(min_size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))
        self.backbone_config = dict(backbone)
        self.num_classes = num_classes
        self.head_config = dict(num_classes=num_classes, min_size=min_size, max_size=max_size, embed_dims=embed_dims,
                                num_query=num_query, max_per_img=max_per_img, num_feats=num_feats,
                                temperature=temperature, neck_groups=neck_groups, num_dn_queries=num_dn_queries,
                                **transformer)

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        """torchvision's detector contract: a list of (3, H, W) [0, 1] images -> per-image dicts."""
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        if self.training and targets is None:
            raise ValueError("DINO: training needs targets (boxes, labels)")
        batch, targets = self.transform(images, targets)
        feats = self.neck(self.backbone(batch.tensors))
        input_size = tuple(batch.tensors.shape[-2:])
        if self.training:
            gt_boxes = [t["boxes"] for t in targets]
            gt_labels = [t["labels"] - 1 for t in targets]
            dn = self.bbox_head.denoising_queries(gt_boxes, gt_labels, batch.image_sizes)
            out = self.bbox_head(feats, batch.image_sizes, input_size, dn.label, dn.boxes, dn.attn_mask)
            return self.bbox_head.loss(out, gt_boxes, gt_labels, batch.image_sizes, dn)
        out = self.bbox_head(feats, batch.image_sizes, input_size)
        detections = self.bbox_head.detections(out.all_cls_scores[-1], out.all_bbox_preds[-1], batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def checkpoint_filter(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The official mmdet layout is ours (backbone names go through InternImage's filter); any other state dict
        (a classifier, another task's model with an InternImage under ``backbone.``) initialises the backbone only."""
        if not any(k.startswith(("neck.", "bbox_head.")) for k in state_dict):  # a classifier, segmentor, ...
            log.info("checkpoint has no detector keys: loading it into the backbone only")
            state_dict = {f"backbone.{k}": v for k, v in checkpoint_filter_fn(state_dict, self.backbone).items()}
            return {**{k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}, **state_dict}
        body = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        rest = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
        return {**{f"backbone.{k}": v for k, v in checkpoint_filter_fn(body, self.backbone).items()}, **rest}

    def export_config(self) -> Dict:
        return dict(backbone=self.backbone_config, **self.head_config)


# name -> (backbone variant, overrides of the official config's backbone); tags are in intern2.weights.
DINO_VARIANTS = {
    "dino_4scale_internimage_t": ("internimage_t", dict(drop_path_rate=0.2)),
    "dino_4scale_internimage_s": ("internimage_s", dict(drop_path_rate=0.3)),  # no official config: T's head
    "dino_4scale_internimage_b": ("internimage_b", dict(drop_path_rate=0.4)),  # no official config: T's head
    "dino_4scale_internimage_l": ("internimage_l", dict(drop_path_rate=0.4)),
}


def _builder(variant: str, overrides: Dict):
    def build(kwargs: Dict) -> InternImageDINO:
        backbone = kwargs.pop("backbone", None) or {}
        return InternImageDINO(_seg_backbone(variant, **{**overrides, **backbone}), **kwargs)
    return build


for _name, (_variant, _overrides) in DINO_VARIANTS.items():
    register_variant(_name, _builder(_variant, _overrides),
                     f"DINO-4scale + {_variant} (official mmdet COCO configuration).", test_size_cfg)
