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

import contextlib
import contextvars
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

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

from ..data.segmentation import keep_ratio_size

__all__ = ["InternImageFPN", "UnroundedAnchorGenerator", "AlignedMultiScaleRoIAlign", "KeepRatioTransform",
           "test_size_cfg", "paste_masks", "unpasted_masks", "mmdet_to_torchvision", "torchvision_to_mmdet",
           "mask_rcnn_components"]


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
    floors it, so an image gets the size the official pipeline gives it (e.g. 427 x 640 -> 800 x 1199).

    :meth:`postprocess` pastes every detection's mask at the image size (4 bytes per pixel each, as an evaluation
    needs) unless called within :func:`unpasted_masks`."""

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None):
        height, width = image.shape[-2:]
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        size = keep_ratio_size(height, width, (short, self.max_size))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (height, width), size)
            if "masks" in target:
                target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        return image, target

    def postprocess(self, result: List[Dict[str, Tensor]], image_shapes: List[Tuple[int, int]],
                    original_image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """torchvision's (boxes back to the original size), with mmdet's mask pasting (:func:`paste_masks`) outside
        :func:`unpasted_masks`; within it masks stay (N, 1, M, M) probabilities in their boxes."""
        if self.training:
            return result
        for prediction, resized, original in zip(result, image_shapes, original_image_sizes):
            prediction["boxes"] = resize_boxes(prediction["boxes"], resized, original)
            if "masks" in prediction and _PASTE_MASKS.get():
                prediction["masks"] = paste_masks(prediction["masks"], prediction["boxes"], *original)
        return result


# Per thread (and task): one caller's choice cannot leak into another's call on the same model.
_PASTE_MASKS: contextvars.ContextVar[bool] = contextvars.ContextVar("paste_masks", default=True)


@contextlib.contextmanager
def unpasted_masks() -> Iterator[None]:
    """Within it, detectors return each mask as (N, 1, M, M) probabilities in its box instead of pasting all N at
    the image size, for a caller that pastes only the detections it keeps (100 masks of a 12 MP photo are 5 GB)."""
    token = _PASTE_MASKS.set(False)
    try:
        yield
    finally:
        _PASTE_MASKS.reset(token)


def test_size_cfg(model: nn.Module, record: object = None) -> Dict:
    """A detector's pretrained-config entry that follows its built resize bounds: the protocol's test size (long,
    short) (a ``register_variant`` ``cfg_of_model``; the weights ``record`` is not needed)."""
    return dict(test_size=[model.transform.max_size, model.transform.min_size[-1]])


def _paste_weights(low: Tensor, high: Tensor, size: int, length: int) -> Tensor:
    """(N, size, length) bilinear weights that sample a length-``length`` axis spanning [low, high) of each of N
    boxes at the ``size`` pixel centres of an image axis; 0 outside mmdet's paste region (the box's pixels and one
    more on each side)."""
    centres = torch.arange(size, dtype=low.dtype, device=low.device) + 0.5
    grid = (centres - low[:, None]) / (high - low)[:, None] * 2 - 1
    grid = torch.where(torch.isinf(grid), torch.zeros_like(grid), grid)  # a zero-size box: mmdet samples the centre
    source = ((grid + 1) * length - 1) / 2  # grid_sample's index for align_corners=False
    taps = torch.arange(length, dtype=low.dtype, device=low.device)
    weights = (1 - (source[..., None] - taps).abs()).clamp(min=0)  # bilinear = triangle kernel, zeros outside
    pixel = centres - 0.5
    inside = (pixel >= torch.floor(low)[:, None] - 1) & (pixel < torch.ceil(high)[:, None] + 1)
    return weights * inside[..., None].to(weights.dtype)


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """mmdet's mask pasting (``_do_paste_mask`` with ``skip_empty``, as on CPU): each (M, M) probability map covers
    its box and is sampled bilinearly (zero padding, ``align_corners=False``) at the pixel centres of the box and one
    pixel around it; elsewhere 0. masks (N, 1, M, M), boxes (N, 4) x1 y1 x2 y2 in pixels -> (N, 1, height, width);
    threshold with ``>= 0.5`` as mmdet does.

    Bilinear sampling is separable, so this is two small matrix products per mask rather than N x H x W grid
    points (the same numbers; traceable, so detectors export with it)."""
    masks = masks[:, 0].to(boxes.dtype)
    rows = _paste_weights(boxes[:, 1], boxes[:, 3], height, masks.shape[-2])
    cols = _paste_weights(boxes[:, 0], boxes[:, 2], width, masks.shape[-1])
    return (rows @ masks @ cols.transpose(1, 2))[:, None]


# -------------------------------------------------------------------------------------------------- converter
# A rule is (mmdet prefix, torchvision prefix, kind). Kinds: "same" keeps the tensor; "cls" moves the background row
# (mmdet: last, torchvision: first); "reg" adds torchvision's unused background box rows (80x4 -> 81x4); "logits"
# adds its unused background mask channel.
_Rule = Tuple[str, str, str]


def _counts(state: Dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def _mask_rules(mmdet: str, ours_head: str, ours_predictor: str, num_convs: int) -> List[_Rule]:
    return [*((f"{mmdet}convs.{i}.conv.", f"{ours_head}{i}.0.", "same") for i in range(num_convs)),
            (f"{mmdet}upsample.", f"{ours_predictor}conv5_mask.", "same"),
            (f"{mmdet}conv_logits.", f"{ours_predictor}mask_fcn_logits.", "logits")]


def _rules(state: Dict[str, Tensor], mmdet_layout: bool) -> List[_Rule]:
    """Every rule a Mask R-CNN or Cascade Mask R-CNN state dict (in either layout) needs."""
    if mmdet_layout:
        num_fpn = _counts(state, "neck.lateral_convs.")
        cascade = any(k.startswith("roi_head.bbox_head.0.") for k in state)
        num_stages = _counts(state, "roi_head.bbox_head.") if cascade else 1
        box_convs = _counts(state, "roi_head.bbox_head.0.shared_convs.")
        mask_convs = _counts(state, "roi_head.mask_head.0.convs." if cascade else "roi_head.mask_head.convs.")
    else:
        num_fpn = _counts(state, "backbone.fpn.inner_blocks.")
        cascade = any(k.startswith("roi_heads.box_heads.") for k in state)
        num_stages = _counts(state, "roi_heads.box_heads.") if cascade else 1
        box_convs = _counts(state, "roi_heads.box_heads.0.") - 1  # the FC follows the convs and a Flatten
        mask_convs = _counts(state, "roi_heads.mask_heads.0." if cascade else "roi_heads.mask_head.")
    rules: List[_Rule] = [("backbone.", "backbone.body.", "same"),
                          ("rpn_head.rpn_conv.", "rpn.head.conv.0.0.", "same"),
                          ("rpn_head.rpn_cls.", "rpn.head.cls_logits.", "same"),
                          ("rpn_head.rpn_reg.", "rpn.head.bbox_pred.", "same")]
    rules += [(f"neck.lateral_convs.{i}.conv.", f"backbone.fpn.inner_blocks.{i}.0.", "same") for i in range(num_fpn)]
    rules += [(f"neck.fpn_convs.{i}.conv.", f"backbone.fpn.layer_blocks.{i}.0.", "same") for i in range(num_fpn)]
    if not cascade:
        return rules + [("roi_head.bbox_head.shared_fcs.0.", "roi_heads.box_head.fc6.", "same"),
                        ("roi_head.bbox_head.shared_fcs.1.", "roi_heads.box_head.fc7.", "same"),
                        ("roi_head.bbox_head.fc_cls.", "roi_heads.box_predictor.cls_score.", "cls"),
                        ("roi_head.bbox_head.fc_reg.", "roi_heads.box_predictor.bbox_pred.", "reg"),
                        *_mask_rules("roi_head.mask_head.", "roi_heads.mask_head.", "roi_heads.mask_predictor.",
                                     mask_convs)]
    for s in range(num_stages):  # mmdet ConvFCBBoxHead = torchvision FastRCNNConvFCHead (convs, Flatten, FC)
        box, ours = f"roi_head.bbox_head.{s}.", f"roi_heads.box_heads.{s}."
        rules += [(f"{box}shared_convs.{i}.{part}.", f"{ours}{i}.{j}.", "same")
                  for i in range(box_convs) for j, part in enumerate(("conv", "bn"))]
        rules += [(f"{box}shared_fcs.0.", f"{ours}{box_convs + 1}.", "same"),
                  (f"{box}fc_cls.", f"roi_heads.box_predictors.{s}.cls_score.", "cls"),
                  (f"{box}fc_reg.", f"roi_heads.box_predictors.{s}.bbox_pred.", "reg")]
        rules += _mask_rules(f"roi_head.mask_head.{s}.", f"roi_heads.mask_heads.{s}.",
                             f"roi_heads.mask_predictors.{s}.", mask_convs)
    return rules


def _convert(state: Dict[str, Tensor], to_torchvision: bool) -> Dict[str, Tensor]:
    rules = _rules(state, mmdet_layout=to_torchvision)
    out, unknown = {}, []
    for key, value in state.items():
        rule = next((r for r in rules if key.startswith(r[0 if to_torchvision else 1])), None)
        if rule is None:
            unknown.append(key)
            continue
        src, dst = (rule[0], rule[1]) if to_torchvision else (rule[1], rule[0])
        kind = rule[2]
        if kind == "cls":
            value = torch.cat([value[-1:], value[:-1]]) if to_torchvision else torch.cat([value[1:], value[:1]])
        elif kind in ("reg", "logits"):
            rows = 4 if kind == "reg" else 1
            value = torch.cat([value.new_zeros((rows, *value.shape[1:])), value]) if to_torchvision else value[rows:]
        out[dst + key[len(src):]] = value
    if unknown:
        layout = "mmdet checkpoint" if to_torchvision else "detector state dict"
        raise ValueError(f"{layout}: {len(unknown)} keys this converter does not know: {unknown[:8]}")
    return out


def mmdet_to_torchvision(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Convert an mmdet Mask R-CNN or Cascade Mask R-CNN state dict (background last, 80x4 class boxes) to our
    torchvision layout. Raises ValueError listing any key it does not know, so nothing is silently dropped."""
    return _convert(state, to_torchvision=True)


def torchvision_to_mmdet(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The inverse of :func:`mmdet_to_torchvision` (writes files in the official layout)."""
    return _convert(state, to_torchvision=False)


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
