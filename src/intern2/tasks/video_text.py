"""Video-text contrastive learning (InternVideo-MM): `intern2 train video-text` and `intern2 eval --task
video-text` (inference: :mod:`intern2.pipelines.video_text`: `retrieve`, `zero-shot`, `embed`).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..constants import CLIP_MEAN, CLIP_STD
from ..data import read_text
from ..data.video import (
    FrameSampler,
    VideoDataset,
    VideoEvalTransform,
    VideoSource,
    VideoTrainTransform,
    collate_videos,
)
from ..engine import TrainConfig
from ..factory import create_model, save_pretrained
from ..models.videotext import VideoTextModel, clip_contrastive_loss
from ..pipelines.common import positive
from ..pipelines.video_text import (
    DEFAULT_PROMPT,
    VideoTextPipeline,
    add_inference_arguments,
    check_prompt,
    encode_texts,
    encode_views,
    pipeline_from_args,
)
from ..weights import VideoTextProtocol, trained_cfg
from .common import train_cli
from .video_cls import BUILTIN, VideoDataConfig, video_protocol

__all__ = ["VideoTextConfig", "VideoTextTask", "CaptionSource", "RetrievalSet", "read_captions",
           "retrieval_metrics", "evaluate_video_text", "train_main", "eval_main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoTextConfig(VideoDataConfig):
    data: str = BUILTIN  # a caption list (.jsonl of {path, caption[, label]}) or builtin:actions
    val_data: Optional[str] = None  # default: val*.jsonl beside a train*.jsonl `data` (the same name), else no eval
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

    def __post_init__(self):
        super().__post_init__()
        if self.vocab_size < 258:  # the 256 bytes and the two specials; fewer would be raised silently
            raise ValueError(f"vocab_size: expected at least 258 (256 bytes + 2 special tokens), got {self.vocab_size}")


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
        classes = [c.strip() for c in read_text(path.parent / "classes.txt").splitlines() if c.strip()]
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
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
                 transform: VideoTrainTransform, seed: int, cache: bool = False):
        self.tokens = tokens
        self.videos = VideoDataset(_video_source([p for p, _, _ in source.samples],
                                                 [label for *_, label in source.samples], source.name),
                                   sampler, transform, train=True, seed=seed, cache=cache)

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


@torch.no_grad()
def evaluate_video_text(model: nn.Module, data: RetrievalSet, tokenizer, prompt: str = DEFAULT_PROMPT,
                        batch_size: int = 16, device: Optional[torch.device] = None,
                        num_workers: int = 0) -> Dict[str, float]:
    """Retrieval recalls / ranks over ``data`` and, when it has labels, zero-shot top-1 from class prompts;
    chance levels are reported alongside. Unreadable videos get a zero feature (never retrieved)."""
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    video_features = torch.zeros(len(data.videos), model.embed_dim, device=device)
    readable = torch.zeros(len(data.videos), dtype=torch.bool)
    loader = DataLoader(data.videos, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_videos)
    for batch in loader:
        if batch["index"].numel():
            video_features[batch["index"].to(device)] = encode_views(model, batch["video"].to(device))
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

    # Fields a resumed run may change: the evaluation's data, resize and zero-shot prompt (the checkpoint folder
    # also gives the tokenizer: not resumable).
    resume_may_change = frozenset({"val_data", "short_side", "prompt"})

    def __init__(self, cfg: VideoTextConfig):
        from ..text.bpe import BPETokenizer
        check_prompt(cfg.prompt)
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
        self._train_set = CaptionedVideos(self.train_source, tokens, sampler, transform, cfg.train.seed,
                                          cfg.cache_clips)
        self._eval_set = None
        if val_source is not None:
            self._eval_set = RetrievalSet.build(
                val_source, sampler, VideoEvalTransform(cfg.img_size, cfg.short_side, cfg.test_crops, cfg.mean,
                                                        cfg.std), cfg.test_clips)
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
        model.pretrained_cfg = trained_cfg(getattr(model, "pretrained_cfg", {}), {
            "label_names": list(self.classes), "prompt": self.cfg.prompt,
            **video_protocol(self.cfg, VideoTextProtocol).to_cfg()})
        save_pretrained(model, directory)
        self.tokenizer.save(directory)


# ------------------------------------------------------------------------------------------------------------ CLI
def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "video-text", "Train a video-text dual encoder (contrastive, InternVideo-MM).",
                     VideoTextConfig, VideoTextTask, "caption list (.jsonl of {path, caption[, label]}) or "
                     "builtin:actions", "internvideo_mm_tiny")


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 eval", description="Evaluate a video-text model: retrieval "
                                     "recall and median rank, zero-shot top-1.")
    parser.add_argument("--data", required=True, help="caption list (.jsonl), or builtin:actions (its val split)")
    parser.add_argument("--root", help="folder the list's paths are relative to (default: the list's folder)")
    add_inference_arguments(parser)
    parser.add_argument("--prompt", help="zero-shot prompt (default: as trained, else 'a video of {}')")
    parser.add_argument("--batch-size", type=positive(int), default=8)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    try:
        if args.prompt is not None:
            check_prompt(args.prompt, "--prompt")
    except ValueError as exc:
        parser.error(str(exc))
    pipeline: VideoTextPipeline = pipeline_from_args(parser, args)
    try:
        if args.data == BUILTIN:
            from ..data.actions import builtin_actions_root
            source = read_captions(builtin_actions_root() / "val_captions.jsonl")
        else:
            source = read_captions(args.data, args.root, pipeline.class_names or None)
    except ValueError as exc:
        parser.error(str(exc))
    data = RetrievalSet.build(source, pipeline.sampler, pipeline.transform, pipeline.protocol.test_clips)
    metrics = evaluate_video_text(pipeline.model, data, pipeline.tokenizer, args.prompt or pipeline.prompt,
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
