"""Image classification data: ImageFolder-style directories, CSV lists, built-in datasets; seeded augmentation.

Unreadable or non-image files never stop training: the dataset logs a warning naming the file and returns
``None``; :func:`collate_images` drops it and counts it in the batch (``batch["skipped"]``).
"""
from __future__ import annotations

import csv
import logging
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..weights import imagenet_wordnet_ids

__all__ = ["ImageSource", "open_image_source", "split_source", "ClassificationDataset", "collate_images",
           "collate_skipping", "train_transform", "eval_transform", "load_image", "upright_rgb", "IMAGE_EXTENSIONS"]

log = logging.getLogger(__name__)
_WORDNET_ID = re.compile(r"n\d{8}")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
Sample = Union[str, np.ndarray]  # a file path, or an HxW / HxWx3 uint8 array (built-in data)


@dataclass(frozen=True)
class ImageSource:
    samples: Tuple[Tuple[Sample, int], ...]
    classes: Tuple[str, ...]
    name: str


def _builtin_digits() -> ImageSource:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ValueError("data 'builtin:digits' needs scikit-learn (pip install 'intern2[data]')") from exc
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 8x8, values 0..16
    return ImageSource(tuple((img, int(y)) for img, y in zip(images, digits.target)),
                       tuple(str(i) for i in range(10)), "builtin:digits")


BUILTIN = {"builtin:digits": _builtin_digits}


def _folder(root: Path, classes: Optional[Sequence[str]] = None) -> ImageSource:
    """One sub-folder per class; with ``classes`` (a model's labels) folders may cover a subset of them. ImageNet's
    layout, one WordNet-id folder (n01440764, ...) per class: for a model of an ImageNet label set, each folder is
    its WordNet id's class, so a subset (Imagenette, ImageNet-100) is scored on the right outputs; for another
    model with as many classes as folders, the classes in sorted order (torchvision's ImageFolder convention)."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"data {root}: expected one sub-folder per class (ImageFolder layout), found none")
    names = list(classes) if classes is not None else folders
    index = {name: i for i, name in enumerate(names)}
    if classes is not None and not set(folders) <= set(index) and all(_WORDNET_ID.fullmatch(f) for f in folders):
        try:
            wordnet_ids = imagenet_wordnet_ids(names)
        except ImportError as exc:  # a whole set needs no list: the ids are in sorted order
            if len(folders) != len(names):
                raise ValueError(f"data {root}: a subset of WordNet-id folders: {exc}") from None
            wordnet_ids = None
        if wordnet_ids is not None:
            index = {wnid: i for i, wnid in enumerate(wordnet_ids)}
        elif len(folders) == len(names):
            index = {name: i for i, name in enumerate(folders)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ValueError(f"data {root}: class folders {unknown[:10]} are not among the model's classes {names[:10]}")
    if folders[0] not in names:
        log.info("data %s: %d WordNet-id folders, each read as its class (%s = class %d, %s)", root, len(folders),
                 folders[0], index[folders[0]], names[index[folders[0]]])
    samples = []
    for name in folders:
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        samples.extend((str(p), index[name]) for p in files)
    if not samples:
        raise ValueError(f"data {root}: class folders hold no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageSource(tuple(samples), tuple(names), str(root))


def _csv(path: Path, classes: Optional[Sequence[str]] = None) -> ImageSource:
    """Rows ``path,label`` (optional header); relative paths are relative to the CSV file."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a BOM (Excel) is not part of the header
            rows = [row for row in csv.reader(fh) if row and not row[0].startswith("#")]
    except (UnicodeDecodeError, csv.Error) as exc:  # e.g. an image given as the CSV
        raise ValueError(f"data {path}: not a UTF-8 CSV of 'path,label' rows ({exc})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    for number, row in enumerate(rows, 1):
        if len(row) < 2:
            raise ValueError(f"data {path}: row {number} {row!r}: expected 'path,label'")
    names = list(classes) if classes is not None else sorted({row[1].strip() for row in rows})
    index = {name: i for i, name in enumerate(names)}
    samples = []
    for number, (file, label, *_) in enumerate(rows, 1):
        if label.strip() not in index:
            raise ValueError(f"data {path}: row {number}: unknown label {label.strip()!r}; known: {names[:20]}")
        file_path = Path(file.strip())
        samples.append((str(file_path if file_path.is_absolute() else path.parent / file_path), index[label.strip()]))
    if not samples:
        raise ValueError(f"data {path}: no rows")
    return ImageSource(tuple(samples), tuple(names), str(path))


def open_image_source(spec: str, classes: Optional[Sequence[str]] = None) -> ImageSource:
    """'builtin:digits', an ImageFolder-style directory, or a CSV list of ``path,label`` rows.

    ``classes`` fixes the label order (a trained model's classes); otherwise it is the sorted class names.
    """
    if spec in BUILTIN:
        source = BUILTIN[spec]()
        if classes is not None and tuple(classes) != source.classes:  # its labels index the model's outputs as they are
            raise ValueError(f"data {spec}: its {len(source.classes)} classes {list(source.classes)[:10]} are not "
                             f"the model's {len(classes)} classes {list(classes)[:10]}")
        return source
    if spec.startswith("builtin:"):
        raise ValueError(f"data {spec!r}: unknown built-in dataset; available: {sorted(BUILTIN)}")
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"data {spec}: no such file or directory")
    return _folder(path, classes) if path.is_dir() else _csv(path, classes)


