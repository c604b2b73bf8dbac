"""Mask R-CNN and Cascade Mask R-CNN with an InternImage + FPN backbone on torchvision's detection stack (no
mmcv/mmdet).

``model(images)`` (a list of CHW float tensors in [0, 1]) returns torchvision's per-image dicts (boxes, labels,
scores, masks); ``model(images, targets)`` in training mode returns the loss dict. Official mmdet checkpoints
(``{'state_dict'}`` with backbone./neck./rpn_head./roi_head. keys) are converted on load.
"""
from __future__ import annotations

import inspect
import logging
from typing import Dict, List

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..heads.cascade import CASCADE_STDS, CascadeRoIHeads, cascade_stage
from ..heads.detection import (InternImageFPN, KeepRatioTransform, mask_rcnn_components, mmdet_to_torchvision,
                               test_size_cfg)
from ..registry import register_variant
from .internimage import InternImage, checkpoint_filter_fn
from .upernet import _seg_backbone

__all__ = ["InternImageMaskRCNN", "InternImageCascadeMaskRCNN", "MASK_RCNN_VARIANTS", "CASCADE_VARIANTS"]

log = logging.getLogger(__name__)
_MMDET_PREFIXES = ("neck.", "rpn_head.", "roi_head.")


# torchvision's Faster R-CNN options a caller may set (the transform, backbone and RoI heads are ours).
_TORCHVISION_OPTIONS = frozenset(inspect.signature(FasterRCNN.__init__).parameters) - {
    "self", "backbone", "num_classes", "min_size", "max_size", "image_mean", "image_std", "box_roi_pool", "box_head",
    "box_predictor", "kwargs"}


