"""Temporal action localization: a video's snippet features (or the video itself, with a feature encoder) in,
labelled action segments in seconds out.

The localizer's :class:`~intern2.weights.TemporalLocalizationProtocol` says which features it reads (snippets of
``feat_num_frames`` frames every ``feat_stride``); the frame rate comes from the features' sidecar JSON (written
by `intern2 extract-features --snippets`), the caller, or the protocol's ``default_fps``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..config import error_message
from ..data.temporal import read_features
from ..weights import TemporalLocalizationProtocol
from .common import Pipeline, add_model_arguments, items, load_model_spec, pipeline_from_args, positive, progress

__all__ = ["TemporalLocalizationPipeline", "RateError", "check_fps", "predict_main"]

Features = Union[str, Path, np.ndarray, torch.Tensor]


# What `predict` and POST /v1/video/localize show by default (the metric reads every segment: 0 and None).
DEFAULT_MIN_SCORE = 0.05
DEFAULT_TOPK = 10
# Frame rates beyond these make no video, and seconds computed in float32 from them would overflow.
FPS_RANGE = (1e-3, 1e5)


class RateError(ValueError):
    """An fps or duration that cannot be the video's: the argument's fault, not the features' (the server answers
    422 on that field). ``field`` names it; ``detail`` is the message after its name."""

    def __init__(self, where: Any, field: str, detail: str):
        super().__init__(f"{where}: {field} {detail}")
        self.field, self.detail = field, detail


def _check_rate(value: Any, name: str, where: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise RateError(where, name, f"{value!r}: expected a positive finite number")


def check_fps(fps: Any, where: Any) -> None:
    """A :class:`RateError` naming ``where`` unless ``fps`` is a frame rate in :data:`FPS_RANGE`."""
    _check_rate(fps, "fps", where)
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise RateError(where, "fps", f"{fps}: expected a frame rate between {FPS_RANGE[0]:g} and {FPS_RANGE[1]:g}")


class TemporalLocalizationPipeline(Pipeline):
    """``pipeline(features, fps=None, duration=None) -> {"segments": [{"label", "index", "score", "segment"}],
    ...}``: ``features`` a (T, C) array or a .npy file; segments in seconds, best first.

    ``encoder`` (a :class:`~intern2.pipelines.snippets.SnippetFeatureExtractor`, e.g. :meth:`snippet_extractor`)
    lets :meth:`video` localize in a video file directly; it must produce the features the localizer was trained
    on.
    """

    task = "tal"
    expects = "a temporal action localizer (ActionFormer)"
    bfloat16 = False  # a small model: soft-NMS and the metric read float32
    protocol: TemporalLocalizationProtocol

    def __init__(self, model: nn.Module, source: Optional[str] = None, encoder: Any = None, **protocol: Any):
        super().__init__(model, source, **protocol)
        self.encoder = encoder

    @classmethod
    def model_types(cls) -> Tuple[type, ...]:
        from ..models.actionformer import ActionFormer
        return (ActionFormer,)

    def _features(self, features: Features) -> Tuple[np.ndarray, Dict[str, Any]]:
        """(T, C) float32 features and what their sidecar JSON says (fps, duration), checked against the model."""
        dim = self.model.input_dim
        if isinstance(features, (str, Path)):
            path = Path(features)
            sidecar = path.with_suffix(".json")
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
            except (ValueError, OSError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise ValueError(f"{sidecar}: not a readable JSON sidecar of {path.name} ({exc})") from None
            return read_features(path, dim), meta if isinstance(meta, dict) else {}
        array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        if array.ndim != 2 or array.shape[1] != dim or array.shape[0] < 1:
            raise ValueError(f"features: expected a (T, {dim}) array, got {tuple(array.shape)}")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"features: expected numbers, got an array of {array.dtype}")
        array = array.astype(np.float32)
        if not np.isfinite(array).all():  # as read_features says of a file
            raise ValueError("features contain NaN or infinite values")
        return array, {}

    @torch.inference_mode()
    def __call__(self, features: Features, fps: Optional[float] = None, duration: Optional[float] = None,
                 min_score: float = DEFAULT_MIN_SCORE, topk: Optional[int] = DEFAULT_TOPK) -> Dict[str, Any]:
        """Segments above ``min_score``, at most ``topk`` (None: all; the metric reads all with 0 and None)."""
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score {min_score}: expected a score between 0 and 1")
        if topk is not None and topk < 1:
            raise ValueError(f"topk {topk}: expected a positive number of segments")
        array, meta = self._features(features)
        where = features if isinstance(features, (str, Path)) else "features"
        p = self.protocol
        fps = fps or meta.get("fps") or p.default_fps
        if not fps:
            raise ValueError(f"{where}: no frame rate: give fps (the video's frames per second), or extract with "
                             f"`intern2 extract-features --snippets`, whose sidecar JSON records it")
        check_fps(fps, where)  # as given, or from the sidecar JSON
        # Without a stated duration: the end of the last snippet.
        duration = duration or meta.get("duration") or ((len(array) - 1) * p.feat_stride + p.feat_num_frames) / fps
        _check_rate(duration, "duration", where)
        last_start = (len(array) - 1) * p.feat_stride / fps
        if duration < last_start:
            raise RateError(where, "duration", f"{duration:g} s: the {len(array)} features at {fps:g} fps run to "
                            f"{last_start:g} s (their last snippet's start); expected the video's length, at least "
                            f"that")
        seconds, scores, labels = self.model.detect(torch.from_numpy(array).T, fps, duration, p.feat_stride,
                                                    p.feat_num_frames)
        keep = scores >= min_score
        segments = [{"label": self.labels[int(c)], "index": int(c), "score": round(float(s), 6),
                     "segment": [round(float(a), 4), round(float(b), 4)]}
                    for (a, b), s, c in zip(seconds[keep], scores[keep], labels[keep])][:topk]
        return {"segments": segments, "fps": float(fps), "duration": float(duration), "num_features": len(array)}

    def snippet_extractor(self, encoder: nn.Module, source: Optional[str] = None) -> Any:
        """A :class:`~intern2.pipelines.snippets.SnippetFeatureExtractor` of ``encoder`` with this localizer's
        snippets (``feat_num_frames`` frames every ``feat_stride``); its feature size must be the localizer's."""
        from .snippets import SnippetFeatureExtractor, SnippetProtocol
        p = self.protocol
        encoder = encoder.to(self.device)  # the encoder is the heavy part: it runs where the localizer does
        extractor = SnippetFeatureExtractor(encoder, SnippetProtocol(p.feat_num_frames, p.feat_stride), source=source)
        if extractor.feature_dim != self.model.input_dim:
            raise ValueError(f"its features have {extractor.feature_dim} channels, the localizer reads "
                             f"{self.model.input_dim}")
        return extractor

    def video(self, file: str, fps: Optional[float] = None, **options: Any) -> Dict[str, Any]:
        """Localize in a video file: snippet features by ``encoder`` (at ``fps`` if given, else the container's
        frame rate), then :meth:`__call__`."""
        if self.encoder is None:
            raise ValueError("localizing in a video needs the feature encoder the localizer was trained on "
                             "(--encoder MODEL_FOLDER)")
        if fps is not None:  # before the video is decoded
            check_fps(fps, file)
        snippets = self.encoder(file, fps=fps)
        return self(snippets.features, fps=snippets.fps, duration=snippets.duration, **options)

    def predict_files(self, files: Sequence[str], fps: Optional[float] = None, min_score: float = DEFAULT_MIN_SCORE,
                      topk: Optional[int] = DEFAULT_TOPK) -> List[Dict[str, Any]]:
        """``{"file", "segments", ...}`` per .npy feature file or video; a bad file gets ``{"file", "error"}``."""
        from ..data.video import VideoDecodeError
        results = []
        for file in progress(items(files, "files"), "videos"):
            file = str(file)
            try:
                if file.endswith(".npy"):
                    result = self(file, fps=fps, min_score=min_score, topk=topk)
                else:
                    result = self.video(file, fps=fps, min_score=min_score, topk=topk)
                results.append({"file": file, **result})
            except (ValueError, OSError, VideoDecodeError) as exc:
                results.append({"file": file, "error": str(exc)})
        return results


