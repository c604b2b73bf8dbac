"""Action recognition with the video ViT: `intern2 train video-cls`, `intern2 eval`, `intern2 predict VIDEO`,
`intern2 extract-features`. Test-time views (clips x crops) are averaged in probability space."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.video import (IMAGENET_MEAN, IMAGENET_STD, FrameSampler, VideoDataset,
                          VideoDecodeError, VideoEvalTransform, VideoSource, VideoTrainTransform, collate_videos,
                          read_annotations, read_video)
from ..engine import TrainConfig
from ..engine.trainer import accumulate_eval
from ..factory import create_model, save_pretrained
from .common import add_model_arguments, model_from_args, print_topk, setup_logging, train_cli
from .image_cls import ClassificationMetrics

__all__ = ["VideoDataConfig", "VideoClsConfig", "VideoTask", "VideoClassificationTask", "open_video_sources",
           "video_datasets", "predict_videos", "extract_features", "train_main", "eval_main", "predict_main",
           "extract_features_main"]

log = logging.getLogger(__name__)
BUILTIN = "builtin:actions"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")


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
    cache_clips: bool = False  # keep decoded videos in memory (small data sets; use with train.num_workers=0)
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class VideoClsConfig(VideoDataConfig):
    model: str = "videomae_vit_s"
    model_args: Optional[Dict[str, Any]] = None  # architecture overrides, e.g. {depth: 4, embed_dim: 96}
    checkpoint: Optional[str] = None  # initial weights: a fine-tuned, pre-training (VideoMAE) or HF file/folder
    label_smoothing: float = 0.1
    train: TrainConfig = field(default_factory=TrainConfig)


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
        eval_set = VideoDataset(val_source, sampler, VideoEvalTransform(cfg.img_size, num_crops=cfg.test_crops,
                                                                        mean=cfg.mean, std=cfg.std),
                                train=False, num_clips=cfg.test_clips, seed=seed, cache=cfg.cache_clips)
    return train_source, train_set, eval_set


def _view_logits(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """(B, V, C, T, H, W) test views -> log of the view-averaged class probabilities, (B, K)."""
    batch, num_views = views.shape[:2]
    probs = model(views.flatten(0, 1)).float().softmax(-1).view(batch, num_views, -1).mean(1)
    return probs.clamp_min(1e-12).log()


def _eval_sums(model: nn.Module, batch, metrics: ClassificationMetrics) -> Dict[str, torch.Tensor]:
    logits = _view_logits(model, batch["video"]) if batch["label"].numel() else None
    return metrics.sums(logits, batch["label"], batch["skipped"])


class VideoTask:
    """Plumbing shared by the video tasks: datasets from a :class:`VideoDataConfig`, the skip-counting collate,
    model creation at the clip size, and a loss that keeps ranks in step when a whole batch was unreadable."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.train_source, self._train_set, self._eval_set = video_datasets(cfg, cfg.train.seed)
        self.skipped = 0

    def _create_model(self) -> nn.Module:
        cfg = self.cfg
        return create_model(cfg.model, **{"all_frames": cfg.num_frames, "img_size": cfg.img_size,
                                          **(cfg.model_args or {})})

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

    def __init__(self, cfg: VideoClsConfig):
        super().__init__(cfg)
        self.classes = self.train_source.classes
        self.metrics = ClassificationMetrics(self.classes)

    def build_model(self) -> nn.Module:
        model = self._create_model()
        if model.num_classes != len(self.classes):
            model.reset_classifier(len(self.classes))
        return self._load_initial_weights(model)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        logits = model(batch["video"]).float()
        return F.cross_entropy(logits, batch["label"], label_smoothing=self.cfg.label_smoothing)

    def eval_step(self, model: nn.Module, batch) -> Dict[str, torch.Tensor]:
        return _eval_sums(model, batch, self.metrics)

    def summarize(self, sums: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        return self.metrics.summarize(sums)

    def save_model(self, model: nn.Module, directory: Path) -> None:
        cfg = self.cfg
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "file": None,
                                "num_classes": len(self.classes), "label_names": list(self.classes),
                                "input_size": (3, cfg.num_frames, cfg.img_size, cfg.img_size),
                                "mean": tuple(cfg.mean), "std": tuple(cfg.std), "num_frames": cfg.num_frames,
                                "stride": cfg.stride, "sampling": cfg.sampling, "test_clips": cfg.test_clips,
                                "test_crops": cfg.test_crops}
        save_pretrained(model, directory)


