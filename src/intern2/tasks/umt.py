"""Unmasked-teacher distillation (UMT): `intern2 train umt`.

A student video ViT sees a small share of its tokens (``keep_ratio``, 20% by default) and aligns each visible
token of its last ``student_layers`` blocks, through a LayerNorm + Linear projection per block, with the frozen
teacher's normalised feature at the same place: loss ``2 - 2 cos(student, teacher)`` averaged over tokens and
blocks. No pixel decoder and 80% fewer tokens than full fine-tuning make it far cheaper than VideoMAE.

The teacher is any video model intern2 can load: an InternVideo-MM / video-text folder (CLIP per-frame patch
features after ``ln_post`` and ``proj``, as UMT uses CLIP), or a VideoMAE classifier / pre-training encoder (its
token features). Teacher maps are resampled to the student's token grid (average over the student's tubelet
frames, bilinear over space). Masks are ``random`` or ``attention`` (UMT's teacher-guided masking: visible tokens
drawn without replacement with probability proportional to the attention of the teacher's pooled feature over
its tokens, a single-head proxy of the class-token attention of the official code).

The saved model is the student alone (a ``videomae_vit_*`` folder), ready for `intern2 train video-cls
--set checkpoint=...`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.video import collate_videos
from ..engine import TrainConfig
from ..factory import create_model, save_pretrained
from ..hub import hub_repo
from ..models.video_vit import VideoMAEPretrain, VideoViT, keep_visible
from ..models.videotext import VideoTextModel
from ..pipelines.common import load_model
from ..weights import trained_cfg
from .common import train_cli
from .video_cls import VideoDataConfig, video_datasets

__all__ = ["UMTConfig", "UMTDistiller", "UMTTask", "teacher_tokens", "attention_mask", "random_mask",
           "umt_loss", "train_main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UMTConfig(VideoDataConfig):
    teacher: str = ""  # a model folder (video-text or VideoMAE) or a registered name used with teacher_checkpoint
    teacher_checkpoint: Optional[str] = None  # weights for a registered teacher name
    model: str = "videomae_vit_b"  # the student
    model_args: Optional[Dict[str, Any]] = None  # e.g. {depth: 4, embed_dim: 96, num_heads: 3}
    keep_ratio: float = 0.2  # share of the student's tokens it sees
    masking: str = "attention"  # attention (teacher-guided) or random
    student_layers: int = 6  # last blocks aligned with the teacher (UMT: 6 for ViT-B)
    num_frames: int = 8
    sampling: str = "segment"
    img_size: Optional[int] = None  # default: the teacher's input size
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1.5e-4, weight_decay=0.05, warmup_steps=20))


def teacher_tokens(teacher: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """The teacher's token feature map (B, D, T', H', W') for ``video``."""
    if isinstance(teacher, VideoTextModel):
        if isinstance(teacher.visual, VideoViT):
            return teacher_tokens(teacher.visual, video)
        return teacher.visual.forward_tokens(video).permute(0, 4, 1, 2, 3)
    encoder = teacher.encoder if isinstance(teacher, VideoMAEPretrain) else teacher
    if not isinstance(encoder, VideoViT):
        raise ValueError(f"teacher: {type(teacher).__name__} is not a video model (use a video-text or VideoMAE "
                         f"model)")
    embed = encoder.patch_embed
    grid = (video.shape[2] // embed.tubelet_size, video.shape[3] // embed.patch_size,
            video.shape[4] // embed.patch_size)
    tokens = encoder.forward_features(video)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def _resample(features: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
    """(B, D, T', H', W') -> (B, T*H*W, D) on the student grid, t-major like the student's tokens."""
    batch, dim, frames = features.shape[:3]
    if frames != grid[0]:  # e.g. per-frame CLIP features for 2-frame tubelets: average each tubelet's frames
        features = F.adaptive_avg_pool3d(features, (grid[0], *features.shape[-2:]))
    if tuple(features.shape[-2:]) != tuple(grid[1:]):
        flat = features.transpose(1, 2).flatten(0, 1)
        flat = F.interpolate(flat, size=grid[1:], mode="bilinear", align_corners=False)
        features = flat.reshape(batch, grid[0], dim, *grid[1:]).transpose(1, 2)
    return features.flatten(2).transpose(1, 2)


def random_mask(batch: int, num_tokens: int, keep: int, generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """bool (B, N), True = hidden; ``keep`` uniformly random visible tokens per sample."""
    order = torch.rand(batch, num_tokens, generator=generator, device=device).argsort(dim=1)
    return order >= keep


def attention_mask(teacher: torch.Tensor, keep: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """UMT's teacher-guided mask from teacher features (B, N, D): the ``keep`` visible tokens are drawn without
    replacement with probability softmax(<mean token, token> / sqrt(D)). bool (B, N), True = hidden."""
    query = teacher.mean(1, keepdim=True)
    weights = ((query @ teacher.transpose(1, 2))[:, 0] / teacher.shape[-1] ** 0.5).float().softmax(-1)
    chosen = torch.multinomial(weights, keep, replacement=False, generator=generator)
    mask = torch.ones_like(weights, dtype=torch.bool)
    return mask.scatter(1, chosen, False)


def umt_loss(student: List[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean over blocks and tokens of ``2 - 2 cos(student, target)``, in float32."""
    target = F.normalize(target.float(), dim=-1)
    losses = [(2 - 2 * (F.normalize(s.float(), dim=-1) * target).sum(-1)).mean() for s in student]
    return torch.stack(losses).mean()


class UMTDistiller(nn.Module):
    """The student video ViT plus one LayerNorm + Linear projection per aligned block (training only)."""

    def __init__(self, student: VideoViT, teacher_dim: int, student_layers: int):
        super().__init__()
        if not 0 < student_layers <= len(student.blocks):
            raise ValueError(f"student_layers must be in [1, {len(student.blocks)}], got {student_layers}")
        self.student = student
        # The pooling norm serves a classifier, not distillation: frozen so DDP sees no unused parameter.
        if student.fc_norm is not None:
            student.fc_norm.requires_grad_(False)
        self.first_aligned = len(student.blocks) - student_layers
        dim = student.embed_dim
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, teacher_dim))
                                   for _ in range(student_layers))

    def no_weight_decay(self) -> set:
        return {f"student.{n}" for n in self.student.no_weight_decay()}

    def forward(self, video: torch.Tensor, mask: torch.Tensor) -> List[torch.Tensor]:
        """Projected visible tokens of the aligned blocks, each (B, N_visible, teacher_dim)."""
        x = self.student.pos_drop(keep_visible(self.student.embed(video), mask))
        out = []
        for index, block in enumerate(self.student.blocks):
            x = block(x)
            if index >= self.first_aligned:
                out.append(self.heads[index - self.first_aligned](x))
        return out


