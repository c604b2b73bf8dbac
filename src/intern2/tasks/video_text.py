"""Video-text contrastive learning (InternVideo-MM): `intern2 train video-text`, `intern2 eval --task video-text`,
`intern2 retrieve`, `intern2 zero-shot` (also `intern2 predict --task video-text`), `intern2 embed`.

Data: a JSON-lines caption list, one ``{"path", "caption"[, "label"]}`` object per line (a video may appear on
several lines, one per caption), or ``builtin:actions`` (generated clips with captions). Evaluation reports
text-to-video and video-to-text recall at 1/5/10 and median rank, and zero-shot top-1 from class-name prompts
when the list has labels. The trained model folder holds ``tokenizer.json`` next to the weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.video import (CLIP_MEAN, CLIP_STD, FrameSampler, VideoDataset, VideoDecodeError, VideoEvalTransform,
                          VideoSource, VideoTrainTransform, collate_videos)
from ..engine import TrainConfig
from ..engine.optim import build_optimizer
from ..factory import create_model, save_pretrained
from ..models.videotext import VideoTextModel, clip_contrastive_loss
from .common import add_model_arguments, print_topk, setup_logging, train_cli
from .video_cls import BUILTIN, VIDEO_SUFFIXES, VideoDataConfig, _inference_setup, _load_views, _video_files

__all__ = ["VideoTextConfig", "VideoTextTask", "CaptionSource", "RetrievalSet", "read_captions",
           "retrieval_metrics", "evaluate_video_text", "encode_videos", "encode_texts", "zero_shot",
           "retrieve", "load_video_text", "run_video_text_demo", "train_main", "eval_main", "retrieve_main",
           "zero_shot_main", "predict_main", "embed_main"]

log = logging.getLogger(__name__)
DEFAULT_PROMPT = "a video of {}"


@dataclass(frozen=True)
class VideoTextConfig(VideoDataConfig):
    data: str = BUILTIN  # a caption list (.jsonl of {path, caption[, label]}) or builtin:actions
    model: str = "internvideo_mm_tiny"
    model_args: Optional[Dict[str, Any]] = None  # architecture overrides, e.g. {vision: videomae}
    checkpoint: Optional[str] = None  # initial weights: a model folder (its tokenizer is kept) or an official file
    # tokenizer.json or CLIP's bpe_simple_vocab_16e6.txt.gz (for an official checkpoint); default: the checkpoint
    # folder's, else trained on the captions
    tokenizer: Optional[str] = None
    vocab_size: int = 2048  # upper bound for a trained tokenizer
    prompt: str = DEFAULT_PROMPT  # zero-shot class prompt
    num_frames: Optional[int] = None  # default: the model's (8)
    img_size: Optional[int] = None  # default: the model's image_resolution
    sampling: str = "segment"  # InternVideo-MM: frames spread over the whole video
    train_scale: Tuple[float, float] = (0.8, 1.0)  # mild crops: a small one can cut out what the caption names
    flip: Optional[bool] = False  # a flip contradicts captions that say left or right
    mean: Tuple[float, float, float] = CLIP_MEAN
    std: Tuple[float, float, float] = CLIP_STD
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-4, weight_decay=0.2, warmup_steps=20))


# ------------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class CaptionSource:
    """(absolute video path, caption, label or -1) rows of a caption list, the class names, the list's name."""
    samples: Tuple[Tuple[str, str, int], ...]
    classes: Tuple[str, ...]
    name: str

    def videos(self) -> Tuple[List[str], List[int], torch.Tensor]:
        """(unique paths in first-seen order, their labels, index of each caption's video)."""
        order: Dict[str, int] = {}
        labels: List[int] = []
        for path, _, label in self.samples:
            if path not in order:
                order[path] = len(order)
                labels.append(label)
        return list(order), labels, torch.tensor([order[path] for path, _, _ in self.samples])


