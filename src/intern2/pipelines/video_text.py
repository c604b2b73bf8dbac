"""Video-text (InternVideo-MM): embeddings of videos and texts, zero-shot classification, text-to-video search
and caption ranking, with the checkpoint's frame protocol (the official demo's: 8 frames evenly spaced from the
first to the last, shorter side 256, centre crop 224).

Commands: `intern2 retrieve`, `intern2 zero-shot` (also `intern2 predict --task video-text`), `intern2 embed`.
"""
from __future__ import annotations

import argparse
import json
import logging
import string
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data import read_text
from ..data.video import FrameSampler, VideoDecodeError, VideoEvalTransform, read_video
from ..text import check_text
from ..weights import VideoProtocol
from .common import (Pipeline, add_model_arguments, check_aspect, device_from_args, items, load_model, local_checkpoint,
                     model_dtype, one_or_many, option_error, output_or_exit, positive, positive_count, print_topk,
                     progress, setup_logging)
from .video_cls import add_protocol_arguments, protocol_options, video_files_or_exit, write_arrays

__all__ = ["VideoTextPipeline", "DEFAULT_PROMPT", "check_prompt", "encode_texts", "encode_views", "retrieve_main",
           "zero_shot_main", "predict_main", "embed_main"]

log = logging.getLogger(__name__)
DEFAULT_PROMPT = "a video of {}"


def check_prompt(prompt: str, what: str = "prompt") -> str:
    """``prompt`` if it is a template with one ``{}`` where the label goes (literal braces doubled), else a
    ValueError naming ``what``."""
    check_text(prompt, what)
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
    except ValueError as exc:  # a lone '{' or '}'
        raise ValueError(f"{what} {prompt!r}: {exc}; write literal braces as '{{{{' and '}}}}'") from None
    if fields != [""]:
        raise ValueError(f"{what} {prompt!r}: expected one '{{}}' where the label goes, found "
                         f"{len(fields)} field{'' if len(fields) == 1 else 's'} {fields}")
    return prompt


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 256,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """L2-normalised text features (N, D), float32."""
    model = _unwrap(model)
    device = device or next(model.parameters()).device
    out = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim, device=device)


