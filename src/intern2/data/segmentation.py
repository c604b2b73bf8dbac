"""Semantic segmentation data: image + PNG label-map folders (ADE20K layout), seeded augmentation.

``root/images/<split>/*.{jpg,png}`` pairs with ``root/annotations/<split>/<same stem>.png`` (class index per
pixel, 255 = ignore). ``reduce_zero_label`` maps ADE20K's 0 ("other") to 255 and shifts the rest down by one.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from . import read_text
from .images import IMAGE_EXTENSIONS, load_image

__all__ = ["SegSource", "open_seg_source", "SegmentationDataset", "collate_segmentation", "IGNORE_INDEX",
           "keep_ratio_size"]

log = logging.getLogger(__name__)
IGNORE_INDEX = 255


@dataclass(frozen=True)
class SegSource:
    pairs: Tuple[Tuple[str, str], ...]  # (image path, label path)
    classes: Optional[Tuple[str, ...]]  # from root/classes.txt when present
    name: str


def _resolve_root(spec: str) -> Path:
    if spec == "builtin:shapes":
        from .shapes import builtin_shapes_root
        return builtin_shapes_root()
    if spec.startswith("builtin:"):
        raise ValueError(f"data {spec!r}: unknown built-in segmentation dataset; available: ['builtin:shapes']")
    root = Path(spec)
    if not root.is_dir():
        raise ValueError(f"data {spec}: no such directory (expected images/<split> and annotations/<split> inside)")
    return root


def open_seg_source(spec: str, split: str) -> SegSource:
    """Pairs of (image, label map) of one split; an image without a label map is an error naming it."""
    root = _resolve_root(spec)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            found = sorted(p.name for p in (folder.parent.iterdir() if folder.parent.is_dir() else []))
            raise ValueError(f"data {spec}: no folder {folder} (splits found: {found})")
    labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() == ".png"}
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    missing = [p.name for p in images if p.stem not in labels]
    if missing:
        raise ValueError(f"data {spec}: {len(missing)} images in {image_dir} have no label map in {label_dir}, "
                         f"e.g. {missing[:3]}")
    if not images:
        raise ValueError(f"data {spec}: no images in {image_dir}")
    classes_file = root / "classes.txt"
    classes = tuple(line.strip() for line in read_text(classes_file).splitlines() if line.strip()) \
        if classes_file.exists() else None
    return SegSource(tuple((str(p), str(labels[p.stem])) for p in images), classes, f"{root}[{split}]")


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> Tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= max(scale) and short side <= min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _load_label(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I;16", "I"):
                raise ValueError(f"mode {img.mode}, expected a single-channel class-index PNG")
            return np.asarray(img, dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable label map ({exc})") from exc


class SegmentationDataset(Dataset):
    """Training: random rescale (``ratio_range`` x ``scale``), random crop ``crop_size`` (padded with ignore),
    horizontal flip, normalised with ``mean``/``std``. Evaluation: the image as it is, (3, H, W) in [0, 1] with
    its full-size label: the segmentation pipeline resizes and normalises it by the model's test protocol.
    With ``num_classes`` a label outside the classes (other than 255) is an error naming the file."""

    def __init__(self, source: SegSource, mean: Sequence[float], std: Sequence[float], train: bool,
                 crop_size: int = 512, scale: int = 512, ratio_range: Sequence[float] = (0.5, 2.0),
                 reduce_zero_label: bool = False, seed: int = 0, num_classes: Optional[int] = None):
        self.source, self.train, self.seed, self.epoch = source, train, seed, 0
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.crop_size, self.scale, self.ratio_range = crop_size, scale, ratio_range
        self.reduce_zero_label = reduce_zero_label
        self.num_classes = num_classes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source.pairs)

    def _label(self, path: str) -> torch.Tensor:
        label = torch.from_numpy(_load_label(path))
        if self.reduce_zero_label:
            label = torch.where(label == 0, IGNORE_INDEX, label - 1)
        return label

    def _check_classes(self, label: torch.Tensor, path: str) -> None:
        """An error, not a skip: labels beyond the classes mean the wrong class count, which would corrupt every
        epoch and the metric."""
        if self.num_classes is None:
            return
        bad = label[(label != IGNORE_INDEX) & ((label < 0) | (label >= self.num_classes))]
        if bad.numel():
            raise ValueError(f"{path}: class {int(bad.max())} in the label map, but the model has {self.num_classes} "
                             f"classes (0..{self.num_classes - 1}; {IGNORE_INDEX} = ignore"
                             f"{'; after reduce_zero_label' if self.reduce_zero_label else ''})")

    def check_labels(self) -> None:
        """Read every label map now and raise for one beyond the classes (unreadable ones are skipped later,
        when read with their image): a training run checks its validation set before it trains, not after."""
        for _, label_path in self.source.pairs:
            try:
                label = self._label(label_path)
            except ValueError:
                continue
            self._check_classes(label, label_path)

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        image_path, label_path = self.source.pairs[index]
        try:
            image = torch.from_numpy(np.array(load_image(image_path))).permute(2, 0, 1).float() / 255
            label = self._label(label_path)
        except ValueError as exc:
            log.warning("skipping unreadable sample: %s", exc)
            return None
        self._check_classes(label, label_path)
        if image.shape[1:] != label.shape:
            log.warning("skipping %s: image %s and label map %s differ in size", image_path, tuple(image.shape[1:]),
                        tuple(label.shape))
            return None
        if not self.train:
            return {"image": image, "label": label, "index": index}
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.epoch}:{index}".encode()))
        image, label = self._augment(image, label, gen)
        return {"image": (image - self.mean) / self.std, "label": label, "index": index}

    def _augment(self, image: torch.Tensor, label: torch.Tensor, gen: torch.Generator):
        low, high = self.ratio_range
        ratio = low + (high - low) * torch.rand((), generator=gen).item()
        h, w = image.shape[1:]
        factor = self.scale * ratio / min(h, w)
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        crop = self.crop_size
        pad_h, pad_w = max(0, crop - size[0]), max(0, crop - size[1])
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(torch.randint(0, image.shape[1] - crop + 1, (), generator=gen))
        left = int(torch.randint(0, image.shape[2] - crop + 1, (), generator=gen))
        image, label = image[:, top:top + crop, left:left + crop], label[top:top + crop, left:left + crop]
        if torch.rand((), generator=gen) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image, label


def collate_segmentation(samples: List[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """Stacks equal-sized samples (training crops); otherwise keeps lists (evaluation at native sizes)."""
    good = [s for s in samples if s is not None]
    batch: Dict[str, Any] = {"skipped": len(samples) - len(good),
                             "index": torch.tensor([s["index"] for s in good], dtype=torch.long)}
    for key in ("image", "label"):
        items = [s[key] for s in good]
        same = len({tuple(t.shape) for t in items}) <= 1
        batch[key] = (torch.stack(items) if items else torch.empty(0)) if same else items
    return batch
