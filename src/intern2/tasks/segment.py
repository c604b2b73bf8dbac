"""Semantic segmentation: `intern2 train segment`, `intern2 eval` / `intern2 predict` on segmentation models."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.images import load_image
from ..data.segmentation import (IGNORE_INDEX, SegmentationDataset, collate_segmentation, keep_ratio_size,
                                 open_seg_source)
from ..engine import TrainConfig
from ..engine.trainer import accumulate_eval
from ..factory import create_model, save_pretrained
from .common import add_model_arguments, model_from_args, train_cli

__all__ = ["SegmentConfig", "SegmentationTask", "SegmentationMetrics", "colourise", "train_main", "eval_main",
           "predict_main"]

log = logging.getLogger(__name__)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


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
    test_size: Tuple[int, int] = (2048, 512)
    slide: bool = False  # sliding-window evaluation with crop_size windows
    aux_weight: float = 0.4
    train: TrainConfig = field(default_factory=TrainConfig)


class SegmentationMetrics:
    """mIoU, per-class IoU and pixel accuracy from a summable confusion matrix."""

    def __init__(self, classes: Sequence[str], slide: Optional[int] = None):
        self.classes = list(classes)
        self.slide = slide

    def predict_logits(self, model: nn.Module, image: torch.Tensor, size) -> torch.Tensor:
        from ..models.upernet import slide_inference
        logits = slide_inference(model, image, self.slide, self.slide * 2 // 3) if self.slide else model(image)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def eval_step(self, model: nn.Module, batch) -> Dict[str, torch.Tensor]:
        k = len(self.classes)
        confusion = torch.zeros(k * k, dtype=torch.float64)
        images, labels = batch["image"], batch["label"]
        pairs = zip(images, labels) if isinstance(images, list) else zip(images.split(1), labels)
        for image, label in pairs:
            image = image if image.dim() == 4 else image[None]
            prediction = self.predict_logits(model, image, label.shape[-2:]).argmax(1)[0]
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

    def __init__(self, cfg: SegmentConfig):
        self.cfg = cfg
        self.train_source = open_seg_source(cfg.data, cfg.train_split)
        self.val_source = open_seg_source(cfg.data, cfg.val_split)
        classes = self.train_source.classes
        if cfg.num_classes is None and classes is None:
            raise ValueError(f"data {cfg.data}: no classes.txt: set num_classes")
        num_classes = cfg.num_classes or len(classes)
        self.classes = list(classes) if classes and len(classes) == num_classes else [str(i) for i in
                                                                                      range(num_classes)]
        self.metrics = SegmentationMetrics(self.classes, cfg.crop_size if cfg.slide else None)
        self.skipped = 0

    def build_model(self) -> nn.Module:
        model = create_model(self.cfg.model, num_classes=len(self.classes), **(self.cfg.model_args or {}))
        from ..checkpoint import load_checkpoint
        if self.cfg.backbone_checkpoint:
            load_checkpoint(model.backbone, self.cfg.backbone_checkpoint)
        if self.cfg.checkpoint:
            load_checkpoint(model, self.cfg.checkpoint)
        return model

    def _dataset(self, source, train: bool) -> Dataset:
        cfg = self.cfg
        return SegmentationDataset(source, MEAN, STD, train, cfg.crop_size, cfg.scale, cfg.ratio_range, cfg.test_size,
                                   cfg.reduce_zero_label, cfg.train.seed)

    def train_dataset(self) -> Dataset:
        return self._dataset(self.train_source, True)

    def eval_dataset(self) -> Dataset:
        return self._dataset(self.val_source, False)

    def collate(self, samples):
        return collate_segmentation(samples)

    def training_step(self, model: nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        self.skipped += batch["skipped"]
        images, labels = batch["image"], batch["label"]
        if len(images) == 0:
            return sum(p.sum() * 0 for p in model.parameters()), {"skipped_images": self.skipped}
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
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "file": None, "num_classes": len(self.classes),
                                "label_names": self.classes, "test_size": list(self.cfg.test_size),
                                "crop_size": self.cfg.crop_size, "mean": MEAN, "std": STD,
                                "reduce_zero_label": self.cfg.reduce_zero_label}
        save_pretrained(model, directory)


# -------------------------------------------------------------------------------------------------- inference
def _palette(count: int) -> np.ndarray:
    """Distinct colours per class (deterministic); background-ish class 0 is dark."""
    gen = np.random.default_rng(1234)
    colours = gen.integers(40, 256, (max(count, 1), 3)).astype(np.uint8)
    colours[0] = (20, 20, 20)
    return colours


def colourise(image: Image.Image, prediction: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a colour per class over the image."""
    overlay = _palette(int(prediction.max()) + 1)[prediction]
    return Image.fromarray((np.asarray(image, dtype=np.float32) * (1 - alpha) + overlay * alpha).astype(np.uint8))


