"""`intern2 demo`: the project's main job on built-in data, with a JSON summary of every figure and an HTML report.

Stages (each trains briefly on data that ships with the package or is generated; no download):
1. dcnv3: the operator's implementations agree, the fast CPU path is timed against the readable reference, and
   free offsets are fitted by gradient descent until they recover a known displacement field.
2. digits: a small InternImage on scikit-learn's handwritten digits; held-out accuracy and predictions.
3. segmentation / 4. detection: UperNet and Mask R-CNN with a small InternImage on the generated shapes; mIoU and
   COCO AP before and after training, an overlay and a drawing. The detector starts from the segmentation stage's
   backbone when that stage ran (as detectors start from pre-trained backbones).
5. video: VideoMAE pre-training of a tiny video ViT on the generated action clips, fine-tuned, next to the same
   fine-tuning from scratch.
6. video_text: a tiny dual encoder on the clips' captions; text-to-video R@1 and zero-shot accuracy vs chance.
7. translation: a small NLLB-architecture model on CLDR phrases (babel); chrF++ vs copying the source.
Writes <out>/summary.json and <out>/report.html (loss curves, examples); each stage runs in a fresh folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..ops import dcnv3

log = logging.getLogger("intern2.demo")


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
    grad = torch.randn(2, 56, 56, 64)
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


def recover_displacement(steps: int, size: int = 32, seed: int = 0) -> Dict[str, float]:
    """Fit free DCNv3 offsets (1x1 kernel) so that sampling image A reproduces image B = A warped by a known
    smooth displacement field; return the mean displacement error before and after, in pixels."""
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
    return {"start_error_px": start_error, "final_error_px": error(), "start_loss": losses[0],
            "final_loss": losses[-1], "steps": steps}


DIGITS_MODEL = dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)


def train_digits(out_dir: Path, epochs: int) -> Dict[str, object]:
    """Train a small InternImage on the built-in digits; held-out accuracy and a few predictions."""
    from ..engine import TrainConfig, Trainer
    from ..pipelines.image_cls import ImageClassificationPipeline
    from ..tasks.image_cls import ImageClassificationTask, ImageClsConfig
    cfg = ImageClsConfig(model="internimage_t", model_args=DIGITS_MODEL, data="builtin:digits", img_size=32,
                         hflip=0.0, label_smoothing=0.1,
                         train=TrainConfig(epochs=epochs, batch_size=32, lr=2e-3, warmup_steps=10, log_every=50,
                                           out_dir=str(out_dir), device="cpu"))
    task = ImageClassificationTask(cfg)
    metrics = Trainer(task, cfg.train).fit()
    pipeline = ImageClassificationPipeline.from_pretrained(str(out_dir / "model"))
    examples = []
    samples = task.val_source.samples[:6]
    files = []
    for i, (array, label) in enumerate(samples):
        from PIL import Image
        path = out_dir / f"example_{i}_label{label}.png"
        Image.fromarray(array).save(path)  # native 8x8, so predict sees what evaluation sees
        files.append(str(path))
    for (array, label), result in zip(samples, pipeline.predict_files(files, topk=1)):
        examples.append({"file": result["file"], "label": task.classes[label], "predicted": result["top"][0]["label"],
                         "prob": result["top"][0]["prob"]})
    return {"top1": metrics["top1"], "top5": metrics["top5"], "val_images": metrics["count"],
            "chance": 100.0 / len(task.classes), "epochs": epochs, "model_dir": str(out_dir / "model"),
            "examples": examples}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


STAGES = ("dcnv3", "digits", "segmentation", "detection", "video", "video_text", "translation")


def _dcnv3_stage(args) -> Dict[str, object]:
    impls = ["fast", "triton"] if torch.cuda.is_available() else ["fast"]
    log.info("DCNv3: checking every path against the reference (InternImage-T stage 2, batch 2)...")
    diffs = check_paths(impls)
    for impl, diff in diffs.items():
        log.info("  %-9s max |out/grad difference| = %.2e", impl, diff)
    log.info("DCNv3: timing forward+backward (InternImage-T stage 1, batch 2, %d rounds)...", args.rounds)
    times = time_paths(args.rounds)
    log.info("  reference %.1f ms, fast %.1f ms: fast is %.1fx the reference", times["reference"], times["fast"],
             times["reference"] / times["fast"])
    log.info("DCNv3: fitting free offsets to recover a known displacement field (%d Adam steps)...", args.steps)
    fit = recover_displacement(args.steps)
    log.info("  mean displacement error %.3f px -> %.3f px (loss %.2e -> %.2e)", fit["start_error_px"],
             fit["final_error_px"], fit["start_loss"], fit["final_loss"])
    ok = all(d < 1e-3 for d in diffs.values()) and fit["final_error_px"] < 0.25 * fit["start_error_px"]
    return {"max_abs_diff_vs_reference": max(diffs.values()),
            "fast_speedup_fwd_bwd": times["reference"] / times["fast"],
            **{f"displacement_{k}": v for k, v in fit.items()}, "ok": ok}


def _run_stage(name: str, args, out_dir: Path, done: Dict[str, object]) -> Dict[str, object]:
    """Run one stage in a fresh folder; returns its figures and whether they pass the stage's check. ``done``:
    the results of the stages that ran before it in this invocation."""
    from . import stages as demo_stages
    folder = out_dir / name
    if folder.exists():
        shutil.rmtree(folder)  # re-running reuses nothing stale
    folder.mkdir(parents=True)
    budget = args.budget
    if name == "dcnv3":
        return _dcnv3_stage(args)
    if name == "digits":
        log.info("InternImage: training on the built-in handwritten digits (%d epochs)...", args.epochs)
        result = train_digits(folder, args.epochs)
        result["run_dir"] = str(folder)
        log.info("  held-out top-1 %.2f%% on %d images (chance %.0f%%)", result["top1"], result["val_images"],
                 result["chance"])
        return {**result, "ok": result["top1"] > 5 * result["chance"]}
    if name == "segmentation":
        log.info("UperNet + InternImage: training on the built-in shapes (%.0f s)...", 90 * budget)
        result = demo_stages.train_shapes_segmentation(folder, 90 * budget)
        log.info("  mIoU %.1f (untrained %.1f) after %d steps", result["mIoU"], result["mIoU_untrained"],
                 result["steps"])
        # 25: well above calling every pixel background (~13 on shapes), which an untrained model does not even do
        return {**result, "ok": result["mIoU"] > max(2 * result["mIoU_untrained"], 25.0)}
    if name == "detection":
        backbone = done.get("segmentation", {}).get("model_dir")
        log.info("Mask R-CNN + InternImage: training on the built-in shapes (%.0f s, backbone %s)...", 120 * budget,
                 "from the segmentation stage" if backbone else "from scratch")
        result = demo_stages.train_shapes_detection(folder, 120 * budget, backbone)
        log.info("  box AP %.1f / mask AP %.1f (before training %.1f / %.1f) after %d steps", result["box_AP"],
                 result["mask_AP"], result["box_AP_before"], result["mask_AP_before"], result["steps"])
        return {**result, "ok": result["box_AP50"] > result["box_AP_before"]}
    if name == "video":
        log.info("Video ViT: VideoMAE pre-training (%.0f s), then fine-tuning vs from scratch (%.0f s each)...",
                 90 * budget, 45 * budget)
        result = demo_stages.video_pretraining_vs_scratch(folder, 90 * budget, 45 * budget)
        log.info("  top-1 %.1f%% pre-trained, %.1f%% from scratch (chance %.0f%%)", result["top1_pretrained"],
                 result["top1_scratch"], result["chance"])
        return {**result, "ok": result["top1_pretrained"] > result["top1_scratch"]}
    if name == "video_text":
        from ..tasks.video_text import run_video_text_demo
        log.info("Video-text: contrastive training on the built-in captioned clips (%.0f s)...", 90 * budget)
        result = run_video_text_demo(folder, 90 * budget)
        log.info("  text-to-video R@1 %.1f%% (chance %.1f%%), zero-shot top-1 %.1f%% (chance %.1f%%)",
                 result.get("t2v_r1", 0), result.get("chance_t2v_r1", 0), result.get("zero_shot_top1", 0),
                 result.get("chance_zero_shot", 0))
        return {**result, "ok": result.get("t2v_r1", 0) > result.get("chance_t2v_r1", 100)}
    if name == "translation":
        from ..tasks.translation import run_translation_demo
        log.info("Translation: a small NLLB-architecture model on the built-in CLDR phrases (%.0f s)...",
                 120 * budget)
        result = run_translation_demo(folder, 120 * budget)
        result["run_dir"] = str(folder)
        log.info("  held-out chrF++ %.1f vs %.1f for copying the source", result.get("chrf", 0),
                 result.get("copy_chrf", 0))
        return {**result, "ok": result.get("chrf", 0) > result.get("copy_chrf", 100)}
    raise ValueError(f"unknown demo stage {name!r}; known: {', '.join(STAGES)}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for summary.json, report.html and the runs")
    parser.add_argument("--only", help=f"comma-separated stages to run (default: all of {','.join(STAGES)})")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="multiplier of every stage's training time (1.0: about 13 minutes on 2 CPU cores)")
    parser.add_argument("--steps", type=_positive, default=300, help="optimisation steps of the displacement fit")
    parser.add_argument("--rounds", type=_positive, default=5, help="timing rounds")
    parser.add_argument("--epochs", type=_positive, default=8, help="epochs of the InternImage digits run")
    args = parser.parse_args(argv)
    stages = STAGES if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--only: unknown stages {unknown}; known: {', '.join(STAGES)}")
    if args.budget <= 0:
        parser.error(f"--budget: expected a positive number, got {args.budget}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("intern2.engine", "intern2.data", "intern2.checkpoint", "intern2.tasks"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # the stages log their own summaries
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: Dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    started = time.perf_counter()
    for name in stages:
        stage_started = time.perf_counter()
        try:
            summary[name] = _run_stage(name, args, out_dir, summary)
        except ImportError as exc:  # an optional extra is not installed
            summary[name] = {"error": f"skipped: {exc}", "ok": False}
            log.warning("  %s skipped: %s", name, exc)
        summary[name]["seconds"] = round(time.perf_counter() - stage_started, 1)
        _write_outputs(summary, out_dir)
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    paths = _write_outputs(summary, out_dir)
    log.info("summary: %s\nreport:  %s", *paths)
    failed = [name for name in stages if not summary[name].get("ok")]
    if failed:
        log.warning("stages below their expected figures: %s", ", ".join(failed))
    return 1 if failed else 0


def _write_outputs(summary: Dict[str, object], out_dir: Path):
    from ..checkpoint import atomic_write
    from .report import write_report
    path = out_dir / "summary.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    return path, write_report(summary, out_dir / "report.html")
