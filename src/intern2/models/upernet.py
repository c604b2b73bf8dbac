"""UperNet semantic segmentation with an InternImage backbone (the official ADE20K models).

State-dict layout = mmseg's EncoderDecoder: ``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``; official
checkpoints (``{'state_dict': ...}``) load directly.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..heads.upernet import FCNHead, UPerHead
from ..registry import register_model
from .internimage import INTERNIMAGE_VARIANTS, InternImage, checkpoint_filter_fn

__all__ = ["UperNet", "slide_inference", "UPERNET_VARIANTS"]

log = logging.getLogger(__name__)
ADE_MEAN = (0.485, 0.456, 0.406)  # mmseg's [123.675, 116.28, 103.53] / 255
ADE_STD = (0.229, 0.224, 0.225)


class UperNet(nn.Module):
    """InternImage backbone + UPerHead (+ FCN auxiliary head on level ``aux_level`` for training).

    ``forward(images)`` returns class logits at the input resolution; ``forward_heads`` returns the raw
    (decode, auxiliary) logits at stride 4 / 16 for the loss.
    """

    def __init__(self, backbone: Dict, num_classes: int = 150, channels: int = 512, aux_channels: int = 256,
                 aux_level: Optional[int] = 2, dropout: float = 0.1):
        super().__init__()
        self.backbone_config = dict(backbone)
        self.backbone = InternImage(**backbone, features_only=True)
        in_channels = [info["num_chs"] for info in self.backbone.feature_info]
        self.num_classes = num_classes
        self.decode_head = UPerHead(in_channels, channels, num_classes, dropout=dropout)
        self.aux_level = aux_level
        self.auxiliary_head = (FCNHead(in_channels[aux_level], aux_channels, num_classes, dropout=dropout)
                               if aux_level is not None else None)
        self.head_config = dict(num_classes=num_classes, channels=channels, aux_channels=aux_channels,
                                aux_level=aux_level, dropout=dropout)

    def forward_heads(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        features = self.backbone(images)
        aux = self.auxiliary_head(features[self.aux_level]) if self.auxiliary_head is not None and self.training \
            else None
        return self.decode_head(features), aux

    def forward(self, images: torch.Tensor, return_heads: bool = False):
        """Logits at the input resolution, or with ``return_heads`` the raw (decode, auxiliary) head outputs
        (what the loss needs; going through forward keeps DDP/FSDP hooks in the loop)."""
        if return_heads:
            return self.forward_heads(images)
        logits, _ = self.forward_heads(images)
        return F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def fsdp_units(self) -> List[nn.Module]:
        return self.backbone.fsdp_units()

    @property
    def num_layer_ids(self) -> int:
        return self.backbone.num_layer_ids

    def layer_id(self, name: str) -> int:
        return self.backbone.layer_id(name[len("backbone."):]) if name.startswith("backbone.") \
            else self.num_layer_ids - 1

    def no_weight_decay(self) -> set:
        return set()

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Official mmseg checkpoints load as they are; a bare InternImage state dict loads into the backbone."""
        if not any(k.startswith(("backbone.", "decode_head.")) for k in state_dict):
            log.info("checkpoint has no segmentor keys: loading it into the backbone only")
            backbone = checkpoint_filter_fn(state_dict, self.backbone)
            return {**{f"backbone.{k}": v for k, v in backbone.items()},
                    **{k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}}
        backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        rest = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
        if self.auxiliary_head is None:
            rest = {k: v for k, v in rest.items() if not k.startswith("auxiliary_head.")}
        return {**{f"backbone.{k}": v for k, v in checkpoint_filter_fn(backbone, self.backbone).items()}, **rest}

    def export_config(self) -> Dict:
        return dict(backbone=self.backbone_config, **self.head_config)


@torch.no_grad()
def slide_inference(model: UperNet, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmseg's sliding-window inference: average the logits of overlapping crops (for large images)."""
    n, _, height, width = images.shape
    logits = images.new_zeros(n, model.num_classes, height, width)
    counts = images.new_zeros(1, 1, height, width)
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits[:, :, y1:y2, x1:x2] += model(images[:, :, y1:y2, x1:x2])
            counts[:, :, y1:y2, x1:x2] += 1
    return logits / counts


def _seg_backbone(name: str, **overrides) -> Dict:
    """The det/seg flavour of an InternImage variant: the official det/seg configs use layer scale 1.0 for T..XL
    (none for H/G) and no classifier."""
    cfg = INTERNIMAGE_VARIANTS[name][0].to_dict()
    cfg.pop("num_classes")
    cfg.update(layer_scale=None if name in ("internimage_h", "internimage_g") else 1.0, use_clip_projector=False)
    return {**cfg, **overrides}


def _ade_cfg(file: str, crop: int) -> Dict:
    return dict(file=file, hf_hub_id="OpenGVLab/InternImage", num_classes=150, crop_size=crop,
                test_scale=(2048, crop), mean=ADE_MEAN, std=ADE_STD, label_names="ade20k", reduce_zero_label=True)


# (backbone variant, backbone overrides, official file, training crop)
UPERNET_VARIANTS = {
    "upernet_internimage_t": ("internimage_t", dict(drop_path_rate=0.2),
                              "upernet_internimage_t_512_160k_ade20k.pth", 512),
    "upernet_internimage_s": ("internimage_s", dict(drop_path_rate=0.3),
                              "upernet_internimage_s_512_160k_ade20k.pth", 512),
    "upernet_internimage_b": ("internimage_b", dict(drop_path_rate=0.3),
                              "upernet_internimage_b_512_160k_ade20k.pth", 512),
    "upernet_internimage_l": ("internimage_l", dict(drop_path_rate=0.4),
                              "upernet_internimage_l_640_160k_ade20k.pth", 640),
    "upernet_internimage_xl": ("internimage_xl", dict(drop_path_rate=0.4),
                               "upernet_internimage_xl_640_160k_ade20k.pth", 640),
    "upernet_internimage_h": ("internimage_h", dict(drop_path_rate=0.5),
                              "upernet_internimage_h_896_160k_ade20k.pth", 896),
}


def _register(name: str) -> None:
    variant, overrides, file, crop = UPERNET_VARIANTS[name]

    def builder(pretrained_tag: Optional[str] = None, backbone: Optional[Dict] = None, **kwargs) -> UperNet:
        if pretrained_tag not in (None, "ade20k"):
            raise ValueError(f"unknown pretrained tag {pretrained_tag!r} for {name}; known: ['ade20k']")
        model = UperNet(_seg_backbone(variant, **{**overrides, **(backbone or {})}), **kwargs)
        model.pretrained_cfg = dict(_ade_cfg(file, crop), architecture=name, tag="ade20k",
                                    num_classes=model.num_classes)
        return model
    builder.__name__ = name
    builder.__doc__ = f"UperNet + {variant} (official ADE20K configuration); backbone={{...}} overrides its config."
    register_model(builder)


for _name in UPERNET_VARIANTS:
    _register(_name)
