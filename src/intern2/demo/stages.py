"""Training stages of `intern2 demo` beyond the image classifier: dense prediction on the built-in shapes and video
pre-training on the built-in actions. Each stage measures an untrained model of the same architecture first, so
the figures it reports show what training bought, and returns a JSON-ready dict (metrics, example files, the
run folder whose metrics.jsonl the report plots)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..engine import TrainConfig, Trainer
from ..engine.trainer import accumulate_eval

__all__ = ["train_shapes_segmentation", "train_shapes_detection", "video_pretraining_vs_scratch"]

log = logging.getLogger("intern2.demo")
CPU = torch.device("cpu")

SEG_MODEL = {"backbone": {"channels": 32, "depths": [1, 1, 2, 1], "groups": [2, 4, 8, 16], "drop_path_rate": 0.0},
             "channels": 64, "aux_channels": 32}
DET_MODEL = {"backbone": {"channels": 32, "depths": [1, 1, 2, 1], "groups": [2, 4, 8, 16], "drop_path_rate": 0.0},
             "fpn_channels": 64, "box_fc_channels": 256, "mask_channels": 64, "box_batch_size_per_image": 64,
             "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300}
VIDEO_ENCODER = {"embed_dim": 96, "depth": 4, "num_heads": 4, "patch_size": 8}
# The 600 built-in clips fit in memory (~120 MB decoded): caching them lets the model, not decoding, set the pace.
VIDEO_DATA = {"num_frames": 8, "stride": 2, "img_size": 32, "train_scale": (0.6, 1.0), "cache_clips": True}


def _untrained_metrics(task, batch_size: int) -> Dict[str, Any]:
    """The task's evaluation of a freshly initialised model."""
    torch.manual_seed(0)
    model = task.build_model().eval()
    dataset = task.eval_dataset()
    if hasattr(task, "evaluate"):
        return task.evaluate(model, dataset, batch_size, CPU)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=task.collate)
    return task.summarize({k: v.cpu() for k, v in accumulate_eval(model, loader, task.eval_step, CPU).items()})


def _train_config(out_dir: Path, seconds: float, max_steps: int, **kwargs) -> TrainConfig:
    """A run that ends on a time budget and evaluates once, at its end (evaluation time is not training time)."""
    return TrainConfig(**{"epochs": 1000, "max_steps": max_steps, "time_limit_s": seconds, "log_every": 25,
                          "device": "cpu", "out_dir": str(out_dir), "checkpoint_every": 10 ** 9,
                          "eval_every": 10 ** 9, **kwargs})


def train_shapes_segmentation(out_dir: Path, seconds: float, max_steps: int = 2000) -> Dict[str, Any]:
    """UperNet + a small InternImage on the built-in shapes: mIoU untrained -> trained, an overlay example."""
    from PIL import Image

    from ..pipelines.segment import SegmentationPipeline, colourise
    from ..tasks.segment import SegmentationTask, SegmentConfig
    train = _train_config(out_dir, seconds, max_steps, batch_size=16, lr=2e-3, warmup_steps=30, weight_decay=0.01)
    cfg = SegmentConfig(model="upernet_internimage_t", model_args=SEG_MODEL, data="builtin:shapes", crop_size=64,
                        scale=64, ratio_range=(0.75, 1.5), test_size=(64, 64), train=train)
    task = SegmentationTask(cfg)
    before = _untrained_metrics(task, 8)
    after = Trainer(task, train).fit()
    pipeline = SegmentationPipeline.from_pretrained(str(out_dir / "model"))
    image_path = task.val_source.pairs[0][0]
    image = Image.open(image_path).convert("RGB")
    example = out_dir / "example_overlay.png"
    overlay = colourise(image, pipeline.predict(image))
    Image.fromarray(np.concatenate([np.asarray(image), np.asarray(overlay)], axis=1)).resize(
        (image.width * 4, image.height * 2), Image.NEAREST).save(example)
    return {"mIoU_untrained": before["mIoU"], "mIoU": after["mIoU"], "aAcc": after["aAcc"],
            "per_class_IoU": after.get("per_class_IoU"), "steps": _steps(out_dir), "run_dir": str(out_dir),
            "model_dir": str(out_dir / "model"),
            "examples": [str(example)]}