def predict_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 predict", description="Localize actions in videos: snippet "
                                     "feature files (.npy), or video files with --encoder.")
    parser.add_argument("inputs", nargs="+", help=".npy feature files (T, C) or folders of them, or video files with "
                        "--encoder")
    add_model_arguments(parser)
    parser.add_argument("--encoder", help="the video model folder whose snippet features the localizer was trained "
                        "on (needed for video files)")
    parser.add_argument("--fps", type=float, help="frame rate of the features' video (default: the sidecar JSON's)")
    parser.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE,
                        help=f"drop segments below this score ({DEFAULT_MIN_SCORE})")
    parser.add_argument("--topk", type=positive(int), default=DEFAULT_TOPK,
                        help=f"segments per video, best first ({DEFAULT_TOPK})")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        parser.error(f"--fps {args.fps}: expected a positive number")
    if not 0.0 <= args.min_score <= 1.0:
        parser.error(f"--min-score {args.min_score}: expected a score between 0 and 1")
    pipeline = pipeline_from_args(parser, args, TemporalLocalizationPipeline)
    if args.encoder:
        try:
            pipeline.encoder = pipeline.snippet_extractor(load_model_spec(args.encoder, "--encoder"), args.encoder)
        except (ValueError, FileNotFoundError, TypeError, KeyError) as exc:
            message = error_message(exc)  # loading's errors name the flag already
            parser.error(message if message.startswith("--encoder") else f"--encoder {args.encoder}: {message}")
    inputs = []
    for item in args.inputs:  # a folder: its feature files (extract-features --snippets writes one per video)
        path = Path(item)
        found = sorted(str(f) for f in path.glob("*.npy")) if path.is_dir() else [item]
        if not found:
            parser.error(f"{item}: a folder without .npy feature files")
        inputs += found
    results = pipeline.predict_files(inputs, args.fps, args.min_score, args.topk)
    if args.json:
        print(json.dumps(results, indent=2))
    for result in results:
        if "error" in result:
            print(f"error: {result['error']}", file=sys.stderr)
        elif not args.json:
            found = ", ".join(f"{s['label']} {s['segment'][0]:.1f}-{s['segment'][1]:.1f}s ({s['score']:.2f})"
                              for s in result["segments"])
            print(f"{result['file']}: {found or 'no action found'}")
    return 1 if any("error" in r for r in results) else 0