def read_captions(path, root=None, classes: Optional[Sequence[str]] = None) -> CaptionSource:
    """Read a JSON-lines caption list. Paths are relative to ``root`` (default: the list's folder); a label is a
    class name or index into ``classes`` (default: ``classes.txt`` next to the list, else the sorted label
    names). Lines without a label get -1 (no zero-shot evaluation for them)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"captions {path}: no such file")
    root = Path(root) if root is not None else path.parent
    if classes is None and (path.parent / "classes.txt").is_file():
        classes = [c.strip() for c in (path.parent / "classes.txt").read_text().splitlines() if c.strip()]
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"captions {path}: line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or \
                not isinstance(row.get("caption"), str) or not row["caption"].strip():
            raise ValueError(f"captions {path}: line {number}: expected {{\"path\": str, \"caption\": non-empty "
                             f"str[, \"label\": name or index]}}, got {line[:120]!r}")
        rows.append((number, row["path"], row["caption"].strip(), row.get("label")))
    if not rows:
        raise ValueError(f"captions {path}: no captions listed")
    if classes is None:
        classes = sorted({str(label) for *_, label in rows if isinstance(label, str)})
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for number, file, caption, label in rows:
        target = -1 if label is None else index.get(label, label if isinstance(label, int) else None)
        if target is None or not -1 <= target < len(classes):
            raise ValueError(f"captions {path}: line {number}: label {label!r} is neither a class name nor an "
                             f"index into {len(classes)} classes {list(classes)[:10]}")
        samples.append((str(root / file), caption, target))
    if not any(Path(file).exists() for file, _, _ in samples):
        raise ValueError(f"captions {path}: none of the listed videos exist under {root} (first: "
                         f"{samples[0][0]}); is the root right?")
    return CaptionSource(tuple(samples), tuple(classes), str(path))


def open_caption_sources(cfg: VideoTextConfig) -> Tuple[CaptionSource, Optional[CaptionSource]]:
    """(train, val or None); ``builtin:actions`` is generated on first use. A ``train*.jsonl`` list finds its
    ``val*.jsonl`` sibling."""
    if cfg.data == BUILTIN:
        from ..data.actions import builtin_actions_root
        root = builtin_actions_root()
        return read_captions(root / "train_captions.jsonl"), read_captions(root / "val_captions.jsonl")
    if cfg.data.startswith("builtin:"):
        raise ValueError(f"data: unknown built-in dataset {cfg.data!r}; the built-in video dataset is {BUILTIN}")
    train = read_captions(cfg.data, cfg.root)
    val_path = cfg.val_data
    sibling = Path(cfg.data).parent / Path(cfg.data).name.replace("train", "val", 1)
    if val_path is None and Path(cfg.data).name.startswith("train") and sibling.is_file():
        val_path = str(sibling)
    return train, (read_captions(val_path, cfg.root, train.classes) if val_path else None)


def _video_source(paths: Sequence[str], labels: Sequence[int], name: str) -> VideoSource:
    return VideoSource(tuple((p, max(label, 0)) for p, label in zip(paths, labels)), (), name)


class CaptionedVideos(Dataset):
    """Training pairs: the clip of caption ``i`` (random frames and crop) and its token ids."""

    def __init__(self, source: CaptionSource, tokens: torch.Tensor, sampler: FrameSampler,
                 transform: VideoTrainTransform, seed: int):
        self.tokens = tokens
        self.videos = VideoDataset(_video_source([p for p, _, _ in source.samples],
                                                 [label for *_, label in source.samples], source.name),
                                   sampler, transform, train=True, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.videos.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        sample = self.videos[index]
        return None if sample is None else {**sample, "text": self.tokens[index]}


def collate_captioned(samples: List[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """:func:`collate_videos` plus the stacked token ids of the readable clips."""
    batch = collate_videos(samples)
    good = [s["text"] for s in samples if s is not None]
    batch["text"] = torch.stack(good) if good else torch.zeros(0, 1, dtype=torch.long)
    return batch


@dataclass
class RetrievalSet:
    """Evaluation data: each video once (test views), every caption, and which video each caption describes."""
    videos: VideoDataset
    captions: List[str]
    text_to_video: torch.Tensor
    labels: List[int]
    classes: Tuple[str, ...]

    @classmethod
    def build(cls, source: CaptionSource, sampler: FrameSampler, transform: VideoEvalTransform,
              clips: int = 1) -> "RetrievalSet":
        paths, labels, text_to_video = source.videos()
        videos = VideoDataset(_video_source(paths, labels, source.name), sampler, transform, train=False,
                              num_clips=clips)
        return cls(videos, [c for _, c, _ in source.samples], text_to_video, labels, source.classes)

    def __len__(self) -> int:
        return len(self.videos)


# ------------------------------------------------------------------------------------------------------- metrics
def retrieval_metrics(similarity: torch.Tensor, text_to_video: torch.Tensor) -> Dict[str, float]:
    """Recall@1/5/10 (%), median and mean rank in both directions from a (texts, videos) similarity matrix.

    Text-to-video ranks each caption's video among all videos; video-to-text ranks a video's best-placed
    caption among all captions (the convention for several captions per video). Videos without a caption are
    left out of video-to-text.
    """
    similarity = similarity.float()
    texts = torch.arange(similarity.shape[0])
    correct = similarity[texts, text_to_video]
    t2v = (similarity > correct[:, None]).sum(1) + 1
    matches = torch.zeros_like(similarity, dtype=torch.bool)
    matches[texts, text_to_video] = True
    has_text = matches.any(0)
    best = similarity.masked_fill(~matches, float("-inf")).max(0).values
    v2t = ((similarity > best[None]).sum(0) + 1)[has_text]
    out = {}
    for name, ranks in (("t2v", t2v), ("v2t", v2t)):
        ranks = ranks.float()
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * (ranks <= k).float().mean().item()
        out[f"{name}_median_rank"] = ranks.median().item()
        out[f"{name}_mean_rank"] = ranks.mean().item()
    return out


def _unwrap(model: nn.Module) -> VideoTextModel:
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


def _encode_views(model: VideoTextModel, views: torch.Tensor) -> torch.Tensor:
    """(B, V, C, T, H, W) test views -> normalised view-averaged features (B, D)."""
    features = model.encode_video(views.flatten(0, 1), normalize=True).float()
    return F.normalize(features.view(*views.shape[:2], -1).mean(1), dim=-1)


@torch.no_grad()
def evaluate_video_text(model: nn.Module, data: RetrievalSet, tokenizer, prompt: str = DEFAULT_PROMPT,
                        batch_size: int = 16, device: Optional[torch.device] = None,
                        num_workers: int = 0) -> Dict[str, float]:
    """Retrieval recalls / ranks over ``data`` and, when it has labels, zero-shot top-1 from class prompts;
    chance levels are reported alongside. Unreadable videos get a zero feature (never retrieved)."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    video_features = torch.zeros(len(data.videos), model.embed_dim, device=device)
    readable = torch.zeros(len(data.videos), dtype=torch.bool)
    loader = DataLoader(data.videos, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_videos)
    for batch in loader:
        if batch["index"].numel():
            video_features[batch["index"].to(device)] = _encode_views(model, batch["video"].to(device))
            readable[batch["index"]] = True
    text_features = encode_texts(model, tokenizer, data.captions, device=device)
    metrics = retrieval_metrics((text_features @ video_features.t()).cpu(), data.text_to_video)
    metrics.update(chance_t2v_r1=100.0 / len(data.videos), videos=len(data.videos), captions=len(data.captions),
                   skipped=int((~readable).sum()))
    labels = torch.tensor(data.labels)
    labelled = (labels >= 0) & readable
    if data.classes and labelled.any():
        class_features = encode_texts(model, tokenizer, [prompt.format(c) for c in data.classes], device=device)
        predicted = (video_features @ class_features.t()).argmax(-1).cpu()
        metrics["zero_shot_top1"] = 100.0 * (predicted[labelled] == labels[labelled]).float().mean().item()
        metrics["chance_zero_shot"] = 100.0 / len(data.classes)
    model.train(was_training)
    return metrics


