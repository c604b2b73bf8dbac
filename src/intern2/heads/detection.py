"""Mask R-CNN glue: an InternImage + FPN backbone on torchvision's MaskRCNN, set up to compute what mmdet 2.x
computes for the official InternImage checkpoints, and the converter for those checkpoints.

Matching mmdet: FPN 256 channels with a max-pooled P6 (mmdet ``num_outs=5``, no extra convs); anchors 32..512 x
ratios 0.5/1/2 *without* torchvision's rounding of the base anchors; RoIAlign ``aligned=True`` with adaptive
sampling (mmcv's ``sampling_ratio=0``) for boxes (7x7) and masks (14x14); box coder weights (10, 10, 5, 5) =
mmdet stds (0.1, 0.1, 0.2, 0.2); the keep-ratio resize rounds sizes as mmcv does. mmdet puts the background
class last and regresses 80x4 class-specific boxes; torchvision puts it first with 81x4 boxes: the converter
reorders rows.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

__all__ = ["InternImageFPN", "UnroundedAnchorGenerator", "AlignedMultiScaleRoIAlign", "KeepRatioTransform",
           "mmdet_to_torchvision", "torchvision_to_mmdet", "mask_rcnn_components"]


class InternImageFPN(nn.Module):
    """torchvision's BackboneWithFPN contract (``out_channels``, OrderedDict of maps) for an InternImage body."""

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class UnroundedAnchorGenerator(AnchorGenerator):
    """mmdet's base anchors are not rounded to integers (torchvision's are)."""

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign with ``aligned=True`` (half-pixel-correct sampling, as mmcv's RoIAlign in mmdet)."""

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        # rois.shape[0], not len(rois): a traced export keeps the number of boxes dynamic
        result = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            result[index] = roi_align(feature, rois[index], self.output_size, spatial_scale=scale,
                                      sampling_ratio=self.sampling_ratio, aligned=True).to(result.dtype)
        return result


class KeepRatioTransform(GeneralizedRCNNTransform):
    """torchvision's transform with mmdet's keep-ratio resize: the scale is min(short / min(h, w), long /
    max(h, w)) as in torchvision, but the size is rounded (mmcv's ``int(x * scale + 0.5)``) where torchvision
    floors it, so an image gets the size the official pipeline gives it (e.g. 427 x 640 -> 800 x 1199)."""

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None):
        height, width = image.shape[-2:]
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        scale = min(short / min(height, width), self.max_size / max(height, width))
        size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))  # a 1 x 10000 image too
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (height, width), size)
            if "masks" in target:
                target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        return image, target


# -------------------------------------------------------------------------------------------------- converter
def _renames(num_fpn: int, num_mask_convs: int) -> List[Tuple[str, str]]:
    """(mmdet prefix, torchvision prefix) pairs for every module whose tensors keep their layout."""
    pairs = [("backbone.", "backbone.body."),
             ("rpn_head.rpn_conv.", "rpn.head.conv.0.0."), ("rpn_head.rpn_cls.", "rpn.head.cls_logits."),
             ("rpn_head.rpn_reg.", "rpn.head.bbox_pred."),
             ("roi_head.bbox_head.shared_fcs.0.", "roi_heads.box_head.fc6."),
             ("roi_head.bbox_head.shared_fcs.1.", "roi_heads.box_head.fc7."),
             ("roi_head.mask_head.upsample.", "roi_heads.mask_predictor.conv5_mask.")]
    pairs += [(f"neck.lateral_convs.{i}.conv.", f"backbone.fpn.inner_blocks.{i}.0.") for i in range(num_fpn)]
    pairs += [(f"neck.fpn_convs.{i}.conv.", f"backbone.fpn.layer_blocks.{i}.0.") for i in range(num_fpn)]
    pairs += [(f"roi_head.mask_head.convs.{i}.conv.", f"roi_heads.mask_head.{i}.0.") for i in range(num_mask_convs)]
    return pairs


def _counts(state: Dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def mmdet_to_torchvision(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Convert an mmdet Mask R-CNN state dict (background last, 80x4 class boxes) to our torchvision layout.

    Raises ValueError listing any key it does not know, so nothing is silently dropped.
    """
    pairs = _renames(_counts(state, "neck.lateral_convs."), _counts(state, "roi_head.mask_head.convs."))
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith("roi_head.bbox_head.fc_cls."):  # [80 classes, background] -> [background, 80 classes]
            out["roi_heads.box_predictor.cls_score." + key.rsplit(".", 1)[1]] = torch.cat([value[-1:], value[:-1]])
        elif key.startswith("roi_head.bbox_head.fc_reg."):  # 80x4 -> 81x4 (background rows unused)
            out["roi_heads.box_predictor.bbox_pred." + key.rsplit(".", 1)[1]] = torch.cat(
                [value.new_zeros((4, *value.shape[1:])), value])
        elif key.startswith("roi_head.mask_head.conv_logits."):  # 80 -> 81 (background row unused)
            out["roi_heads.mask_predictor.mask_fcn_logits." + key.rsplit(".", 1)[1]] = torch.cat(
                [value.new_zeros((1, *value.shape[1:])), value])
        else:
            match = next(((src, dst) for src, dst in pairs if key.startswith(src)), None)
            if match is None:
                unknown.append(key)
                continue
            out[match[1] + key[len(match[0]):]] = value
    if unknown:
        raise ValueError(f"mmdet checkpoint: {len(unknown)} keys this converter does not know: {unknown[:8]}")
    return out


def torchvision_to_mmdet(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The inverse of :func:`mmdet_to_torchvision` (writes files in the official layout)."""
    pairs = _renames(_counts(state, "backbone.fpn.inner_blocks."), _counts(state, "roi_heads.mask_head."))
    out = {}
    for key, value in state.items():
        suffix = key.rsplit(".", 1)[1]
        if key.startswith("roi_heads.box_predictor.cls_score."):
            out[f"roi_head.bbox_head.fc_cls.{suffix}"] = torch.cat([value[1:], value[:1]])
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            out[f"roi_head.bbox_head.fc_reg.{suffix}"] = value[4:]
        elif key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
            out[f"roi_head.mask_head.conv_logits.{suffix}"] = value[1:]
        else:
            src, dst = next((s, d) for s, d in pairs if key.startswith(d))
            out[src + key[len(dst):]] = value
    return out


def mask_rcnn_components(fpn_channels: int, num_classes: int, box_fc_channels: int = 1024,
                         mask_channels: int = 256) -> Dict[str, nn.Module]:
    """Keyword arguments for torchvision's MaskRCNN that reproduce the mmdet configuration (2-FC box head of
    ``box_fc_channels``, 4-conv mask head of ``mask_channels``; narrower heads train much faster on a CPU).
    ``num_classes`` counts the background."""
    sizes: Sequence[Tuple[int]] = ((32,), (64,), (128,), (256,), (512,))
    return dict(rpn_anchor_generator=UnroundedAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)),
                box_roi_pool=AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=0),
                box_head=TwoMLPHead(fpn_channels * 7 * 7, box_fc_channels),
                box_predictor=FastRCNNPredictor(box_fc_channels, num_classes),
                mask_roi_pool=AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 14, sampling_ratio=0),
                mask_head=MaskRCNNHeads(fpn_channels, [mask_channels] * 4, 1),
                mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes))
