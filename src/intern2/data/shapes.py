"""The built-in "shapes" dataset: generated images of several object classes with occlusion on varied
backgrounds, with COCO instance annotations (RLE masks) and PNG semantic label maps. No download.

A class is an outline (circle, square, ...) and a hue family (jittered): with outline alone, a small dense model
trained from scratch on a CPU for two minutes learns object-vs-background but hardly which object (mIoU ~17, all
five shapes called "circle"); with both, the demo's UperNet reaches ~60 mIoU in the same time.

Layout (the same as a user's own data)::

    root/images/{train,val}/000000.png
    root/annotations/{train,val}/000000.png     semantic map: 0 background, k = class k, 255 ignore
    root/instances_{train,val}.json             COCO instances, category ids 1..K
    root/classes.txt                            one class name per line, background first
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["SHAPE_CLASSES", "generate_shapes", "builtin_shapes_root"]

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "ring")
VERSION = 3


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    if kind == "square":
        corners = 4
    elif kind == "triangle":
        corners = 3
    else:  # star: 5 points alternating radii
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(angle + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else r * 0.45) * math.sin(angle + i * math.pi / 5)) for i in range(10)]
    return [(cx + r * math.cos(angle + 2 * math.pi * i / corners), cy + r * math.sin(angle + 2 * math.pi * i / corners))
            for i in range(corners)]


def _shape_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "ring":
        draw.ellipse(box, fill=255)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=255)
    return np.asarray(canvas) > 127


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Gradient + blurred noise + occasional stripes: no two backgrounds alike."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-90, 90, (2, 3))
    image = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    noise = Image.fromarray(rng.uniform(0, 255, (size, size, 3)).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    image = image * 0.7 + np.asarray(noise, dtype=np.float64) * 0.3
    if rng.random() < 0.3:
        period = rng.integers(4, 12)
        image += 25 * np.sign(np.sin(2 * np.pi * (xx if rng.random() < 0.5 else yy) * size / period))[..., None]
    return np.clip(image, 0, 255)


def _class_colour(label: int, rng: np.random.Generator) -> np.ndarray:
    """RGB of an object of class ``label``: each class has its own hue family (jittered saturation and brightness),
    as object classes in photographs tend to, so a dense model can learn from colour as well as from outline."""
    import colorsys
    hue = (label / len(SHAPE_CLASSES) + rng.uniform(-0.05, 0.05)) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))) * 255


def _sample(size: int, rng: np.random.Generator):
    """(image uint8 HxWx3, semantic map uint8, [(class id, visible mask)])."""
    image = _background(size, rng)
    semantic = np.zeros((size, size), np.uint8)
    owner = np.full((size, size), -1, np.int64)
    objects = []
    for k in range(int(rng.integers(1, 4))):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        r = rng.uniform(0.16, 0.3) * size
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
        mask = _shape_mask(SHAPE_CLASSES[label], size, cx, cy, r, rng.uniform(0, 2 * math.pi))
        colour = _class_colour(label, rng)
        shade = 1 + 0.25 * (np.mgrid[0:size, 0:size][0] / size - 0.5)[..., None]  # a little shading
        image[mask] = np.clip(colour * shade[mask], 0, 255)
        semantic[mask] = label + 1
        owner[mask] = k
        objects.append(label + 1)
    instances = [(cls, owner == k) for k, cls in enumerate(objects) if (owner == k).sum() >= 12]  # after occlusion
    return image.astype(np.uint8), semantic, instances


def _write_split(root: Path, split: str, count: int, size: int, seed: int) -> None:
    from pycocotools import mask as mask_utils
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for index in range(count):
        image, semantic, instances = _sample(size, rng)
        name = f"{index:06d}.png"
        Image.fromarray(image).save(root / "images" / split / name)
        Image.fromarray(semantic).save(root / "annotations" / split / name)
        images.append({"id": index + 1, "file_name": name, "height": size, "width": size})
        for category, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": category,
                                "bbox": [x, y, w, h], "area": float(mask.sum()), "iscrowd": 0,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]
    (root / f"instances_{split}.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))


def generate_shapes(root: Path, num_train: int = 300, num_val: int = 60, size: int = 64, seed: int = 0) -> Path:
    """Write the dataset into ``root`` (atomically: a half-written folder is never left behind)."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        _write_split(staging, "train", num_train, size, seed)
        _write_split(staging, "val", num_val, size, seed + 1)
        (staging / "classes.txt").write_text("\n".join(("background",) + SHAPE_CLASSES) + "\n")
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def builtin_shapes_root(num_train: int = 300, num_val: int = 60, size: int = 64, home: Optional[Path] = None) -> Path:
    """The cached built-in dataset folder, generated on first use (a few seconds)."""
    home = Path(home or os.environ.get("INTERN2_HOME", Path.home() / ".cache" / "intern2"))
    root = home / "builtin" / f"shapes-v{VERSION}-{size}px-{num_train}-{num_val}"
    if not root.exists():
        generate_shapes(root, num_train, num_val, size)
    return root
