"""Action recognition with the video ViT: `intern2 train video-cls` and `intern2 eval` (multi-view, with each
checkpoint's protocol; inference: :mod:`intern2.pipelines.video_cls`). Test-time views (clips x crops) are
averaged in probability space."""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import CONFIG_NAME, read_config
from ..config import check_positive, check_range
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..data.video import (
    FrameSampler,
    VideoDataset,
    VideoEvalTransform,
    VideoSource,
    VideoTrainTransform,
    collate_videos,
    read_annotations,
)
from ..engine import TrainConfig
from ..engine.trainer import accumulate_eval
from ..factory import create_model, save_pretrained
from ..models.video_vit import classifier_config
from ..pipelines.common import add_model_arguments, counted, pipeline_from_args, positive, progress
from ..pipelines.video_cls import (
    VideoClassificationPipeline,
    add_protocol_arguments,
    protocol_options,
    view_probabilities,
)
from ..weights import SAMPLINGS, VideoProtocol, trained_cfg
from .common import head_model_args, train_cli
from .image_cls import ClassificationMetrics

__all__ = ["VideoDataConfig", "VideoClsConfig", "VideoTask", "VideoClassificationTask", "open_video_sources",
           "video_datasets", "train_main", "eval_main"]

log = logging.getLogger(__name__)
BUILTIN = "builtin:actions"
DEFAULT_MODEL = "videomae_vit_s"  # fine-tuned when neither a model nor a model folder is given


@dataclass(frozen=True)
class VideoDataConfig:
    """Where clips come from and how they are sampled and augmented (shared by fine-tuning and pre-training)."""
    data: str = BUILTIN  # an annotation list (`path label` lines or path,label CSV), or builtin:actions
    val_data: Optional[str] = None  # default: <list folder>/val.txt when `data` is train.txt, else no eval
    root: Optional[str] = None  # folder the list's paths are relative to (default: the list's folder)
    num_frames: int = 16
    stride: int = 4
    sampling: str = "dense"  # dense (frames `stride` apart) or segment (TSN: one frame per segment)
    img_size: int = 224
    train_scale: Tuple[float, float] = (0.25, 1.0)
    flip: Optional[bool] = None  # None: on, except for builtin:actions whose classes depend on direction
    test_clips: int = 1
    test_crops: int = 1
    short_side: Optional[int] = None  # evaluation: shorter side resized to this before cropping (None: img_size)
    cache_clips: bool = False  # keep decoded videos in memory (small data sets; use with train.num_workers=0)
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        check_positive(self, "num_frames", "stride", "img_size", "test_clips", "short_side")
        check_range(self, "train_scale", "(0, 1]", pair=True)
        check_range(self, "std", "(0, inf)")
        check_range(self, "mean", "(-inf, inf)")
        if self.test_crops not in (1, 3):
            raise ValueError(f"test_crops: expected 1 or 3, got {self.test_crops!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling: expected one of {list(SAMPLINGS)}, got {self.sampling!r}")


@dataclass(frozen=True)
class VideoClsConfig(VideoDataConfig):
    model: Optional[str] = None  # null: the checkpoint folder's architecture, else videomae_vit_s
    model_args: Optional[Dict[str, Any]] = None  # architecture overrides, e.g. {depth: 4, embed_dim: 96}
    checkpoint: Optional[str] = None  # initial weights: a fine-tuned, pre-training (VideoMAE) or HF file/folder
    label_smoothing: float = 0.1
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        super().__post_init__()
        check_range(self, "label_smoothing", "[0, 1)")


def open_video_sources(cfg: VideoDataConfig) -> Tuple[VideoSource, Optional[VideoSource]]:
    """(train, val or None) sources; ``builtin:actions`` is generated on first use."""
    if cfg.data == BUILTIN:
        from ..data.actions import builtin_actions_root
        root = builtin_actions_root()
        return read_annotations(root / "train.txt"), read_annotations(root / "val.txt")
    if cfg.data.startswith("builtin:"):
        raise ValueError(f"data: unknown built-in dataset {cfg.data!r}; the built-in video dataset is {BUILTIN}")
    train = read_annotations(cfg.data, cfg.root)
    val_path = cfg.val_data
    if val_path is None and Path(cfg.data).name.startswith("train") and \
            (Path(cfg.data).parent / Path(cfg.data).name.replace("train", "val", 1)).is_file():
        val_path = str(Path(cfg.data).parent / Path(cfg.data).name.replace("train", "val", 1))
    val = read_annotations(val_path, cfg.root, train.classes) if val_path else None
    return train, val


