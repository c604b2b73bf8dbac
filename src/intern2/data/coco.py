"""COCO-format instance data: an image folder + an instances JSON (boxes; polygon or RLE masks).

Malformed input never passes silently: unreadable JSON or a missing image file is an error naming the file and
entry; degenerate boxes (zero size, outside the image) are skipped with a counted warning.
"""
from __future__ import annotations

import json
import logging
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import load_image

__all__ = ["CocoSource", "open_coco_source", "CocoDetection", "collate_detection", "decode_segmentation"]

log = logging.getLogger(__name__)


@dataclass
class CocoSource:
    images_dir: Path
    annotation_file: Path
    images: List[Dict[str, Any]]
    annotations: Dict[int, List[Dict[str, Any]]]  # image id -> usable annotations
    category_ids: List[int]  # contiguous label k (1-based) -> category id category_ids[k - 1]
    classes: List[str]
    skipped_annotations: int


def _paths(spec: str, split: str) -> Tuple[Path, Path]:
    if spec == "builtin:shapes":
        from .shapes import builtin_shapes_root
        root = builtin_shapes_root()
    elif spec.startswith("builtin:"):
        raise ValueError(f"data {spec!r}: unknown built-in detection dataset; available: ['builtin:shapes']")
    else:
        root = Path(spec)
        if not root.is_dir():
            raise ValueError(f"data {spec}: no such directory")
    images = next((p for p in (root / "images" / split, root / split, root / f"{split}2017") if p.is_dir()), None)
    annotations = next((p for p in (root / f"instances_{split}.json", root / "annotations" / f"instances_{split}.json",
                                    root / "annotations" / f"instances_{split}2017.json") if p.is_file()), None)
    if images is None or annotations is None:
        raise ValueError(f"data {spec}: expected images in images/{split}/ (or {split}/) and annotations in "
                         f"instances_{split}.json (or annotations/instances_{split}.json)")
    return images, annotations


def open_coco_source(spec: str, split: str) -> CocoSource:
    images_dir, annotation_file = _paths(spec, split)
    try:
        data = json.loads(annotation_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{annotation_file}: not a readable COCO JSON file ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{annotation_file}: expected a list under '{key}'")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = [c["id"] for c in categories]
    images = {}
    for entry in data["images"]:
        if not {"id", "file_name"} <= set(entry):
            raise ValueError(f"{annotation_file}: image entry {entry} needs 'id' and 'file_name'")
        if not (images_dir / entry["file_name"]).is_file():
            raise ValueError(f"{annotation_file}: image {entry['id']} file {images_dir / entry['file_name']} "
                             "is missing")
        images[entry["id"]] = entry
    per_image: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    skipped = 0
    for entry in data["annotations"]:
        image = images.get(entry.get("image_id"))
        if image is None or entry.get("category_id") not in category_ids:
            raise ValueError(f"{annotation_file}: annotation {entry.get('id')} refers to an unknown image or category")
        bbox = entry.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise ValueError(f"{annotation_file}: annotation {entry.get('id')}: bbox must be [x, y, w, h], got {bbox}")
        x, y, w, h = bbox
        width, height = image.get("width", float("inf")), image.get("height", float("inf"))
        x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
        if x2 - x1 < 1 or y2 - y1 < 1 or entry.get("iscrowd", 0):
            skipped += 1
            continue
        per_image[entry["image_id"]].append({**entry, "box": [x1, y1, x2, y2]})
    if skipped:
        log.warning("%s: skipped %d crowd or degenerate (empty / outside the image) annotations", annotation_file,
                    skipped)
    return CocoSource(images_dir, annotation_file, list(images.values()), dict(per_image), category_ids,
                      [c.get("name", str(c["id"])) for c in categories], skipped)


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Binary mask from COCO polygons, RLE (compressed or not)."""
    from pycocotools import mask as mask_utils
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()
               if isinstance(segmentation["counts"], str) else segmentation["counts"]}
    else:
        raise ValueError(f"unsupported segmentation {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(np.uint8)


class CocoDetection(Dataset):
    """Images as [0, 1] CHW tensors with torchvision targets (boxes x1y1x2y2, labels 1..K, masks); horizontal
    flips seeded by (seed, epoch, index) when training."""

    def __init__(self, source: CocoSource, train: bool, hflip: float = 0.5, seed: int = 0):
        self.source, self.train, self.hflip, self.seed, self.epoch = source, train, hflip, seed, 0
        self.label_of = {cid: k + 1 for k, cid in enumerate(source.category_ids)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source.images)

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        entry = self.source.images[index]
        path = self.source.images_dir / entry["file_name"]
        try:
            image = torch.from_numpy(np.array(load_image(str(path)))).permute(2, 0, 1).float() / 255
        except ValueError as exc:
            log.warning("skipping unreadable image: %s", exc)
            return None
        height, width = image.shape[1:]
        annotations = self.source.annotations.get(entry["id"], [])
        masks = np.zeros((len(annotations), height, width), np.uint8)
        for i, ann in enumerate(annotations):
            if ann.get("segmentation"):
                masks[i] = decode_segmentation(ann["segmentation"], height, width)
            else:  # boxes only: the box is the mask
                x1, y1, x2, y2 = (int(round(v)) for v in ann["box"])
                masks[i, y1:y2, x1:x2] = 1
        target = {"boxes": torch.tensor([a["box"] for a in annotations], dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor([self.label_of[a["category_id"]] for a in annotations], dtype=torch.long),
                  "masks": torch.from_numpy(masks)}
        if self.train and self.hflip > 0:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.epoch}:{index}".encode()))
            if torch.rand((), generator=gen) < self.hflip:
                image, target["masks"] = image.flip(-1), target["masks"].flip(-1)
                boxes = target["boxes"].clone()
                boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
                target["boxes"] = boxes
        return {"image": image, "target": target, "image_id": entry["id"], "index": index}


def collate_detection(samples: List[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    good = [s for s in samples if s is not None]
    return {"images": [s["image"] for s in good], "targets": [s["target"] for s in good],
            "image_ids": [s["image_id"] for s in good], "skipped": len(samples) - len(good)}
