"""Object detection + instance segmentation: `intern2 train detect`, `intern2 eval` / `intern2 predict` on
Mask R-CNN models; COCO box and mask AP with pycocotools."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.coco import CocoDetection, CocoSource, collate_detection, open_coco_source
from ..data.images import load_image
from ..engine import TrainConfig
from ..factory import create_model, save_pretrained
from .common import add_model_arguments, model_from_args, train_cli

__all__ = ["DetectConfig", "DetectionTask", "coco_evaluate", "evaluate_detector", "draw_detections", "train_main",
           "eval_main", "predict_main"]

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
    train: TrainConfig = field(default_factory=TrainConfig)


@torch.no_grad()
def detect(model: nn.Module, images: Sequence[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    model.eval()
    return model(list(images))


def coco_evaluate(source: CocoSource, detections: List[Dict[str, Any]]) -> Dict[str, float]:
    """COCO bbox and segm AP / AP50 / AP75 of ``detections`` (COCO result dicts) against ``source``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    if not detections:
        return {f"{kind}_{k}": 0.0 for kind in ("bbox", "segm") for k in keys}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        ground_truth = COCO(str(source.annotation_file))
        results = ground_truth.loadRes(detections)
        metrics = {}
        for kind in ("bbox", "segm"):
            evaluator = COCOeval(ground_truth, results, kind)
            evaluator.params.imgIds = [image["id"] for image in source.images]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            metrics.update({f"{kind}_{k}": round(float(v) * 100, 3) for k, v in zip(keys, evaluator.stats[:6])})
    return metrics


def to_coco_results(output: Dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int]) -> List[Dict]:
    from pycocotools import mask as mask_utils
    results = []
    masks = (output["masks"][:, 0] > 0.5).numpy().astype(np.uint8) if "masks" in output else None
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
    detections: List[Dict] = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_detection):
        outputs = detect(model, [image.to(device) for image in batch["images"]])
        for output, image_id in zip(outputs, batch["image_ids"]):
            detections += to_coco_results({k: v.cpu() for k, v in output.items()}, image_id,
                                          dataset.source.category_ids)
    model.train(was_training)
    return {**coco_evaluate(dataset.source, detections), "images": len(dataset), "detections": len(detections)}


class DetectionTask:
    """Mask R-CNN training (torchvision's losses) and COCO evaluation."""

    def __init__(self, cfg: DetectConfig):
        self.cfg = cfg
        self.train_source = open_coco_source(cfg.data, cfg.train_split)
        self.val_source = open_coco_source(cfg.data, cfg.val_split)
        self.classes = self.train_source.classes
        self.skipped = 0

    def build_model(self) -> nn.Module:
        model = create_model(self.cfg.model, num_classes=len(self.classes), min_size=self.cfg.min_size,
                             max_size=self.cfg.max_size, **(self.cfg.model_args or {}))
        from ..checkpoint import load_checkpoint
        if self.cfg.backbone_checkpoint:
            load_checkpoint(model, self.cfg.backbone_checkpoint)
        if self.cfg.checkpoint:
            load_checkpoint(model, self.cfg.checkpoint)
        return model

    def train_dataset(self) -> Dataset:
        return CocoDetection(self.train_source, True, self.cfg.hflip, self.cfg.train.seed)

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
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "file": None, "num_classes": len(self.classes),
                                "label_names": list(self.classes)}
        save_pretrained(model, directory)


# --------------------------------------------------------------------------------------------------- drawing
def draw_detections(image: Image.Image, output: Dict[str, torch.Tensor], classes: Sequence[str],
                    threshold: float = 0.5) -> Image.Image:
    """Masks blended in, boxes outlined and labelled with class and score."""
    canvas = np.asarray(image, dtype=np.float32).copy()
    palette = np.random.default_rng(7).integers(60, 256, (len(classes) + 1, 3))
    keep = output["scores"] >= threshold
    for mask, label in zip(output.get("masks", torch.zeros(0))[keep], output["labels"][keep]):
        region = mask[0].numpy() > 0.5
        canvas[region] = canvas[region] * 0.5 + palette[int(label)] * 0.5
    drawn = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(drawn)
    for box, label, score in zip(output["boxes"][keep].tolist(), output["labels"][keep].tolist(),
                                 output["scores"][keep].tolist()):
        colour = tuple(int(c) for c in palette[label])
        draw.rectangle(box, outline=colour, width=2)
        draw.text((box[0] + 2, box[1] + 1), f"{classes[label - 1]} {score:.2f}", fill=colour)
    return drawn


def _class_names(model: nn.Module) -> List[str]:
    names = model.pretrained_cfg.get("label_names")
    return names if isinstance(names, list) else [str(i + 1) for i in range(model.num_classes)]


def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "detect", "Train Mask R-CNN.", DetectConfig, DetectionTask,
                     "COCO-format folder or builtin:shapes", "mask_rcnn_internimage_t", hide=())


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 eval", description="Evaluate a detector (COCO box/mask AP).")
    parser.add_argument("--data", required=True, help="COCO-format folder or builtin:shapes")
    parser.add_argument("--split", default="val")
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    model = model_from_args(parser, args)
    try:
        source = open_coco_source(args.data, args.split)
    except ValueError as exc:
        parser.error(str(exc))
    metrics = evaluate_detector(model, CocoDetection(source, False), args.batch_size, torch.device("cpu"))
    print(json.dumps(metrics) if args.json else
          f"{source.annotation_file}: box AP {metrics['bbox_AP']:.2f} (AP50 {metrics['bbox_AP50']:.2f}), "
          f"mask AP {metrics['segm_AP']:.2f} (AP50 {metrics['segm_AP50']:.2f}) on {metrics['images']} images")
    return 0


def predict_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 predict", description="Detect and segment objects in images.")
    parser.add_argument("images", nargs="+")
    add_model_arguments(parser)
    parser.add_argument("--threshold", type=float, default=0.5, help="score threshold for drawing and JSON")
    parser.add_argument("--out", default="predictions", help="folder for <name>_det.png drawings")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    model = model_from_args(parser, args)
    classes = _class_names(model)
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
        (output,) = detect(model, [torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255])
        drawing = out / f"{Path(file).stem}_det.png"
        draw_detections(image, output, classes, args.threshold).save(drawing)
        keep = output["scores"] >= args.threshold
        results.append({"file": file, "drawing": str(drawing), "objects": [
            {"label": classes[int(label) - 1], "score": round(float(score), 4), "box": [round(v, 1) for v in box]}
            for box, label, score in zip(output["boxes"][keep].tolist(), output["labels"][keep].tolist(),
                                         output["scores"][keep].tolist())]})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['file']}: {len(r['objects'])} objects -> {r['drawing']}")
    return 1 if failed else 0