# ------------------------------------------------------------------------------------------------------- task
def _model_config(cfg: VideoTextConfig) -> Dict[str, Any]:
    """The architecture config of ``cfg.model`` with its overrides, from a parameter-free meta build."""
    with torch.device("meta"):
        model = create_model(cfg.model, **(cfg.model_args or {}))
    if not isinstance(model, VideoTextModel):
        raise ValueError(f"model: {cfg.model} is not a video-text model (use internvideo_mm_*)")
    return model.config


class VideoTextTask:
    """Symmetric InfoNCE between clips and their captions (features gathered over DDP ranks)."""

    def __init__(self, cfg: VideoTextConfig):
        from ..text.bpe import BPETokenizer
        if "{}" not in cfg.prompt:
            raise ValueError(f"prompt {cfg.prompt!r}: needs a '{{}}' where the class name goes")
        arch = _model_config(cfg)
        # The frame count and size the config leaves open are the model's.
        cfg = dataclasses.replace(cfg, num_frames=cfg.num_frames or arch["num_frames"],
                                  img_size=cfg.img_size or arch["image_resolution"])
        self.cfg = cfg
        self.train_source, val_source = open_caption_sources(cfg)
        self.classes = self.train_source.classes
        context = arch["context_length"]
        folder = Path(cfg.checkpoint) if cfg.checkpoint else None
        if cfg.tokenizer:
            self.tokenizer = BPETokenizer.from_file(cfg.tokenizer, context)
        elif folder is not None and folder.is_dir():
            self.tokenizer = BPETokenizer.from_file(folder, context)  # the checkpoint's vocabulary
        else:
            texts = [c for _, c, _ in self.train_source.samples] + list(self.classes) + \
                [cfg.prompt.format(c) for c in self.classes]
            self.tokenizer = BPETokenizer.train(texts, cfg.vocab_size, context)
            log.info("trained a %d-token BPE tokenizer on %d captions", self.tokenizer.vocab_size, len(texts))
        sampler = FrameSampler(cfg.num_frames, cfg.stride, cfg.sampling)
        transform = VideoTrainTransform(cfg.img_size, tuple(cfg.train_scale), flip=bool(cfg.flip), mean=cfg.mean,
                                        std=cfg.std)
        tokens = self.tokenizer([c for _, c, _ in self.train_source.samples])
        self._train_set = CaptionedVideos(self.train_source, tokens, sampler, transform, cfg.train.seed)
        self._eval_set = None
        if val_source is not None:
            self._eval_set = RetrievalSet.build(
                val_source, sampler, VideoEvalTransform(cfg.img_size, num_crops=cfg.test_crops, mean=cfg.mean,
                                                        std=cfg.std), cfg.test_clips)
        self.skipped = 0

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        model = create_model(cfg.model, **{"num_frames": cfg.num_frames, "image_resolution": cfg.img_size,
                                           "vocab_size": self.tokenizer.vocab_size,
                                           "context_length": self.tokenizer.context_length,
                                           **(cfg.model_args or {})})
        if cfg.checkpoint:
            from ..checkpoint import load_checkpoint
            load_checkpoint(model, cfg.checkpoint)
        return model

    def train_dataset(self) -> Dataset:
        return self._train_set

    def eval_dataset(self) -> Optional[RetrievalSet]:
        return self._eval_set

    def collate(self, samples):
        return collate_captioned(samples)

    def training_step(self, model: nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        self.skipped += batch["skipped"]
        if batch["video"].shape[0] == 0:  # every clip of the batch was unreadable
            return sum(p.sum() * 0 for p in model.parameters()), {"skipped_videos": self.skipped}
        video, text, scale = model(batch["video"], batch["text"])
        loss, scalars = clip_contrastive_loss(video, text, scale)
        return loss, {**scalars, "skipped_videos": self.skipped}

    def evaluate(self, model: nn.Module, dataset: RetrievalSet, batch_size: int,
                 device: torch.device) -> Dict[str, float]:
        return evaluate_video_text(model, dataset, self.tokenizer, self.cfg.prompt, batch_size, device,
                                   self.cfg.train.num_workers)

    def save_model(self, model: nn.Module, directory: Path) -> None:
        cfg = self.cfg
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "file": None,
                                "label_names": list(self.classes), "prompt": cfg.prompt,
                                "input_size": (3, cfg.num_frames, cfg.img_size, cfg.img_size),
                                "mean": tuple(cfg.mean), "std": tuple(cfg.std), "num_frames": cfg.num_frames,
                                "stride": cfg.stride, "sampling": cfg.sampling, "test_clips": cfg.test_clips,
                                "test_crops": cfg.test_crops}
        save_pretrained(model, directory)
        self.tokenizer.save(directory)


