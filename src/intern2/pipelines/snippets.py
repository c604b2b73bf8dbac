"""Snippet features for temporal action localization: an untrimmed video in, a (T, C) feature sequence out, as
ActionFormer reads them (one ``<video_id>.npy`` of float32 (T, C) per video).

The protocol of InternVideo's TAL features: snippets of ``snippet_frames`` consecutive frames at the video's own
frame rate, one every ``stride`` frames, no padding. Feature i covers frames ``[i * stride, i * stride +
snippet_frames)``, so ``T = (num_frames - snippet_frames) // stride + 1``, and its time is ActionFormer's
``(i * stride + 0.5 * snippet_frames) / fps`` seconds. Presets (:data:`SNIPPET_PRESETS`):

* ``thumos14``: 16 frames, stride 4 (one feature per 4/30 s at THUMOS14's ~30 fps);
* ``activitynet``: 16 frames, stride 16 (also the protocol of HACS and FineAction).

The encoder sees ``frames_per_snippet`` of a snippet's frames (default its own clip length; evenly spaced, ends
included, as :func:`~intern2.data.video.uniform_indices`), shorter side resized and centre-cropped by the
model's protocol unless ``short_side`` / ``crop`` say otherwise. Videos are decoded once, in order
(:func:`~intern2.data.video.iter_frames`), keeping only the last ``snippet_frames`` prepared frames, so memory
does not grow with the video's length.

    >>> extractor = SnippetFeatureExtractor(intern2.from_pretrained("runs/vit/model"), SNIPPET_PRESETS["thumos14"])
    >>> extractor.extract_to_folder(video_files(["thumos14/videos"]), "features/")
    {'done': [...], 'skipped_existing': [], 'failed': []}

`intern2 extract-features VIDEOS --snippets thumos14 --out FOLDER` is the command.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..checkpoint import atomic_write
from ..config import error_message
from ..data.video import VideoDecodeError, VideoEvalTransform, iter_frames, probe_video, uniform_indices
from ..weights import MAX_SIDE, protocol_from_cfg
from .common import check_aspect, device_from_args, model_from_args, model_task, positive, progress, unique_stems
from .video_cls import VideoClassificationPipeline, pooled_features, video_files_or_exit, write_npy
from .video_text import VideoTextPipeline, encode_views

__all__ = ["SnippetProtocol", "SNIPPET_PRESETS", "SnippetFeatures", "SnippetFeatureExtractor",
           "add_snippet_arguments", "check_no_snippet_options", "snippets_main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnippetProtocol:
    """Snippets of ``snippet_frames`` frames every ``stride`` frames; the encoder gets ``frames_per_snippet`` of
    them (None: its protocol's ``num_frames``), shorter side ``short_side`` (None: the protocol's) and a centre
    crop of ``crop`` (None: the protocol's ``img_size``); ``batch_size`` snippets per forward pass."""
    snippet_frames: int
    stride: int
    frames_per_snippet: Optional[int] = None
    short_side: Optional[int] = None
    crop: Optional[int] = None
    batch_size: int = 8

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            optional = field.default is None
            if (value is None and not optional) or (value is not None and (type(value) is not int or value < 1)):
                raise ValueError(f"SnippetProtocol.{field.name}: expected a positive integer"
                                 f"{' or None' if optional else ''}, got {value!r}")
        for name in ("short_side", "crop"):  # beyond it a typo asks for hundreds of gigabytes of frames
            value = getattr(self, name)
            if value is not None and value > MAX_SIDE:
                raise ValueError(f"SnippetProtocol.{name}: expected at most {MAX_SIDE} pixels, got {value}")


SNIPPET_PRESETS: Dict[str, SnippetProtocol] = {
    "thumos14": SnippetProtocol(snippet_frames=16, stride=4),
    "activitynet": SnippetProtocol(snippet_frames=16, stride=16),
}


@dataclass(frozen=True)
class SnippetFeatures:
    """The feature sequence of one video: ``features`` (T, C) float32; ``timestamps`` (T,) snippet centres and
    ``segments`` (T, 2) start / end, in seconds (float64); the frame rate they were computed with, the decoded
    frame count and the duration (frames / fps)."""
    video: str
    features: torch.Tensor
    timestamps: torch.Tensor
    segments: torch.Tensor
    fps: float
    num_video_frames: int
    duration: float


class SnippetFeatureExtractor:
    """``extractor(file) -> SnippetFeatures`` for any video encoder intern2 has, chosen by ``task`` (default the
    model's own, :func:`~intern2.pipelines.common.model_task`):

    * video ViT classifier: the pre-logits pooled feature; VideoMAEPretrain: the mean of the encoder tokens (as
      :meth:`VideoClassificationPipeline.features`, :func:`~intern2.pipelines.video_cls.pooled_features`);
    * InternVideo-MM (``video-text``): the L2-normalised video embedding of the vision tower, as
      ``intern2 embed`` writes it (:func:`~intern2.pipelines.video_text.encode_views`).

    ``fps`` overrides the container's frame rate (needed where it states none); ``source`` (where the model came
    from: a folder, a file, a name) names it in messages and in the sidecar files.
    """

    def __init__(self, model: nn.Module, snippets: SnippetProtocol = SNIPPET_PRESETS["thumos14"],
                 source: Optional[str] = None, fps: Optional[float] = None, task: Optional[str] = None):
        if fps is not None and not fps > 0:
            raise ValueError(f"fps: expected a positive frame rate, got {fps}")
        task = task or model_task(model)
        family = VideoTextPipeline if task == "video-text" else VideoClassificationPipeline
        family.check_model(model)
        self.model = model.eval()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        architecture = cfg.get("architecture") or type(model).__name__
        self.name = f"{architecture}.{cfg['tag']}" if cfg.get("tag") else architecture
        self.source = None if source is None else str(source)
        video = protocol_from_cfg(cfg, family.task, f"{source or architecture}: pretrained_cfg")
        self.snippets, self.fps = snippets, fps
        self.frames_per_snippet = snippets.frames_per_snippet or video.num_frames
        self.crop = snippets.crop or video.img_size
        self.short_side = snippets.short_side or video.short_side or self.crop
        if self.short_side < self.crop:
            raise ValueError(f"short_side {self.short_side} is smaller than crop {self.crop}: frames are resized to "
                             f"short_side, then centre-cropped")
        self.transform = VideoEvalTransform(self.crop, self.short_side, 1, video.mean, video.std, video.antialias)
        self.offsets = uniform_indices(snippets.snippet_frames, self.frames_per_snippet)
        self._encode: Callable[[torch.Tensor], torch.Tensor] = (
            (lambda clips: encode_views(model, clips[:, None])) if family is VideoTextPipeline
            else (lambda clips: pooled_features(model, clips)))
        # One blank snippet through the encoder: a clip size it cannot take fails here, not once per video.
        try:
            with torch.inference_mode():
                blank = torch.zeros(1, len(video.mean), self.frames_per_snippet, self.crop, self.crop)
                self.feature_dim = int(self._encode(blank.to(self.device)).shape[-1])
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{source or self.name}: cannot encode snippets of {self.frames_per_snippet} frames "
                             f"at {self.crop} x {self.crop} pixels (frames_per_snippet, crop): {exc}") from exc

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _used(self, index: int) -> bool:
        """Whether frame ``index`` is one the encoder sees in some snippet (others are not resized at all)."""
        return any(index >= o and (index - o) % self.snippets.stride == 0 for o in self.offsets)

    def _encode_batch(self, clips: List[torch.Tensor]) -> torch.Tensor:
        return self._encode(torch.stack(clips).to(self.device)).float().cpu()

    @torch.inference_mode()
    def __call__(self, file: str, fps: Optional[float] = None) -> SnippetFeatures:
        """The snippet features of a video file; a VideoDecodeError names an unreadable file, one without a frame
        rate (unless ``fps`` was given) or one shorter than a snippet."""
        fps = fps or self.fps or probe_video(file).fps
        if not fps:
            raise VideoDecodeError(f"{file}: the container states no frame rate; give one (fps, --fps)")
        length, stride = self.snippets.snippet_frames, self.snippets.stride
        window: Deque[Optional[torch.Tensor]] = deque(maxlen=length)  # (C, crop, crop) frames, None: unused
        batch: List[torch.Tensor] = []
        features: List[torch.Tensor] = []
        count = 0
        for index, frame in enumerate(iter_frames(file)):
            if index == 0:
                check_aspect(frame.shape[1], frame.shape[0], f"{file}: video frames")
            window.append(self.transform(torch.from_numpy(frame)[None])[0, :, 0] if self._used(index) else None)
            count = index + 1
            start = count - length
            if start >= 0 and start % stride == 0:
                batch.append(torch.stack([window[o] for o in self.offsets], dim=1))
                if len(batch) == self.snippets.batch_size:
                    features.append(self._encode_batch(batch))
                    batch = []
        if batch:
            features.append(self._encode_batch(batch))
        if not features:
            raise VideoDecodeError(f"{file}: {count} frames, fewer than the {length} frames of one snippet")
        starts = torch.arange(sum(len(f) for f in features), dtype=torch.float64) * stride
        return SnippetFeatures(file, torch.cat(features), (starts + 0.5 * length) / fps,
                               torch.stack([starts, starts + length], dim=1) / fps, float(fps), count, count / fps)

    def settings(self, file: str) -> Dict[str, Any]:
        """What a sidecar must record for its features to count as this extractor's output for ``file``."""
        return {"video": str(Path(file).resolve()), "encoder": self.name, "source": self.source,
                "fps_override": self.fps, "snippet_frames": self.snippets.snippet_frames,
                "stride": self.snippets.stride, "frames_per_snippet": self.frames_per_snippet,
                "short_side": self.short_side, "crop": self.crop}

    def is_done(self, file: str, out_dir: Union[str, Path], name: str) -> bool:
        """Whether ``out_dir`` holds ``name``.npy and a ``name``.json sidecar with this extractor's settings."""
        out_dir = Path(out_dir)
        try:
            recorded = json.loads((out_dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            return False
        return ((out_dir / f"{name}.npy").is_file() and isinstance(recorded, dict)
                and all(recorded.get(key) == value for key, value in self.settings(file).items()))

    def extract_to_folder(self, files: Sequence[str], out_dir: Union[str, Path]) -> Dict[str, List[str]]:
        """Write ``<out_dir>/<stem>.npy`` ((T, C) float32) and the ``<stem>.json`` sidecar (settings, fps,
        frame count, duration, feature_dim, timestamps) of every video, both atomically and the sidecar last;
        videos whose sidecar has the current settings are skipped, so an interrupted run resumes. Returns
        ``{"done": [files], "skipped_existing": [files], "failed": [messages]}``; duplicate stems are a
        ValueError before any work."""
        names = unique_stems(files, "{stem}.npy")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary: Dict[str, List[str]] = {"done": [], "skipped_existing": [], "failed": []}
        for file, name in progress(zip(files, names), "videos", total=len(files)):
            if self.is_done(file, out, name):
                summary["skipped_existing"].append(file)
                continue
            try:
                result = self(file)
            except ValueError as exc:  # VideoDecodeError, too elongated frames: this video only
                summary["failed"].append(str(exc))
                continue
            sidecar = out / f"{name}.json"
            sidecar.unlink(missing_ok=True)  # an old sidecar must not vouch for the .npy about to be replaced
            write_npy(out / f"{name}.npy", result.features.numpy())
            record = {**self.settings(file), "fps": result.fps, "num_video_frames": result.num_video_frames,
                      "duration": result.duration, "feature_dim": int(result.features.shape[1]),
                      "timestamps": result.timestamps.tolist()}
            atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))
            summary["done"].append(file)
        return summary


