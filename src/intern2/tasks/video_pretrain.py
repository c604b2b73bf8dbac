"""VideoMAE masked pre-training: `intern2 train video-pretrain`.

Tube masks (and VideoMAEv2 running-cell decoder masks) are drawn on the batch's device from torch's RNG, which
the trainer checkpoints, so a resumed run draws the same masks. Evaluation reports the reconstruction loss on
the validation clips with masks seeded by the clips' indices (the same masks every time).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..engine import TrainConfig
from ..factory import save_pretrained
from ..models.video_vit import VideoMAEPretrain, pixel_targets, running_cell_mask, tube_mask, videomae_loss
from ..weights import trained_cfg
from .common import train_cli
from .video_cls import VideoDataConfig, VideoTask

__all__ = ["VideoPretrainConfig", "VideoPretrainTask", "train_main"]


@dataclass(frozen=True)
class VideoPretrainConfig(VideoDataConfig):
    model: str = "videomae_pretrain_vit_s"
    model_args: Optional[Dict[str, Any]] = None  # e.g. {encoder_depth: 4, decoder_depth: 1}
    checkpoint: Optional[str] = None  # continue from a pre-training checkpoint
    mask_ratio: float = 0.9  # tube masking: share of spatial positions hidden from the encoder
    decoder_mask_ratio: Optional[float] = None  # VideoMAEv2 dual masking: share NOT reconstructed (0.5)
    normalize_target: bool = True  # per-tubelet normalised pixels (the official default)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(weight_decay=0.05))


def _unwrap(model: nn.Module) -> VideoMAEPretrain:
    return getattr(model, "module", model)


class VideoPretrainTask(VideoTask):
    """Masked video modelling on unlabelled clips (labels in the list are ignored)."""

    # Fields a resumed run may change: the evaluation's data and resize; initial weights (the resume replaces them).
    resume_may_change = frozenset({"val_data", "short_side", "checkpoint"})

    def __init__(self, cfg: VideoPretrainConfig):
        if not 0 < cfg.mask_ratio < 1:
            raise ValueError(f"mask_ratio: expected a value in (0, 1), got {cfg.mask_ratio}")
        # The running cell masks int(4 * ratio) of each 2x2 cell's slots: one to three.
        if cfg.decoder_mask_ratio is not None and not 0.25 <= cfg.decoder_mask_ratio < 1:
            raise ValueError(f"decoder_mask_ratio: expected a value in [0.25, 1) (the running cell masks "
                             f"int(4 x ratio) of 4 slots), got {cfg.decoder_mask_ratio}")
        super().__init__(cfg)

    def build_model(self) -> nn.Module:
        model = self._create_model(self.cfg.model)
        if not isinstance(model, VideoMAEPretrain):
            raise ValueError(f"model: {self.cfg.model} is not a VideoMAE pre-training model "
                             f"(use videomae_pretrain_vit_*)")
        return self._load_initial_weights(model)

    def loss(self, model: nn.Module, batch, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Reconstruction loss of a batch with freshly drawn masks (from ``generator``, else torch's RNG)."""
        video = batch["video"]
        embed = _unwrap(model).encoder.patch_embed
        grid = (video.shape[2] // embed.tubelet_size, video.shape[3] // embed.patch_size,
                video.shape[4] // embed.patch_size)
        mask = tube_mask(video.shape[0], grid, self.cfg.mask_ratio, generator, video.device)
        decode_mask = None
        if self.cfg.decoder_mask_ratio is not None:
            decode_mask = running_cell_mask(video.shape[0], grid, self.cfg.decoder_mask_ratio, generator,
                                            video.device)
        targets = pixel_targets(video, embed.patch_size, embed.tubelet_size, self.cfg.normalize_target,
                                self.cfg.mean, self.cfg.std)
        return videomae_loss(model(video, mask, decode_mask), targets, mask, decode_mask)

    def eval_step(self, model: nn.Module, batch) -> Dict[str, torch.Tensor]:
        video = batch["video"]
        count = torch.tensor(float(video.shape[0]))
        if video.shape[0] == 0:
            return {"count": count}
        generator = torch.Generator(video.device).manual_seed(int(batch["index"][0]))
        # (B, V, C, T, H, W): the first test view of each clip
        loss = self.loss(model, {"video": video[:, 0]}, generator)
        return {"count": count, "loss": loss.detach().cpu() * count}

    def summarize(self, sums: Dict[str, torch.Tensor]) -> Dict[str, float]:
        count = float(sums.get("count", 0))
        return {"reconstruction_loss": float(sums["loss"]) / count, "count": int(count)} if count else {"count": 0}

    def save_model(self, model: nn.Module, directory: Path) -> None:
        cfg = self.cfg
        model.pretrained_cfg = trained_cfg(getattr(model, "pretrained_cfg", {}), {
            "input_size": (3, cfg.num_frames, cfg.img_size, cfg.img_size), "mean": tuple(cfg.mean),
            "std": tuple(cfg.std), "num_frames": cfg.num_frames, "stride": cfg.stride, "sampling": cfg.sampling,
            "mask_ratio": cfg.mask_ratio})
        save_pretrained(model, directory)


def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "video-pretrain", "VideoMAE masked pre-training of a video ViT.", VideoPretrainConfig,
                     VideoPretrainTask, "annotation list (`path label` lines or path,label CSV) or builtin:actions",
                     "videomae_pretrain_vit_s")
