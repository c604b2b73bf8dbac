"""Action recognition and video features: a video file in, top-k class names (or a pooled feature) out.

Test views follow the checkpoint's :class:`~intern2.weights.VideoProtocol` (VideoMAE's dense 5 clips x 3 crops on
Kinetics, segment-based 2 x 3 on Something-Something-v2, ...); class probabilities are averaged over the views.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..data.video import FrameSampler, VideoEvalTransform, read_video
from ..weights import SAMPLINGS, VideoProtocol
from .common import (Pipeline, add_model_arguments, check_aspect, expand_files, files_or_exit, items, model_dtype,
                     one_or_many, output_or_exit, pipeline_from_args, positive, print_topk, progress, setup_logging,
                     top_k)

__all__ = ["VideoClassificationPipeline", "VIDEO_SUFFIXES", "video_files", "video_files_or_exit", "view_probabilities",
           "pooled_features", "add_protocol_arguments", "protocol_options", "predict_main",
           "extract_features_main", "write_npy"]

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")


def video_files(paths: Sequence[str]) -> List[str]:
    """Files as given; folders expanded to the video files inside them (sorted, recursive)."""
    return expand_files(paths, VIDEO_SUFFIXES)


def video_files_or_exit(parser: argparse.ArgumentParser, paths: Sequence[str]) -> List[str]:
    """:func:`video_files` of a command's arguments; missing paths or no video at all are a usage error."""
    return files_or_exit(parser, paths, VIDEO_SUFFIXES, "video")


