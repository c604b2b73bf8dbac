"""Video data: a PyAV reader (random access, or every frame in order with :func:`iter_frames`), dense and
segment-based (TSN) frame sampling, seeded clip transforms, and a dataset over Kinetics-style annotation lists
with multi-view (clips x crops) testing.

Frames travel as uint8 ``(T, H, W, 3)`` tensors until the transform, which returns normalised float
``(C, T, H, W)`` clips (the layout of the video ViT's Conv3d tubelet embedding).

A missing, corrupt, truncated or video-less file raises :class:`VideoDecodeError` naming it; the dataset
turns that into a logged warning and ``None`` (unless ``skip_errors=False``), which :func:`collate_videos`
drops and counts in ``batch["skipped"]``, so one bad file never stops a long run.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from . import read_text
from .images import collate_skipping

__all__ = ["VideoDecodeError", "VideoInfo", "probe_video", "read_video", "iter_frames", "write_video", "dense_indices",
           "segment_indices", "clip_positions", "dense_test_indices", "uniform_indices", "FrameSampler",
           "VideoTrainTransform", "VideoEvalTransform",
           "VideoSource", "read_annotations", "VideoDataset", "collate_videos", "IMAGENET_MEAN", "IMAGENET_STD",
           "CLIP_MEAN", "CLIP_STD"]

log = logging.getLogger(__name__)

FrameSpec = Union[Sequence[int], Callable[[int], Sequence[int]]]
SEEK_MIN_FRAMES = 32  # closer to the start, decoding from frame 0 costs about what a seek saves


class VideoDecodeError(ValueError):
    """A video file that cannot be read: missing, corrupt, truncated, or without a video stream."""


def _av():
    try:
        import av
    except ImportError as exc:
        raise ImportError("reading or writing video (the built-in clips too) needs PyAV: "
                          "pip install 'intern2[video]'") from exc
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` reads from the container (``fps`` 0 when it states none)."""
    num_frames: int
    fps: float
    width: int
    height: int