def split_source(source: ImageSource, val_fraction: float, seed: int) -> Tuple[ImageSource, ImageSource]:
    """Deterministic per-class split into (train, validation)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    gen = np.random.default_rng(seed)
    train, val = [], []
    labels = np.array([y for _, y in source.samples])
    for label in range(len(source.classes)):
        members = np.flatnonzero(labels == label)
        gen.shuffle(members)
        cut = int(round(len(members) * val_fraction))
        val.extend(members[:cut].tolist())
        train.extend(members[cut:].tolist())
    pick = lambda idx: tuple(source.samples[i] for i in sorted(idx))  # noqa: E731
    return (ImageSource(pick(train), source.classes, source.name + "[train]"),
            ImageSource(pick(val), source.classes, source.name + "[val]"))


def upright_rgb(image: Image.Image) -> Image.Image:
    """A decoded file's pixels as RGB, turned as its EXIF orientation says (a phone photo is stored sideways; the
    official mmcv loader and HF's ``load_image`` turn it too)."""
    return ImageOps.exif_transpose(image).convert("RGB")


def load_image(sample: Union[Sample, Image.Image]) -> Image.Image:
    """RGB PIL image from a path, a PIL image of any mode or an (H, W[, C]) uint8 array; a ValueError names the
    file that is not an image, or an image without pixels; a TypeError says what else it takes."""
    if isinstance(sample, Image.Image):
        image = sample if sample.mode == "RGB" else sample.convert("RGB")
    elif isinstance(sample, np.ndarray):
        channels = sample.shape[2] if sample.ndim == 3 else 1
        if sample.ndim not in (2, 3) or sample.dtype != np.uint8 or channels not in (1, 3, 4):
            raise ValueError(f"image: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 array, got "
                             f"{sample.dtype} {tuple(sample.shape)}")
        image = Image.fromarray(sample[..., 0] if sample.ndim == 3 and channels == 1 else sample).convert("RGB")
    elif isinstance(sample, (str, os.PathLike)):
        try:
            with Image.open(sample) as img:
                img.load()
                image = upright_rgb(img)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
            raise ValueError(f"{sample}: not a readable image ({exc.__class__.__name__}: {exc})") from exc
    else:
        raise TypeError(f"image: expected a file path, a PIL image or a uint8 array, got {type(sample).__name__}")
    if not min(image.size):
        raise ValueError(f"{sample if isinstance(sample, (str, os.PathLike)) else 'image'}: has no pixels "
                         f"({image.width} x {image.height})")
    return image