# ------------------------------------------------------------------------------------------------------------ CLI
_SNIPPET_OPTIONS = ("snippet_frames", "snippet_stride", "frames_per_snippet", "crop", "batch_size", "fps")
_POOLED_OPTIONS = ("clips", "crops", "sampling", "stride")



def add_snippet_arguments(parser: argparse.ArgumentParser) -> None:
    """The snippet options of `intern2 extract-features` (``--short-side`` is the protocol override's)."""
    parser.add_argument("--snippets", choices=(*SNIPPET_PRESETS, "custom"),
                        help="a (T, C) feature sequence per video for temporal action localization: thumos14 (16 "
                        "frames every 4), activitynet (16 every 16), or custom (--snippet-frames, --snippet-stride)")
    parser.add_argument("--snippet-frames", type=positive(int), help="frames per snippet (default: the preset's)")
    parser.add_argument("--snippet-stride", type=positive(int), help="frames between snippet starts (default: "
                        "the preset's)")
    parser.add_argument("--frames-per-snippet", type=positive(int), help="frames of a snippet the encoder sees, "
                        "evenly spaced (default: the model's clip length)")
    parser.add_argument("--crop", type=positive(int), help="centre crop size (default: the model's image size)")
    parser.add_argument("--batch-size", type=positive(int), help="snippets per forward pass (default: 8)")
    parser.add_argument("--fps", type=positive(float), help="frame rate for the timestamps (default: the "
                        "container's)")