class UMTTask:
    """Distil a frozen teacher into a masked student video ViT."""

    def __init__(self, cfg: UMTConfig):
        if not cfg.teacher:
            raise ValueError("teacher: give a model folder or a registered model name (+ teacher_checkpoint)")
        if not 0 < cfg.keep_ratio < 1:
            raise ValueError(f"keep_ratio: expected a value in (0, 1), got {cfg.keep_ratio}")
        if cfg.masking not in ("attention", "random"):
            raise ValueError(f"masking: expected 'attention' or 'random', got {cfg.masking!r}")
        given = Path(cfg.teacher)
        if given.is_file():
            raise ValueError(f"teacher {cfg.teacher}: a file; give the model's registered name as teacher and the "
                             f"file as teacher_checkpoint")
        try:
            folder = given.is_dir() or hub_repo(cfg.teacher) is not None  # a Hub repo's snapshot is a folder too
        except ValueError as exc:  # hf-hub: without a repo id
            raise ValueError(f"teacher: {exc}") from None
        if not folder and ("/" in cfg.teacher or os.sep in cfg.teacher):  # no registered name has one
            raise ValueError(f"teacher {cfg.teacher}: no such model folder")
        try:
            teacher = load_model(cfg.teacher, None, names=("teacher", "teacher")) if folder else \
                load_model(cfg.teacher_checkpoint, cfg.teacher)
        except KeyError as exc:  # an unknown model name
            raise ValueError(f"teacher: {exc.args[0]}") from None
        self.teacher = teacher.requires_grad_(False)
        teacher_cfg = getattr(self.teacher, "pretrained_cfg", {})
        size = cfg.img_size or teacher_cfg.get("input_size", (3, cfg.num_frames, 224, 224))[-1]
        # The clips are normalised as the teacher expects; the student learns from the same input.
        cfg = dataclasses.replace(cfg, img_size=size, mean=tuple(teacher_cfg.get("mean", cfg.mean)),
                                  std=tuple(teacher_cfg.get("std", cfg.std)))
        self.cfg = cfg
        _, self._train_set, self._eval_set = video_datasets(cfg, cfg.train.seed)
        with torch.no_grad():
            probe = torch.zeros(1, 3, cfg.num_frames, size, size)
            self.teacher_dim = teacher_tokens(self.teacher.eval(), probe).shape[1]
        self.skipped = 0

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        student = create_model(cfg.model, **{"num_classes": 0, "all_frames": cfg.num_frames,
                                             "img_size": cfg.img_size, **(cfg.model_args or {})})
        if not isinstance(student, VideoViT):
            raise ValueError(f"model: {cfg.model} is not a video ViT (use videomae_vit_*)")
        return UMTDistiller(student, self.teacher_dim, cfg.student_layers)

    def train_dataset(self) -> Dataset:
        return self._train_set

    def eval_dataset(self) -> Optional[Dataset]:
        return self._eval_set

    def collate(self, samples):
        return collate_videos(samples)

    def _loss(self, model: nn.Module, video: torch.Tensor,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
        core: UMTDistiller = getattr(model, "module", model)
        self.teacher.to(video.device).eval()
        embed = core.student.patch_embed
        grid = (video.shape[2] // embed.tubelet_size, video.shape[3] // embed.patch_size,
                video.shape[4] // embed.patch_size)
        with torch.no_grad():
            target = _resample(teacher_tokens(self.teacher, video).float(), grid)
        num_tokens = target.shape[1]
        keep = max(1, round(self.cfg.keep_ratio * num_tokens))
        if self.cfg.masking == "attention":
            mask = attention_mask(target, keep, generator)
        else:
            mask = random_mask(video.shape[0], num_tokens, keep, generator, video.device)
        return umt_loss(model(video, mask), keep_visible(target, mask))

    def training_step(self, model: nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        self.skipped += batch["skipped"]
        if batch["video"].shape[0] == 0:
            return sum(p.sum() * 0 for p in model.parameters()), {"skipped_videos": self.skipped}
        return self._loss(model, batch["video"]), {"skipped_videos": self.skipped}

    def eval_step(self, model: nn.Module, batch) -> Dict[str, torch.Tensor]:
        video = batch["video"][:, 0]  # the first test view
        if video.shape[0] == 0:
            return {"loss_sum": torch.zeros(()), "count": torch.zeros(())}
        # Masks seeded by the clips' indices: the same masks at every evaluation.
        generator = torch.Generator(video.device).manual_seed(int(batch["index"].sum()))
        loss = self._loss(model, video, generator)
        return {"loss_sum": loss * video.shape[0], "count": torch.tensor(float(video.shape[0]))}

    def summarize(self, sums: Dict[str, torch.Tensor]) -> Dict[str, float]:
        count = max(float(sums.get("count", 0)), 1.0)
        return {"distill_loss": float(sums.get("loss_sum", 0)) / count, "count": int(count)}

    def save_model(self, model: nn.Module, directory: Path) -> None:
        cfg = self.cfg
        student = getattr(model, "module", model).student
        student.pretrained_cfg = trained_cfg(getattr(student, "pretrained_cfg", {}), {
            "input_size": (3, cfg.num_frames, cfg.img_size, cfg.img_size), "mean": tuple(cfg.mean),
            "std": tuple(cfg.std), "num_frames": cfg.num_frames, "stride": cfg.stride, "sampling": cfg.sampling,
            "distilled_from": cfg.teacher, "keep_ratio": cfg.keep_ratio, "masking": cfg.masking})
        save_pretrained(student, directory)


def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "umt", "Distil a frozen teacher into a masked student video ViT (Unmasked Teacher).",
                     UMTConfig, UMTTask, "annotation list (`path label` lines; labels unused) or builtin:actions",
                     "videomae_vit_b")
