"""Temporal action localization data: a folder of per-video snippet features + an ActivityNet-layout annotation file.

Layout (what ActionFormer and InternVideo's TAL read)::

    features/<prefix><video_id>.npy        (T, C) float features, one row per snippet (optional sidecar
    features/<prefix><video_id>.json       written by `intern2 extract-features --snippets`: its fps wins)
    annotations.json                       {"database": {video_id: {"subset", "duration", "fps",
                                            "annotations": [{"label", "label_id", "segment": [start_s, end_s]}]}}}

Feature i covers the ``feat_num_frames`` frames from ``i * feat_stride``; segments are converted to that grid as
ActionFormer does (``seconds * fps / stride - 0.5 * frames / stride``). Class ids are the annotations' ``label_id``
when every annotation has one (ActionFormer's files), else the sorted label names.

Bad entries never stop a run: a video without a feature file, a feature file of the wrong shape or dimension, a
segment entirely outside its video (or empty), an unknown class name each produce one message naming the file and
the entry; the video (or the annotation) is skipped and counted (``source.problems``). Segments that only overhang
the video are clipped to it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["TemporalVideo", "TemporalSource", "open_temporal_source", "read_features", "TemporalDataset",
           "collate_temporal", "class_names"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TemporalVideo:
    """One annotated video: where its features are, its frame rate and length, its segments (seconds) and labels."""
    video_id: str
    feature_file: Path
    fps: float
    duration: float
    num_features: int
    segments: np.ndarray  # (N, 2) float64 seconds
    labels: np.ndarray  # (N,) int64


@dataclass
class TemporalSource:
    """The videos of one subset, the class names (index = class id), the feature dimension and what was skipped."""
    annotation_file: Path
    feature_dir: Path
    subset: str
    classes: List[str]
    feature_dim: int
    videos: List[TemporalVideo]
    problems: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.annotation_file} [{self.subset}]"


def _load_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"annotations {path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("database"), dict):
        raise ValueError(f"annotations {path}: expected a JSON object with a 'database' object (ActivityNet layout)")
    return data


def class_names(path: Path, database: Dict[str, Any]) -> List[str]:
    """Class names by id, as training numbers them: the annotations' label_id when all have one (a clash is an
    error), else the sorted names (official ActivityNet files name the labels only)."""
    entries = [a for v in database.values() if isinstance(v, dict) for a in v.get("annotations") or []
               if isinstance(a, dict) and isinstance(a.get("label"), str)]
    if entries and all(isinstance(a.get("label_id"), int) and a["label_id"] >= 0 for a in entries):
        names: Dict[int, str] = {}
        for entry in entries:
            known = names.setdefault(entry["label_id"], entry["label"])
            if known != entry["label"]:
                raise ValueError(f"annotations {path}: label_id {entry['label_id']} is both {known!r} and "
                                 f"{entry['label']!r}")
        return [names.get(i, f"class_{i}") for i in range(max(names) + 1)]
    return sorted({a["label"] for a in entries})


def load_npy(source: Union[Path, BinaryIO], where: Any) -> np.ndarray:
    """The one array of an .npy file or stream (never unpickled); a ValueError naming ``where`` otherwise."""
    try:
        with (open(source, "rb") if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source)) as f:
            magic = f.read(6)
            if magic != b"\x93NUMPY":  # else numpy reads it as a pickle and says it holds pickled data
                raise ValueError("empty" if not magic else "it does not start with the .npy signature")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # EOFError: a header without its data
        raise ValueError(f"{where}: not a readable .npy feature file ({exc})") from None
    except MemoryError:  # numpy sizes the array from the header before reading the data
        raise ValueError(f"{where}: its .npy header declares an array far larger than the file") from None


def read_features(path: Path, feature_dim: Optional[int] = None) -> np.ndarray:
    """A (T, C) float32 feature array (integers are converted, as an in-memory array's are); a ValueError names
    the file when it is unreadable or of the wrong shape."""
    array = load_npy(path, path)
    numbers = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    if array.ndim != 2 or array.shape[0] < 1 or not numbers:
        raise ValueError(f"{path}: expected a (T, C) array of snippet features (numbers), got {array.dtype} "
                         f"{tuple(array.shape)}")
    if feature_dim is not None and array.shape[1] != feature_dim:
        raise ValueError(f"{path}: features of dimension {array.shape[1]}, expected {feature_dim} (features from "
                         f"another encoder?)")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: features contain NaN or infinite values")
    return array.astype(np.float32, copy=False)


def _feature_shape(path: Path) -> Tuple[int, ...]:
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)  # reads the header only
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
        raise ValueError(f"{path}: not a readable .npy feature file ({exc or 'empty'})") from None


def _sidecar_fps(feature_file: Path) -> Optional[float]:
    sidecar = feature_file.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        fps = json.loads(sidecar.read_text(encoding="utf-8")).get("fps")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return float(fps) if isinstance(fps, (int, float)) and fps > 0 else None


def open_temporal_source(annotation_file: str, feature_dir: str, subset: str, classes: Optional[Sequence[str]] = None,
                         feature_dim: Optional[int] = None, default_fps: Optional[float] = None,
                         file_prefix: str = "") -> TemporalSource:
    """The videos of ``subset`` (matched case-insensitively, as ActionFormer does) that have a feature file.
    ``classes`` (e.g. a trained model's) fixes the class ids by name; ``feature_dim`` defaults to the first
    readable file's. A missing file or folder, or a subset without any usable video, is a ValueError."""
    path, folder = Path(annotation_file), Path(feature_dir)
    data = _load_json(path)
    if not folder.is_dir():
        raise ValueError(f"features {folder}: no such folder")
    database = data["database"]
    names = list(classes) if classes is not None else class_names(path, database)
    ids = {name: i for i, name in enumerate(names)}
    source = TemporalSource(path, folder, subset, names, feature_dim or 0, [])
    for video_id, info in database.items():
        where = f"{path}: video {video_id!r}"
        if not isinstance(info, dict):
            source.problems.append(f"{where}: expected an object")
            continue
        if str(info.get("subset", "")).lower() != subset.lower():
            continue
        feature_file = folder / f"{file_prefix}{video_id}.npy"
        if not feature_file.is_file():
            source.problems.append(f"{where}: no feature file {feature_file}")
            continue
        try:
            shape = _feature_shape(feature_file)
        except ValueError as exc:
            source.problems.append(str(exc))
            continue
        if len(shape) != 2 or shape[0] < 1:
            source.problems.append(f"{feature_file}: expected (T, C) snippet features, got shape {shape}")
            continue
        if not source.feature_dim:
            source.feature_dim = shape[1]
        if shape[1] != source.feature_dim:
            source.problems.append(f"{feature_file}: features of dimension {shape[1]}, expected "
                                   f"{source.feature_dim} (features from another encoder?)")
            continue
        fps = default_fps or _sidecar_fps(feature_file) or info.get("fps")
        if not isinstance(fps, (int, float)) or not fps > 0:
            source.problems.append(f"{where}: no frame rate (set 'fps' in the annotation or default_fps)")
            continue
        duration = info.get("duration")
        duration = float(duration) if isinstance(duration, (int, float)) and duration > 0 else math.inf
        segments, labels = [], []
        for index, entry in enumerate(info.get("annotations") or []):
            problem = _check_entry(entry, duration, ids)
            if problem:
                source.problems.append(f"{where}: annotation {index}: {problem}")
                continue
            start, end = (float(v) for v in entry["segment"])
            segments.append((max(start, 0.0), min(end, duration)))
            labels.append(ids[entry["label"]])
        source.videos.append(TemporalVideo(video_id, feature_file, float(fps), duration, shape[0],
                                           np.array(segments, np.float64).reshape(-1, 2), np.array(labels, np.int64)))
    for problem in source.problems:
        log.warning("skipped: %s", problem)
    if not source.videos:
        raise ValueError(f"annotations {path}: no video of subset {subset!r} has a usable feature file in {folder}"
                         + (f" (first problem: {source.problems[0]})" if source.problems else ""))
    return source


def _check_entry(entry: Any, duration: float, ids: Dict[str, int]) -> Optional[str]:
    """Why an annotation cannot be used, or None."""
    if not isinstance(entry, dict):
        return "expected an object"
    segment = entry.get("segment")
    if (not isinstance(segment, (list, tuple)) or len(segment) != 2
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in segment)):
        return f"segment: expected [start, end] in seconds, got {segment!r}"
    start, end = segment
    if end <= start:
        return f"segment [{start}, {end}] is empty"
    if end <= 0 or start >= duration:
        return f"segment [{start}, {end}] lies outside the video (0 to {duration:g} s)"
    if entry.get("label") not in ids:
        known = ", ".join(list(ids)[:8]) + (", ..." if len(ids) > 8 else "")
        return f"unknown class {entry.get('label')!r} (classes: {known})"
    return None


class TemporalDataset(Dataset):
    """Feature sequences (C, T) with their segments on the feature grid. In training, a sequence longer than
    ``max_seq_len`` (and, with ``crop_ratio``, any sequence) is randomly cropped to a window that keeps at least
    one action with ``trunc_thresh`` of its length (ActionFormer's ``truncate_feats``); seeded per epoch and item."""

    def __init__(self, source: TemporalSource, feat_stride: int, feat_num_frames: int, train: bool = False,
                 max_seq_len: Optional[int] = None, trunc_thresh: float = 0.5,
                 crop_ratio: Optional[Tuple[float, float]] = None, seed: int = 0):
        self.source = source
        self.feat_stride = feat_stride
        self.feat_num_frames = feat_num_frames
        self.train = train
        self.max_seq_len = max_seq_len
        self.trunc_thresh = trunc_thresh
        self.crop_ratio = crop_ratio
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source.videos)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        video = self.source.videos[index]
        feats = torch.from_numpy(np.ascontiguousarray(read_features(video.feature_file, self.source.feature_dim).T))
        offset = 0.5 * self.feat_num_frames / self.feat_stride
        segments = torch.from_numpy(video.segments * video.fps / self.feat_stride - offset).float()
        item = {"video_id": video.video_id, "feats": feats, "segments": segments,
                "labels": torch.from_numpy(video.labels), "fps": video.fps, "duration": video.duration,
                "feat_stride": self.feat_stride, "feat_num_frames": self.feat_num_frames}
        if self.train:
            item = self._truncate(item, np.random.default_rng([self.seed, self.epoch, index]), offset)
        return item

    def _truncate(self, item: Dict[str, Any], rng: np.random.Generator, offset: float) -> Dict[str, Any]:
        length = item["feats"].shape[1]
        window = self.max_seq_len or length
        if length <= window:
            if self.crop_ratio is None:
                return item
            low, high = self.crop_ratio
            window = int(rng.integers(max(round(low * length), 1), min(round(high * length), length) + 1))
            if window == length:
                return item
        segments = item["segments"]
        if not len(segments):  # a video without actions: any window
            start = int(rng.integers(0, length - window + 1))
            return {**item, "feats": item["feats"][:, start:start + window].clone()}
        for _ in range(200):  # a window that keeps at least one action (else the last try)
            start = int(rng.integers(0, length - window + 1))
            left = torch.clamp(segments[:, 0], min=start - offset)
            right = torch.clamp(segments[:, 1], max=start + window + offset)
            kept = (right - left).clamp(min=0) / (segments[:, 1] - segments[:, 0]).abs() >= self.trunc_thresh
            if kept.any():
                break
        return {**item, "feats": item["feats"][:, start:start + window].clone(),
                "segments": torch.stack([left[kept], right[kept]], 1) - start, "labels": item["labels"][kept]}


def collate_temporal(samples: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Videos stay a list (the model pads them; each has its own length and segments)."""
    return list(samples)