def view_probabilities(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """(B, V, C, T, H, W) test views -> view-averaged class probabilities (B, K), float32."""
    batch, num_views = views.shape[:2]
    return model(views.flatten(0, 1).to(model_dtype(model))).float().softmax(-1).view(batch, num_views, -1).mean(1)


def pooled_features(model: nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) clips -> (B, D) float32 features: a classifier's pre-logits (pooled as trained), a
    pre-training model's (VideoMAEPretrain) mean encoder token."""
    pretraining = hasattr(model, "encoder")
    encoder = model.encoder if pretraining else model
    tokens = encoder.forward_features(clips.to(model_dtype(model)))
    return (tokens.mean(1) if pretraining else encoder.forward_head(tokens, pre_logits=True)).float()


class VideoClassificationPipeline(Pipeline):
    """``pipeline(file, topk=5) -> {"top": [{"label", "index", "prob"}]}``; ``pipeline.features(file)`` is the
    pooled feature (a classifier pools as trained; a pre-training encoder is mean-pooled), views averaged.

    Protocol fields (``test_clips``, ``test_crops``, ``sampling``, ``stride``, ``short_side``) may be overridden.
    """

    task = "video-cls"
    expects = "a video ViT (VideoMAE / InternVideo classifier or pre-training model)"
    protocol: VideoProtocol

    def __init__(self, model: nn.Module, source: Optional[str] = None, **protocol: Any):
        super().__init__(model, source, **protocol)
        p = self.protocol
        self.sampler = FrameSampler(p.num_frames, p.stride, p.sampling)
        self.transform = VideoEvalTransform(p.img_size, p.short_side, p.test_crops, p.mean, p.std, p.antialias)
        self.sampler.test_views(p.num_frames, p.test_clips)  # an impossible combination fails now, not per file

    @classmethod
    def model_types(cls) -> Tuple[type, ...]:
        from ..models.video_vit import VideoMAEPretrain, VideoViT
        return (VideoViT, VideoMAEPretrain)

    def views(self, file: str) -> torch.Tensor:
        """(V, C, T, H, W) test views of a video file (V = clips x crops, clip-major); a VideoDecodeError names
        an unreadable file."""
        clips = self.protocol.test_clips
        frames = read_video(file, lambda total: [i for view in self.sampler.test_views(total, clips) for i in view])
        check_aspect(frames.shape[2], frames.shape[1], f"{file}: video frames")
        return torch.stack([self.transform(clip) for clip in frames.chunk(clips)]).flatten(0, 1)

    @torch.inference_mode()
    def probabilities(self, views: torch.Tensor) -> torch.Tensor:
        """(B, V, C, T, H, W) views -> (B, K) view-averaged class probabilities."""
        if not self.labels:
            raise TypeError(f"{self.source or type(self.model).__name__}: has no classifier (a pre-training or "
                            f"num_classes=0 model): use features()")
        return view_probabilities(self.model, views.to(self.device)).cpu()

    @one_or_many
    def __call__(self, file: str, topk: int = 5) -> Dict[str, Any]:
        return self._top(self.views(file), topk)

    def _top(self, views: torch.Tensor, topk: int) -> Dict[str, Any]:
        return {"top": top_k(self.probabilities(views[None])[0], self.labels, topk)}

    def _readable_views(self, files: Sequence[str]) -> Iterator[Tuple[str, Optional[torch.Tensor], Optional[str]]]:
        """(file, its test views, None), or (file, None, why) for a file it cannot use (VideoDecodeError, frames
        too elongated to resize): a bad file of a batch is reported, the others still run."""
        for file in progress(items(files, "files"), "videos"):
            try:
                yield str(file), self.views(file), None
            except ValueError as exc:
                yield file, None, str(exc)

    def predict_files(self, files: Sequence[str], topk: int = 5) -> List[Dict[str, Any]]:
        """``{"file", "top"}`` per file; an unreadable file gets ``{"file", "error"}`` naming it."""
        return [{"file": file, "error": error} if views is None else {"file": file, **self._top(views, topk)}
                for file, views, error in self._readable_views(files)]

    @torch.inference_mode()
    def features(self, file: str) -> torch.Tensor:
        """The pooled (D,) float32 feature of a video file (:func:`pooled_features`), averaged over the test
        views."""
        return self._features(self.views(file))

    @torch.inference_mode()
    def _features(self, views: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.model, views.to(self.device)).mean(0).cpu()

    def extract_features(self, files: Sequence[str]) -> Tuple[torch.Tensor, List[str], List[str]]:
        """(N, D) features of the readable files, the files read, and the errors of the unreadable ones."""
        features, done, errors = [], [], []
        for file, views, error in self._readable_views(files):
            if views is None:
                errors.append(error)
                continue
            features.append(self._features(views))
            done.append(file)
        dim = getattr(getattr(self.model, "encoder", self.model), "embed_dim", 0)
        return (torch.stack(features) if features else torch.zeros(0, dim)), done, errors


# ------------------------------------------------------------------------------------------------------------ CLI
def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """The video protocol overrides of `intern2 predict`, `eval`, `extract-features` and the video-text commands."""
    parser.add_argument("--clips", type=int, help="temporal views per video (default: the weights' protocol)")
    parser.add_argument("--crops", type=int, choices=(1, 3), help="spatial crops per clip (default: the protocol's)")
    parser.add_argument("--sampling", choices=SAMPLINGS, help="frame sampling (default: the protocol's)")
    parser.add_argument("--stride", type=int, help="frame stride of dense sampling (default: the protocol's)")
    parser.add_argument("--short-side", type=int, help="resize the shorter side to this before cropping")


def protocol_options(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(test_clips=args.clips, test_crops=args.crops, sampling=args.sampling, stride=args.stride,
                short_side=args.short_side)


def predict_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 predict", description="Classify video files.")
    parser.add_argument("videos", nargs="+", help="video files or folders")
    add_model_arguments(parser)
    add_protocol_arguments(parser)
    parser.add_argument("--topk", type=positive(int), default=5)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    files = video_files_or_exit(parser, args.videos)
    pipeline = pipeline_from_args(parser, args, VideoClassificationPipeline, **protocol_options(args))
    return print_topk(pipeline.predict_files(files, args.topk), args.json)


def extract_features_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 extract-features VIDEOS... --out FILE.{safetensors,npy}`; with ``--snippets`` a (T, C) feature
    sequence per video in the folder ``--out`` (:mod:`intern2.pipelines.snippets`)."""
    from .snippets import add_snippet_arguments, check_no_snippet_options, snippets_main
    parser = argparse.ArgumentParser(prog="intern2 extract-features",
                                     description="Pooled video features per video, or with --snippets a feature "
                                     "sequence per video (temporal action localization), for downstream use.")
    parser.add_argument("videos", nargs="+", help="video files or folders")
    add_model_arguments(parser)
    add_protocol_arguments(parser)
    parser.add_argument("--out", required=True, help="output .safetensors (features + file order) or .npy; with "
                        "--snippets a folder (<video>.npy + <video>.json per video)")
    add_snippet_arguments(parser)
    args = parser.parse_args(argv)
    if args.snippets:
        return snippets_main(parser, args)
    check_no_snippet_options(parser, args)
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npy"):
        parser.error(f"--out {out}: expected a .safetensors or .npy file name")
    output_or_exit(parser, args.out, "--out")
    files = video_files_or_exit(parser, args.videos)
    pipeline = pipeline_from_args(parser, args, VideoClassificationPipeline, **protocol_options(args))
    features, done, errors = pipeline.extract_features(files)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if not done:
        return 1
    write_arrays(out, {"features": features}, {"files": done})
    setup_logging()
    log.info("wrote %d x %d features to %s", *features.shape, out)
    return 1 if errors else 0


def write_arrays(out: Path, tensors: Dict[str, torch.Tensor], names: Dict[str, List[str]]) -> None:
    """Atomically write ``tensors`` to ``out``: .safetensors with ``names`` as JSON metadata, or (one tensor) .npy
    with its names one per line in ``<out>.<key>.txt`` (e.g. ``features.files.txt``)."""
    from ..checkpoint import atomic_write
    if out.suffix == ".npy":
        ((_, array),) = tensors.items()
        ((key, values),) = names.items()
        broken = next((i for i, value in enumerate(values) if value.splitlines() not in ([value], [])), None)
        if broken is not None:  # one name per line: the lines would no longer match the rows
            raise ValueError(f"{out}: {key[:-1]} {broken + 1} has a line break, which {out.with_suffix(f'.{key}.txt')}"
                             f" (one per line) cannot hold; write .safetensors instead")
        write_npy(out, array.numpy())
        atomic_write(out.with_suffix(f".{key}.txt"), lambda tmp: Path(tmp).write_text("\n".join(values) + "\n"))
    else:
        from safetensors.torch import save_file
        atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                                {k: json.dumps(v) for k, v in names.items()}))


def write_npy(path: Path, array: np.ndarray) -> None:
    """Atomically write one array as ``path`` (.npy)."""
    from ..checkpoint import atomic_write

    def save(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    atomic_write(path, save)
