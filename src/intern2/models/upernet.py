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
from ..registry import register_variant
from .internimage import INTERNIMAGE_VARIANTS, InternImage, checkpoint_filter_fn

__all__ = ["UperNet", "UPERNET_VARIANTS"]

log = logging.getLogger(__name__)


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
        in_channels = self.backbone.feature_info.channels()
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


def _seg_backbone(name: str, **overrides) -> Dict:
    """The det/seg flavour of an InternImage variant: the official det/seg configs use layer scale 1.0 for T..XL
    (none for H/G) and no classifier."""
    cfg = INTERNIMAGE_VARIANTS[name].to_dict()
    cfg.pop("num_classes")
    cfg.update(layer_scale=None if name in ("internimage_h", "internimage_g") else 1.0, use_clip_projector=False)
    return {**cfg, **overrides}


# name -> (backbone variant, backbone overrides of the official ADE20K config); tags are in intern2.weights.
UPERNET_VARIANTS = {
    "upernet_internimage_t": ("internimage_t", dict(drop_path_rate=0.2)),
    "upernet_internimage_s": ("internimage_s", dict(drop_path_rate=0.3)),
    "upernet_internimage_b": ("internimage_b", dict(drop_path_rate=0.4)),
    "upernet_internimage_l": ("internimage_l", dict(drop_path_rate=0.4)),
    "upernet_internimage_xl": ("internimage_xl", dict(drop_path_rate=0.4)),
    "upernet_internimage_h": ("internimage_h", dict(drop_path_rate=0.5)),
}


def _builder(variant: str, overrides: Dict):
    def build(kwargs: Dict) -> UperNet:
        backbone = kwargs.pop("backbone", None) or {}
        return UperNet(_seg_backbone(variant, **{**overrides, **backbone}), **kwargs)
    return build


for _name, (_variant, _overrides) in UPERNET_VARIANTS.items():
    register_variant(_name, _builder(_variant, _overrides),
                     f"UperNet + {_variant} (official ADE20K configuration); backbone={{...}} overrides its config.")