# ------------------------------------------------------------------------------------------------------- inference
def _inference_setup(model: nn.Module, clips: Optional[int] = None, crops: Optional[int] = None):
    """(sampler, transform, clips) from the model's pretrained config (what training saved), defaults otherwise."""
    cfg = getattr(model, "pretrained_cfg", {})
    frames = cfg.get("num_frames", getattr(model, "config", {}).get("all_frames", 16))
    size = cfg.get("input_size", (3, frames, 224, 224))[-1]
    sampler = FrameSampler(frames, cfg.get("stride", 4), cfg.get("sampling", "dense"))
    transform = VideoEvalTransform(size, num_crops=crops or cfg.get("test_crops", 1),
                                   mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))
    return sampler, transform, clips or cfg.get("test_clips", 1)


def _load_views(file: str, sampler: FrameSampler, transform: VideoEvalTransform, clips: int) -> torch.Tensor:
    from ..data.video import clip_positions
    frames = read_video(file, lambda total: [i for p in clip_positions(clips) for i in sampler(total, position=p)])
    return torch.stack([transform(clip) for clip in frames.chunk(clips)]).flatten(0, 1)


def _class_names(model: nn.Module) -> List[str]:
    names = getattr(model, "pretrained_cfg", {}).get("label_names")
    return list(names) if isinstance(names, list) and len(names) == model.num_classes else \
        [str(i) for i in range(model.num_classes)]


@torch.no_grad()
def predict_videos(model: nn.Module, files: Sequence[str], topk: int = 5, clips: Optional[int] = None,
                   crops: Optional[int] = None) -> List[Dict[str, Any]]:
    """Top-k labels per video file (views averaged); an unreadable file gets an 'error' entry naming it."""
    sampler, transform, clips = _inference_setup(model, clips, crops)
    names, results = _class_names(model), []
    for file in files:
        try:
            views = _load_views(file, sampler, transform, clips)
        except VideoDecodeError as exc:
            results.append({"file": file, "error": str(exc)})
            continue
        probs = _view_logits(model, views[None]).exp()[0]
        values, indices = probs.topk(min(topk, probs.numel()))
        results.append({"file": file, "top": [{"label": names[i], "index": int(i), "prob": round(float(p), 6)}
                                              for p, i in zip(values.tolist(), indices.tolist())]})
    return results


@torch.no_grad()
def extract_features(model: nn.Module, files: Sequence[str]) -> Tuple[torch.Tensor, List[str], List[str]]:
    """Pooled clip features (views averaged), (N, D) float32, for the readable files; returns (features, files
    read, error messages of the unreadable ones)."""
    sampler, transform, clips = _inference_setup(model)
    # A classifier pools as it was trained to; a pre-training encoder (no pooling of its own) is mean-pooled.
    pretraining = hasattr(model, "encoder")
    encoder = model.encoder if pretraining else model
    features, done, errors = [], [], []
    for file in files:
        try:
            views = _load_views(file, sampler, transform, clips)
        except VideoDecodeError as exc:
            errors.append(str(exc))
            continue
        tokens = encoder.forward_features(views)
        pooled = tokens.mean(1) if pretraining else encoder.forward_head(tokens, pre_logits=True)
        features.append(pooled.float().mean(0))
        done.append(file)
    dim = getattr(encoder, "embed_dim", 0)
    return (torch.stack(features) if features else torch.zeros(0, dim)), done, errors