@torch.no_grad()
def segment_image(model: nn.Module, image: Image.Image) -> np.ndarray:
    """Class index per pixel of ``image`` (preprocessing from the model's pretrained config)."""
    cfg = getattr(model, "pretrained_cfg", {})
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mean, std = (torch.tensor(cfg.get(key, default)).view(3, 1, 1) for key, default in (("mean", MEAN), ("std", STD)))
    tensor = (tensor - mean) / std
    size = keep_ratio_size(*tensor.shape[1:], cfg.get("test_size", (2048, 512)))
    resized = F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False)
    logits = F.interpolate(model(resized), size=tensor.shape[1:], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy().astype(np.int64)


def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "segment", "Train a semantic segmentation model.", SegmentConfig, SegmentationTask,
                     "folder with images/<split> + annotations/<split>, or builtin:shapes", "upernet_internimage_t",
                     hide=("per_class_IoU",))


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 eval", description="Evaluate a segmentation model (mIoU).")
    parser.add_argument("--data", required=True,
                        help="folder with images/<split> + annotations/<split>, or builtin:shapes")
    parser.add_argument("--split", default="val")
    parser.add_argument("--reduce-zero-label", action="store_true", help="ADE20K: label 0 is ignored")
    parser.add_argument("--slide", type=int, help="sliding-window evaluation with this crop size")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    model = model_from_args(parser, args)
    try:
        source = open_seg_source(args.data, args.split)
    except ValueError as exc:
        parser.error(str(exc))
    names = model.pretrained_cfg.get("label_names")
    classes = names if isinstance(names, list) else [str(i) for i in range(model.num_classes)]
    cfg = model.pretrained_cfg
    dataset = SegmentationDataset(source, cfg.get("mean", MEAN), cfg.get("std", STD), False,
                                  test_size=cfg.get("test_size", (2048, 512)),
                                  reduce_zero_label=args.reduce_zero_label or cfg.get("reduce_zero_label", False))
    metrics_of = SegmentationMetrics(classes, args.slide)
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate_segmentation)
    metrics = metrics_of.summarize(accumulate_eval(model, loader, metrics_of.eval_step, torch.device("cpu")))
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{source.name}: mIoU {metrics['mIoU']:.2f}  aAcc {metrics['aAcc']:.2f}  ({len(dataset)} images, "
              f"{metrics['skipped']} unreadable)")
        for name, iou in metrics["per_class_IoU"].items():
            print(f"  {name}: {iou:.2f}")
    return 0


def predict_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 predict", description="Segment images.")
    parser.add_argument("images", nargs="+")
    add_model_arguments(parser)
    parser.add_argument("--out", default="predictions", help="folder for overlays (<name>_seg.png) and masks")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    model = model_from_args(parser, args)
    names = model.pretrained_cfg.get("label_names")
    classes = names if isinstance(names, list) else [str(i) for i in range(model.num_classes)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = [], False
    for file in args.images:
        try:
            image = load_image(file)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
            continue
        prediction = segment_image(model, image)
        stem = Path(file).stem
        colourise(image, prediction).save(out / f"{stem}_seg.png")
        Image.fromarray(prediction.astype(np.uint8)).save(out / f"{stem}_mask.png")
        counts = np.bincount(prediction.ravel(), minlength=len(classes))
        results.append({"file": file, "overlay": str(out / f"{stem}_seg.png"), "mask": str(out / f"{stem}_mask.png"),
                        "classes": {classes[i]: round(float(c) / prediction.size, 4)
                                    for i, c in enumerate(counts) if c}})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['file']}: " + ", ".join(f"{k} {v:.1%}" for k, v in r["classes"].items()) + f" -> {r['overlay']}")
    return 1 if failed else 0
