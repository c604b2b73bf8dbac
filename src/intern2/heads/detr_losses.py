"""Training pieces of the DETR-family heads, as mmdet 2.28 / InternImage's ``mmdet_custom`` compute them: DINO's
contrastive denoising queries (``CdnQueryGenerator``), one-to-one Hungarian matching (``HungarianAssigner`` with
focal-class, L1-box and GIoU costs; scipy's ``linear_sum_assignment``), the sigmoid focal / L1 / GIoU losses; and
Mask2Former's (``MaskHungarianAssigner`` on randomly sampled points, class cross-entropy, mask BCE and dice on
uncertainty-sampled points).

Class indices here are 0-based (mmdet's); ``num_classes`` marks "no object" in the label targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DenoisingQueries", "cdn_queries", "hungarian_match", "sigmoid_focal_loss", "giou_loss",
           "box_xyxy_to_cxcywh", "box_cxcywh_to_xyxy", "pairwise_giou", "DinoCriterion", "point_sample",
           "uncertain_points", "Mask2FormerCriterion"]


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """mmdet's ``inverse_sigmoid``: log(x / (1 - x)) with both clamped to at least ``eps``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _giou_parts(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """GIoU of broadcast pairs of xyxy boxes (mmdet's ``bbox_overlaps`` arithmetic, eps-guarded)."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area_a + area_b - overlap).clamp(min=eps)
    enclose_wh = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    enclose = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps)
    return overlap / union - (enclose - union) / enclose


def pairwise_giou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """(N, 4) x (M, 4) xyxy -> (N, M) GIoU."""
    return _giou_parts(a[:, None], b[None], eps)


# mmdet 2.28's ``weight_reduce_loss`` divides a sum by (avg_factor + float32 eps).
_AVG_EPS = torch.finfo(torch.float32).eps


def giou_loss(pred: Tensor, target: Tensor, weight: Tensor, avg_factor: float, eps: float = 1e-6) -> Tensor:
    """mmdet's GIoULoss (aligned boxes, per-box weight, sum / avg_factor)."""
    if not torch.any(weight > 0):
        return (pred * weight[:, None]).sum()
    return ((1 - _giou_parts(pred, target, eps)) * weight).sum() / (avg_factor + _AVG_EPS)


def sigmoid_focal_loss(logits: Tensor, labels: Tensor, avg_factor: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """mmdet's ``py_sigmoid_focal_loss`` over (N, K) logits with labels in 0..K (K = no object), sum /
    avg_factor."""
    target = F.one_hot(labels, logits.shape[1] + 1)[:, :-1].to(logits.dtype)
    prob = logits.sigmoid()
    pt = (1 - prob) * target + prob * (1 - target)
    weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
    return loss.sum() / (avg_factor + _AVG_EPS)


@torch.no_grad()
def hungarian_match(cls_logits: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                    image_size: Tuple[int, int], cls_weight: float = 2.0, l1_weight: float = 5.0,
                    giou_weight: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> Tuple[Tensor, Tensor]:
    """mmdet's HungarianAssigner (FocalLossCost, BBoxL1Cost on normalised cxcywh, GIoU cost in pixels) for one
    image: (query indices, gt indices) of the optimal one-to-one matching. ``boxes``: (Q, 4) sigmoid cxcywh."""
    if gt_boxes.shape[0] == 0 or boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return empty, empty
    height, width = image_size
    factor = boxes.new_tensor([width, height, width, height])
    prob = cls_logits.sigmoid()
    neg = -(1 - prob + 1e-12).log() * (1 - alpha) * prob.pow(gamma)
    pos = -(prob + 1e-12).log() * alpha * (1 - prob).pow(gamma)
    cost = (pos[:, gt_labels] - neg[:, gt_labels]) * cls_weight
    cost = cost + torch.cdist(boxes, box_xyxy_to_cxcywh(gt_boxes / factor), p=1) * l1_weight
    cost = cost - pairwise_giou(box_cxcywh_to_xyxy(boxes) * factor, gt_boxes) * giou_weight
    return _assign(cost)


def _assign(cost: Tensor) -> Tuple[Tensor, Tensor]:
    """(rows, cols) of the minimum-cost one-to-one assignment of a (queries, gts) cost matrix."""
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, device=cost.device), torch.as_tensor(cols, device=cost.device)


def _global_mean(value: float, like: Tensor) -> float:
    """mmdet's ``reduce_mean``: the mean over the ranks of a distributed run (itself otherwise)."""
    tensor = like.new_tensor([value])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor.div_(torch.distributed.get_world_size()))
    return float(tensor)


