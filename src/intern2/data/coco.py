"""COCO-format instance data: an image folder + an instances JSON (boxes; polygon or RLE masks).

Malformed input never passes silently. What makes the whole file unusable is an error naming the file and the
entry: unreadable JSON, a top level that is not an object with 'images', 'annotations' and 'categories' lists, a
category or image entry without its id (or file), a missing image file, an annotation of an unknown image or
category. One bad annotation does not stop a run: a box that is not four numbers, a segmentation that is neither
polygons nor RLE, crowd and degenerate boxes (zero size, outside the image) are skipped and counted in one
warning; an RLE that fails to decode when its image is read is dropped from that sample with a warning.
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
from .segmentation import keep_ratio_size

__all__ = ["CocoSource", "open_coco_source", "check_categories", "CocoDetection", "collate_detection",
           "decode_segmentation", "AUGMENTS", "autoaugment_short_sides", "autoaugment_crop"]

AUGMENTS = ("none", "autoaugment")
# The official 3x configs' AutoAugment (DETR's policy), at test size 800 x 1333: one of two policies at random,
# (a) a multi-scale resize, short side 480..800 step 32; (b) a resize to short side 400 / 500 / 600, a random crop
# of 384..600 pixels a side, then the same multi-scale resize. Other test sizes scale every length.
_MULTI_SCALE = tuple(range(480, 801, 32))
_CROP_RESIZE = (400, 500, 600)
_CROP_RANGE = (384, 600)


def autoaugment_short_sides(min_size: int) -> Tuple[int, ...]:
    """The multi-scale training short sides for a test short side ``min_size`` (the last is ``min_size``)."""
    return tuple(max(1, round(s * min_size / 800)) for s in _MULTI_SCALE)

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


def _number_list(value: Any, length: Optional[int] = None) -> bool:
    return isinstance(value, list) and (length is None or len(value) == length) and \
        all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _segmentation_ok(segmentation: Any) -> bool:
    """Polygons (lists of numbers) or an RLE dict (size + counts); absent is fine (the box is the mask)."""
    if segmentation in (None, [], {}):
        return True
    if isinstance(segmentation, list):
        return all(_number_list(polygon) and len(polygon) >= 6 for polygon in segmentation)
    return isinstance(segmentation, dict) and _number_list(segmentation.get("size"), 2) and \
        isinstance(segmentation.get("counts"), (str, list))


def open_coco_source(spec: str, split: str) -> CocoSource:
    images_dir, annotation_file = _paths(spec, split)
    try:
        data = json.loads(annotation_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{annotation_file}: not a readable COCO JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{annotation_file}: expected a JSON object with 'images', 'annotations' and 'categories', "
                         f"got a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{annotation_file}: expected a list under '{key}'")
    for i, category in enumerate(data["categories"]):
        if not (isinstance(category, dict) and isinstance(category.get("id"), int)):
            raise ValueError(f"{annotation_file}: categories[{i}]: expected an object with an integer 'id', "
                             f"got {category!r:.80}")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = [c["id"] for c in categories]
    images = {}
    for i, entry in enumerate(data["images"]):
        if not (isinstance(entry, dict) and {"id", "file_name"} <= set(entry)):
            raise ValueError(f"{annotation_file}: images[{i}]: expected an object with 'id' and 'file_name', "
                             f"got {entry!r:.80}")
        if not (images_dir / str(entry["file_name"])).is_file():
            raise ValueError(f"{annotation_file}: image {entry['id']} file {images_dir / str(entry['file_name'])} "
                             "is missing")
        images[entry["id"]] = entry
    per_image: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    skipped = malformed = 0
    for entry in data["annotations"]:
        if not isinstance(entry, dict) or not _number_list(entry.get("bbox"), 4) or \
                not _segmentation_ok(entry.get("segmentation")):
            malformed += 1
            continue
        image = images.get(entry.get("image_id"))
        if image is None or entry.get("category_id") not in category_ids:
            raise ValueError(f"{annotation_file}: annotation {entry.get('id')} refers to an unknown image or category")
        x, y, w, h = entry["bbox"]
        width, height = image.get("width", float("inf")), image.get("height", float("inf"))
        x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
        if x2 - x1 < 1 or y2 - y1 < 1 or entry.get("iscrowd", 0):
            skipped += 1
            continue
        per_image[entry["image_id"]].append({**entry, "box": [x1, y1, x2, y2]})
    if skipped or malformed:
        log.warning("%s: skipped %d annotations: %d malformed (a box that is not 4 numbers, a segmentation that is "
                    "neither polygons nor RLE), %d crowd or degenerate (empty / outside the image)", annotation_file,
                    malformed + skipped, malformed, skipped)
    return CocoSource(images_dir, annotation_file, list(images.values()), dict(per_image), category_ids,
                      [str(c.get("name", c["id"])) for c in categories], skipped + malformed)


def check_categories(source: CocoSource, classes: List[str], of: str) -> None:
    """Refuse to score ``source`` with a model of ``classes`` (those of ``of``: a training file or a checkpoint):
    label k means the k-th category by id, so another count or other names would be scored as wrong classes."""
    if [c.strip().lower() for c in source.classes] != [c.strip().lower() for c in classes]:
        raise ValueError(f"{source.annotation_file}: its {len(source.classes)} categories {source.classes!r:.120} "
                         f"differ from the {len(classes)} of {of} {list(classes)!r:.120}: evaluate with the same "
                         f"categories (names, in id order)")


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


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def autoaugment_crop(image: torch.Tensor, target: Dict[str, torch.Tensor], generator: torch.Generator,
                     min_size: int, max_size: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """AutoAugment's policy (b) before its final multi-scale resize (which the model's transform does): resize to a
    random short side of 400 / 500 / 600 (keep ratio, long side at most ``max_size``; scaled by min_size / 800),
    then mmdet's ``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``: a crop of 384..600 pixels a
    side (at most the image) at a random offset; boxes are shifted and clipped, boxes left empty are dropped (an
    image may end with none)."""
    scale = min_size / 800
    short = round(_CROP_RESIZE[_randint(generator, 0, len(_CROP_RESIZE) - 1)] * scale)
    height, width = image.shape[1:]
    size = keep_ratio_size(height, width, (short, max_size))
    image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    boxes = target["boxes"] * torch.tensor([size[1] / width, size[0] / height] * 2)
    masks = torch.nn.functional.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
    low, high = (round(v * scale) for v in _CROP_RANGE)
    crop_h, crop_w = (_randint(generator, min(side, low), min(side, high)) for side in size)
    top, left = _randint(generator, 0, size[0] - crop_h), _randint(generator, 0, size[1] - crop_w)
    boxes = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clamp(0, crop_w), boxes[:, 1::2].clamp(0, crop_h)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image[:, top:top + crop_h, left:left + crop_w], {
        "boxes": boxes[keep], "labels": target["labels"][keep],
        "masks": masks[keep][:, top:top + crop_h, left:left + crop_w]}


class CocoDetection(Dataset):
    """Images as [0, 1] CHW tensors with torchvision targets (boxes x1y1x2y2, labels 1..K, masks); when training,
    horizontal flips and (``augment="autoaugment"``) the official 3x AutoAugment crops, seeded by (seed, epoch,
    index). ``test_size`` (short, long) scales the AutoAugment lengths (official: 800, 1333); its multi-scale
    resize is the model's transform (``min_size`` = :func:`autoaugment_short_sides`)."""

    def __init__(self, source: CocoSource, train: bool, hflip: float = 0.5, seed: int = 0, augment: str = "none",
                 test_size: Tuple[int, int] = (800, 1333)):
        if augment not in AUGMENTS:
            raise ValueError(f"augment {augment!r}: expected one of {list(AUGMENTS)}")
        self.source, self.train, self.hflip, self.seed, self.epoch = source, train, hflip, seed, 0
        self.augment, self.test_size = augment, test_size
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
        annotations, masks = [], []
        for ann in self.source.annotations.get(entry["id"], []):
            mask = np.zeros((height, width), np.uint8)
            if ann.get("segmentation"):
                try:
                    mask = decode_segmentation(ann["segmentation"], height, width)
                except (ValueError, TypeError) as exc:  # pycocotools: an RLE whose counts do not decode
                    log.warning("%s: dropping annotation %s of image %s: its segmentation does not decode (%s)",
                                self.source.annotation_file, ann.get("id"), entry["id"], exc)
                    continue
            else:  # boxes only: the box is the mask
                x1, y1, x2, y2 = (int(round(v)) for v in ann["box"])
                mask[y1:y2, x1:x2] = 1
            annotations.append(ann)
            masks.append(mask)
        masks = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
        target = {"boxes": torch.tensor([a["box"] for a in annotations], dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor([self.label_of[a["category_id"]] for a in annotations], dtype=torch.long),
                  "masks": torch.from_numpy(masks)}
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.epoch}:{index}".encode()))
        if self.train and self.hflip > 0 and torch.rand((), generator=gen) < self.hflip:
            image, target["masks"] = image.flip(-1), target["masks"].flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
            target["boxes"] = boxes
        if self.train and self.augment == "autoaugment" and torch.rand((), generator=gen) < 0.5:
            image, target = autoaugment_crop(image, target, gen, *self.test_size)
        return {"image": image, "target": target, "image_id": entry["id"], "index": index}


def collate_detection(samples: List[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    good = [s for s in samples if s is not None]
    return {"images": [s["image"] for s in good], "targets": [s["target"] for s in good],
            "image_ids": [s["image_id"] for s in good], "skipped": len(samples) - len(good)}
