"""The built-in "actions" video dataset: short generated clips of a coloured shape moving on a textured
background, encoded to H.264 MP4, with a caption per clip. No download.

The classes come in mirror pairs whose clips are the same frames in reverse order (moving right / left,
down / up, rotating clockwise / counter-clockwise, approaching / receding, appearing / disappearing), so a
model that averages frames over time is at chance within each pair: solving it needs temporal order. The
training split holds each generated scene in both directions. Do not train with horizontal flips (they turn
"moving right" into "moving left").

Layout (the Kinetics-style lists that :func:`intern2.data.video.read_annotations` reads)::

    root/videos/{train,val}/00000.mp4
    root/{train,val}.txt                 "videos/train/00000.mp4 3" lines (integer labels)
    root/{train,val}_captions.jsonl      {"path", "label", "caption"} per clip
    root/classes.txt                     one class name per line, in label order
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np

from .shapes import SHAPE_CLASSES, _background, _shape_mask
from .video import write_video

__all__ = ["ACTION_CLASSES", "render_action", "generate_actions", "builtin_actions_root"]

# Label 2k is a pair's forward action, 2k + 1 the same frames reversed.
ACTION_CLASSES = ("moving right", "moving left", "moving down", "moving up", "rotating clockwise",
                  "rotating counter-clockwise", "approaching", "receding", "appearing", "disappearing")
_VERBS = (("moves to the right", "slides right"), ("moves to the left", "slides left"),
          ("moves down", "slides downwards"), ("moves up", "slides upwards"),
          ("rotates clockwise", "turns clockwise"), ("rotates counter-clockwise", "turns anticlockwise"),
          ("comes closer", "grows larger"), ("moves away", "shrinks"),
          ("appears", "fades in"), ("disappears", "fades out"))
_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (245, 220, 40),
            "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (15, 15, 15)}
_ROTATING = ("square", "triangle", "star")  # circles and rings look the same at every angle
VERSION = 2  # 2: videos encoded without x264's mbtree (reproducible)
FPS = 8


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def render_action(label: int, seed: int, num_frames: int = 16, size: int = 64) -> Tuple[np.ndarray, str]:
    """(uint8 frames (T, H, W, 3), caption) of one clip of class ``label``.

    The scene depends only on ``seed`` and the class pair, so labels 2k and 2k + 1 with one seed give the
    same frames in opposite orders.
    """
    if not 0 <= label < len(ACTION_CLASSES):
        raise ValueError(f"render_action: label {label} not in [0, {len(ACTION_CLASSES)})")
    rng = np.random.default_rng(seed)
    pair = label // 2
    # A muted background keeps the saturated object colours visible.
    background = _background(size, rng) * 0.6 + 50
    shape = _pick(rng, _ROTATING if pair == 2 else SHAPE_CLASSES)
    colour = _pick(rng, list(_COLOURS))
    rgb = np.array(_COLOURS[colour], np.float64) + rng.uniform(-15, 15, 3)
    angle = rng.uniform(0, 2 * math.pi)
    progress = np.linspace(0.0, 1.0, num_frames)
    alpha = np.ones(num_frames)
    if pair in (0, 1):  # a straight move along x (pair 0) or y (pair 1)
        r = np.full(num_frames, rng.uniform(0.1, 0.15) * size)
        distance = rng.uniform(0.35, 0.55) * size
        along = rng.uniform(r[0], size - r[0] - distance) + distance * progress
        across = np.full(num_frames, rng.uniform(r[0], size - r[0]))
        cx, cy = (along, across) if pair == 0 else (across, along)
        angles = np.full(num_frames, angle)
    else:
        r0 = rng.uniform(0.08, 0.1) * size if pair == 3 else rng.uniform(0.15, 0.22) * size
        growth = rng.uniform(1.0, 1.6) if pair == 3 else 0.0
        r = r0 * (1 + growth * progress)
        margin = r.max() * 0.8
        cx, cy = (np.full(num_frames, v) for v in rng.uniform(margin, size - margin, 2))
        # With y pointing down, a growing angle turns clockwise on screen.
        turn = math.radians(rng.uniform(6, 10)) * (num_frames - 1) if pair == 2 else 0.0
        angles = angle + turn * progress
        if pair == 4:  # fade in over a few frames from a random onset
            ramp = max(2, num_frames // 5)
            onset = int(rng.integers(num_frames // 8, num_frames - num_frames // 8 - ramp + 1))
            alpha = np.clip((np.arange(num_frames) - onset + 1) / ramp, 0.0, 1.0)
    distractor = None
    if rng.random() < 0.5:  # a static second object, drawn under the moving one
        d_shape, d_colour = _pick(rng, SHAPE_CLASSES), _pick(rng, [c for c in _COLOURS if c != colour])
        d_r = rng.uniform(0.07, 0.1) * size
        d_mask = _shape_mask(d_shape, size, *rng.uniform(d_r, size - d_r, 2), d_r, rng.uniform(0, 2 * math.pi))
        background[d_mask] = _COLOURS[d_colour]
        distractor = f"{d_colour} {d_shape}"
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        mask = _shape_mask(shape, size, cx[t], cy[t], r[t], angles[t])[..., None] * alpha[t]
        frames[t] = np.clip(background * (1 - mask) + rgb * mask, 0, 255).round()
    if label % 2:
        frames = frames[::-1].copy()
    caption = f"a {colour} {shape} {_pick(rng, _VERBS[label])}"
    if distractor:
        caption += f" near a {distractor}"
    return frames, caption


def _write_split(root: Path, split: str, count: int, num_frames: int, size: int, seed: int) -> None:
    """Clips 2j and 2j + 1 share a scene seed, so each training scene appears in both directions."""
    folder = root / "videos" / split
    folder.mkdir(parents=True)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    scene_seeds = rng.integers(0, 2 ** 31, (count + 1) // 2)
    lines, captions = [], []
    for index in range(count):
        label = index % len(ACTION_CLASSES)
        frames, caption = render_action(label, int(scene_seeds[index // 2]), num_frames, size)
        name = f"videos/{split}/{index:05d}.mp4"
        write_video(root / name, frames, fps=FPS)
        lines.append(f"{name} {label}")
        captions.append(json.dumps({"path": name, "label": label, "caption": caption}))
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / f"{split}_captions.jsonl").write_text("\n".join(captions) + "\n")


def _write_atomically(root: Path, write: Callable[[Path], None], done: str) -> Path:
    """Run ``write(folder)`` on a staging folder beside ``root``, then rename it to ``root``: a half-written
    folder is never left behind. A ``root`` that another process finished first (it holds ``done``) is kept."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write(staging)
        try:
            os.replace(staging, root)
        except OSError:
            if not (root / done).exists():
                raise
            shutil.rmtree(staging)  # another process (a DataLoader worker, a DDP rank) finished first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def generate_actions(root: Path, num_train: int = 500, num_val: int = 100, num_frames: int = 16, size: int = 64,
                     seed: int = 0) -> Path:
    """Write the dataset into ``root`` (atomically: a half-written folder is never left behind)."""
    if size % 2:
        raise ValueError(f"generate_actions: size must be even (H.264 yuv420p), got {size}")

    def write(folder: Path) -> None:
        _write_split(folder, "train", num_train, num_frames, size, seed)
        _write_split(folder, "val", num_val, num_frames, size, seed)
        (folder / "classes.txt").write_text("\n".join(ACTION_CLASSES) + "\n")

    return _write_atomically(root, write, "classes.txt")


def builtin_actions_root(num_train: int = 500, num_val: int = 100, num_frames: int = 16, size: int = 64,
                         home: Optional[Path] = None) -> Path:
    """The cached built-in dataset folder under ``$INTERN2_HOME`` (default ~/.cache/intern2), generated on
    first use; a new :data:`VERSION` of the generator writes a new folder."""
    home = Path(home or os.environ.get("INTERN2_HOME", Path.home() / ".cache" / "intern2"))
    root = home / "builtin" / f"actions-v{VERSION}-{size}px-{num_frames}f-{num_train}-{num_val}"
    if not (root / "classes.txt").exists():
        generate_actions(root, num_train, num_val, num_frames, size)
    return root