def video_datasets(cfg: VideoDataConfig, seed: int) -> Tuple[VideoSource, Dataset, Optional[Dataset]]:
    """(train source, train dataset, eval dataset or None) for a data config."""
    train_source, val_source = open_video_sources(cfg)
    flip = cfg.flip if cfg.flip is not None else cfg.data != BUILTIN
    sampler = FrameSampler(cfg.num_frames, cfg.stride, cfg.sampling)
    train_set = VideoDataset(train_source, sampler, VideoTrainTransform(cfg.img_size, tuple(cfg.train_scale),
                                                                        flip=flip, mean=cfg.mean, std=cfg.std),
                             train=True, seed=seed, cache=cfg.cache_clips)
    eval_set = None
    if val_source is not None:
        eval_set = VideoDataset(val_source, sampler, VideoEvalTransform(cfg.img_size, cfg.short_side,
                                                                        cfg.test_crops, cfg.mean, cfg.std),
                                train=False, num_clips=cfg.test_clips, seed=seed, cache=cfg.cache_clips)
    return train_source, train_set, eval_set


def _eval_sums(model: nn.Module, batch, metrics: ClassificationMetrics) -> Dict[str, torch.Tensor]:
    """Counts of a batch of test views; the log of the view-averaged probabilities stands in for logits."""
    logits = view_probabilities(model, batch["video"]).clamp_min(1e-12).log() if batch["label"].numel() else None
    return metrics.sums(logits, batch["label"], batch["skipped"])