# ------------------------------------------------------------------------------------------------------- inference
def load_video_text(checkpoint: Optional[str], model_name: Optional[str] = None, tokenizer: Optional[str] = None):
    """(model in eval mode, tokenizer) from a model folder written by training (its ``tokenizer.json``), or from
    ``model_name`` + a weight file + ``tokenizer`` (a ``tokenizer.json``, or CLIP's merges file for an official
    checkpoint)."""
    from ..text.bpe import BPETokenizer
    from .common import load_model
    model = load_model(checkpoint, model_name)
    if not isinstance(model, VideoTextModel):
        raise ValueError(f"{checkpoint or model_name}: not a video-text model (train one with "
                         f"'intern2 train video-text')")
    source = tokenizer or (checkpoint if checkpoint and Path(checkpoint).is_dir() else None)
    if source is None:
        raise ValueError("--tokenizer is required unless --checkpoint is a model folder holding tokenizer.json "
                         "(for an official checkpoint: CLIP's bpe_simple_vocab_16e6.txt.gz, which intern2 does not "
                         "download)")
    return model, BPETokenizer.from_file(source, model.context_length)


@torch.no_grad()
def encode_videos(model: nn.Module, files: Sequence[str]) -> Tuple[torch.Tensor, List[str], List[str]]:
    """Normalised video features (N, D) float32 of the readable files, sampled and cropped as the model was
    trained; returns (features, files read, error messages of the unreadable ones)."""
    model = _unwrap(model)
    sampler, transform, clips = _inference_setup(model)
    device = next(model.parameters()).device
    features, done, errors = [], [], []
    for file in files:
        try:
            views = _load_views(file, sampler, transform, clips)
        except VideoDecodeError as exc:
            errors.append(str(exc))
            continue
        features.append(_encode_views(model, views[None].to(device))[0])
        done.append(file)
    return (torch.stack(features) if features else torch.zeros(0, model.embed_dim)), done, errors


