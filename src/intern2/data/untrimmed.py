"""The built-in "untrimmed" video dataset for temporal action localization: generated videos of a few clips of
the built-in actions (:mod:`intern2.data.actions`) with still background stretches around them, and the segment
of every action. No download.

An instance is a clip of :func:`~intern2.data.actions.render_action` cut to the frames that change, so its
segment is exactly where the motion is; a background stretch holds one frame of a neighbouring instance (the
frame it stops or starts on), so nothing moves there. Each instance is its own scene: where two instances
meet, the picture cuts once from one scene to the other, at the end of the earlier one or at the start of the
later one (at random, so a cut marks starts and ends alike and does not stand in for the motion).

A video holds 1-4 instances of random classes, 12-32 frames each (up to a few frames less where a clip starts
or ends still; the fades of appearing / disappearing last 5-13 frames), 4-24 background frames between two of
them and 0-24 at either end, padded at the ends to at least 64 frames and cut to at most 200 (later instances
are dropped).

Segments are in seconds, frames numbered from 0: frame ``t`` shows the interval ``[t / fps, (t + 1) / fps)``,
so an instance on frames ``first..last`` (inclusive) has the segment ``[first / fps, (last + 1) / fps]`` and a
video of ``n`` frames lasts ``n / fps`` seconds.

Layout (ActivityNet's annotation file, as ActionFormer and the ActivityNet detection metric read it)::

    root/videos/{train,val}_00000.mp4
    root/annotations.json    {"version", "taxonomy": [{"nodeName", "nodeId"}],
                              "database": {id: {"subset": "training" | "validation", "duration", "fps",
                                                "num_frames", "url": "",
                                                "annotations": [{"label", "label_id", "segment"}]}}}
    root/classes.txt         one class name per line, in label order
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .actions import ACTION_CLASSES, FPS, _write_atomically, render_action
from .video import write_video

__all__ = ["render_untrimmed", "generate_untrimmed", "builtin_untrimmed_root"]

VERSION = 2  # 2: videos encoded without x264's mbtree (reproducible)
INSTANCES = (1, 4)
INSTANCE_FRAMES = (12, 32)  # longer clips of render_action move too slowly to change every frame
GAP_FRAMES = (4, 24)  # between two instances; 0 to the upper bound at the ends
VIDEO_FRAMES = (64, 200)
_FADES = ("appearing", "disappearing")


def _instance(label: int, seed: int, length: int, size: int) -> np.ndarray:
    """The frames of one instance: a clip of class ``label`` cut to the frames that change."""
    # render_action fades over a fifth of its clip and holds the rest: a clip twice as long fades over 0.4 x
    # ``length`` frames, about as fast as in the built-in actions clips (which a localizer's features may come from).
    frames, _ = render_action(label, seed, 2 * length if ACTION_CLASSES[label] in _FADES else length, size)
    changes = np.flatnonzero((frames[1:] != frames[:-1]).any(axis=(1, 2, 3)))
    return frames[changes[0]:changes[-1] + 2]


def render_untrimmed(seed: int, num_classes: int = len(ACTION_CLASSES),
                     size: int = 64) -> Tuple[np.ndarray, List[Tuple[int, int, int]]]:
    """(uint8 frames (T, H, W, 3), [(label, first frame, last frame)] in time order) of one video whose
    instances are of the first ``num_classes`` classes."""
    if not 1 <= num_classes <= len(ACTION_CLASSES):
        raise ValueError(f"render_untrimmed: num_classes must be in [1, {len(ACTION_CLASSES)}], got {num_classes}")
    rng = np.random.default_rng(seed)
    count = int(rng.integers(INSTANCES[0], INSTANCES[1] + 1))
    labels = rng.integers(0, num_classes, count).tolist()
    scenes = rng.integers(0, 2 ** 31, count).tolist()
    lengths = rng.integers(INSTANCE_FRAMES[0], INSTANCE_FRAMES[1] + 1, count).tolist()
    clips = [_instance(label, scene, length, size) for label, scene, length in zip(labels, scenes, lengths)]
    ends = rng.integers(0, GAP_FRAMES[1] + 1, 2).tolist()
    gaps = [ends[0], *rng.integers(GAP_FRAMES[0], GAP_FRAMES[1] + 1, count - 1).tolist(), ends[1]]
    hold_earlier = (rng.random(count - 1) < 0.5).tolist()  # the frame an inner gap holds: earlier or later scene
    while count > 1 and sum(map(len, clips)) + sum(gaps) > VIDEO_FRAMES[1]:
        count -= 1
        del labels[count], clips[count], gaps[count], hold_earlier[count - 1]
    short = VIDEO_FRAMES[0] - sum(map(len, clips)) - sum(gaps)
    if short > 0:
        lead = int(rng.integers(0, short + 1))
        gaps[0] += lead
        gaps[-1] += short - lead
    parts = [np.repeat(clips[0][:1], gaps[0], axis=0)]
    segments = []
    for k, (label, clip) in enumerate(zip(labels, clips)):
        start = sum(map(len, parts))
        segments.append((label, start, start + len(clip) - 1))
        parts.append(clip)
        still = clip[-1:] if k == count - 1 or hold_earlier[k] else clips[k + 1][:1]
        parts.append(np.repeat(still, gaps[k + 1], axis=0))
    return np.concatenate(parts), segments


def _write_split(root: Path, subset: str, count: int, num_classes: int, size: int, fps: int,
                 seed: int) -> Dict[str, Dict[str, Any]]:
    """Write the videos of ``subset`` ("training" or "validation"); their database entries by video id."""
    database = {}
    split = "train" if subset == "training" else "val"
    video_seeds = np.random.default_rng([seed, 0 if split == "train" else 1]).integers(0, 2 ** 31, count)
    for index, video_seed in enumerate(video_seeds):
        video_id = f"{split}_{index:05d}"
        frames, segments = render_untrimmed(int(video_seed), num_classes, size)
        write_video(root / "videos" / f"{video_id}.mp4", frames, fps=fps)
        database[video_id] = {
            "subset": subset, "duration": len(frames) / fps, "fps": fps, "num_frames": len(frames), "url": "",
            "annotations": [{"label": ACTION_CLASSES[label], "label_id": label,
                             "segment": [first / fps, (last + 1) / fps]} for label, first, last in segments]}
    return database


def generate_untrimmed(root: Path, num_train: int = 100, num_val: int = 25, num_classes: int = len(ACTION_CLASSES),
                       size: int = 64, fps: int = FPS, seed: int = 0) -> Path:
    """Write the dataset into ``root`` (atomically: a half-written folder is never left behind); its classes
    are the first ``num_classes`` action classes."""
    if size % 2:
        raise ValueError(f"generate_untrimmed: size must be even (H.264 yuv420p), got {size}")
    if not 1 <= num_classes <= len(ACTION_CLASSES):
        raise ValueError(f"generate_untrimmed: num_classes must be in [1, {len(ACTION_CLASSES)}], got {num_classes}")
    if not isinstance(fps, int) or fps < 1:  # the container stores an integer frame rate
        raise ValueError(f"generate_untrimmed: fps must be a positive integer, got {fps!r}")
    classes = ACTION_CLASSES[:num_classes]

    def write(folder: Path) -> None:
        (folder / "videos").mkdir()
        database = {**_write_split(folder, "training", num_train, num_classes, size, fps, seed),
                    **_write_split(folder, "validation", num_val, num_classes, size, fps, seed)}
        (folder / "classes.txt").write_text("\n".join(classes) + "\n")
        taxonomy = [{"nodeName": name, "nodeId": i} for i, name in enumerate(classes)]
        (folder / "annotations.json").write_text(json.dumps(
            {"version": f"intern2-untrimmed-v{VERSION}", "taxonomy": taxonomy, "database": database}, indent=1) + "\n")

    return _write_atomically(root, write, "annotations.json")


def builtin_untrimmed_root(num_train: int = 100, num_val: int = 25, num_classes: int = len(ACTION_CLASSES),
                           size: int = 64, fps: int = FPS, home: Optional[Path] = None) -> Path:
    """The cached built-in dataset folder under ``$INTERN2_HOME`` (default ~/.cache/intern2), generated on
    first use; a new :data:`VERSION` of the generator writes a new folder."""
    home = Path(home or os.environ.get("INTERN2_HOME", Path.home() / ".cache" / "intern2"))
    root = home / "builtin" / f"untrimmed-v{VERSION}-{size}px-{fps}fps-{num_classes}c-{num_train}-{num_val}"
    if not (root / "annotations.json").exists():
        generate_untrimmed(root, num_train, num_val, num_classes, size, fps)
    return root