class VideoTask:
    """Plumbing shared by the video tasks: datasets from a :class:`VideoDataConfig`, the skip-counting collate,
    model creation at the clip size, and a loss that keeps ranks in step when a whole batch was unreadable."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.train_source, self._train_set, self._eval_set = video_datasets(cfg, cfg.train.seed)
        self.skipped = 0

    def _create_model(self, model: str, base: Optional[Dict[str, Any]] = None, **model_args: Any) -> nn.Module:
        """``model`` at the clip size: ``base`` fields, then the config's ``model_args``, then ``model_args``."""
        cfg = self.cfg
        return create_model(model, **{**(base or {}), "all_frames": cfg.num_frames, "img_size": cfg.img_size,
                                      **(cfg.model_args or {}), **model_args})

    def _load_initial_weights(self, model: nn.Module) -> nn.Module:
        if self.cfg.checkpoint:
            from ..checkpoint import load_checkpoint
            load_checkpoint(model, self.cfg.checkpoint)
        return model

    def train_dataset(self) -> Dataset:
        return self._train_set

    def eval_dataset(self) -> Optional[Dataset]:
        return self._eval_set

    def collate(self, samples):
        return collate_videos(samples)

    def training_step(self, model: nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        self.skipped += batch["skipped"]
        if batch["video"].shape[0] == 0:  # every clip of the batch was unreadable: keep ranks in step
            loss = sum(p.sum() * 0 for p in model.parameters())
        else:
            loss = self.loss(model, batch)
        return loss, {"skipped_videos": self.skipped}

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError


class VideoClassificationTask(VideoTask):
    """Cross-entropy fine-tuning of a video ViT on annotation lists or the built-in actions."""

    # Fields a resumed run may change: the evaluation's data and resize; initial weights (the resume replaces them).
    resume_may_change = frozenset({"val_data", "short_side", "checkpoint"})

    def __init__(self, cfg: VideoClsConfig):
        super().__init__(cfg)
        self.classes = self.train_source.classes
        self.metrics = ClassificationMetrics(self.classes)

    def build_model(self) -> nn.Module:
        name, base = starting_architecture(self.cfg.model, self.cfg.checkpoint)
        model = self._create_model(name, base, **head_model_args(self.cfg.model_args, len(self.classes),
                                                                 self.cfg.data))
        return self._load_initial_weights(model)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        logits = model(batch["video"]).float()
        return F.cross_entropy(logits, batch["label"], label_smoothing=self.cfg.label_smoothing)

    def eval_step(self, model: nn.Module, batch) -> Dict[str, torch.Tensor]:
        return _eval_sums(model, batch, self.metrics)

    def summarize(self, sums: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        return self.metrics.summarize(sums)

    def save_model(self, model: nn.Module, directory: Path) -> None:
        model.pretrained_cfg = trained_cfg(getattr(model, "pretrained_cfg", {}), {
            "num_classes": len(self.classes), "label_names": list(self.classes), **video_protocol(self.cfg).to_cfg()})
        save_pretrained(model, directory)


def starting_architecture(model: Optional[str], checkpoint: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(classifier to build, encoder fields taken from ``checkpoint``) of a fine-tune: a model folder's own
    architecture when ``model`` is None (as HF's ``from_pretrained``; without a folder, ViT-S), and its geometry
    under a ``model`` of that architecture too (a tiny pre-trained ViT-S needs no ``model_args`` repeated). Another
    ``model`` is built as asked: the folder's weights then fit it or are refused by name."""
    implied = None
    if checkpoint and (Path(checkpoint) / CONFIG_NAME).is_file():
        implied = classifier_config(read_config(checkpoint))
    if implied is None:
        return model or DEFAULT_MODEL, {}
    name, fields = implied
    if model is None or model.partition(".")[0] == name:
        return model or name, fields
    return model, {}


def video_protocol(cfg: VideoDataConfig, protocol_cls: type = VideoProtocol) -> VideoProtocol:
    """The test protocol a model trained with ``cfg`` is evaluated with (stored in its folder)."""
    return protocol_cls(num_frames=cfg.num_frames, sampling=cfg.sampling, stride=cfg.stride,
                        test_clips=cfg.test_clips, test_crops=cfg.test_crops, img_size=cfg.img_size,
                        short_side=cfg.short_side, mean=tuple(cfg.mean), std=tuple(cfg.std))


# ------------------------------------------------------------------------------------------------------------ CLI
def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "video-cls", "Fine-tune a video ViT for action recognition.", VideoClsConfig,
                     VideoClassificationTask, "annotation list (`path label` lines or path,label CSV) or "
                     "builtin:actions", DEFAULT_MODEL, hide=("per_class_top1",))


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 eval", description="Evaluate a video classifier (multi-view, "
                                     "with its weights' test protocol; options below override it).")
    parser.add_argument("--data", required=True, help="annotation list, or builtin:actions (its val split)")
    parser.add_argument("--root", help="folder the list's paths are relative to (default: the list's folder)")
    add_model_arguments(parser)
    add_protocol_arguments(parser)
    parser.add_argument("--batch-size", type=positive(int), default=8)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    pipeline = pipeline_from_args(parser, args, VideoClassificationPipeline, **protocol_options(args))
    if not pipeline.labels:
        parser.error(f"{pipeline.source}: has no classifier (a pre-training, UMT or num_classes=0 model): fine-tune "
                     f"it with 'intern2 train video-cls', or take its features with 'intern2 extract-features'")
    try:
        if args.data == BUILTIN:
            from ..data.actions import builtin_actions_root
            source = read_annotations(builtin_actions_root() / "val.txt")
        else:
            source = read_annotations(args.data, args.root, pipeline.labels)
    except ValueError as exc:
        parser.error(str(exc))
    clips = pipeline.protocol.test_clips
    loader = DataLoader(VideoDataset(source, pipeline.sampler, pipeline.transform, train=False, num_clips=clips),
                        batch_size=args.batch_size, collate_fn=collate_videos)
    metrics_of = ClassificationMetrics(source.classes)
    batches = progress(loader, "eval", len(loader))
    sums = accumulate_eval(pipeline.model, batches, lambda m, b: _eval_sums(m, b, metrics_of), pipeline.device)
    metrics = metrics_of.summarize(sums)
    if not metrics["count"]:
        parser.error(f"--data {args.data}: no readable videos ({metrics['skipped']} unreadable)")
    if args.json:
        print(json.dumps(metrics))
    else:
        p = pipeline.protocol
        print(f"{source.name}: top-1 {metrics.get('top1', 0):.2f}%  top-5 {metrics.get('top5', 0):.2f}%  "
              f"({counted(metrics['count'], 'video')} x {counted(clips, 'clip')} x {counted(p.test_crops, 'crop')}, "
              f"{p.sampling} sampling, "
              f"{metrics.get('skipped', 0)} unreadable)")
    return 0