def zero_shot(model: nn.Module, tokenizer, files: Sequence[str], labels: Sequence[str],
              prompt: str = DEFAULT_PROMPT, topk: int = 5) -> List[Dict[str, Any]]:
    """Per video, the labels ranked by the similarity of the clip to ``prompt.format(label)`` (softmax over the
    labels at the model's logit scale); an unreadable file gets an 'error' entry."""
    features, done, errors = encode_videos(model, files)
    scale = _unwrap(model).logit_scale.exp().clamp(max=100.0).item()
    probs = (scale * features @ encode_texts(model, tokenizer, [prompt.format(l) for l in labels]).t()).softmax(-1)
    rows, messages = dict(zip(done, probs)), iter(errors)  # errors come in the order of the failed files
    results = []
    for file in files:
        if file not in rows:
            results.append({"file": file, "error": next(messages)})
            continue
        values, indices = rows[file].topk(min(topk, len(labels)))
        results.append({"file": file, "top": [{"label": labels[i], "prob": round(float(p), 6)}
                                              for p, i in zip(values.tolist(), indices.tolist())]})
    return results


def retrieve(model: nn.Module, tokenizer, files: Sequence[str], query: str,
             topk: int = 5) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The ``topk`` videos most similar to the text ``query`` ([{file, score}], best first) and the error
    messages of unreadable files."""
    if not query.strip():
        raise ValueError("the query is empty")
    features, done, errors = encode_videos(model, files)
    scores = (features @ encode_texts(model, tokenizer, [query])[0]).tolist()
    ranked = sorted(zip(done, scores), key=lambda item: -item[1])[:topk]
    return [{"file": f, "score": round(s, 6)} for f, s in ranked], errors


# ------------------------------------------------------------------------------------------------------------ demo
def run_video_text_demo(out_dir: Path, seconds: float = 120, batch_size: int = 32, num_frames: int = 8,
                        lr: float = 2e-3, model_args: Optional[Dict[str, Any]] = None,
                        seed: int = 0) -> Dict[str, Any]:
    """Train ``internvideo_mm_tiny`` on the built-in captioned action clips for about ``seconds`` (wall clock,
    data preparation and evaluation included) and evaluate on their validation split.

    The training clips are decoded and augmented once and kept in memory, and the learning rate follows a
    warmup + cosine schedule over the time budget rather than a step count, so the run ends on time whatever the
    machine's load. Returns text-to-video R@1/R@5 and video-to-text R@1 with their chance level (1 / number of
    videos), zero-shot top-1 from "a video of {class}" prompts with its chance level (1 / number of classes),
    the steps and epochs run, and the folder of the trained model (with its tokenizer).
    """
    started = time.perf_counter()
    deadline = started + seconds
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    task = VideoTextTask(VideoTextConfig(num_frames=num_frames, model_args=model_args,
                                         train=TrainConfig(batch_size=batch_size, seed=seed)))
    samples = [task.train_dataset()[i] for i in range(len(task.train_dataset()))]
    model = task.build_model().train()
    optimizer = build_optimizer(model, lr, weight_decay=0.2)
    # Evaluation decodes the validation clips (budgeted like the training clips' decoding) and encodes them.
    eval_reserve = (time.perf_counter() - started) * len(task.eval_dataset()) / len(samples) + 0.05 * seconds
    train_end = deadline - eval_reserve
    train_start = time.perf_counter()
    log.info("video-text demo: %d clips decoded in %.1f s; training for %.0f s", len(samples),
             train_start - started, train_end - train_start)
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    while time.perf_counter() < train_end:
        order = torch.randperm(len(samples), generator=generator).tolist()
        for first in range(0, len(order) - batch_size + 1, batch_size):
            progress = (time.perf_counter() - train_start) / max(train_end - train_start, 1e-6)
            if progress >= 1:
                break
            factor = min(1.0, (steps + 1) / 10) * 0.5 * (1 + math.cos(math.pi * progress))  # warmup + cosine
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            batch = collate_captioned([samples[i] for i in order[first:first + batch_size]])
            loss, _ = task.training_step(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            steps += 1
    log.info("video-text demo: %d steps; evaluating", steps)
    metrics = task.evaluate(model, task.eval_dataset(), batch_size, torch.device("cpu"))
    task.save_model(model.eval(), out_dir / "model")
    keys = ("t2v_r1", "t2v_r5", "t2v_median_rank", "v2t_r1", "chance_t2v_r1", "zero_shot_top1", "chance_zero_shot")
    return {**{k: metrics[k] for k in keys if k in metrics}, "steps": steps,
            "epochs": round(steps * batch_size / len(samples), 2), "seconds": round(time.perf_counter() - started, 1),
            "model_dir": str(out_dir / "model")}


# ------------------------------------------------------------------------------------------------------------ CLI
def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "video-text", "Train a video-text dual encoder (contrastive, InternVideo-MM).",
                     VideoTextConfig, VideoTextTask, "caption list (.jsonl of {path, caption[, label]}) or "
                     "builtin:actions", "internvideo_mm_tiny")


def _add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--tokenizer", help="tokenizer.json, or CLIP's bpe_simple_vocab_16e6.txt.gz for an official "
                        "InternVideo-MM checkpoint (default: the --checkpoint folder's tokenizer.json)")


def _load(parser: argparse.ArgumentParser, args: argparse.Namespace):
    setup_logging()
    try:
        return load_video_text(args.checkpoint, args.model, args.tokenizer)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as exc:
        parser.error(str(exc))


def _files_or_error(parser: argparse.ArgumentParser, paths: Sequence[str]) -> List[str]:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    files = _video_files(paths)
    if not files:
        parser.error(f"no video files found in {', '.join(paths)} (extensions: {', '.join(VIDEO_SUFFIXES)})")
    return files


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 eval", description="Evaluate a video-text model: retrieval "
                                     "recall and median rank, zero-shot top-1.")
    parser.add_argument("--data", required=True, help="caption list (.jsonl), or builtin:actions (its val split)")
    parser.add_argument("--root", help="folder the list's paths are relative to (default: the list's folder)")
    _add_inference_arguments(parser)
    parser.add_argument("--prompt", help="zero-shot prompt (default: as trained, else 'a video of {}')")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    model, tokenizer = _load(parser, args)
    try:
        if args.data == BUILTIN:
            from ..data.actions import builtin_actions_root
            source = read_captions(builtin_actions_root() / "val_captions.jsonl")
        else:
            source = read_captions(args.data, args.root, model.pretrained_cfg.get("label_names") or None)
    except ValueError as exc:
        parser.error(str(exc))
    sampler, transform, clips = _inference_setup(model)
    prompt = args.prompt or model.pretrained_cfg.get("prompt", DEFAULT_PROMPT)
    metrics = evaluate_video_text(model, RetrievalSet.build(source, sampler, transform, clips), tokenizer, prompt,
                                  args.batch_size)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{source.name}: text->video R@1 {metrics['t2v_r1']:.1f} R@5 {metrics['t2v_r5']:.1f} "
              f"R@10 {metrics['t2v_r10']:.1f} MdR {metrics['t2v_median_rank']:.0f}; video->text R@1 "
              f"{metrics['v2t_r1']:.1f} R@5 {metrics['v2t_r5']:.1f} R@10 {metrics['v2t_r10']:.1f} MdR "
              f"{metrics['v2t_median_rank']:.0f}" + (f"; zero-shot top-1 {metrics['zero_shot_top1']:.1f}"
                                                     if "zero_shot_top1" in metrics else ""))
    return 0


def retrieve_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 retrieve --videos DIR --query TEXT`."""
    parser = argparse.ArgumentParser(prog="intern2 retrieve", description="Rank videos by similarity to a text.")
    parser.add_argument("--videos", nargs="+", required=True, help="video files or folders")
    parser.add_argument("--query", required=True, help="what to look for, e.g. 'a red circle moves left'")
    _add_inference_arguments(parser)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    if not args.query.strip():
        parser.error("--query is empty: give the text to search for")
    files = _files_or_error(parser, args.videos)
    model, tokenizer = _load(parser, args)
    ranked, errors = retrieve(model, tokenizer, files, args.query, args.topk)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps(ranked, indent=2))
    else:
        for rank, item in enumerate(ranked, 1):
            print(f"{rank}. {item['file']} ({item['score']:.3f})")
    return 0 if ranked else 1