@dataclass
class DenoisingQueries:
    """DINO's denoising part of the decoder input: ``label`` (B, pad, E) embeddings, ``boxes`` (B, pad, 4)
    inverse-sigmoid boxes, ``attn_mask`` (pad + Q, pad + Q) bool (True = blocked), ``pad_size`` and
    ``num_groups``."""
    label: Tensor
    boxes: Tensor
    attn_mask: Tensor
    pad_size: int
    num_groups: int


def cdn_queries(gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor], image_sizes: Sequence[Tuple[int, int]],
                label_embedding: nn.Embedding, num_queries: int, num_classes: int, num_dn_queries: int = 100,
                label_noise: float = 0.5, box_noise: float = 1.0) -> DenoisingQueries:
    """InternImage's ``CdnQueryGenerator`` (dynamic groups), random draws in the official order (so a seeded run
    reproduces the official queries): ``num_dn_queries // max gts`` groups, each a positive copy (box jittered within
    half its size) and a negative copy (jittered by 1-2x half its size) of every gt; a quarter of the labels flipped
    at random. Slots are ``[group 0 positives (max gts), group 0 negatives, group 1 positives, ...]``; an image with
    fewer gts leaves zero slots. Matching queries cannot see dn slots; a group cannot see the others."""
    dtype = label_embedding.weight.dtype
    device = label_embedding.weight.device
    normalised = [box_xyxy_to_cxcywh(b) / b.new_tensor([w, h, w, h]) for b, (h, w) in zip(gt_boxes, image_sizes)]
    counts = [len(labels) for labels in gt_labels]
    single_pad = max(counts) if counts else 0
    num_groups = max(1, num_dn_queries // single_pad) if single_pad else 1
    labels = torch.cat(list(gt_labels)).to(device)
    boxes = torch.cat(normalised).to(device)
    batch_index = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])
    known_labels = labels.repeat(2 * num_groups)
    known_boxes = boxes.repeat(2 * num_groups, 1)
    known_batch = batch_index.repeat(2 * num_groups)
    if label_noise > 0:
        p = torch.rand(known_labels.shape, dtype=dtype, device=device)
        chosen = torch.nonzero(p < label_noise * 0.5).view(-1)
        known_labels = known_labels.scatter(0, chosen, torch.randint_like(chosen, 0, num_classes))
    total = len(boxes)
    positive = torch.arange(total, device=device)[None] + (torch.arange(num_groups, device=device) * total * 2)[:, None]
    negative = positive.flatten() + total
    noisy = known_boxes.clone()
    if box_noise > 0 and total:
        centre, half = known_boxes[:, :2], known_boxes[:, 2:] / 2
        corners = torch.cat([centre - half, centre + half], 1)
        diff = torch.cat([known_boxes[:, 2:] / 2, known_boxes[:, 2:] / 2], 1)
        sign = torch.randint_like(known_boxes, low=0, high=2) * 2.0 - 1.0
        part = torch.rand_like(known_boxes)
        part[negative] += 1.0
        corners = (corners + part * sign * diff * box_noise).clamp(0.0, 1.0)
        noisy = torch.cat([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1)
    pad_size = single_pad * 2 * num_groups
    batch = len(gt_boxes)
    label_query = torch.zeros(batch, pad_size, label_embedding.embedding_dim, dtype=dtype, device=device)
    box_query = torch.zeros(batch, pad_size, 4, dtype=dtype, device=device)
    if total:
        slots = torch.cat([torch.arange(n, device=device) for n in counts])
        slots = torch.cat([slots + single_pad * i for i in range(2 * num_groups)])
        label_query[known_batch, slots] = label_embedding(known_labels).to(dtype)
        box_query[known_batch, slots] = inverse_sigmoid(noisy, eps=1e-3)
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    block = single_pad * 2
    for group in range(num_groups):
        rows = slice(block * group, block * (group + 1))
        mask[rows, block * (group + 1):pad_size] = True
        mask[rows, :block * group] = True
    return DenoisingQueries(label_query, box_query, mask, pad_size, num_groups)


class DinoCriterion:
    """DINO's losses (InternImage's ``DINOHead.loss``): for the encoder's top-k proposals (``interm_``), every
    decoder layer's matching queries (``loss_*`` for the last, ``d{i}.`` before it) and denoising queries
    (``dn_loss_*``): sigmoid focal class loss over the matched / denoised targets, L1 on normalised cxcywh and GIoU
    in pixels, averaged over the positives (``sync_cls_avg_factor``: over all ranks)."""

    def __init__(self, num_classes: int, cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0):
        self.num_classes = num_classes
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight

    def _losses(self, logits: Tensor, boxes: Tensor, labels: Tensor, targets: Tensor, weights: Tensor,
                factors: Tensor, num_pos: int) -> Tuple[Tensor, Tensor, Tensor]:
        """The three losses of flattened predictions given their targets (labels K = no object)."""
        avg = max(_global_mean(num_pos, logits), 1)  # mmdet's class and box averages: the same number here
        loss_cls = sigmoid_focal_loss(logits, labels, avg) * self.cls_weight if len(logits) else \
            logits.new_zeros(1)
        pred_xyxy = box_cxcywh_to_xyxy(boxes) * factors
        target_xyxy = box_cxcywh_to_xyxy(targets) * factors
        loss_iou = giou_loss(pred_xyxy, target_xyxy, weights[:, 0], avg) * self.giou_weight
        loss_l1 = (torch.abs(boxes - targets) * weights).sum() / (avg + _AVG_EPS) * self.l1_weight
        return loss_cls, loss_l1, loss_iou

    @staticmethod
    def _factors(boxes: Tensor, image_sizes: Sequence[Tuple[int, int]]) -> Tensor:
        return torch.cat([boxes.new_tensor([w, h, w, h]).expand(boxes.shape[1], 4) for h, w in image_sizes])

    def matched(self, logits: Tensor, boxes: Tensor, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                image_sizes: Sequence[Tuple[int, int]]) -> Tuple[Tensor, Tensor, Tensor]:
        """Losses of (B, Q, K) logits and (B, Q, 4) boxes against the Hungarian-matched ground truth."""
        labels = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        targets, weights = torch.zeros_like(boxes), torch.zeros_like(boxes)
        num_pos = 0
        for b, (gtb, gtl, (h, w)) in enumerate(zip(gt_boxes, gt_labels, image_sizes)):
            rows, cols = hungarian_match(logits[b], boxes[b], gtb, gtl, (h, w))
            labels[b, rows] = gtl[cols]
            targets[b, rows] = box_xyxy_to_cxcywh(gtb[cols] / gtb.new_tensor([w, h, w, h])).to(boxes.dtype)
            weights[b, rows] = 1.0
            num_pos += len(rows)
        return self._losses(logits.flatten(0, 1), boxes.flatten(0, 1), labels.flatten(), targets.flatten(0, 1),
                            weights.flatten(0, 1), self._factors(boxes, image_sizes), num_pos)

    def denoising(self, logits: Tensor, boxes: Tensor, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                  image_sizes: Sequence[Tuple[int, int]], num_groups: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Losses of the (B, pad, ...) denoising outputs: each group's positive slots reconstruct their gt; the
        negative slots and padding are "no object"."""
        labels = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        targets, weights = torch.zeros_like(boxes), torch.zeros_like(boxes)
        single_pad = logits.shape[1] // num_groups
        num_pos = 0
        for b, (gtb, gtl, (h, w)) in enumerate(zip(gt_boxes, gt_labels, image_sizes)):
            if len(gtl) == 0:
                continue
            slots = (torch.arange(num_groups, device=logits.device)[:, None] * single_pad
                     + torch.arange(len(gtl), device=logits.device)[None]).flatten()
            labels[b, slots] = gtl.repeat(num_groups)
            normalised = box_xyxy_to_cxcywh(gtb / gtb.new_tensor([w, h, w, h])).to(boxes.dtype)
            targets[b, slots] = normalised.repeat(num_groups, 1)
            weights[b, slots] = 1.0
            num_pos += len(slots)
        return self._losses(logits.flatten(0, 1), boxes.flatten(0, 1), labels.flatten(), targets.flatten(0, 1),
                            weights.flatten(0, 1), self._factors(boxes, image_sizes), num_pos)

    def __call__(self, all_logits: Tensor, all_boxes: Tensor, enc_logits: Tensor, enc_boxes: Tensor,
                 gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor], image_sizes: Sequence[Tuple[int, int]],
                 denoising: Optional[DenoisingQueries]) -> Dict[str, Tensor]:
        """The official loss dict (15 entries for 6 layers' worth of ``d{i}.`` keys, here per decoder layer)."""
        pad = denoising.pad_size if denoising is not None else 0
        losses: Dict[str, Tensor] = {}

        def put(prefix: str, suffix: str, values: Tuple[Tensor, Tensor, Tensor]) -> None:
            for name, value in zip(("cls", "bbox", "iou"), values):
                losses[f"{prefix}{suffix}_{name}"] = value

        put("", "interm_loss", self.matched(enc_logits, enc_boxes, gt_boxes, gt_labels, image_sizes))
        layers = all_logits.shape[0]
        for layer in range(layers):
            prefix = "" if layer == layers - 1 else f"d{layer}."
            put(prefix, "loss", self.matched(all_logits[layer, :, pad:], all_boxes[layer, :, pad:], gt_boxes,
                                             gt_labels, image_sizes))
            if denoising is not None:
                put(prefix, "dn_loss", self.denoising(all_logits[layer, :, :pad], all_boxes[layer, :, :pad],
                                                      gt_boxes, gt_labels, image_sizes, denoising.num_groups))
        return losses


# ------------------------------------------------------------------------------------------------ Mask2Former
def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """mmcv's ``point_sample``: (N, C, H, W) maps at (N, P, 2) normalised (x, y) points in [0, 1] -> (N, C, P)
    (bilinear, zero padding, ``align_corners=False``)."""
    return F.grid_sample(maps, 2 * points[:, :, None] - 1, align_corners=False)[..., 0]


def uncertain_points(mask_logits: Tensor, num_points: int, oversample_ratio: float,
                     importance_sample_ratio: float) -> Tensor:
    """mmdet's ``get_uncertain_point_coords_with_randomness`` for (N, 1, H, W) logits: of ``num_points *
    oversample_ratio`` uniform points, the ``importance_sample_ratio`` share closest to the decision boundary (least
    |logit|), plus uniform points for the rest -> (N, num_points, 2)."""
    n = mask_logits.shape[0]
    sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, sampled, 2, device=mask_logits.device, dtype=mask_logits.dtype)
    uncertainty = -point_sample(mask_logits, coords)[:, 0].abs()
    certain = int(importance_sample_ratio * num_points)
    index = torch.topk(uncertainty, k=certain, dim=1)[1]
    coords = torch.gather(coords, 1, index[..., None].expand(-1, -1, 2))
    if num_points > certain:
        coords = torch.cat([coords, torch.rand(n, num_points - certain, 2, device=mask_logits.device,
                                               dtype=mask_logits.dtype)], 1)
    return coords


class Mask2FormerCriterion:
    """Mask2Former's losses (mmdet 2.x ``Mask2FormerHead.loss``) for every prediction (``loss_*`` for the last,
    ``d{i}.`` before): each image's queries are matched one to one to its gt masks (class, mask BCE and dice costs on
    ``num_points`` uniform points); class cross-entropy over all queries (the "no object" class weighted 0.1), BCE
    and dice on ``num_points`` uncertainty-sampled points of the matched masks, averaged over the gt masks of the
    batch (all ranks)."""

    def __init__(self, num_classes: int, num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, cls_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, no_object_weight: float = 0.1):
        self.num_classes, self.num_points = num_classes, num_points
        self.oversample_ratio, self.importance_sample_ratio = oversample_ratio, importance_sample_ratio
        self.cls_weight, self.mask_weight, self.dice_weight = cls_weight, mask_weight, dice_weight
        self.no_object_weight = no_object_weight

    @torch.no_grad()
    def match(self, cls_logits: Tensor, mask_logits: Tensor, gt_labels: Tensor, gt_masks: Tensor):
        """MaskHungarianAssigner for one image: (query indices, gt indices)."""
        if len(gt_labels) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=cls_logits.device)
            return empty, empty
        points = torch.rand(1, self.num_points, 2, device=mask_logits.device, dtype=mask_logits.dtype)
        pred = point_sample(mask_logits[:, None], points.expand(len(mask_logits), -1, -1))[:, 0]
        gt = point_sample(gt_masks[:, None].to(pred.dtype), points.expand(len(gt_masks), -1, -1))[:, 0]
        cost = -cls_logits.softmax(-1)[:, gt_labels] * self.cls_weight
        pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
        neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
        cost = cost + (pos @ gt.T + neg @ (1 - gt).T) / pred.shape[1] * self.mask_weight
        prob = pred.sigmoid()
        dice = 1 - (2 * prob @ gt.T + 1) / (prob.sum(-1)[:, None] + gt.sum(-1)[None] + 1)
        return _assign(cost + dice * self.dice_weight)

    def single(self, cls_logits: Tensor, mask_logits: Tensor, gt_labels: Sequence[Tensor],
               gt_masks: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """(class, mask, dice) losses of one prediction: (B, Q, K+1) logits, (B, Q, h, w) mask logits."""
        labels = torch.full(cls_logits.shape[:2], self.num_classes, dtype=torch.long, device=cls_logits.device)
        preds, targets = [], []
        for b, (gtl, gtm) in enumerate(zip(gt_labels, gt_masks)):
            rows, cols = self.match(cls_logits[b], mask_logits[b], gtl, gtm)
            order = torch.argsort(rows)  # mmdet keeps the positives in query order
            rows, cols = rows[order], cols[order]
            labels[b, rows] = gtl[cols]
            preds.append(mask_logits[b, rows])
            targets.append(gtm[cols])
        class_weight = cls_logits.new_ones(self.num_classes + 1)
        class_weight[-1] = self.no_object_weight
        flat = labels.flatten()
        loss_cls = F.cross_entropy(cls_logits.flatten(0, 1), flat, weight=class_weight, reduction="none").sum()
        loss_cls = loss_cls / (class_weight[flat].sum() + _AVG_EPS) * self.cls_weight
        preds, targets = torch.cat(preds), torch.cat(targets)
        num_masks = max(_global_mean(len(targets), cls_logits), 1)
        if len(targets) == 0:
            return loss_cls, mask_logits.sum() * 0, mask_logits.sum() * 0
        with torch.no_grad():
            points = uncertain_points(preds[:, None], self.num_points, self.oversample_ratio,
                                      self.importance_sample_ratio)
            target_points = point_sample(targets[:, None].to(preds.dtype), points)[:, 0]
        pred_points = point_sample(preds[:, None], points)[:, 0]
        prob = pred_points.sigmoid()
        dice = 1 - (2 * (prob * target_points).sum(1) + 1) / (prob.sum(1) + target_points.sum(1) + 1)
        loss_dice = dice.sum() / (num_masks + _AVG_EPS) * self.dice_weight
        bce = F.binary_cross_entropy_with_logits(pred_points, target_points, reduction="none").sum()
        loss_mask = bce / (num_masks * self.num_points + _AVG_EPS) * self.mask_weight
        return loss_cls, loss_mask, loss_dice

    def __call__(self, all_cls: Sequence[Tensor], all_masks: Sequence[Tensor], gt_labels: Sequence[Tensor],
                 gt_masks: Sequence[Tensor]) -> Dict[str, Tensor]:
        losses: Dict[str, Tensor] = {}
        for layer, (cls_logits, mask_logits) in enumerate(zip(all_cls, all_masks)):
            prefix = "" if layer == len(all_cls) - 1 else f"d{layer}."
            for name, value in zip(("loss_cls", "loss_mask", "loss_dice"),
                                   self.single(cls_logits, mask_logits, gt_labels, gt_masks)):
                losses[prefix + name] = value
        return losses
