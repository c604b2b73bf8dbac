"""Object detection + instance segmentation: `intern2 train detect` and `intern2 eval` on Mask R-CNN and Cascade
Mask R-CNN models (COCO box and mask AP with pycocotools; inference: :mod:`intern2.pipelines.detect`)."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import check_positive, check_range
from ..data.coco import (AUGMENTS, CocoDetection, CocoSource, autoaugment_short_sides, check_categories,
                         collate_detection, open_coco_source)
from ..engine import TrainConfig
from ..factory import create_model, save_pretrained
from ..pipelines.common import add_model_arguments, counted, pair, pipeline_from_args, positive
from ..pipelines.detect import DetectionPipeline
from ..weights import DetectionProtocol, trained_cfg
from .common import head_model_args, train_cli

__all__ = ["DetectConfig", "DetectionTask", "coco_evaluate", "evaluate_detector", "train_main", "eval_main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectConfig:
    model: str = "mask_rcnn_internimage_t"
    model_args: Optional[Dict[str, Any]] = None  # e.g. {backbone: {channels: 16, depths: [1, 1, 2, 1]}}
    backbone_checkpoint: Optional[str] = None  # ImageNet InternImage weights for the backbone
    checkpoint: Optional[str] = None  # full detector weights (our layout or the official mmdet file)
    data: str = "builtin:shapes"  # images/<split> + instances_<split>.json, COCO's own layout, or builtin:shapes
    train_split: str = "train"
    val_split: str = "val"
    min_size: int = 800
    max_size: int = 1333
    hflip: float = 0.5
    # "autoaugment": the official 3x recipe (multi-scale short sides 480..800 + DETR's resize-crop policy, lengths
    # scaled by min_size / 800); "none": one scale (min_size) and flips, as the 1x configs.
    augment: str = "none"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_positive(self, "min_size", "max_size")
        check_range(self, "hflip", "[0, 1]")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size: expected at most max_size ({self.max_size}), got {self.min_size}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment: expected one of {list(AUGMENTS)}, got {self.augment!r}")


def coco_evaluate(source: CocoSource, detections: List[Dict[str, Any]],
                  masks: bool = True) -> Dict[str, Optional[float]]:
    """COCO bbox (and, for a detector with masks, segm) AP / AP50 / AP75 of ``detections`` (COCO result dicts)
    against ``source``, in percent (None where no ground-truth object has that size). pycocotools would score box-only
    results as box-shaped masks: ``masks=False`` skips segm."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    kinds = ("bbox", "segm") if masks else ("bbox",)
    image_ids = [image["id"] for image in source.images]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        ground_truth = COCO(str(source.annotation_file))
        if not detections:  # loadRes refuses an empty list; COCOeval would score 0 where ground truth exists
            objects = [a for a in ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=image_ids))
                       if not a.get("iscrowd")]
            areas = [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in objects]
            ranges = COCOeval(iouType="bbox").params.areaRng  # all, small, medium, large
            present = [any(low <= area <= high for area in areas) for low, high in ranges]
            by_key = dict(zip(keys, present[:1] * 3 + present[1:]))
            return {f"{kind}_{k}": 0.0 if by_key[k] else None for kind in kinds for k in keys}
        results = ground_truth.loadRes(detections)
        metrics = {}
        for kind in kinds:
            evaluator = COCOeval(ground_truth, results, kind)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            # pycocotools' -1 (no ground-truth object of that size) is null, not a -100 AP.
            metrics.update({f"{kind}_{k}": None if v < 0 else round(float(v) * 100, 3)
                            for k, v in zip(keys, evaluator.stats[:6])})
    return metrics


def to_coco_results(output: Dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int]) -> List[Dict]:
    from pycocotools import mask as mask_utils
    results = []
    masks = (output["masks"][:, 0] >= 0.5).numpy().astype(np.uint8) if "masks" in output else None
    for i, (box, label, score) in enumerate(zip(output["boxes"].tolist(), output["labels"].tolist(),
                                                output["scores"].tolist())):
        entry = {"image_id": image_id, "category_id": category_ids[label - 1], "score": score,
                 "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i]))
            entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        results.append(entry)
    return results


def evaluate_detector(model: nn.Module, dataset: CocoDetection, batch_size: int,
                      device: torch.device) -> Dict[str, Any]:
    """COCO metrics over the whole dataset (under torchrun every rank evaluates everything: detections are not
    summable like classification counts)."""
    was_training = model.training
    model.eval()
    detections: List[Dict] = []
    masks = True
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_detection):
        with torch.no_grad():
            outputs = model([image.to(device) for image in batch["images"]])
        for output, image_id in zip(outputs, batch["image_ids"]):
            masks = "masks" in output
            detections += to_coco_results({k: v.cpu() for k, v in output.items()}, image_id,
                                          dataset.source.category_ids)
    model.train(was_training)
    return {**coco_evaluate(dataset.source, detections, masks), "images": len(dataset),
            "detections": len(detections)}