class InternImageMaskRCNN(MaskRCNN):
    """torchvision MaskRCNN configured like the official mmdet InternImage Mask R-CNN.

    Args:
        backbone: InternImage config (the det flavour: layer scale 1.0).
        num_classes: object classes, background excluded (80 for COCO).
        min_size, max_size: test/train resize (mmdet's (1333, 800) keep-ratio).
        fpn_channels: FPN width (256 in the official models; smaller for quick CPU runs).
        box_fc_channels, mask_channels: box-head FC and mask-head conv widths (official: 1024, 256).
        **kwargs: torchvision MaskRCNN options (box_batch_size_per_image, rpn_post_nms_top_n_train, ...).
    """

    def __init__(self, backbone: Dict, num_classes: int = 80, min_size: int = 800, max_size: int = 1333,
                 fpn_channels: int = 256, box_fc_channels: int = 1024, mask_channels: int = 256, **kwargs):
        unknown = sorted(set(kwargs) - _TORCHVISION_OPTIONS)
        if unknown:  # torchvision would pass them on to its transform, which ignores them
            raise ValueError(f"{type(self).__name__}: unknown config key(s) {unknown}; the torchvision options are "
                             f"{sorted(_TORCHVISION_OPTIONS)}")
        body = InternImage(**backbone, features_only=True)
        super().__init__(InternImageFPN(body, fpn_channels), num_classes=None, min_size=min_size,  # heads given
                         max_size=max_size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                         **self.roi_components(fpn_channels, num_classes + 1, box_fc_channels, mask_channels),
                         **kwargs)
        self.transform = KeepRatioTransform(min_size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))
        self.backbone_config = dict(backbone)
        self.num_classes = num_classes
        self.head_config = dict(num_classes=num_classes, min_size=min_size, max_size=max_size,
                                fpn_channels=fpn_channels, box_fc_channels=box_fc_channels,
                                mask_channels=mask_channels, **kwargs)

    @staticmethod
    def roi_components(fpn_channels: int, num_classes: int, box_fc_channels: int, mask_channels: int) -> Dict:
        """torchvision MaskRCNN's RoI-head arguments (``num_classes`` counts the background)."""
        return mask_rcnn_components(fpn_channels, num_classes, box_fc_channels, mask_channels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.body.set_grad_checkpointing(enable)

    def fsdp_units(self) -> List[nn.Module]:
        return self.backbone.body.fsdp_units()

    def no_weight_decay(self) -> set:
        return set()

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """mmdet files are converted; a bare InternImage state dict initialises the backbone only."""
        if any(k.startswith(_MMDET_PREFIXES) for k in state_dict):
            state_dict = mmdet_to_torchvision(state_dict)
        elif not any(k.startswith(("backbone.body.", "rpn.", "roi_heads.")) for k in state_dict):
            log.info("checkpoint has no detector keys: loading it into the backbone only")
            body = checkpoint_filter_fn(state_dict, self.backbone.body)
            return {**{f"backbone.body.{k}": v for k, v in body.items()},
                    **{k: v for k, v in self.state_dict().items() if not k.startswith("backbone.body.")}}
        body = {k[len("backbone.body."):]: v for k, v in state_dict.items() if k.startswith("backbone.body.")}
        rest = {k: v for k, v in state_dict.items() if not k.startswith("backbone.body.")}
        return {**{f"backbone.body.{k}": v for k, v in checkpoint_filter_fn(body, self.backbone.body).items()},
                **rest}

    def export_config(self) -> Dict:
        return dict(backbone=self.backbone_config, **self.head_config)


class InternImageCascadeMaskRCNN(InternImageMaskRCNN):
    """Cascade Mask R-CNN configured like the official mmdet InternImage-L/XL detectors (3 stages, ConvFC box heads
    with BatchNorm whose convs are as wide as the FPN, class-specific GIoU regression; :mod:`intern2.heads.cascade`).
    Same arguments as :class:`InternImageMaskRCNN`."""

    def __init__(self, backbone: Dict, num_classes: int = 80, min_size: int = 800, max_size: int = 1333,
                 fpn_channels: int = 256, box_fc_channels: int = 1024, mask_channels: int = 256, **kwargs):
        super().__init__(backbone, num_classes, min_size, max_size, fpn_channels, box_fc_channels, mask_channels,
                         **kwargs)
        later = [cascade_stage(fpn_channels, num_classes + 1, fpn_channels, box_fc_channels, mask_channels)
                 for _ in CASCADE_STDS[1:]]
        self.roi_heads = CascadeRoIHeads(self.roi_heads, later)

    @staticmethod
    def roi_components(fpn_channels: int, num_classes: int, box_fc_channels: int, mask_channels: int) -> Dict:
        """Stage 0's heads as torchvision MaskRCNN arguments (the cascade wraps them with the later stages)."""
        return {**mask_rcnn_components(fpn_channels, num_classes, box_fc_channels, mask_channels),
                **cascade_stage(fpn_channels, num_classes, fpn_channels, box_fc_channels, mask_channels)}

    def sync_batchnorm(self) -> None:
        """SyncBatchNorm in the box heads, as the official configs train them on several GPUs."""
        self.roi_heads.box_heads = nn.SyncBatchNorm.convert_sync_batchnorm(self.roi_heads.box_heads)


# name -> (backbone variant, backbone overrides of the official mmdet COCO config); tags are in intern2.weights.
MASK_RCNN_VARIANTS = {
    "mask_rcnn_internimage_t": ("internimage_t", dict(drop_path_rate=0.2)),
    "mask_rcnn_internimage_s": ("internimage_s", dict(drop_path_rate=0.3)),
    "mask_rcnn_internimage_b": ("internimage_b", dict(drop_path_rate=0.4)),
}


CASCADE_VARIANTS = {
    "cascade_mask_rcnn_internimage_l": ("internimage_l", dict(drop_path_rate=0.4)),
    "cascade_mask_rcnn_internimage_xl": ("internimage_xl", dict(drop_path_rate=0.4)),  # 3x config: 0.6
}


def _builder(cls: type, variant: str, overrides: Dict):
    def build(kwargs: Dict) -> InternImageMaskRCNN:
        backbone = kwargs.pop("backbone", None) or {}
        return cls(_seg_backbone(variant, **{**overrides, **backbone}), **kwargs)
    return build


for _name, (_variant, _overrides) in MASK_RCNN_VARIANTS.items():
    register_variant(_name, _builder(InternImageMaskRCNN, _variant, _overrides),
                     f"Mask R-CNN + FPN + {_variant} (official mmdet COCO configuration) on torchvision.",
                     test_size_cfg)
for _name, (_variant, _overrides) in CASCADE_VARIANTS.items():
    register_variant(_name, _builder(InternImageCascadeMaskRCNN, _variant, _overrides),
                     f"Cascade Mask R-CNN + FPN + {_variant} (official mmdet COCO configuration) on torchvision.",
                     test_size_cfg)