def _video_files(paths: Sequence[str]) -> List[str]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        else:
            files.append(str(path))
    return files


# ------------------------------------------------------------------------------------------------------------ CLI
def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "video-cls", "Fine-tune a video ViT for action recognition.", VideoClsConfig,
                     VideoClassificationTask, "annotation list (`path label` lines or path,label CSV) or "
                     "builtin:actions", "videomae_vit_s", hide=("per_class_top1",))


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 eval", description="Evaluate a video classifier (multi-view).")
    parser.add_argument("--data", required=True, help="annotation list, or builtin:actions (its val split)")
    parser.add_argument("--root", help="folder the list's paths are relative to (default: the list's folder)")
    add_model_arguments(parser)
    parser.add_argument("--clips", type=int, help="temporal views per video (default: as trained)")
    parser.add_argument("--crops", type=int, choices=(1, 3), help="spatial crops per clip (default: as trained)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    model = model_from_args(parser, args)
    sampler, transform, clips = _inference_setup(model, args.clips, args.crops)
    try:
        if args.data == BUILTIN:
            from ..data.actions import builtin_actions_root
            source = read_annotations(builtin_actions_root() / "val.txt")
        else:
            source = read_annotations(args.data, args.root, _class_names(model))
    except ValueError as exc:
        parser.error(str(exc))
    loader = DataLoader(VideoDataset(source, sampler, transform, train=False, num_clips=clips),
                        batch_size=args.batch_size, collate_fn=collate_videos)
    metrics_of = ClassificationMetrics(source.classes)
    sums = accumulate_eval(model, loader, lambda m, b: _eval_sums(m, b, metrics_of), torch.device("cpu"))
    metrics = metrics_of.summarize(sums)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{source.name}: top-1 {metrics.get('top1', 0):.2f}%  top-5 {metrics.get('top5', 0):.2f}%  "
              f"({metrics['count']} videos x {clips * transform.num_crops} views, {metrics.get('skipped', 0)} "
              f"unreadable)")
    return 0


def predict_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 predict", description="Classify video files.")
    parser.add_argument("videos", nargs="+", help="video files or folders")
    add_model_arguments(parser)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--clips", type=int, help="temporal views per video (default: as trained)")
    parser.add_argument("--crops", type=int, choices=(1, 3), help="spatial crops per clip (default: as trained)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    model = model_from_args(parser, args)
    results = predict_videos(model, _video_files(args.videos), args.topk, args.clips, args.crops)
    return print_topk(results, args.json)


def extract_features_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 extract-features VIDEOS... --out FILE.{safetensors,npy}`."""
    parser = argparse.ArgumentParser(prog="intern2 extract-features",
                                     description="Pooled video-ViT features per video, for downstream use.")
    parser.add_argument("videos", nargs="+", help="video files or folders")
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="output .safetensors (features + file order) or .npy")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npy"):
        parser.error(f"--out {out}: expected a .safetensors or .npy file name")
    files = _video_files(args.videos)
    if not files:
        parser.error(f"no video files found in {args.videos} (extensions: {', '.join(VIDEO_SUFFIXES)})")
    model = model_from_args(parser, args)
    features, done, errors = extract_features(model, files)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if not done:
        return 1
    from ..checkpoint import atomic_write
    if out.suffix == ".npy":
        import numpy as np
        atomic_write(out, lambda tmp: np.save(open(tmp, "wb"), features.numpy()))
        atomic_write(out.with_suffix(".files.txt"), lambda tmp: Path(tmp).write_text("\n".join(done) + "\n"))
    else:
        from safetensors.torch import save_file
        atomic_write(out, lambda tmp: save_file({"features": features.contiguous()}, tmp,
                                                metadata={"files": json.dumps(done)}))
    setup_logging()
    log.info("wrote %d x %d features to %s", *features.shape, out)
    return 1 if errors else 0