def train_shapes_detection(out_dir: Path, seconds: float, backbone: Optional[str] = None,
                           max_steps: int = 2000) -> Dict[str, Any]:
    """Mask R-CNN + a small InternImage on the built-in shapes: COCO box/mask AP untrained -> trained, a drawing.
    ``backbone``: a model folder whose InternImage initialises the detector's (the segmentation stage's: the same
    backbone configuration), as the official detectors start from pre-trained backbones. From scratch, a detector
    learns next to nothing in two CPU minutes (box AP ~1); from the segmentation backbone it reaches ~10."""
    from PIL import Image

    from ..pipelines.detect import DetectionPipeline
    from ..tasks.detect import DetectConfig, DetectionTask
    train = _train_config(out_dir, seconds, max_steps, batch_size=4, lr=1e-3, warmup_steps=30, weight_decay=0.01)
    cfg = DetectConfig(model="mask_rcnn_internimage_t", model_args=DET_MODEL, data="builtin:shapes", min_size=128,
                       max_size=128, backbone_checkpoint=backbone, train=train)
    task = DetectionTask(cfg)
    before = _untrained_metrics(task, 8)
    after = Trainer(task, train).fit()
    pipeline = DetectionPipeline.from_pretrained(str(out_dir / "model"))
    source = task.val_source
    image = Image.open(source.images_dir / source.images[0]["file_name"]).convert("RGB")
    drawn = pipeline.draw(image, pipeline(image, threshold=0.3)["output"], threshold=0.3)
    example = out_dir / "example_detections.png"
    drawn.resize((image.width * 4, image.height * 4), Image.NEAREST).save(example)
    return {"box_AP_before": before["bbox_AP"], "mask_AP_before": before["segm_AP"],
            "box_AP": after["bbox_AP"], "box_AP50": after["bbox_AP50"], "mask_AP": after["segm_AP"],
            "mask_AP50": after["segm_AP50"], "steps": _steps(out_dir), "run_dir": str(out_dir),
            "backbone_from": backbone or "scratch",
            "examples": [str(example)]}


def video_pretraining_vs_scratch(out_dir: Path, pretrain_seconds: float, finetune_seconds: float,
                                 max_steps: int = 5000) -> Dict[str, Any]:
    """VideoMAE pre-training of a tiny video ViT on the built-in action clips, then fine-tuning; the same fine-tuning
    from scratch beside it. Top-1 of both on the held-out clips, and the reconstruction loss reached."""
    from ..tasks.video_cls import VideoClassificationTask, VideoClsConfig
    from ..tasks.video_pretrain import VideoPretrainConfig, VideoPretrainTask
    encoder = {f"encoder_{k}" if k != "patch_size" else k: v for k, v in VIDEO_ENCODER.items()}
    # lr 3e-4 for both: at 1e-3 and above a ViT this small sits on its loss plateau for the whole budget (the
    # reconstruction loss stays flat and fine-tuning stays at chance, pre-trained or not).
    pre_train = _train_config(out_dir / "pretrain", pretrain_seconds, max_steps, batch_size=16, lr=3e-4,
                              warmup_steps=40)
    pre_cfg = VideoPretrainConfig(model="videomae_pretrain_vit_s", mask_ratio=0.75, train=pre_train,
                                  model_args={**encoder, "decoder_embed_dim": 64, "decoder_depth": 1,
                                              "decoder_num_heads": 4}, **VIDEO_DATA)
    pre_metrics = Trainer(VideoPretrainTask(pre_cfg), pre_train).fit()
    results: Dict[str, Any] = {"reconstruction_loss": pre_metrics.get("reconstruction_loss")}
    for name, checkpoint in (("pretrained", str(out_dir / "pretrain" / "model")), ("scratch", None)):
        train = _train_config(out_dir / name, finetune_seconds, max_steps, batch_size=16, lr=3e-4, warmup_steps=40)
        cfg = VideoClsConfig(model="videomae_vit_s", model_args=VIDEO_ENCODER, checkpoint=checkpoint, train=train,
                             **VIDEO_DATA)
        task = VideoClassificationTask(cfg)
        metrics = Trainer(task, train).fit()
        results[f"top1_{name}"] = metrics["top1"]
        results[f"steps_{name}"] = _steps(out_dir / name)
        results["chance"] = 100.0 / len(task.classes)
        results["val_clips"] = metrics["count"]
    results["run_dirs"] = [str(out_dir / d) for d in ("pretrain", "pretrained", "scratch")]
    return results


def _steps(run_dir: Path) -> int:
    """The last optimizer step logged in a run's metrics.jsonl."""
    import json
    steps = [json.loads(line).get("step", 0) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(steps, default=0)