@torch.no_grad()
def encode_views(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """(B, V, C, T, H, W) test views -> normalised view-averaged features (B, D)."""
    features = _unwrap(model).encode_video(views.flatten(0, 1).to(model_dtype(model)), normalize=True).float()
    return F.normalize(features.view(*views.shape[:2], -1).mean(1), dim=-1)


class VideoTextPipeline(Pipeline):
    """A video-text model with its tokenizer: ``encode_videos`` / ``encode_texts`` (normalised features),
    ``zero_shot``, ``retrieve`` (videos for a text) and ``rank_captions`` (texts for a video).

    ``tokenizer``: a tokenizer object, or a ``tokenizer.json`` / CLIP ``bpe_simple_vocab_16e6.txt.gz`` path;
    default: the ``tokenizer.json`` of the model folder ``source``.
    """

    task = "video-text"
    expects = "a video-text model (internvideo_mm_*)"
    protocol: VideoProtocol

    def __init__(self, model: nn.Module, tokenizer: Any = None, source: Optional[str] = None, **protocol: Any):
        super().__init__(model, source, **protocol)
        p = self.protocol
        self.sampler = FrameSampler(p.num_frames, p.stride, p.sampling)
        self.transform = VideoEvalTransform(p.img_size, p.short_side, p.test_crops, p.mean, p.std, p.antialias)
        self.sampler.test_views(p.num_frames, p.test_clips)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        names = cfg.get("label_names")
        self.class_names = list(names) if isinstance(names, list) else []  # the training list's classes
        self.prompt = cfg.get("prompt") or DEFAULT_PROMPT
        self.tokenizer = self._tokenizer(tokenizer, source)

    def _tokenizer(self, tokenizer: Any, source: Optional[str]) -> Any:
        from ..text.bpe import BPETokenizer
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            if not callable(tokenizer) or not hasattr(tokenizer, "vocab_size"):
                raise TypeError(f"tokenizer: expected a tokenizer (BPETokenizer) or the path of its file, got "
                                f"{type(tokenizer).__name__}")
            found = tokenizer
        else:
            folder = local_checkpoint(source)  # a Hub repo's snapshot
            path = tokenizer or (folder if folder and Path(folder).is_dir() else None)
            if path is None:
                raise ValueError("--tokenizer is required unless --checkpoint is a model folder holding "
                                 "tokenizer.json (for an official checkpoint: CLIP's bpe_simple_vocab_16e6.txt.gz, "
                                 "which intern2 does not download)")
            found = BPETokenizer.from_file(path, self.model.context_length)
        if found.vocab_size > self.model.vocab_size:
            raise ValueError(f"the tokenizer has {found.vocab_size} ids but the model only {self.model.vocab_size} "
                             f"embedding rows: they do not belong together")
        return found

    @classmethod
    def model_types(cls) -> Tuple[type, ...]:
        from ..models.videotext import VideoTextModel
        return (VideoTextModel,)

    @classmethod
    def from_pretrained(cls, checkpoint: Optional[str] = None, model: Optional[str] = None,
                        tokenizer: Any = None, **options: Any) -> "VideoTextPipeline":
        return cls(load_model(checkpoint, model), tokenizer, source=checkpoint or model, **options)

    def views(self, file: str) -> torch.Tensor:
        """(V, C, T, H, W) test views of a video file."""
        clips = self.protocol.test_clips
        frames = read_video(file, lambda total: [i for view in self.sampler.test_views(total, clips) for i in view])
        check_aspect(frames.shape[2], frames.shape[1], f"{file}: video frames")
        return torch.stack([self.transform(clip) for clip in frames.chunk(clips)]).flatten(0, 1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return encode_texts(self.model, self.tokenizer, texts).cpu()

    def encode_videos(self, files: Sequence[str]) -> Tuple[torch.Tensor, List[str], List[str]]:
        """(N, D) normalised features of the readable files, the files read, the errors of the unreadable ones."""
        features, done, errors = [], [], []
        for file in progress(items(files, "files"), "videos"):
            try:
                views = self.views(file)
            except ValueError as exc:  # VideoDecodeError, or frames too elongated to resize
                errors.append(str(exc))
                continue
            features.append(encode_views(self.model, views[None].to(self.device))[0].cpu())
            done.append(file)
        return (torch.stack(features) if features else torch.zeros(0, self.model.embed_dim)), done, errors

    def _scale(self) -> float:
        return self.model.logit_scale.exp().clamp(max=100.0).item()

    @one_or_many
    def __call__(self, file: str, labels: Optional[Sequence[str]] = None, prompt: Optional[str] = None,
                 topk: int = 5) -> Dict[str, Any]:
        """Zero-shot classification of one video (as the other pipelines' calls): ``{"top": [{"label", "index",
        "prob"}]}``; ``labels`` default to the model's training classes. An unreadable file raises
        VideoDecodeError."""
        (result,) = self.zero_shot([file], labels, prompt, topk)
        if "error" in result:
            raise VideoDecodeError(result["error"])
        return {"top": result["top"]}

    def zero_shot(self, files: Sequence[str], labels: Optional[Sequence[str]] = None, prompt: Optional[str] = None,
                  topk: int = 5) -> List[Dict[str, Any]]:
        """Per video, ``labels`` (default: the model's training classes) ranked by the similarity of the clip to
        ``prompt.format(label)`` (softmax at the model's logit scale): ``{"file", "top": [{"label", "index",
        "prob"}]}``, or ``{"file", "error"}``."""
        prompt = check_prompt(prompt or self.prompt)
        if labels is None:
            if len(self.class_names) < 2:
                raise ValueError("labels: required, the model records no class names of its own")
            labels = self.class_names
        labels = [check_text(label, "label") for label in items(labels, "labels")]
        if len(labels) < 2:  # the softmax ranks labels against each other: one is always "certain"
            raise ValueError(f"labels: expected at least two to choose between, got {len(labels)}")
        files, topk = items(files, "files"), positive_count(topk, "topk")
        features, done, errors = self.encode_videos(files)
        texts = self.encode_texts([prompt.format(label) for label in labels])
        probs = (self._scale() * features @ texts.t()).softmax(-1)
        rows, messages = dict(zip(done, probs)), iter(errors)  # errors come in the order of the failed files
        results = []
        for file in files:
            if file not in rows:
                results.append({"file": file, "error": next(messages)})
                continue
            values, indices = rows[file].topk(min(topk, len(labels)))
            results.append({"file": file, "top": [{"label": labels[i], "index": int(i), "prob": round(float(p), 6)}
                                                  for p, i in zip(values.tolist(), indices.tolist())]})
        return results

    def retrieve(self, files: Sequence[str], query: str, topk: int = 5) -> Tuple[List[Dict[str, Any]], List[str]]:
        """The ``topk`` videos most similar to the text ``query`` (``[{file, score}]``, best first) and the
        errors of unreadable files."""
        if not check_text(query, "query").strip():
            raise ValueError("the query is empty")
        positive_count(topk, "topk")
        features, done, errors = self.encode_videos(files)
        scores = (features @ self.encode_texts([query])[0]).tolist()
        ranked = sorted(zip(done, scores), key=lambda item: -item[1])[:topk]
        return [{"file": f, "score": round(s, 6)} for f, s in ranked], errors

    def rank_captions(self, file: str, captions: Sequence[str], topk: int = 10) -> Dict[str, Any]:
        """``captions`` ranked by cosine similarity to the video, with softmax probabilities at the model's
        temperature: ``{"ranking": [{"text", "index", "similarity", "prob"}]}``."""
        captions, topk = items(captions, "captions"), positive_count(topk, "topk")
        if not captions:
            raise ValueError("captions: nothing to rank")
        for index, caption in enumerate(captions):
            if not check_text(caption, f"captions[{index}]").strip():
                raise ValueError(f"captions[{index}]: empty (or only whitespace)")
        features, _, errors = self.encode_videos([file])
        if errors:
            raise VideoDecodeError(errors[0])
        similarity = self.encode_texts(captions) @ features[0]
        probs = (similarity * self._scale()).softmax(0)
        order = similarity.argsort(descending=True)[:topk].tolist()
        return {"ranking": [{"text": captions[i], "index": i, "similarity": round(float(similarity[i]), 6),
                             "prob": round(float(probs[i]), 6)} for i in order]}


# ------------------------------------------------------------------------------------------------------------ CLI
def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_protocol_arguments(parser)
    parser.add_argument("--tokenizer", help="tokenizer.json, or CLIP's bpe_simple_vocab_16e6.txt.gz for an official "
                        "InternVideo-MM checkpoint (default: the --checkpoint folder's tokenizer.json)")


def pipeline_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> VideoTextPipeline:
    setup_logging()
    device = device_from_args(parser, args)
    try:
        return VideoTextPipeline.from_pretrained(args.checkpoint, args.model, args.tokenizer, device=device,
                                                 dtype=args.dtype, **protocol_options(args))
    except (ValueError, TypeError, FileNotFoundError, KeyError, ImportError) as exc:
        parser.error(option_error(exc))


def _checked_text(parser: argparse.ArgumentParser, text: str, flag: str) -> str:
    try:
        return check_text(text, flag)
    except ValueError as exc:
        parser.error(str(exc))


def retrieve_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 retrieve --videos DIR --query TEXT`."""
    parser = argparse.ArgumentParser(prog="intern2 retrieve", description="Rank videos by similarity to a text.")
    parser.add_argument("--videos", nargs="+", required=True, help="video files or folders")
    parser.add_argument("--query", required=True, help="what to look for, e.g. 'a red circle moves left'")
    add_inference_arguments(parser)
    parser.add_argument("--topk", type=positive(int), default=5)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    if not _checked_text(parser, args.query, "--query").strip():
        parser.error("--query is empty: give the text to search for")
    files = video_files_or_exit(parser, args.videos)
    pipeline = pipeline_from_args(parser, args)
    ranked, errors = pipeline.retrieve(files, args.query, args.topk)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps(ranked, indent=2))
    else:
        for rank, item in enumerate(ranked, 1):
            print(f"{rank}. {item['file']} ({item['score']:.3f})")
    return 1 if errors or not ranked else 0  # as every batch command: 1 when a file failed


def zero_shot_main(argv: Optional[List[str]] = None, prog: str = "intern2 zero-shot") -> int:
    """`intern2 zero-shot VIDEO --labels a,b,c` (without --labels: the classes the model was trained with)."""
    parser = argparse.ArgumentParser(prog=prog, description="Classify videos against free-text labels (no "
                                     "training).")
    parser.add_argument("videos", nargs="+", help="video files or folders")
    parser.add_argument("--labels", help="comma-separated class names, e.g. 'moving left,moving up' (default: "
                        "the class names of the model's training list)")
    parser.add_argument("--labels-file", help="class names one per line (names may hold commas)")
    parser.add_argument("--prompt", help="prompt template (default: as trained, else 'a video of {}')")
    add_inference_arguments(parser)
    parser.add_argument("--topk", type=positive(int), default=5)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    if args.prompt is not None:
        try:
            check_prompt(args.prompt, "--prompt")
        except ValueError as exc:
            parser.error(str(exc))
    if args.labels is not None and args.labels_file is not None:
        parser.error("--labels and --labels-file: give the class names one way")
    labels = None
    if args.labels is not None:
        labels = [label.strip() for label in _checked_text(parser, args.labels, "--labels").split(",")
                  if label.strip()]
        if len(labels) < 2:
            parser.error(f"--labels {args.labels!r}: give at least two comma-separated class names")
    if args.labels_file is not None:  # before the model loads
        try:
            text = read_text(Path(args.labels_file))
        except OSError as exc:
            parser.error(f"--labels-file {args.labels_file}: cannot read it ({exc.strerror or exc})")
        except ValueError as exc:  # not UTF-8, the file named
            parser.error(str(exc))
        labels = [line.strip() for line in _checked_text(parser, text, "--labels-file").splitlines() if line.strip()]
        if len(labels) < 2:
            parser.error(f"--labels-file {args.labels_file}: expected at least two class names, one per line")
    files = video_files_or_exit(parser, args.videos)
    pipeline = pipeline_from_args(parser, args)
    if labels is None and len(pipeline.class_names) < 2:
        parser.error("--labels is required: the model records no class names of its own")
    return print_topk(pipeline.zero_shot(files, labels, args.prompt, args.topk), args.json)


def predict_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 predict --task video-text VIDEO`: zero-shot over the model's training classes (or --labels)."""
    return zero_shot_main(argv, prog="intern2 predict")


def embed_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 embed [--videos ...] [--texts ...] --out FILE.{safetensors,npy}`."""
    parser = argparse.ArgumentParser(prog="intern2 embed", description="Normalised video and/or text embeddings "
                                     "of a video-text model, for downstream use.")
    parser.add_argument("--videos", nargs="+", default=[], help="video files or folders")
    parser.add_argument("--texts", nargs="+", default=[], help="texts (one argument each)")
    add_inference_arguments(parser)
    parser.add_argument("--out", required=True, help=".safetensors ('video', 'text' tensors; file order and texts "
                        "in the metadata) or .npy (one kind of input only; their order one per line in "
                        "OUT.files.txt or OUT.texts.txt, OUT without .npy)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npy"):
        parser.error(f"--out {out}: expected a .safetensors or .npy file name")
    output_or_exit(parser, args.out, "--out")
    if not args.videos and not args.texts:
        parser.error("nothing to embed: give --videos and/or --texts")
    if out.suffix == ".npy" and args.videos and args.texts:
        parser.error("--out .npy holds one array: embed videos and texts separately, or use .safetensors")
    if any(not _checked_text(parser, t, "--texts").strip() for t in args.texts):
        parser.error("--texts: empty text")
    files = video_files_or_exit(parser, args.videos) if args.videos else []
    pipeline = pipeline_from_args(parser, args)
    tensors, names, errors = {}, {}, []
    if files:
        tensors["video"], done, errors = pipeline.encode_videos(files)
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        if not done:
            return 1
        names["files"] = done
    if args.texts:
        tensors["text"] = pipeline.encode_texts(args.texts)
        names["texts"] = list(args.texts)
    write_arrays(out, tensors, names)
    log.info("wrote %s to %s", ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()), out)
    return 1 if errors else 0
