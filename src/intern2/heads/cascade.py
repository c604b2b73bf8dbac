"""Cascade Mask R-CNN RoI heads on torchvision's detection stack, computing what mmdet 2.x's ``CascadeRoIHead``
computes for the official InternImage-L/XL COCO checkpoints (``cascade_internimage_{l,xl}_fpn_{1x,3x}_coco``).

Each of the three stages has its own ConvFC box head (4 3x3 convs + BatchNorm + ReLU, one FC), a class-specific
box predictor (the official configs have ``reg_class_agnostic=False``), its box coder's target stds, and a mask
head; the RoI poolers are shared (mmdet's per-stage extractors are identical and parameter-free).

Test (mmdet ``simple_test``): stage s+1 pools the boxes of stage s regressed with the deltas of stage s's best
non-background class; the score of a box is the softmax of the three stages' logits averaged; its coordinates are
the last stage's class-specific regression; class-wise NMS; a detection's mask is the mean over the stages of each
stage's mask probability for the detected class.

Training (mmdet ``forward_train``): every stage assigns its proposals to the ground truth at its own IoU (0.5 / 0.6
/ 0.7, no low-quality matches), samples 512 RoIs per image (a quarter positive; the ground-truth boxes are added as
proposals), and is trained with cross-entropy, GIoU on the decoded boxes (``reg_decoded_bbox``, weight 10, averaged
over the sampled RoIs) and the mask loss of its positives, all weighted 1 / 0.5 / 0.25. Its sampled RoIs, moved by
its own (detached) regression of the target class (the best non-background class for negatives), without the added
ground-truth boxes, are the next stage's proposals.

Labels follow torchvision: 0 is the background, classes are 1..K (mmdet puts the background last; the converter in
:mod:`intern2.heads.detection` reorders the official tensors).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, generalized_box_iou_loss

__all__ = ["CascadeRoIHeads", "cascade_stage", "CASCADE_STDS", "CASCADE_IOUS", "CASCADE_LOSS_WEIGHTS"]

# The official configs' per-stage box-coder stds, assigner IoUs and loss weights.
CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


def cascade_stage(fpn_channels: int, num_classes: int, box_conv_channels: int = 256, box_fc_channels: int = 1024,
                  mask_channels: int = 256, num_box_convs: int = 4) -> Dict[str, nn.Module]:
    """One stage's heads: ConvFC box head (mmdet ``ConvFCBBoxHead`` with BN), predictor, 4-conv mask head and
    predictor. ``num_classes`` counts the background."""
    return dict(box_head=FastRCNNConvFCHead((fpn_channels, 7, 7), [box_conv_channels] * num_box_convs,
                                            [box_fc_channels], norm_layer=nn.BatchNorm2d),
                box_predictor=FastRCNNPredictor(box_fc_channels, num_classes),
                mask_head=MaskRCNNHeads(fpn_channels, [mask_channels] * 4, 1),
                mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes))


class CascadeRoIHeads(nn.Module):
    """torchvision's ``RoIHeads`` contract (``forward(features, proposals, image_shapes, targets)`` returns
    (detections, losses)) for a cascade of stages.

    Args:
        base: the torchvision RoIHeads of stage 0 (its poolers, heads, sampling and test settings are reused).
        stages: the heads of the later stages (dicts of :func:`cascade_stage`).
        stds, ious, loss_weights: per stage (all stages, stage 0 included).
        box_loss_weight: GIoU loss weight (official 10).
    """

    def __init__(self, base: RoIHeads, stages: Sequence[Dict[str, nn.Module]],
                 stds: Sequence[Sequence[float]] = CASCADE_STDS, ious: Sequence[float] = CASCADE_IOUS,
                 loss_weights: Sequence[float] = CASCADE_LOSS_WEIGHTS, box_loss_weight: float = 10.0):
        super().__init__()
        num_stages = 1 + len(stages)
        if not len(stds) == len(ious) == len(loss_weights) == num_stages:
            raise ValueError(f"cascade: {num_stages} stages need as many stds, IoUs and loss weights")
        self.box_roi_pool, self.mask_roi_pool = base.box_roi_pool, base.mask_roi_pool
        self.box_heads = nn.ModuleList([base.box_head, *(s["box_head"] for s in stages)])
        self.box_predictors = nn.ModuleList([base.box_predictor, *(s["box_predictor"] for s in stages)])
        self.mask_heads = nn.ModuleList([base.mask_head, *(s["mask_head"] for s in stages)])
        self.mask_predictors = nn.ModuleList([base.mask_predictor, *(s["mask_predictor"] for s in stages)])
        self.box_coders = [det_utils.BoxCoder(tuple(1.0 / s for s in std)) for std in stds]
        self.matchers = [det_utils.Matcher(iou, iou, allow_low_quality_matches=False) for iou in ious]
        self.fg_bg_sampler = base.fg_bg_sampler
        self.loss_weights, self.box_loss_weight = tuple(loss_weights), box_loss_weight
        self.score_thresh, self.nms_thresh = base.score_thresh, base.nms_thresh
        self.detections_per_img = base.detections_per_img

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    def stage(self, index: int, features: Dict[str, Tensor], boxes: List[Tensor],
              image_shapes: List[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
        """Class logits (N, K+1) and class-specific deltas (N, (K+1)*4) of stage ``index`` for ``boxes``."""
        pooled = self.box_roi_pool(features, boxes, image_shapes)
        return self.box_predictors[index](self.box_heads[index](pooled))

    def regress(self, index: int, boxes: List[Tensor], deltas: Tensor, labels: Tensor,
                image_shapes: List[Tuple[int, int]]) -> List[Tensor]:
        """``boxes`` moved by stage ``index``'s deltas of class ``labels`` (one per box), clipped to the image."""
        picked = deltas.reshape(deltas.shape[0], -1, 4).gather(1, labels[:, None, None].expand(-1, 1, 4))[:, 0]
        moved = self.box_coders[index].decode_single(picked, torch.cat(boxes)).split([b.shape[0] for b in boxes])
        return [clip_boxes_to_image(b, shape) for b, shape in zip(moved, image_shapes)]

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("cascade RoI heads: training needs targets")
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    # ---------------------------------------------------------------------------------------------------- test
    def detect(self, features: Dict[str, Tensor], proposals: List[Tensor],
               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        boxes, logits_sum = proposals, None
        for index in range(self.num_stages):
            logits, deltas = self.stage(index, features, boxes, image_shapes)
            logits_sum = logits if logits_sum is None else logits_sum + logits
            if index < self.num_stages - 1:
                boxes = self.regress(index, boxes, deltas, logits[:, 1:].argmax(1) + 1, image_shapes)
        scores = F.softmax(logits_sum / self.num_stages, -1)
        decoded = self.box_coders[-1].decode_single(deltas, torch.cat(boxes))
        counts = [b.shape[0] for b in boxes]
        results = [self._postprocess(b.reshape(b.shape[0], -1, 4), s, shape)
                   for b, s, shape in zip(decoded.split(counts), scores.split(counts), image_shapes)]
        self._add_masks(features, results, image_shapes)
        return results

    def _postprocess(self, boxes: Tensor, scores: Tensor, image_shape: Tuple[int, int]) -> Dict[str, Tensor]:
        """mmdet's ``multiclass_nms``: every (box, class) pair above the score threshold, class-wise NMS, the best
        ``detections_per_img``."""
        boxes = clip_boxes_to_image(boxes, image_shape)[:, 1:].reshape(-1, 4)
        labels = torch.arange(1, scores.shape[1], device=scores.device).expand(scores.shape[0], -1).reshape(-1)
        scores = scores[:, 1:].reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}

    def _add_masks(self, features: Dict[str, Tensor], results: List[Dict[str, Tensor]],
                   image_shapes: List[Tuple[int, int]]) -> None:
        boxes = [r["boxes"] for r in results]
        labels = torch.cat([r["labels"] for r in results])
        pooled = self.mask_roi_pool(features, boxes, image_shapes)
        stage_probabilities = []
        for head, predictor in zip(self.mask_heads, self.mask_predictors):
            logits = predictor(head(pooled))
            index = labels[:, None, None, None].expand(-1, 1, *logits.shape[-2:])
            stage_probabilities.append(logits.gather(1, index).sigmoid())
        probability = torch.stack(stage_probabilities).mean(0)
        for result, masks in zip(results, probability.split([b.shape[0] for b in boxes])):
            result["masks"] = masks

    # ------------------------------------------------------------------------------------------------ training
    def _sample(self, index: int, proposals: List[Tensor], targets: List[Dict[str, Tensor]]):
        """Per image: sampled boxes, their labels (0 = background), matched ground-truth index, and whether the
        box is an added ground-truth box (mmdet's RandomSampler with ``add_gt_as_proposals``)."""
        boxes, labels, matched, is_gt = [], [], [], []
        for props, target in zip(proposals, targets):
            gt = target["boxes"].to(props.dtype)
            candidates = torch.cat([gt, props])
            if gt.shape[0] == 0:
                match = torch.full((candidates.shape[0],), -1, dtype=torch.long, device=props.device)
            else:
                match = self.matchers[index](box_iou(gt, candidates))
            label = target["labels"][match.clamp(min=0)] if gt.shape[0] else torch.zeros_like(match)
            label = torch.where(match >= 0, label, torch.where(match == -1, 0, -1))
            boxes.append(candidates), labels.append(label), matched.append(match.clamp(min=0))
            is_gt.append(torch.arange(candidates.shape[0], device=props.device) < gt.shape[0])
        positive, negative = self.fg_bg_sampler(labels)
        keep = [torch.where(p | n)[0] for p, n in zip(positive, negative)]
        return ([b[k] for b, k in zip(boxes, keep)], [lb[k] for lb, k in zip(labels, keep)],
                [m[k] for m, k in zip(matched, keep)], [g[k] for g, k in zip(is_gt, keep)])

    def losses(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
               targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        losses: Dict[str, Tensor] = {}
        proposals = [p.detach() for p in proposals]
        for index, weight in enumerate(self.loss_weights):
            boxes, labels, matched, is_gt = self._sample(index, proposals, targets)
            logits, deltas = self.stage(index, features, boxes, image_shapes)
            label = torch.cat(labels)
            positive = torch.where(label > 0)[0]
            losses[f"s{index}.loss_classifier"] = F.cross_entropy(logits, label) * weight
            gt_boxes = torch.cat([t["boxes"][m] if t["boxes"].shape[0] else t["boxes"].new_zeros((len(m), 4))
                                  for t, m in zip(targets, matched)])[positive]
            pos_deltas = deltas.reshape(deltas.shape[0], -1, 4)[positive, label[positive]]
            decoded = self.box_coders[index].decode_single(pos_deltas, torch.cat(boxes)[positive])
            giou = generalized_box_iou_loss(decoded, gt_boxes.to(decoded.dtype), reduction="sum")
            losses[f"s{index}.loss_box_reg"] = giou / max(label.numel(), 1) * self.box_loss_weight * weight
            losses[f"s{index}.loss_mask"] = self._mask_loss(index, features, boxes, labels, matched, targets,
                                                            image_shapes) * weight
            if index < self.num_stages - 1:
                with torch.no_grad():
                    refine = torch.where(label > 0, label, logits[:, 1:].argmax(1) + 1)
                    moved = self.regress(index, boxes, deltas, refine, image_shapes)
                proposals = [m[~g] for m, g in zip(moved, is_gt)]
        return losses

    def _mask_loss(self, index: int, features: Dict[str, Tensor], boxes: List[Tensor], labels: List[Tensor],
                   matched: List[Tensor], targets: List[Dict[str, Tensor]],
                   image_shapes: List[Tuple[int, int]]) -> Tensor:
        positive = [torch.where(lb > 0)[0] for lb in labels]
        pos_boxes = [b[p] for b, p in zip(boxes, positive)]
        logits = self.mask_predictors[index](self.mask_heads[index](
            self.mask_roi_pool(features, pos_boxes, image_shapes)))
        return maskrcnn_loss(logits, pos_boxes, [t["masks"] for t in targets], [t["labels"] for t in targets],
                             [m[p] for m, p in zip(matched, positive)])
