"""Semantic segmentation: `intern2 train segment` and `intern2 eval` (mIoU through the segmentation pipeline, so
evaluation runs each checkpoint's test protocol; inference: :mod:`intern2.pipelines.segment`)."""
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
from ..data.segmentation import IGNORE_INDEX, SegmentationDataset, collate_segmentation, open_seg_source
from ..engine import TrainConfig
from ..engine.trainer import accumulate_eval
from ..factory import create_model, save_pretrained
from ..pipelines.common import add_model_arguments, counted, pipeline_from_args, progress
from ..pipelines.segment import SegmentationPipeline, add_protocol_arguments, protocol_options, segment_labels
from ..weights import SegmentationProtocol, trained_cfg
from .common import head_model_args, train_cli

__all__ = ["SegmentConfig", "SegmentationTask", "SegmentationMetrics", "train_main", "eval_main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentConfig:
    model: str = "upernet_internimage_t"
    model_args: Optional[Dict[str, Any]] = None  # e.g. {backbone: {channels: 16, depths: [1, 1, 2, 1]}, channels: 64}
    backbone_checkpoint: Optional[str] = None  # ImageNet InternImage weights for the backbone
    checkpoint: Optional[str] = None  # full segmentor weights
    data: str = "builtin:shapes"
    train_split: str = "train"
    val_split: str = "val"
    reduce_zero_label: bool = False  # True for ADE20K (0 = "other" becomes ignore)
    num_classes: Optional[int] = None  # default: the data's classes.txt
    crop_size: int = 512
    scale: int = 512
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    test_size: Tuple[int, int] = (2048, 512)  # evaluation: keep-ratio bound (long, short), mmseg's img_scale
    size_divisor: Optional[int] = 32  # evaluation: each side resized up to a multiple (mmseg's ResizeToMultiple)
    slide: bool = False  # sliding-window evaluation with crop_size windows
    aux_weight: float = 0.4
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_positive(self, "crop_size", "scale", "test_size", "size_divisor", "num_classes")
        check_range(self, "ratio_range", "(0, inf)", pair=True)
        check_range(self, "aux_weight", "[0, inf)")


class SegmentationMetrics:
    """mIoU, per-class IoU and pixel accuracy from a summable confusion matrix; predictions come from the
    segmentation pipeline's :func:`~intern2.pipelines.segment.segment_labels` under ``protocol``."""

    def __init__(self, classes: Sequence[str], protocol: Optional[SegmentationProtocol] = None, tta: bool = False):
        self.classes = list(classes)
        self.protocol = protocol or SegmentationProtocol()
        self.tta = tta

    def eval_step(self, model: nn.Module, batch) -> Dict[str, torch.Tensor]:
        k = len(self.classes)
        confusion = torch.zeros(k * k, dtype=torch.float64)
        images, labels = batch["image"], batch["label"]
        for image, label in zip(images, labels):
            prediction = segment_labels(model, image, self.protocol, self.tta).to(label.device)
            valid = label != IGNORE_INDEX
            confusion += torch.bincount(label[valid] * k + prediction[valid], minlength=k * k).double().cpu()
        return {"confusion": confusion, "skipped": torch.tensor(float(batch["skipped"]))}

    def summarize(self, sums: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        k = len(self.classes)
        confusion = sums.get("confusion", torch.zeros(k * k)).view(k, k)
        tp = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - tp
        iou = tp / union.clamp(min=1)
        present = union > 0  # mmseg: classes absent from both prediction and label do not count
        return {"mIoU": float(iou[present].mean() * 100) if present.any() else 0.0,
                "aAcc": float(tp.sum() / confusion.sum().clamp(min=1) * 100),
                "per_class_IoU": {self.classes[i]: round(float(iou[i] * 100), 2) for i in range(k) if present[i]},
                "pixels": int(confusion.sum()), "skipped": int(sums.get("skipped", 0))}


class SegmentationTask:
    """UperNet training: cross-entropy (ignore 255) on the decode head + ``aux_weight`` x the auxiliary head."""

    # Fields a resumed run may change: the evaluation's split and protocol; initial weights (the resume
    # replaces them).
    resume_may_change = frozenset({"val_split", "test_size", "size_divisor", "slide", "checkpoint",
                                   "backbone_checkpoint"})

    def __init__(self, cfg: SegmentConfig):
        self.cfg = cfg
        self.train_source = open_seg_source(cfg.data, cfg.train_split)
        self.val_source = open_seg_source(cfg.data, cfg.val_split)
        classes = self.train_source.classes
        if cfg.num_classes is None and not classes:
            problem = "classes.txt lists no classes" if classes is not None else "no classes.txt"
            raise ValueError(f"data {cfg.data}: {problem}: list one class name per line, or set num_classes")
        if classes and cfg.num_classes and cfg.num_classes != len(classes):
            raise ValueError(f"num_classes: {cfg.num_classes}, but data {cfg.data}'s classes.txt lists {len(classes)} "
                             f"classes; leave num_classes unset, or make classes.txt match")
        self.classes = list(classes) if classes else [str(i) for i in range(cfg.num_classes)]
        self.protocol = SegmentationProtocol(
            test_size=tuple(cfg.test_size), size_divisor=cfg.size_divisor,
            slide_crop=(cfg.crop_size, cfg.crop_size) if cfg.slide else None, reduce_zero_label=cfg.reduce_zero_label)
        self.metrics = SegmentationMetrics(self.classes, self.protocol)
        self.skipped = 0
        self._eval_set = self._dataset(self.val_source, False)
        self._eval_set.check_labels()

    def build_model(self) -> nn.Module:
        model = create_model(self.cfg.model, **head_model_args(self.cfg.model_args, len(self.classes), self.cfg.data))
        from ..checkpoint import load_checkpoint
        if self.cfg.backbone_checkpoint:
            load_checkpoint(model.backbone, self.cfg.backbone_checkpoint)
        if self.cfg.checkpoint:
            load_checkpoint(model, self.cfg.checkpoint)
        return model

    def _dataset(self, source, train: bool) -> Dataset:
        cfg = self.cfg
        return SegmentationDataset(source, IMAGENET_MEAN, IMAGENET_STD, train, cfg.crop_size, cfg.scale,
                                   cfg.ratio_range, cfg.reduce_zero_label, cfg.train.seed, len(self.classes))

    def train_dataset(self) -> Dataset:
        return self._dataset(self.train_source, True)

    def eval_dataset(self) -> Dataset:
        return self._eval_set

    def collate(self, samples):
        return collate_segmentation(samples)

    def training_step(self, model: nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        self.skipped += batch["skipped"]
        images, labels = batch["image"], batch["label"]
        if len(images) == 0:
            return sum(p.sum() * 0 for p in model.parameters()), {"skipped_images": self.skipped}
        from ..models.mask2former import Mask2Former
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        if isinstance(inner, Mask2Former):  # mask classification: its own matched losses
            losses = model(images, labels)
            return sum(losses.values()), {"skipped_images": self.skipped,
                                          **{k: v.item() for k, v in losses.items() if "." not in k}}
        decode, aux = model(images, return_heads=True)
        size = labels.shape[-2:]
        loss = F.cross_entropy(F.interpolate(decode.float(), size=size, mode="bilinear", align_corners=False),
                               labels, ignore_index=IGNORE_INDEX)
        scalars = {"skipped_images": self.skipped, "loss_decode": loss.item()}
        if aux is not None and self.cfg.aux_weight:
            aux_loss = F.cross_entropy(F.interpolate(aux.float(), size=size, mode="bilinear", align_corners=False),
                                       labels, ignore_index=IGNORE_INDEX)
            loss = loss + self.cfg.aux_weight * aux_loss
            scalars["loss_aux"] = aux_loss.item()
        return loss, scalars

    def eval_step(self, model: nn.Module, batch) -> Dict[str, torch.Tensor]:
        return self.metrics.eval_step(model, batch)

    def summarize(self, sums: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        return self.metrics.summarize(sums)

    def save_model(self, model: nn.Module, directory: Path) -> None:
        model.pretrained_cfg = trained_cfg(getattr(model, "pretrained_cfg", {}), {
            "num_classes": len(self.classes), "label_names": self.classes, "crop_size": self.cfg.crop_size,
            **self.protocol.to_cfg()})
        save_pretrained(model, directory)


def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "segment", "Train a semantic segmentation model.", SegmentConfig, SegmentationTask,
                     "folder with images/<split> + annotations/<split>, or builtin:shapes", "upernet_internimage_t",
                     hide=("per_class_IoU",))


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 eval", description="Evaluate a segmentation model (mIoU) with its "
                                     "weights' test protocol (options below override it).")
    parser.add_argument("--data", required=True,
                        help="folder with images/<split> + annotations/<split>, or builtin:shapes")
    parser.add_argument("--split", default="val")
    parser.add_argument("--reduce-zero-label", action="store_true", default=None,
                        help="label 0 is ignored and the others shift down (ADE20K; default: the protocol's)")
    add_model_arguments(parser)
    add_protocol_arguments(parser)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    options = protocol_options(args)
    pipeline = pipeline_from_args(parser, args, SegmentationPipeline, reduce_zero_label=args.reduce_zero_label,
                                  **options)
    try:
        source = open_seg_source(args.data, args.split)
    except ValueError as exc:
        parser.error(str(exc))
    protocol = pipeline.protocol
    dataset = SegmentationDataset(source, protocol.mean, protocol.std, False,
                                  reduce_zero_label=protocol.reduce_zero_label, num_classes=len(pipeline.labels))
    metrics_of = SegmentationMetrics(pipeline.labels, protocol, pipeline.tta)
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate_segmentation)
    batches = progress(loader, "eval", len(loader))
    metrics = metrics_of.summarize(accumulate_eval(pipeline.model, batches, metrics_of.eval_step, pipeline.device))
    if metrics["skipped"] >= len(dataset):
        parser.error(f"--data {args.data}: no readable images ({metrics['skipped']} unreadable)")
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{source.name}: mIoU {metrics['mIoU']:.2f}  aAcc {metrics['aAcc']:.2f}  "
              f"({counted(len(dataset), 'image')}, {metrics['skipped']} unreadable; test size "
              f"{protocol.test_size[0]}x{protocol.test_size[1]}"
              f"{', multi-scale + flip' if pipeline.tta else ''})")
        for name, iou in metrics["per_class_IoU"].items():
            print(f"  {name}: {iou:.2f}")
    return 0