def train_transform(img_size: int, mean: Sequence[float], std: Sequence[float], crop_scale=(0.6, 1.0),
                    hflip: float = 0.5) -> Callable:
    steps = [v2.PILToTensor(), v2.RandomResizedCrop(img_size, scale=tuple(crop_scale),
                                                    interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0,
                   interpolation: str = "bicubic", crop_mode: str = "center") -> Callable:
    """The official (and timm's) eval preprocessing to ``scale = floor(img_size / crop_pct)``, then ``img_size``:
    ``center`` resizes the shorter side to ``scale`` and centre-crops; ``squash`` resizes both sides to ``scale``
    (the aspect ratio is lost) and centre-crops; ``border`` resizes the longer side to ``scale`` and centre-crops
    or pads with the mean colour. The resize is PIL's, on the PIL image, as the official code (and timm) resize:
    torch's bicubic on a tensor differs by up to a grey level."""
    scale, mode = math.floor(img_size / crop_pct), v2.InterpolationMode(interpolation)
    if crop_mode == "center":
        fit = [v2.Resize(scale, interpolation=mode), v2.CenterCrop(img_size)]
    elif crop_mode == "squash":
        fit = [v2.Resize((scale, scale), interpolation=mode), v2.CenterCrop(img_size)]
    elif crop_mode == "border":
        fill = tuple(round(255 * m) for m in mean)
        fit = [_FitLongerSide(scale, mode), _CropOrPad(img_size, fill if len(fill) > 1 else fill[0])]
    else:
        raise ValueError(f"crop_mode: expected center, squash or border, got {crop_mode!r}")
    return v2.Compose([*fit, v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class _FitLongerSide:
    """Resize so that the longer side is ``size`` (each side rounded, as timm's ``ResizeKeepRatio``)."""

    def __init__(self, size: int, interpolation: v2.InterpolationMode):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        ratio = max(image.height, image.width) / self.size
        return v2.functional.resize(image, [round(image.height / ratio), round(image.width / ratio)],
                                    interpolation=self.interpolation)


class _CropOrPad:
    """Centre crop to ``size`` x ``size``, padding a side that is shorter with ``fill`` (torchvision pads black)."""

    def __init__(self, size: int, fill: Union[int, Tuple[int, ...]]):
        self.size, self.fill = size, fill

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width < self.size or height < self.size:
            left, top = max(self.size - width, 0) // 2, max(self.size - height, 0) // 2
            image = v2.functional.pad(image, [left, top, max(self.size - width, 0) - left,
                                              max(self.size - height, 0) - top], fill=self.fill)
        return v2.functional.center_crop(image, [self.size, self.size])


class ClassificationDataset(Dataset):
    """(image, label) samples through a transform whose randomness is seeded by (seed, epoch, index).

    ``check(width, height, name)`` raises a ValueError for an image the transform must not get (evaluation's
    aspect-ratio limit, as at prediction): such an image is skipped and counted as an unreadable one."""

    def __init__(self, source: ImageSource, transform: Callable, seed: int = 0,
                 check: Optional[Callable[[int, int, str], None]] = None):
        self.source = source
        self.transform = transform
        self.seed = seed
        self.check = check
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source.samples)

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        sample, label = self.source.samples[index]
        try:
            image = load_image(sample)
            if self.check is not None:
                self.check(*image.size, str(sample))
        except ValueError as exc:
            log.warning("skipping unreadable image: %s", exc)
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{self.seed}:{self.epoch}:{index}".encode()))
            tensor = self.transform(image)
        return {"image": tensor, "label": label, "index": index}


def collate_skipping(samples: List[Optional[Dict[str, Any]]], key: str, empty_shape: Sequence[int]) -> Dict[str, Any]:
    """Stack the readable samples' ``key`` tensors, labels and indices; ``skipped`` counts the unreadable ones
    (``None``). A batch with none readable has a ``key`` tensor of ``empty_shape``."""
    good = [s for s in samples if s is not None]
    return {key: torch.stack([s[key] for s in good]) if good else torch.empty(tuple(empty_shape)),
            "label": torch.tensor([s["label"] for s in good], dtype=torch.long),
            "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
            "skipped": len(samples) - len(good)}


def collate_images(samples: List[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """Stack the readable samples; ``skipped`` counts the unreadable ones."""
    return collate_skipping(samples, "image", (0, 3, 1, 1))