def zero_shot_main(argv: Optional[List[str]] = None, prog: str = "intern2 zero-shot") -> int:
    """`intern2 zero-shot VIDEO --labels a,b,c` (without --labels: the classes the model was trained with)."""
    parser = argparse.ArgumentParser(prog=prog, description="Classify videos against free-text labels (no "
                                     "training).")
    parser.add_argument("videos", nargs="+", help="video files or folders")
    parser.add_argument("--labels", help="comma-separated class names, e.g. 'moving left,moving up' (default: "
                        "the class names of the model's training list)")
    parser.add_argument("--prompt", help="prompt template (default: as trained, else 'a video of {}')")
    _add_inference_arguments(parser)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    if args.prompt is not None and "{}" not in args.prompt:
        parser.error(f"--prompt {args.prompt!r}: needs a '{{}}' where the label goes")
    files = _files_or_error(parser, args.videos)
    model, tokenizer = _load(parser, args)
    if args.labels is None:
        labels = list(model.pretrained_cfg.get("label_names") or [])
        if len(labels) < 2:
            parser.error("--labels is required: the model records no class names of its own")
    else:
        labels = [label.strip() for label in args.labels.split(",") if label.strip()]
        if len(labels) < 2:
            parser.error(f"--labels {args.labels!r}: give at least two comma-separated class names")
    prompt = args.prompt or model.pretrained_cfg.get("prompt", DEFAULT_PROMPT)
    return print_topk(zero_shot(model, tokenizer, files, labels, prompt, args.topk), args.json)