def _open(path: Union[str, Path]):
    """(container, video stream), or VideoDecodeError saying why not."""
    av = _av()
    if not isinstance(path, (str, os.PathLike)):  # frames are not decoded from memory: a file is read
        raise TypeError(f"video: expected a video file path, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise VideoDecodeError(f"{path}: no such video file")
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise VideoDecodeError(f"{path}: not a readable video container (corrupt or truncated file?): "
                               f"{exc}") from exc
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise VideoDecodeError(f"{path}: no video stream (streams: {', '.join(kinds)})")
    return container, container.streams.video[0]


def _frame_count(path, container, stream) -> int:
    """The container's frame count; else counted from the packets (demuxing only, no decoding)."""
    if stream.frames > 0:
        return int(stream.frames)
    try:
        count = sum(1 for packet in container.demux(stream) if packet.size > 0)
        container.seek(0)
    except _av().FFmpegError as exc:
        raise VideoDecodeError(f"{path}: cannot read packets (corrupt or truncated file?): {exc}") from exc
    return count


def probe_video(path: Union[str, Path]) -> VideoInfo:
    """Frame count, frame rate and size of a video file without decoding it."""
    container, stream = _open(path)
    with container:
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(_frame_count(path, container, stream), float(rate) if rate else 0.0, stream.width,
                         stream.height)


class _NoTimestampIndex(Exception):
    """Frame timestamps that do not number the frames one by one (variable frame rate, missing pts)."""


def _by_timestamp(container, stream, first: int):
    """(index, frame) from the keyframe at or before frame ``first``, indices from the timestamps of a
    constant-rate stream; raises _NoTimestampIndex when they do not advance one frame at a time."""
    per_frame = 1 / (stream.average_rate * stream.time_base)  # timestamp units per frame
    origin = stream.start_time
    container.seek(origin + int(first * per_frame), stream=stream, backward=True)
    expected = None
    for frame in container.decode(stream):
        index = None if frame.pts is None else round((frame.pts - origin) / per_frame)
        if index is None or (index != expected if expected is not None else index > first):
            raise _NoTimestampIndex
        yield index, frame
        expected = index + 1


def _rgb(frame) -> np.ndarray:
    """A decoded frame as a uint8 (H, W, 3) RGB array. One swscale thread: its slice-thread pool, made on the first
    conversion, does not survive a fork, and a DataLoader worker forked after the parent had converted a frame
    waited forever for the pool's threads (seen in the test suite). PyAV before 17 has neither the pool nor the
    ``threads`` argument."""
    if _AV_THREADED_REFORMAT:
        return frame.to_ndarray(format="rgb24", threads=1)
    return frame.to_ndarray(format="rgb24")


def _threaded_reformat() -> bool:
    """Whether the installed PyAV converts frames on a thread pool (17.0 and later)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return int(version("av").split(".")[0]) >= 17
    except (PackageNotFoundError, ValueError):
        return True


_AV_THREADED_REFORMAT = _threaded_reformat()


def _collect(path, frames, wanted: set, last: int, total: int):
    """(RGB arrays of the wanted indices, last index reached, last frame) from (index, frame) pairs."""
    decoded: Dict[int, np.ndarray] = {}
    index, frame = -1, None
    try:
        for index, frame in frames:
            if index in wanted:
                decoded[index] = _rgb(frame)
            if index >= last:
                break
    except _av().FFmpegError as exc:
        raise VideoDecodeError(f"{path}: decoding failed at frame {index + 1} of {total} "
                               f"(damaged or truncated file): {exc}") from exc
    return decoded, index, frame


def _check_complete(path, decoded: int, total: int) -> None:
    """Container frame counts can overstate the decodable frames by a few (edit lists, a dropped last frame);
    a stream that ends further from ``total`` than that is a truncated file."""
    if total - decoded > max(3, total // 20):
        raise VideoDecodeError(f"{path}: the stream ends at frame {decoded} of {total} (truncated file)")


def read_video(path: Union[str, Path], frames: Optional[FrameSpec] = None, seek: bool = True) -> torch.Tensor:
    """Decode the frames at ``frames`` (indices, or a function of the frame count giving them; all frames
    when None) as a uint8 tensor (len(indices), H, W, 3), in the order asked (repeats allowed).

    Decodes up to the last wanted frame and converts only wanted frames to RGB. From the start, an index
    counts decoded frames. When the first wanted frame lies ``SEEK_MIN_FRAMES`` or more into the video,
    ``seek`` jumps to the keyframe before it and numbers frames by timestamp at the average frame rate,
    checking that the numbers advance by one per decoded frame; where they do not (a variable frame rate),
    it decodes from the start instead.
    """
    container, stream = _open(path)
    with container:
        total = _frame_count(path, container, stream)
        if total == 0:
            raise VideoDecodeError(f"{path}: the video stream has no frames")
        if frames is None:
            indices = list(range(total))
        else:
            indices = [int(i) for i in (frames(total) if callable(frames) else frames)]
        if not indices:
            raise ValueError(f"{path}: no frame indices to read")
        if min(indices) < 0 or max(indices) >= total:
            raise ValueError(f"{path}: frame indices must lie in [0, {total}), "
                             f"got {min(indices)}..{max(indices)}")
        wanted, last = set(indices), max(indices)
        result = None
        if (seek and min(indices) >= SEEK_MIN_FRAMES and stream.average_rate and stream.time_base
                and stream.start_time is not None):
            try:
                result = _collect(path, _by_timestamp(container, stream, min(indices)), wanted, last, total)
            except _NoTimestampIndex:
                container.seek(0)
        if result is None:
            result = _collect(path, enumerate(container.decode(stream)), wanted, last, total)
        decoded, position, frame = result
        if frame is None:
            raise VideoDecodeError(f"{path}: no frame could be decoded ({total} expected)")
        if position < last:  # a small gap (see _check_complete) is filled with the last frame
            _check_complete(path, position + 1, total)
            final = _rgb(frame)
            decoded.update({i: final for i in wanted if i > position})
    frames = [decoded[i] for i in indices]
    for frame in frames:
        _check_frame_size(path, frames[0], frame)
    return torch.from_numpy(np.stack(frames))


def _check_frame_size(path: Union[str, Path], first: np.ndarray, frame: np.ndarray) -> None:
    """One size for every frame (concatenated streams can change it): else a VideoDecodeError naming the file."""
    if frame.shape != first.shape:
        raise VideoDecodeError(f"{path}: the frame size changes within the video ({first.shape[1]}x{first.shape[0]}"
                               f" then {frame.shape[1]}x{frame.shape[0]}); re-encode it at one size")


def iter_frames(path: Union[str, Path]) -> Iterator[np.ndarray]:
    """Every frame of a video in decoding order as a uint8 (H, W, 3) RGB array, one at a time: memory holds one
    frame whatever the video's length. Damage, a stream without frames, or one that ends well before the
    container's stated frame count is a VideoDecodeError naming the file."""
    container, stream = _open(path)
    with container:
        decoded, first = 0, None
        try:
            for frame in container.decode(stream):
                array = _rgb(frame)
                first = array if first is None else first
                _check_frame_size(path, first, array)
                yield array
                decoded += 1
        except _av().FFmpegError as exc:
            raise VideoDecodeError(f"{path}: decoding failed at frame {decoded + 1} (damaged or truncated "
                                   f"file): {exc}") from exc
        if decoded == 0:
            raise VideoDecodeError(f"{path}: the video stream has no frames")
        if stream.frames > 0:
            _check_complete(path, decoded, int(stream.frames))


def write_video(path: Union[str, Path], frames: Union[np.ndarray, torch.Tensor], fps: float = 8.0,
                crf: int = 23) -> Path:
    """Encode uint8 frames (T, H, W, 3) (even H and W) to an H.264 yuv420p file."""
    av = _av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_video: expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_video: yuv420p needs even height and width, got {frames.shape[1:3]}")
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        # x264's assembly is not reproducible run to run on small frames on AVX-512 CPUs (one input gave several
        # encodings under CPU load; its C code, which the assembly is meant to match bit for bit, always one).
        # Generated datasets need the same frames to encode to the same video on every CPU: the C code, at
        # about twice the encoding time of tiny clips.
        stream.options = {"crf": str(crf), "x264-params": "no-asm=1"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


# ----------------------------------------------------------------------------------------------- sampling

def dense_indices(total: int, num_frames: int, stride: int, position: float) -> List[int]:
    """``num_frames`` frames ``stride`` apart from a window start at ``position`` in [0, 1] of the free range.

    A video shorter than the window starts at 0 and repeats its last frame: looping back to the start would
    put a jump into the clip that reverses the apparent motion of direction-dependent actions.
    """
    free = max(total - (num_frames - 1) * stride - 1, 0)  # latest start that fits the window
    start = min(int(max(position, 0.0) * (free + 1)), free)  # uniform over 0..free for position in [0, 1)
    return [min(start + i * stride, total - 1) for i in range(num_frames)]


def segment_indices(total: int, num_segments: int, position: Union[float, Sequence[float]]) -> List[int]:
    """TSN sampling: ``num_segments`` equal segments, one frame each at ``position`` in [0, 1) within its
    segment (one value for all segments, or one per segment). Shorter videos repeat frames."""
    positions = [position] * num_segments if isinstance(position, (int, float)) else list(position)
    if len(positions) != num_segments:
        raise ValueError(f"segment_indices: {len(positions)} positions for {num_segments} segments")
    size = total / num_segments
    return [min(int(size * (k + min(max(p, 0.0), 1.0))), total - 1) for k, p in enumerate(positions)]


def clip_positions(num_clips: int) -> List[float]:
    """Evenly spaced positions in (0, 1): the middle of ``num_clips`` equal parts (0.5 for one)."""
    return [(k + 0.5) / num_clips for k in range(num_clips)]


def dense_test_indices(total: int, num_frames: int, stride: int, num_clips: int) -> List[List[int]]:
    """VideoMAE's dense test views: the video's frames ``stride`` apart from frame 0 (the last repeated up to
    ``num_frames``), and ``num_clips`` windows of ``num_frames`` of them whose starts are spread from the first
    to the last possible one (``int(k * (n - num_frames) / (num_clips - 1))``). One clip: the middle window."""
    if num_clips == 1:
        return [dense_indices(total, num_frames, stride, 0.5)]
    strided = list(range(0, total, stride))
    strided += [strided[-1]] * (num_frames - len(strided))
    step = (len(strided) - num_frames) / (num_clips - 1)
    return [strided[int(k * step):int(k * step) + num_frames] for k in range(num_clips)]


def uniform_indices(total: int, num_frames: int) -> List[int]:
    """``num_frames`` frames evenly spaced from the first to the last (``np.linspace(0, total - 1, n)``,
    truncated to integers), as the InternVideo-MM demo samples."""
    return np.linspace(0, total - 1, num_frames).astype(int).tolist()


@dataclass(frozen=True)
class FrameSampler:
    """Which frames make a clip: ``dense`` (``num_frames`` at ``stride``, as VideoMAE on Kinetics),
    ``segment`` (TSN: ``num_frames`` segments, one frame each, as on Something-Something; ``stride`` unused) or
    ``uniform`` (``num_frames`` evenly spaced over the whole video, ends included; trains as ``segment``).
    Test views follow the official test code of each (:meth:`test_views`)."""
    num_frames: int = 16
    stride: int = 4
    mode: str = "dense"

    def __post_init__(self):
        if self.mode not in ("dense", "segment", "uniform"):
            raise ValueError(f"FrameSampler.mode: expected 'dense', 'segment' or 'uniform', got {self.mode!r}")
        if self.num_frames < 1 or self.stride < 1:
            raise ValueError(f"FrameSampler: num_frames and stride must be >= 1, "
                             f"got {self.num_frames}, {self.stride}")

    def __call__(self, total: int, position: Optional[float] = None,
                 generator: Optional[torch.Generator] = None) -> List[int]:
        """Indices for a video of ``total`` frames: at ``position`` (one test view), random when it is None."""
        if self.mode == "dense":
            where = float(torch.rand((), generator=generator)) if position is None else position
            return dense_indices(total, self.num_frames, self.stride, where)
        if self.mode == "uniform" and position is not None:
            return uniform_indices(total, self.num_frames)
        where = torch.rand(self.num_frames, generator=generator).tolist() if position is None else position
        return segment_indices(total, self.num_frames, where)

    def test_views(self, total: int, num_views: int = 1) -> List[List[int]]:
        """The frame indices of each of ``num_views`` test clips: dense as :func:`dense_test_indices`; segment
        views at ``k / num_views`` of every segment (VideoMAE's SSv2 test: segment starts and middles for two),
        one view at the segment middles; uniform: one view (:func:`uniform_indices`)."""
        if self.mode == "dense":
            return dense_test_indices(total, self.num_frames, self.stride, num_views)
        if self.mode == "uniform":
            if num_views != 1:
                raise ValueError(f"FrameSampler: uniform sampling has one test view, got {num_views}")
            return [uniform_indices(total, self.num_frames)]
        positions = [0.5] if num_views == 1 else [k / num_views for k in range(num_views)]
        return [segment_indices(total, self.num_frames, p) for p in positions]


# ----------------------------------------------------------------------------------------------- transforms

def _normalise(clip: torch.Tensor, size: Tuple[int, int], mean: Sequence[float],
               std: Sequence[float], antialias: bool = True) -> torch.Tensor:
    """uint8 (T, H, W, C) -> resized (bilinear) normalised float (C, T, h, w)."""
    x = clip.permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    x = (x / 255.0 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x.permute(1, 0, 2, 3).contiguous()


def _check_clip(video: torch.Tensor) -> None:
    if video.dim() != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
        raise ValueError(f"video transform: expected uint8 frames (T, H, W, 3), got {video.dtype} "
                         f"{tuple(video.shape)}")


@dataclass(frozen=True)
class VideoTrainTransform:
    """Random resized crop (one box for all frames) to ``size`` and an optional horizontal flip.

    The crop covers ``scale`` of the frame area at an aspect ratio within ``ratio``; a short-side resize
    before it would not change what such a crop sees, so none is done. Turn ``flip`` off for classes that
    depend on direction (moving left vs right): a flip turns one into the other.
    """
    size: int = 224
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD

    def crop_box(self, height: int, width: int,
                 generator: Optional[torch.Generator] = None) -> Tuple[int, int, int, int]:
        """(top, left, h, w); falls back to the largest centred box within ``ratio`` after 10 misses."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target = area * float(torch.empty(()).uniform_(*self.scale, generator=generator))
            aspect = math.exp(float(torch.empty(()).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                              generator=generator)))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                return top, left, h, w
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        if width / height < aspect:
            w, h = width, min(height, int(round(width / aspect)))
        else:
            w, h = min(width, int(round(height * aspect))), height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, video: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> float (C, T, size, size)."""
        _check_clip(video)
        top, left, h, w = self.crop_box(video.shape[1], video.shape[2], generator)
        clip = video[:, top:top + h, left:left + w]
        if self.flip and float(torch.rand((), generator=generator)) < 0.5:
            clip = clip.flip(2)
        return _normalise(clip, (self.size, self.size), self.mean, self.std)


@dataclass(frozen=True)
class VideoEvalTransform:
    """Shorter side to ``resize`` (default ``size``; bilinear, antialiased unless ``antialias`` is off), then
    ``num_crops`` square crops of ``size``: one centred, or three along the longer side (left/centre/right or
    top/middle/bottom) as in VideoMAE testing."""
    size: int = 224
    resize: Optional[int] = None
    num_crops: int = 1
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    antialias: bool = True

    def __post_init__(self):
        if self.num_crops not in (1, 3):
            raise ValueError(f"VideoEvalTransform.num_crops: expected 1 or 3, got {self.num_crops}")
        if self.resize is not None and self.resize < self.size:
            raise ValueError(f"VideoEvalTransform: resize {self.resize} is smaller than the crop size "
                             f"{self.size}")

    def crop_boxes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """(top, left) of each crop in the resized frame of size ``resized_size(height, width)``."""
        h, w = self.resized_size(height, width)
        size = self.size
        if self.num_crops == 1:
            return [((h - size) // 2, (w - size) // 2)]
        if w >= h:
            return [((h - size) // 2, left) for left in (0, (w - size) // 2, w - size)]
        return [(top, (w - size) // 2) for top in (0, (h - size) // 2, h - size)]

    def resized_size(self, height: int, width: int) -> Tuple[int, int]:
        """Shorter side ``resize``, longer side scaled and truncated (VideoMAE's and torchvision's rounding)."""
        short = self.resize or self.size
        if width < height:
            return max(short, int(short * height / width)), short
        return short, max(short, int(short * width / height))

    def __call__(self, video: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> float (num_crops, C, T, size, size); ``generator`` is unused (deterministic)."""
        _check_clip(video)
        height, width = video.shape[1:3]
        frames = _normalise(video, self.resized_size(height, width), self.mean, self.std, self.antialias)
        size = self.size
        return torch.stack([frames[..., top:top + size, left:left + size] for top, left in
                            self.crop_boxes(height, width)])


# ----------------------------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class VideoSource:
    """(absolute path, class index) samples of an annotation list, the class names, and the list's name."""
    samples: Tuple[Tuple[str, int], ...]
    classes: Tuple[str, ...]
    name: str


def _list_rows(path: Path) -> List[Tuple[int, str, str]]:
    """(line number, file, label) rows of a ``path label`` list or a ``path,label`` CSV."""
    text = read_text(path)
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    header = lines[0][1].replace(" ", "").lower() if lines else ""
    is_csv = path.suffix.lower() == ".csv" or header.startswith("path,label")
    rows = []
    for number, line in lines:
        if is_csv:
            fields = next(csv.reader([line]))
            if [f.strip().lower() for f in fields[:2]] == ["path", "label"]:
                continue
        else:  # split from the right so paths may contain spaces
            fields = line.rsplit(None, 1)
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            expected = "'path,label'" if is_csv else "'path label'"
            raise ValueError(f"annotations {path}: line {number} {line!r}: expected {expected}")
        rows.append((number, fields[0].strip(), fields[1].strip()))
    if not rows:
        raise ValueError(f"annotations {path}: no samples listed")
    return rows


def read_annotations(path: Union[str, Path], root: Optional[Union[str, Path]] = None,
                     classes: Optional[Sequence[str]] = None) -> VideoSource:
    """A Kinetics-style list: ``path label`` lines (space separated) or a CSV with a ``path,label`` header.

    Paths are relative to ``root`` (default: the list's folder). A label is a class name, else a class index.
    ``classes`` fixes the label order; else ``classes.txt`` next to the list (one name per line) when it
    exists, else the sorted names (or ``0..max`` for integer labels). Missing files are named in a warning
    (they are skipped when read); a list whose files are all missing is an error (a wrong root).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"annotations {path}: no such file")
    root = Path(root) if root is not None else path.parent
    rows = _list_rows(path)
    if classes is None and (path.parent / "classes.txt").is_file():
        classes = [c.strip() for c in read_text(path.parent / "classes.txt").splitlines() if c.strip()]
    if classes is None:
        numeric = all(label.isdigit() for _, _, label in rows)
        classes = ([str(i) for i in range(max(int(label) for _, _, label in rows) + 1)] if numeric
                   else sorted({label for _, _, label in rows}))
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for number, file, label in rows:
        target = index.get(label, int(label) if label.lstrip("-").isdigit() else -1)
        if not 0 <= target < len(classes):
            raise ValueError(f"annotations {path}: line {number}: label {label!r} is not a class index in "
                             f"[0, {len(classes)}) nor a class name; classes: {list(classes)[:20]}")
        samples.append((str(root / file), target))
    missing = [file for file, _ in samples if not os.path.exists(file)]
    if len(missing) == len(samples):
        raise ValueError(f"annotations {path}: none of the {len(samples)} listed files exist under {root} "
                         f"(first: {missing[0]}); is the root right?")
    if missing:
        log.warning("annotations %s: %d of %d listed files are missing (they will be skipped): %s", path,
                    len(missing), len(samples), ", ".join(missing[:5]))
    return VideoSource(tuple(samples), tuple(classes), str(path))


class VideoDataset(Dataset):
    """Decoded, sampled and transformed clips of a :class:`VideoSource`, read inside ``__getitem__`` (so in
    DataLoader workers; the dataset holds only paths and is picklable).

    Training (``train=True``): one random clip, ``{"video": (C, T, H, W), "label", "index"}``; randomness is
    seeded by (seed, epoch, index). Testing: ``num_clips`` clips (:meth:`FrameSampler.test_views`) x the
    transform's crops,
    ``{"video": (V, C, T, H, W), ...}`` with V = clips x crops (clip-major), for the evaluator to average.

    ``cache``: keep every decoded video (all its frames, uint8) in memory after its first read, for small data
    sets where decoding, not the model, bounds the step rate. It lives in the process that reads, so use it with
    ``num_workers=0`` (workers are restarted each epoch and would decode again).
    """

    def __init__(self, source: VideoSource, sampler: FrameSampler,
                 transform: Union[VideoTrainTransform, VideoEvalTransform], train: bool, num_clips: int = 1,
                 seed: int = 0, skip_errors: bool = True, cache: bool = False):
        if train and num_clips != 1:
            raise ValueError(f"VideoDataset: training samples one clip per video, got num_clips={num_clips}")
        self.source = source
        self.sampler = sampler
        self.transform = transform
        self.train = train
        self.num_clips = num_clips
        self.seed = seed
        self.skip_errors = skip_errors
        self.epoch = 0
        self._decoded: Optional[Dict[int, torch.Tensor]] = {} if cache else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source.samples)

    def _indices(self, total: int, generator: torch.Generator) -> List[int]:
        if self.train:
            return self.sampler(total, generator=generator)
        return [i for view in self.sampler.test_views(total, self.num_clips) for i in view]

    def _read(self, index: int, path: str, generator: torch.Generator) -> torch.Tensor:
        """The sampled frames of a video: decoded now, or picked from the cached whole video."""
        if self._decoded is None:
            return read_video(path, lambda total: self._indices(total, generator))
        video = self._decoded.get(index)
        if video is None:
            video = self._decoded[index] = read_video(path)
        return video[self._indices(len(video), generator)]

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        path, label = self.source.samples[index]
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.epoch}:{index}".encode()))
        try:
            frames = self._read(index, path, generator)
        except VideoDecodeError as exc:
            if not self.skip_errors:
                raise
            log.warning("skipping unreadable video: %s", exc)
            return None
        if self.train:
            video = self.transform(frames, generator)
        else:  # one decode for all clips; each gives (crops, C, T, H, W), or (C, T, H, W) for one view
            views = [self.transform(clip, generator) for clip in frames.chunk(self.num_clips)]
            video = torch.cat([v.reshape(-1, *v.shape[-4:]) for v in views])
        return {"video": video, "label": label, "index": index}


def collate_videos(samples: List[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """Stack the readable clips; ``skipped`` counts the unreadable ones (``None``)."""
    return collate_skipping(samples, "video", (0, 3, 0, 0, 0))
