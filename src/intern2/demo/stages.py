"""The stages of `intern2 demo`. Each trains a shipped recipe (:mod:`intern2.recipes`) through the normal
:class:`~intern2.engine.Trainer`, for the recipe's steps times ``budget``, and reads its examples back through the
pipelines, as `intern2 train` and `intern2 predict` would.

A stage returns a JSON-ready dict: ``figures`` (each a value next to a baseline measured in the same run, and what
that baseline is), ``check`` (the sentence its pass/fail ``ok`` tests), ``runs`` (folders whose metrics.jsonl the
report plots), ``pictures`` and ``tables``. Every path is relative to the demo's output folder, so the folder can
be moved or published as it is.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from ..config import load_config, to_dict
from ..engine import Trainer
from ..engine.trainer import accumulate_eval
from ..ops import dcnv3
from ..recipes import get_recipe

__all__ = ["STAGES", "Stage", "figure"]

log = logging.getLogger("intern2.demo")
CPU = torch.device("cpu")


@dataclasses.dataclass
class Stage:
    """Where a stage writes (``folder``, inside the demo's ``root``), how much it trains (``budget`` times each
    recipe's steps or epochs), and what the stages before it produced (``done``: name -> result)."""
    root: Path
    folder: Path
    budget: float
    done: Dict[str, Dict[str, Any]]
    options: Dict[str, Any]

    def relative(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def configure(self, recipe_name: str, config_cls: type, run: str, **fields: Any):
        """The recipe's config, its steps (or epochs) scaled by the budget, writing to ``folder/run``; ``fields``
        replace top-level config fields."""
        recipe = get_recipe(recipe_name)
        cfg = load_config(config_cls, base=recipe.config, base_name=f"recipe {recipe_name}")
        train = cfg.train
        if train.max_steps:
            steps = max(1, round(train.max_steps * self.budget))
            train = dataclasses.replace(train, max_steps=steps, eval_every=steps)
        else:
            train = dataclasses.replace(train, epochs=max(1, round(train.epochs * self.budget)))
        train = dataclasses.replace(train, out_dir=str(self.folder / run), device="cpu")
        return dataclasses.replace(cfg, **fields, train=train)

    def fit(self, task: Any, cfg: Any) -> Dict[str, Any]:
        """Train ``task`` with the Trainer; its final evaluation."""
        return Trainer(task, cfg.train, config_to_save=to_dict(cfg)).fit()


def figure(name: str, value: Any, baseline: Any = None, baseline_is: Optional[str] = None,
           unit: str = "") -> Dict[str, Any]:
    """One row of a stage's figures."""
    return {"name": name, "value": value, "baseline": baseline, "baseline_is": baseline_is, "unit": unit}


def _untrained_metrics(task: Any, batch_size: int) -> Dict[str, Any]:
    """The task's evaluation of a freshly initialised (seeded) model: the baseline of what training bought."""
    torch.manual_seed(0)
    model = task.build_model().eval()
    dataset = task.eval_dataset()
    if hasattr(task, "evaluate"):
        return task.evaluate(model, dataset, batch_size, CPU)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=task.collate)
    return task.summarize({k: v.cpu() for k, v in accumulate_eval(model, loader, task.eval_step, CPU).items()})


# ------------------------------------------------------------------------------------------------------ pictures
def _label(image: Image.Image, text: str, colour: str = "black") -> Image.Image:
    """``image`` with ``text`` on a white band below it."""
    band = 14
    out = Image.new("RGB", (image.width, image.height + band), "white")
    out.paste(image, (0, 0))
    ImageDraw.Draw(out).text((2, image.height + 1), text, fill=colour)
    return out


def _row(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Images side by side, top-aligned, on white."""
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(i.height for i in images)), "white")
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width + gap
    return out


def frame_strip(path: str, frames: int = 8, scale: int = 2) -> Image.Image:
    """``frames`` evenly spaced frames of a video side by side, enlarged ``scale`` times."""
    from ..data.video import read_video
    video = read_video(path, lambda total: np.linspace(0, total - 1, frames).round().astype(int).tolist())
    strip = Image.fromarray(np.concatenate(list(video.numpy()), axis=1))
    return strip.resize((strip.width * scale, strip.height * scale), Image.NEAREST)


def _stack(top: Image.Image, bottom: Image.Image, gap: int = 2) -> Image.Image:
    """Two images one above the other, left-aligned, on white."""
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + gap + bottom.height), "white")
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height + gap))
    return out


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


# -------------------------------------------------------------------------------------------------------- stages
def _stage_inputs(batch: int, size: int, channels: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    inp = torch.randn(batch, size, size, channels, generator=gen)
    offset = torch.rand(batch, size, size, group * 18, generator=gen) * 4 - 2
    mask = torch.randn(batch, size, size, group, 9, generator=gen).softmax(-1).flatten(3)
    return inp, offset, mask


def check_paths(impls: List[str]) -> Dict[str, float]:
    """Max |difference| of each path's output and gradients to the reference (InternImage-T stage 2 shape)."""
    tensors = _stage_inputs(2, 28, 128, 8)
    cotangent = torch.randn(2, 28, 28, 128, generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ["reference", *impls]:
        device = "cuda" if impl == "triton" else "cpu"
        leaves = [t.to(device).requires_grad_() for t in tensors]
        out = dcnv3(*leaves, 3, 1, 1, 1, 8, impl=impl)
        results[impl] = [t.cpu() for t in (out, *torch.autograd.grad(out, leaves, cotangent.to(device)))]
    return {impl: max((a - b).abs().max().item() for a, b in zip(results[impl], results["reference"]))
            for impl in impls}


def time_paths(rounds: int) -> Dict[str, float]:
    """Median forward+backward milliseconds of 'fast' and 'reference' (InternImage-T stage 1, batch 2)."""
    tensors = _stage_inputs(2, 56, 64, 4)
    grad = torch.randn(2, 56, 56, 64, generator=torch.Generator().manual_seed(2))
    times: Dict[str, List[float]] = {"reference": [], "fast": []}
    for _ in range(rounds + 1):  # the first round warms up (and compiles the numba kernels if not cached)
        for impl in times:
            leaves = [t.clone().requires_grad_() for t in tensors]
            start = time.perf_counter()
            torch.autograd.grad(dcnv3(*leaves, 3, 1, 1, 1, 4, impl=impl), leaves, grad)
            times[impl].append((time.perf_counter() - start) * 1e3)
    return {impl: statistics.median(ts[1:]) for impl, ts in times.items()}


def _blob_images(batch: int, channels: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random textures: sums of Gaussian blobs, NCHW."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    images = torch.zeros(batch, channels, size, size)
    for _ in range(24):
        cy, cx = torch.rand(2, batch, channels, 1, 1, generator=gen) * size
        sigma = 2.0 + 3.0 * torch.rand(batch, channels, 1, 1, generator=gen)
        amp = torch.randn(batch, channels, 1, 1, generator=gen)
        images += amp * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
    return images


def recover_displacement(steps: int, size: int = 32, seed: int = 0) -> Dict[str, Any]:
    """Fit free DCNv3 offsets (1x1 kernel) so that sampling image A reproduces image B = A warped by a known
    smooth displacement field; the mean displacement error before and after (pixels) and the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    source = _blob_images(2, 8, size, gen)
    coords = torch.arange(size, dtype=torch.float32)
    true_dx = 1.5 * torch.sin(2 * math.pi * coords / size)[:, None].expand(size, size)  # varies along y
    true_dy = 1.0 * torch.cos(2 * math.pi * coords / size)[None, :].expand(size, size)  # varies along x
    # Target by torch's own bilinear sampler (independent of DCNv3): B(y, x) = A(y + dy, x + dx).
    grid = torch.stack(((2 * (coords[None, :] + true_dx) + 1) / size - 1,
                        (2 * (coords[:, None] + true_dy) + 1) / size - 1), -1)
    target = F.grid_sample(source, grid.expand(2, size, size, 2), align_corners=False).permute(0, 2, 3, 1)
    value = source.permute(0, 2, 3, 1).contiguous()
    offset = torch.zeros(1, size, size, 2, requires_grad=True)  # one group, one point, shared by the batch
    mask = torch.ones(2, size, size, 1)
    optimizer = torch.optim.Adam([offset], lr=0.05)
    inner = (slice(None), slice(3, -3), slice(3, -3))  # border pixels sample outside the image

    def error() -> float:
        learned = offset.detach()[0]
        return ((learned[..., 0] - true_dx).abs() + (learned[..., 1] - true_dy).abs())[inner[1:]].mean().item() / 2

    start_error, losses = error(), []
    for _ in range(steps):
        optimizer.zero_grad()
        out = dcnv3(value, offset.expand(2, -1, -1, -1), mask, 1, 1, 0, 1, 1)
        loss = F.mse_loss(out[inner], target[inner])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"start_error_px": start_error, "final_error_px": error(), "losses": losses, "steps": steps}


def dcnv3_stage(stage: Stage) -> Dict[str, Any]:
    """The operator: paths agree with the reference, the fast path's speed, offsets learnt by gradient descent."""
    impls = ["fast", "triton"] if torch.cuda.is_available() else ["fast"]
    log.info("DCNv3: checking every path against the reference (InternImage-T stage 2, batch 2)...")
    diffs = check_paths(impls)
    rounds, steps = stage.options["rounds"], stage.options["steps"]
    log.info("DCNv3: timing forward+backward (%d rounds), fitting offsets (%d Adam steps)...", rounds, steps)
    times = time_paths(rounds)
    fit = recover_displacement(steps)
    # The fit's loss curve, as a run's metrics.jsonl, so the report plots it like the training runs.
    import json
    curve = stage.folder / "displacement_fit"
    curve.mkdir()
    (curve / "metrics.jsonl").write_text("".join(json.dumps({"split": "train", "step": i + 1, "loss": loss}) + "\n"
                                                 for i, loss in enumerate(fit["losses"])))
    tolerance = 1e-3
    figures = [figure("max abs difference, fast vs reference (outputs + gradients)", max(diffs.values()), tolerance,
                      "the tolerance"),
               figure("forward+backward speed, fast / reference (this machine, varies with load)",
                      times["reference"] / times["fast"], 1.0, "the reference path", unit="x"),
               figure(f"mean displacement error, px, after {steps} Adam steps", fit["final_error_px"],
                      fit["start_error_px"], "offsets before fitting")]
    for impl, diff in diffs.items():
        log.info("  %-9s max |out/grad difference| = %.2e", impl, diff)
    log.info("  fast is %.1fx the reference; displacement error %.3f -> %.5f px", figures[1]["value"],
             fit["start_error_px"], fit["final_error_px"])
    ok = all(d < tolerance for d in diffs.values()) and fit["final_error_px"] < 0.25 * fit["start_error_px"]
    return {"figures": figures, "ok": ok,
            "check": "every path within 1e-3 of the reference, and the fit removes 75% of the displacement error",
            "runs": [{"name": "displacement fit (MSE)", "dir": stage.relative(curve)}],
            "max_abs_diff": diffs, "ms_fwd_bwd": times}


def digits_stage(stage: Stage) -> Dict[str, Any]:
    """InternImage on the built-in handwritten digits (recipe ``digits``); a grid of predictions."""
    from ..pipelines.image_cls import ImageClassificationPipeline
    from ..tasks.image_cls import ImageClassificationTask, ImageClsConfig
    cfg = stage.configure("digits", ImageClsConfig, "train")
    log.info("InternImage: recipe 'digits' on the built-in handwritten digits (%d epochs)...", cfg.train.epochs)
    task = ImageClassificationTask(cfg)
    metrics = stage.fit(task, cfg)
    run = Path(cfg.train.out_dir)
    pipeline = ImageClassificationPipeline.from_pretrained(str(run / "model"))
    samples = task.val_source.samples[:16]
    files = []
    for i, (array, _) in enumerate(samples):
        files.append(str(_save(Image.fromarray(array), run / f"digit_{i}.png")))  # native 8x8: what eval sees
    tiles = []
    for (array, label), result in zip(samples, pipeline.predict_files(files, topk=1)):
        predicted = result["top"][0]["label"]
        tile = Image.fromarray(array).convert("RGB").resize((48, 48), Image.NEAREST)
        tiles.append(_label(tile, f"{predicted} ({task.classes[label]})", "green" if predicted ==
                            task.classes[label] else "red"))
    grid = _save(_row(tiles), stage.folder / "digits.png")
    chance = 100.0 / len(task.classes)
    log.info("  held-out top-1 %.2f%% on %d images (chance %.0f%%)", metrics["top1"], metrics["count"], chance)
    return {"figures": [figure(f"held-out top-1 %, {metrics['count']} images, {cfg.train.epochs} epochs",
                               metrics["top1"], chance, "chance")],
            "ok": metrics["top1"] > 5 * chance, "check": "top-1 above 5x chance",
            "runs": [{"name": "train", "dir": stage.relative(run)}],
            "pictures": [{"file": stage.relative(grid),
                          "caption": "held-out digits: predicted (true) label, green when right"}],
            "top1": metrics["top1"], "top5": metrics["top5"]}


def segmentation_stage(stage: Stage) -> Dict[str, Any]:
    """UperNet + InternImage on the built-in shapes (recipe ``shapes-segment``); mIoU vs untrained, overlays."""
    from ..pipelines.segment import SegmentationPipeline, colourise
    from ..tasks.segment import SegmentationTask, SegmentConfig
    cfg = stage.configure("shapes-segment", SegmentConfig, "train")
    log.info("UperNet + InternImage: recipe 'shapes-segment' (%d steps)...", cfg.train.max_steps)
    task = SegmentationTask(cfg)
    before = _untrained_metrics(task, 8)
    after = stage.fit(task, cfg)
    run = Path(cfg.train.out_dir)
    pipeline = SegmentationPipeline.from_pretrained(str(run / "model"))
    pairs = []
    for image_path, _ in task.val_source.pairs[:4]:
        image = Image.open(image_path).convert("RGB")
        overlay = colourise(image, pipeline.predict(image))
        pairs.append(_row([image, overlay], gap=1).resize((image.width * 6 + 3, image.height * 3), Image.NEAREST))
    overlays = _save(_row(pairs, gap=8), stage.folder / "overlays.png")
    log.info("  mIoU %.1f (untrained %.1f)", after["mIoU"], before["mIoU"])
    return {"figures": [figure(f"mIoU ({cfg.train.max_steps} steps)", after["mIoU"], before["mIoU"],
                               "the untrained model"),
                        figure("pixel accuracy %", after["aAcc"], before["aAcc"], "the untrained model")],
            # 25: well above calling every pixel background (~13 on shapes)
            "ok": after["mIoU"] > max(2 * before["mIoU"], 25.0),
            "check": "mIoU above twice the untrained model's and above 25 (all background scores about 13)",
            "runs": [{"name": "train", "dir": stage.relative(run)}],
            "pictures": [{"file": stage.relative(overlays), "caption": "held-out images: input | predicted classes"}],
            "per_class_IoU": after.get("per_class_IoU"), "model_dir": stage.relative(run / "model")}


def detection_stage(stage: Stage) -> Dict[str, Any]:
    """Mask R-CNN + InternImage on the built-in shapes (recipe ``shapes-detect``), from the segmentation stage's
    backbone when it ran (as detectors start from pre-trained backbones); AP before/after, drawings."""
    from ..pipelines.detect import DetectionPipeline
    from ..tasks.detect import DetectConfig, DetectionTask
    segmentation = stage.done.get("segmentation", {}).get("model_dir")
    backbone = str(stage.root / segmentation) if segmentation else None
    cfg = stage.configure("shapes-detect", DetectConfig, "train", backbone_checkpoint=backbone)
    log.info("Mask R-CNN + InternImage: recipe 'shapes-detect' (%d steps, backbone %s)...", cfg.train.max_steps,
             "from the segmentation stage" if backbone else "from scratch")
    task = DetectionTask(cfg)
    before = _untrained_metrics(task, 8)
    after = stage.fit(task, cfg)
    run = Path(cfg.train.out_dir)
    pipeline = DetectionPipeline.from_pretrained(str(run / "model"))
    source = task.val_source
    drawings = []
    for record in source.images[:4]:
        image = Image.open(source.images_dir / record["file_name"]).convert("RGB")
        # Enlarged before predicting (the pipeline resizes to the model's 128 px again), so that the boxes and
        # labels are drawn at a readable size.
        image = image.resize((image.width * 3, image.height * 3), Image.NEAREST)
        drawings.append(pipeline.draw(image, pipeline(image, threshold=0.3)["output"], threshold=0.3))
    picture = _save(_row(drawings, gap=8), stage.folder / "detections.png")
    log.info("  box AP %.1f / mask AP %.1f (before training %.1f / %.1f)", after["bbox_AP"], after["segm_AP"],
             before["bbox_AP"], before["segm_AP"])
    start = "backbone from the segmentation stage" if backbone else "from scratch"
    return {"figures": [figure(f"box AP / mask AP ({cfg.train.max_steps} steps, {start})",
                               [after["bbox_AP"], after["segm_AP"]], [before["bbox_AP"], before["segm_AP"]],
                               "the same detector before training"),
                        figure("box AP50", after["bbox_AP50"], before["bbox_AP50"],
                               "the same detector before training")],
            "ok": after["bbox_AP50"] > before["bbox_AP50"] + 10,
            "check": "box AP50 at least 10 points above the untrained detector's",
            "runs": [{"name": "train", "dir": stage.relative(run)}],
            "pictures": [{"file": stage.relative(picture), "caption": "held-out images: detections above 0.3"}],
            "backbone_from": start}


def video_stage(stage: Stage) -> Dict[str, Any]:
    """VideoMAE pre-training (recipe ``actions-pretrain``), then fine-tuning (``actions-finetune``) from it and
    from scratch; a held-out clip with its predicted action."""
    from ..pipelines.video_cls import VideoClassificationPipeline
    from ..tasks.video_cls import VideoClassificationTask, VideoClsConfig
    from ..tasks.video_pretrain import VideoPretrainConfig, VideoPretrainTask
    pre_cfg = stage.configure("actions-pretrain", VideoPretrainConfig, "pretrain")
    log.info("Video ViT: recipe 'actions-pretrain' (%d steps), then 'actions-finetune' from it and from scratch...",
             pre_cfg.train.max_steps)
    pre_metrics = stage.fit(VideoPretrainTask(pre_cfg), pre_cfg)
    results: Dict[str, Any] = {}
    for name, checkpoint in (("pretrained", str(Path(pre_cfg.train.out_dir) / "model")), ("scratch", None)):
        cfg = stage.configure("actions-finetune", VideoClsConfig, name, checkpoint=checkpoint)
        task = VideoClassificationTask(cfg)
        results[name] = stage.fit(task, cfg)
    steps = cfg.train.max_steps
    chance = 100.0 / len(task.classes)
    pipeline = VideoClassificationPipeline.from_pretrained(str(stage.folder / "pretrained" / "model"))
    strips = []
    for path, label in task.eval_dataset().source.samples[:3]:
        top = pipeline(path, topk=1)["top"][0]
        strips.append({"file": stage.relative(_save(_label(frame_strip(path), f"predicted: {top['label']} "
                                                           f"({top['prob']:.2f}); true: {task.classes[label]}"),
                                                    stage.folder / f"clip_{len(strips)}.png")),
                       "caption": f"held-out clip, true action: {task.classes[label]}"})
    top1, scratch = results["pretrained"]["top1"], results["scratch"]["top1"]
    log.info("  top-1 %.1f%% pre-trained, %.1f%% from scratch (chance %.0f%%)", top1, scratch, chance)
    return {"figures": [figure(f"held-out top-1 %, fine-tuned from pre-training ({steps} steps)", top1, scratch,
                               "the same fine-tuning from scratch"),
                        figure("held-out top-1 % from scratch", scratch, chance, "chance"),
                        figure("reconstruction loss at the end of pre-training",
                               pre_metrics.get("reconstruction_loss"), None, None)],
            "ok": top1 > scratch,
            "check": "fine-tuning from pre-training beats the same fine-tuning from scratch",
            "runs": [{"name": n, "dir": stage.relative(stage.folder / n)} for n in ("pretrain", "pretrained",
                                                                                   "scratch")],
            "pictures": strips, "chance": chance,
            "model_dir": stage.relative(stage.folder / "pretrained" / "model")}


def timeline(duration: float, width: int, rows: Sequence[Sequence[Dict[str, Any]]], names: Sequence[str],
             colours: Sequence[str]) -> Image.Image:
    """Rows of labelled segments (``{"segment": [start, end], "label"}``, seconds) on a ``width``-pixel time axis
    of ``duration`` seconds; each row named and drawn in its colour."""
    height, margin = 16, 70
    out = Image.new("RGB", (width + margin, height * len(rows) + 2), "white")
    draw = ImageDraw.Draw(out)
    for r, (segments, name, colour) in enumerate(zip(rows, names, colours)):
        top = r * height + 1
        draw.text((2, top + 2), name, fill="black")
        draw.line([(margin, top + height // 2), (margin + width, top + height // 2)], fill="#cccccc")
        for segment in segments:
            x0, x1 = (margin + width * min(max(t / duration, 0.0), 1.0) for t in segment["segment"])
            draw.rectangle([x0, top + 2, max(x1, x0 + 1), top + height - 2], fill=colour)
            draw.text((x0 + 2, top + 2), segment["label"].split()[-1][:6], fill="white")
    return out


def localization_stage(stage: Stage) -> Dict[str, Any]:
    """ActionFormer on snippet features of the built-in untrimmed videos (recipe ``untrimmed-localize``), extracted
    by the video stage's fine-tuned encoder when it ran (else by an untrained one); average mAP before and after
    training; held-out videos with their true and detected segments."""
    from ..pipelines.tal import TemporalLocalizationPipeline
    from ..tasks.tal import TALConfig, TALTask
    video = stage.done.get("video", {}).get("model_dir")
    encoder = str(stage.root / video) if video else None
    cfg = stage.configure("untrimmed-localize", TALConfig, "train", encoder=encoder)
    log.info("Temporal localization: recipe 'untrimmed-localize' (%d steps, features by %s)...",
             cfg.train.max_steps, "the video stage's encoder" if encoder else "an untrained encoder")
    task = TALTask(cfg)
    before = _untrained_metrics(task, 1)
    after = stage.fit(task, cfg)
    pipeline = TemporalLocalizationPipeline.from_pretrained(str(Path(cfg.train.out_dir) / "model"))
    pictures = []
    for video_entry in task.val_source.videos[:3]:
        found = pipeline(video_entry.feature_file, min_score=0.2, topk=6)
        truth = [{"segment": list(s), "label": task.classes[c]}
                 for s, c in zip(video_entry.segments.tolist(), video_entry.labels.tolist())]
        path = Path(task.val_source.annotation_file).parent / "videos" / f"{video_entry.video_id}.mp4"
        strip = frame_strip(str(path), frames=12, scale=1)
        rows = timeline(found["duration"], strip.width, [truth, found["segments"]], ["true", "detected"],
                        ["#2e7d32", "#ef6c00"])
        picture = _save(_stack(strip, rows), stage.folder / f"{video_entry.video_id}.png")
        pictures.append({"file": stage.relative(picture), "caption": f"{video_entry.video_id}: true segments and "
                         f"detections above 0.2 ({len(found['segments'])})"})
    value, baseline = 100 * after["average_mAP"], 100 * before["average_mAP"]
    log.info("  average mAP %.1f%% trained, %.1f%% untrained", value, baseline)
    return {"figures": [figure(f"held-out average mAP % (tIoU 0.3:0.7, {cfg.train.max_steps} steps)", round(value, 2),
                               round(baseline, 2), "the same localizer before training"),
                        figure("held-out mAP % at tIoU 0.5", round(100 * after["mAP"][2], 2),
                               round(100 * before["mAP"][2], 2), "before training")],
            "ok": value > baseline + 5,
            "check": "average mAP at least 5 points above the untrained localizer's",
            "runs": [{"name": "train", "dir": stage.relative(Path(cfg.train.out_dir))}],
            "pictures": pictures, "encoder": video}


def video_text_stage(stage: Stage) -> Dict[str, Any]:
    """InternVideo-MM dual encoder on the captioned clips (recipe ``actions-text``): retrieval and zero-shot next
    to chance; captions with the clips they retrieve."""
    from ..pipelines.video_text import VideoTextPipeline
    from ..tasks.video_text import VideoTextConfig, VideoTextTask
    cfg = stage.configure("actions-text", VideoTextConfig, "train")
    log.info("Video-text: recipe 'actions-text' (%d steps)...", cfg.train.max_steps)
    task = VideoTextTask(cfg)
    metrics = stage.fit(task, cfg)
    run = Path(cfg.train.out_dir)
    pipeline = VideoTextPipeline.from_pretrained(str(run / "model"))
    data = task.eval_dataset()
    files = [path for path, _ in data.videos.source.samples]
    tables_rows, pictures = [], []
    for caption_index in (0, len(data.captions) // 2):
        caption = data.captions[caption_index]
        truth = files[int(data.text_to_video[caption_index])]
        ranked = [r["file"] for r in pipeline.retrieve(files, caption, topk=len(files))[0]]
        strips = [_label(frame_strip(file, frames=4, scale=1), f"#{i + 1}" + (" its clip" if file == truth else ""),
                         "green" if file == truth else "black") for i, file in enumerate(ranked[:3])]
        picture = _save(_row(strips, gap=10), stage.folder / f"retrieval_{len(pictures)}.png")
        pictures.append({"file": stage.relative(picture), "caption": f"query: \u201c{caption}\u201d -> top 3 clips"})
        tables_rows.append([caption, ranked.index(truth) + 1])
    log.info("  text-to-video R@1 %.1f%% (chance %.1f%%), zero-shot top-1 %.1f%% (chance %.1f%%)",
             metrics["t2v_r1"], metrics["chance_t2v_r1"], metrics.get("zero_shot_top1", 0),
             metrics.get("chance_zero_shot", 0))
    return {"figures": [figure(f"text-to-video R@1 % (R@5 {metrics['t2v_r5']:.1f}, median rank "
                               f"{metrics['t2v_median_rank']:.0f}; {cfg.train.max_steps} steps)", metrics["t2v_r1"],
                               metrics["chance_t2v_r1"], "chance"),
                        figure("zero-shot top-1 %", metrics.get("zero_shot_top1"), metrics.get("chance_zero_shot"),
                               "chance")],
            "ok": metrics["t2v_r1"] > 2 * metrics["chance_t2v_r1"],
            "check": "text-to-video R@1 above twice chance",
            "runs": [{"name": "train", "dir": stage.relative(run)}], "pictures": pictures,
            "tables": [{"title": "retrieval: where each caption's own clip ranks", "columns": ["caption", "rank"],
                        "rows": tables_rows}]}


@contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def translation_stage(stage: Stage) -> Dict[str, Any]:
    """The NLLB-architecture model on the CLDR phrases (recipe ``babel-translate``): held-out chrF++ next to
    copying the source, and a table of translations with their references."""
    from ..pipelines.translation import Translator
    from ..tasks.translation import TranslationConfig, TranslationTask, evaluate_translations, load_pairs
    cfg = stage.configure("babel-translate", TranslationConfig, "train")
    log.info("Translation: recipe 'babel-translate' (%d steps)...", cfg.train.max_steps)
    # One thread: this 1M-parameter model gains little from more, and on a busy machine 2 threads ran 10x slower.
    with _threads(1):
        task = TranslationTask(cfg)
        stage.fit(task, cfg)
        run = Path(cfg.train.out_dir)
        translator = Translator.from_pretrained(run / "model")
        metrics = evaluate_translations(translator, load_pairs(cfg.data, "test", task.directions), num_examples=8)
    log.info("  held-out chrF++ %.1f vs %.1f for copying the source", metrics["chrf"], metrics["copy_chrf"])
    rows = [[f"{e['src_lang'][:3]} \u2192 {e['tgt_lang'][:3]}", e["source"], e["reference"], e["translation"]]
            for e in metrics["examples"]]
    return {"figures": [figure(f"held-out chrF++ (eng <-> rus, {cfg.train.max_steps} steps)", metrics["chrf"],
                               metrics["copy_chrf"], "copying the source"),
                        figure("held-out BLEU", metrics["bleu"], None, None)],
            "ok": metrics["chrf"] > metrics["copy_chrf"] + 5,
            "check": "chrF++ at least 5 points above copying the source",
            "runs": [{"name": "train", "dir": stage.relative(run)}],
            "tables": [{"title": "held-out translations", "columns": ["direction", "source", "reference", "output"],
                        "rows": rows}],
            "pairs": metrics.get("pairs")}


STAGES: Dict[str, Callable[[Stage], Dict[str, Any]]] = {
    "dcnv3": dcnv3_stage, "digits": digits_stage, "segmentation": segmentation_stage, "detection": detection_stage,
    "video": video_stage, "localization": localization_stage, "video_text": video_text_stage,
    "translation": translation_stage}