def predict_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 predict --task video-text VIDEO`: zero-shot over the model's training classes (or --labels)."""
    return zero_shot_main(argv, prog="intern2 predict")


def embed_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 embed [--videos ...] [--texts ...] --out FILE.{safetensors,npy}`."""
    parser = argparse.ArgumentParser(prog="intern2 embed", description="Normalised video and/or text embeddings "
                                     "of a video-text model, for downstream use.")
    parser.add_argument("--videos", nargs="+", default=[], help="video files or folders")
    parser.add_argument("--texts", nargs="+", default=[], help="texts (one argument each)")
    _add_inference_arguments(parser)
    parser.add_argument("--out", required=True, help=".safetensors ('video', 'text' tensors; file order and texts "
                        "in the metadata) or .npy (one kind of input only; file order in <out>.files.txt)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npy"):
        parser.error(f"--out {out}: expected a .safetensors or .npy file name")
    if not args.videos and not args.texts:
        parser.error("nothing to embed: give --videos and/or --texts")
    if out.suffix == ".npy" and args.videos and args.texts:
        parser.error("--out .npy holds one array: embed videos and texts separately, or use .safetensors")
    if any(not t.strip() for t in args.texts):
        parser.error("--texts: empty text")
    files = _files_or_error(parser, args.videos) if args.videos else []
    model, tokenizer = _load(parser, args)
    tensors, metadata = {}, {}
    if files:
        tensors["video"], done, errors = encode_videos(model, files)
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        if not done:
            return 1
        metadata["files"] = json.dumps(done)
    if args.texts:
        tensors["text"] = encode_texts(model, tokenizer, args.texts).cpu()
        metadata["texts"] = json.dumps(args.texts)
    from ..checkpoint import atomic_write
    if out.suffix == ".npy":
        import numpy as np
        (kind, array), = tensors.items()
        atomic_write(out, lambda tmp: np.save(open(tmp, "wb"), array.numpy()))
        names = json.loads(metadata["files" if kind == "video" else "texts"])
        atomic_write(out.with_suffix(".files.txt" if kind == "video" else ".texts.txt"),
                     lambda tmp: Path(tmp).write_text("\n".join(names) + "\n"))
    else:
        from safetensors.torch import save_file
        atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata))
    log.info("wrote %s to %s", ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()), out)
    return 1 if files and errors else 0