def check_no_snippet_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error for snippet options given without ``--snippets``."""
    given = [f"--{name.replace('_', '-')}" for name in _SNIPPET_OPTIONS if getattr(args, name) is not None]
    if given:
        parser.error(f"{', '.join(given)}: only with --snippets")


def snippets_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`intern2 extract-features VIDEOS... --snippets PRESET --out FOLDER`; exit status 1 when a video failed."""
    given = [f"--{name}" for name in _POOLED_OPTIONS if getattr(args, name) is not None]
    if given:
        parser.error(f"{', '.join(given)}: options of pooled features; snippets take --snippet-frames, "
                     f"--snippet-stride, --frames-per-snippet")
    if args.snippets == "custom" and (args.snippet_frames is None or args.snippet_stride is None):
        parser.error("--snippets custom needs --snippet-frames and --snippet-stride")
    if args.short_side is not None and args.short_side < 1:
        parser.error(f"--short-side {args.short_side}: expected a positive integer")
    options = dict(snippet_frames=args.snippet_frames, stride=args.snippet_stride,
                   frames_per_snippet=args.frames_per_snippet, short_side=args.short_side, crop=args.crop,
                   batch_size=args.batch_size)
    base = SNIPPET_PRESETS.get(args.snippets) or SnippetProtocol(args.snippet_frames, args.snippet_stride)
    try:
        snippets = dataclasses.replace(base, **{k: v for k, v in options.items() if v is not None})
    except ValueError as exc:  # named by the flag the user typed
        flags = {"stride": "--snippet-stride"}
        parser.error(re.sub(r"SnippetProtocol\.(\w+)", lambda m: flags.get(m[1], "--" + m[1].replace("_", "-")),
                            str(exc)))
    out = Path(args.out)
    if out.suffix in (".npy", ".safetensors") or (out.exists() and not out.is_dir()):
        parser.error(f"--out {out}: with --snippets, --out is a folder (one <video>.npy + <video>.json each)")
    files = video_files_or_exit(parser, args.videos)
    try:
        unique_stems(files, "{stem}.npy")
    except ValueError as exc:
        parser.error(str(exc))
    device = device_from_args(parser, args)
    model = model_from_args(parser, args)
    if device is not None:
        model = model.to(device)
    try:
        extractor = SnippetFeatureExtractor(model, snippets, args.checkpoint or args.model, args.fps, args.task)
    except (ValueError, TypeError, KeyError) as exc:
        parser.error(error_message(exc))
    summary = extractor.extract_to_folder(files, out)
    for message in summary["failed"]:
        print(f"error: {message}", file=sys.stderr)
    log.info("%s snippet features: %d written, %d already done, %d failed, in %s", extractor.name,
             len(summary["done"]), len(summary["skipped_existing"]), len(summary["failed"]), out)
    return 1 if summary["failed"] else 0
