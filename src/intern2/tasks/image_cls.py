"""Image classification: `intern2 train image-cls` and `intern2 eval` (inference:
:mod:`intern2.pipelines.image_cls`)."""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import check_positive, check_range
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..data.images import (
    ClassificationDataset,
    ImageSource,
    collate_images,
    eval_transform,
    open_image_source,
    split_source,
    train_transform,
)
from ..engine import TrainConfig
from ..engine.trainer import accumulate_eval
from ..factory import create_model, save_pretrained
from ..pipelines.common import (add_model_arguments, check_aspect, counted, model_dtype, pipeline_from_args, positive,
                                progress)
from ..pipelines.image_cls import ImageClassificationPipeline
from ..weights import ImageClassificationProtocol, trained_cfg
from .common import head_model_args, train_cli

__all__ = ["ImageClsConfig", "ImageClassificationTask", "ClassificationMetrics", "train_main", "eval_main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageClsConfig:
    model: str = "internimage_t"
    model_args: Optional[Dict[str, Any]] = None  # architecture overrides, e.g. {depths: [1, 1, 2, 1]}
    pretrained: bool = False
    checkpoint: Optional[str] = None  # initial weights (a replaced head is re-initialised)
    data: str = "builtin:digits"
    val_data: Optional[str] = None  # default: a val_fraction split of `data`
    val_fraction: float = 0.2
    img_size: int = 224
    crop_pct: float = 1.0
    crop_mode: str = "center"  # evaluation resize, as timm's: center, squash or border
    train_crop_scale: Tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_positive(self, "img_size")
        check_range(self, "train_crop_scale", "(0, 1]", pair=True)
        for name, interval in (("val_fraction", "(0, 1)"), ("label_smoothing", "[0, 1)"), ("hflip", "[0, 1]"),
                               ("mixup", "[0, inf)"), ("cutmix", "[0, inf)")):
            check_range(self, name, interval)
        self.protocol()  # crop_pct and img_size as the saved model's protocol will check them

    def protocol(self) -> ImageClassificationProtocol:
        """The evaluation protocol the trained model is saved with."""
        return ImageClassificationProtocol(input_size=(3, self.img_size, self.img_size), crop_pct=self.crop_pct,
                                           crop_mode=self.crop_mode)


class ClassificationMetrics:
    """Top-1/top-5 accuracy, loss and per-class accuracy from summable per-batch counts."""

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)

    def eval_step(self, model: nn.Module, batch) -> Dict[str, torch.Tensor]:
        # The model's dtype: a bfloat16 model (eval --dtype bf16) takes bfloat16 images; autocast's model is float32.
        logits = model(batch["image"].to(model_dtype(model))) if batch["label"].numel() else None
        return self.sums(logits, batch["label"], batch["skipped"])

    def sums(self, logits: Optional[torch.Tensor], labels: torch.Tensor, skipped: int) -> Dict[str, torch.Tensor]:
        """Summable counts for a batch of logits (None for an empty batch)."""
        num_classes = len(self.classes)
        sums = {"count": torch.tensor(float(labels.numel())), "skipped": torch.tensor(float(skipped))}
        if logits is None or labels.numel() == 0:
            return sums
        logits = logits.float()
        hits = logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]
        sums.update(loss=F.cross_entropy(logits, labels, reduction="sum"), top1=hits[:, 0].sum().float(),
                    top5=hits.any(1).sum().float(),
                    class_count=torch.bincount(labels, minlength=num_classes).float(),
                    class_correct=torch.bincount(labels[hits[:, 0]], minlength=num_classes).float())
        return {k: v.cpu() for k, v in sums.items()}

    def summarize(self, sums: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        count = float(sums.get("count", 0))
        if count == 0:
            return {"count": 0, "skipped": int(sums.get("skipped", 0))}
        per_class = (sums["class_correct"] / sums["class_count"].clamp(min=1) * 100).tolist()
        return {"top1": float(sums["top1"]) / count * 100, "top5": float(sums["top5"]) / count * 100,
                "loss": float(sums["loss"]) / count, "count": int(count), "skipped": int(sums["skipped"]),
                "per_class_top1": {name: round(acc, 2) for name, acc, n in
                                   zip(self.classes, per_class, sums["class_count"].tolist()) if n > 0}}


class ImageClassificationTask:
    """Cross-entropy classification of an ImageFolder / CSV / built-in dataset with any intern2 image model."""

    # Fields a resumed run may change: the evaluation's crop; initial weights (the resume replaces them).
    resume_may_change = frozenset({"crop_pct", "crop_mode", "checkpoint", "pretrained"})

    def __init__(self, cfg: ImageClsConfig):
        self.cfg = cfg
        source = open_image_source(cfg.data)
        if cfg.val_data:
            self.train_source, self.val_source = source, open_image_source(cfg.val_data, source.classes)
        else:
            self.train_source, self.val_source = split_source(source, cfg.val_fraction, cfg.train.seed)
            if not self.val_source.samples:
                log.warning("val_fraction %s of data %s holds no image (too few per class): the run will not be "
                            "evaluated; give a larger fraction or val_data", cfg.val_fraction, cfg.data)
        self.classes = source.classes
        self.metrics = ClassificationMetrics(self.classes)
        self.skipped = 0
        self._mix = self._batch_mixing()

    def _batch_mixing(self):
        from torchvision.transforms import v2
        mixers = []
        if self.cfg.mixup > 0:
            mixers.append(v2.MixUp(alpha=self.cfg.mixup, num_classes=len(self.classes)))
        if self.cfg.cutmix > 0:
            mixers.append(v2.CutMix(alpha=self.cfg.cutmix, num_classes=len(self.classes)))
        return v2.RandomChoice(mixers) if mixers else None

    def build_model(self) -> nn.Module:
        # Sized to the data before loading: a checkpoint with these classes keeps its head, others get a new one.
        model = create_model(self.cfg.model, pretrained=self.cfg.pretrained and not self.cfg.checkpoint,
                             **head_model_args(self.cfg.model_args, len(self.classes), self.cfg.data))
        if self.cfg.checkpoint:
            from ..checkpoint import load_checkpoint
            load_checkpoint(model, self.cfg.checkpoint)
        return model

    def _dataset(self, source: ImageSource, train: bool) -> Dataset:
        cfg = self.cfg
        transform = (train_transform(cfg.img_size, IMAGENET_MEAN, IMAGENET_STD, cfg.train_crop_scale, cfg.hflip)
                     if train else eval_transform(cfg.img_size, IMAGENET_MEAN, IMAGENET_STD, cfg.crop_pct,
                                                             crop_mode=cfg.crop_mode))
        return ClassificationDataset(source, transform, seed=cfg.train.seed, check=None if train else check_aspect)

    def train_dataset(self) -> Dataset:
        return self._dataset(self.train_source, train=True)

    def eval_dataset(self) -> Optional[Dataset]:
        return self._dataset(self.val_source, train=False) if self.val_source.samples else None

    def collate(self, samples):
        return collate_images(samples)

    def training_step(self, model: nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        self.skipped += batch["skipped"]
        images, labels = batch["image"], batch["label"]
        if images.shape[0] == 0:  # every image of the batch was unreadable: a zero loss keeps ranks in step
            return sum(p.sum() * 0 for p in model.parameters()), {"skipped_images": self.skipped}
        targets = labels
        if self._mix is not None and model.training:
            images, targets = self._mix(images, labels)
        logits = model(images).float()
        loss = F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)
        return loss, {"skipped_images": self.skipped}

    def eval_step(self, model: nn.Module, batch) -> Dict[str, torch.Tensor]:
        return self.metrics.eval_step(model, batch)

    def summarize(self, sums: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        return self.metrics.summarize(sums)

    def save_model(self, model: nn.Module, directory: Path) -> None:
        protocol = self.cfg.protocol()
        model.pretrained_cfg = trained_cfg(getattr(model, "pretrained_cfg", {}), {
            "num_classes": len(self.classes), "label_names": list(self.classes), **protocol.to_cfg()})
        save_pretrained(model, directory)


# ------------------------------------------------------------------------------------------------------------ CLI
def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "image-cls", "Train an image classifier.", ImageClsConfig, ImageClassificationTask,
                     "ImageFolder directory, CSV of path,label, or builtin:digits", "internimage_t",
                     hide=("per_class_top1",))


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 eval", description="Evaluate an image classifier on a dataset.")
    parser.add_argument("--data", required=True, help="ImageFolder directory, CSV of path,label, or builtin:digits")
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=positive(int), default=32)
    parser.add_argument("--val-fraction", type=float,
                        help="score only the held-out part of --data that 'intern2 train image-cls' splits off with "
                             "this val_fraction (and --seed, its train.seed); default: all of --data")
    parser.add_argument("--seed", type=int, default=0, help="with --val-fraction: the training run's train.seed")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    pipeline = pipeline_from_args(parser, args, ImageClassificationPipeline)
    try:
        source = open_image_source(args.data, pipeline.labels)
        if args.val_fraction is not None:
            source = split_source(source, args.val_fraction, args.seed)[1]
    except ValueError as exc:
        parser.error(f"--val-fraction {args.val_fraction}: expected a number in (0, 1)"
                     if "val_fraction" in str(exc) else str(exc))
    if not source.samples:
        parser.error(f"--val-fraction {args.val_fraction}: the held-out split of --data {args.data} is empty (too "
                     f"few images per class); give a larger fraction, or leave it out to score all of --data")
    loader = DataLoader(ClassificationDataset(source, pipeline.transform, check=check_aspect),
                        batch_size=args.batch_size, collate_fn=collate_images)
    metrics_of = ClassificationMetrics(source.classes)
    batches = progress(loader, "eval", len(loader))
    metrics = metrics_of.summarize(accumulate_eval(pipeline.model, batches, metrics_of.eval_step, pipeline.device))
    if not metrics["count"]:
        parser.error(f"--data {args.data}: no readable images ({metrics['skipped']} unreadable)")
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{source.name}: top-1 {metrics.get('top1', 0):.2f}%  top-5 {metrics.get('top5', 0):.2f}%  "
              f"({counted(metrics['count'], 'image')} at {pipeline.protocol.img_size}px, "
              f"{metrics.get('skipped', 0)} unreadable)")
        for name, acc in metrics.get("per_class_top1", {}).items():
            print(f"  {name}: {acc:.2f}%")
    return 0