class DetectionTask:
    """Mask R-CNN / Cascade Mask R-CNN training (torchvision's losses; the cascade's are mmdet's) and COCO
    evaluation."""

    # Fields a resumed run may change: the evaluation's split; initial weights (the resume replaces them).
    resume_may_change = frozenset({"val_split", "checkpoint", "backbone_checkpoint"})

    def __init__(self, cfg: DetectConfig):
        self.cfg = cfg
        self.train_source = open_coco_source(cfg.data, cfg.train_split)
        if not self.train_source.annotations:
            raise ValueError(f"{self.train_source.annotation_file}: no usable annotation to train on")
        self.val_source = open_coco_source(cfg.data, cfg.val_split)
        if not self.val_source.annotations:  # every AP would be undefined
            raise ValueError(f"{self.val_source.annotation_file}: no usable annotation to evaluate against")
        self.classes = self.train_source.classes
        check_categories(self.val_source, self.classes, self.train_source.annotation_file)
        self.skipped = 0

    def build_model(self) -> nn.Module:
        model = create_model(self.cfg.model, min_size=self.cfg.min_size, max_size=self.cfg.max_size,
                             **head_model_args(self.cfg.model_args, len(self.classes), self.cfg.data))
        from ..checkpoint import load_checkpoint
        if self.cfg.backbone_checkpoint:
            load_checkpoint(model, self.cfg.backbone_checkpoint)
        if self.cfg.checkpoint:
            load_checkpoint(model, self.cfg.checkpoint)
        if self.cfg.augment == "autoaugment":  # training draws a short side per batch; eval uses the last one
            model.transform.min_size = autoaugment_short_sides(self.cfg.min_size)
        return model

    def train_dataset(self) -> Dataset:
        return CocoDetection(self.train_source, True, self.cfg.hflip, self.cfg.train.seed, self.cfg.augment,
                             (self.cfg.min_size, self.cfg.max_size))

    def eval_dataset(self) -> Dataset:
        return CocoDetection(self.val_source, False)

    def collate(self, samples):
        return collate_detection(samples)

    def training_step(self, model: nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        self.skipped += batch["skipped"]
        if not batch["images"]:
            return sum(p.sum() * 0 for p in model.parameters()), {"skipped_images": self.skipped}
        losses = model(batch["images"], batch["targets"])
        return sum(losses.values()), {**{k: v.item() for k, v in losses.items()}, "skipped_images": self.skipped}

    def evaluate(self, model: nn.Module, dataset: CocoDetection, batch_size: int,
                 device: torch.device) -> Dict[str, Any]:
        return evaluate_detector(model, dataset, batch_size, device)

    def save_model(self, model: nn.Module, directory: Path) -> None:
        protocol = DetectionProtocol(test_size=(self.cfg.max_size, self.cfg.min_size))
        model.pretrained_cfg = trained_cfg(getattr(model, "pretrained_cfg", {}), {
            "num_classes": len(self.classes), "label_names": list(self.classes), **protocol.to_cfg()})
        save_pretrained(model, directory)


def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "detect", "Train Mask R-CNN or Cascade Mask R-CNN.", DetectConfig, DetectionTask,
                     "COCO-format folder or builtin:shapes", "mask_rcnn_internimage_t", hide=())


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 eval", description="Evaluate a detector (COCO box/mask AP) with "
                                     "its weights' test protocol.")
    parser.add_argument("--data", required=True, help="COCO-format folder or builtin:shapes")
    parser.add_argument("--split", default="val")
    add_model_arguments(parser)
    parser.add_argument("--test-size", type=pair, metavar="LONG,SHORT",
                        help="keep-ratio resize bound (default: the weights' protocol, 1333,800)")
    parser.add_argument("--batch-size", type=positive(int), default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import pycocotools.cocoeval  # noqa: F401  the metric's package, missing or not, is known before the model loads
    pipeline = pipeline_from_args(parser, args, DetectionPipeline, test_size=args.test_size)
    try:
        source = open_coco_source(args.data, args.split)
        check_categories(source, pipeline.labels, f"the model {pipeline.source}")
        if not source.annotations:  # every AP would be undefined
            raise ValueError(f"{source.annotation_file}: no usable annotation to evaluate against")
    except ValueError as exc:
        parser.error(str(exc))
    metrics = evaluate_detector(pipeline.model, CocoDetection(source, False), args.batch_size, pipeline.device)
    mask = f"mask AP {metrics['segm_AP']:.2f} (AP50 {metrics['segm_AP50']:.2f}) " if "segm_AP" in metrics else ""
    print(json.dumps(metrics) if args.json else
          f"{source.annotation_file}: box AP {metrics['bbox_AP']:.2f} (AP50 {metrics['bbox_AP50']:.2f}), "
          f"{mask}on {counted(metrics['images'], 'image')}")
    return 0
