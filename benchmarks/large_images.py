"""Peak memory of one large photo through the segmentation and detection pipelines, against the whole-image
computation they replace (each measured in its own child process, so each peak is its own)::

    python benchmarks/large_images.py                  # a 1600 x 1200 photo (1.9 MP)
    python benchmarks/large_images.py --size 4000 3000 # 12 MP

Segmentation: an UperNet with 150 classes (ADE20K's) at mmseg's (2048, 512) test size; the baseline resizes all
150 classes' logits to the photo's size before the argmax (``segment_probabilities(...).argmax(0)``), the
pipeline's ``segment_labels`` does it in bands of rows. Detection: a Mask R-CNN keeping 100 detections (mmdet's
``max_per_img``); the baseline pastes all 100 masks at the photo's size (the model's own postprocess, what the
pipeline called before), the pipeline only those it keeps: ``--keep`` of them (10; the threshold is set to the
score of the 10th best, since a random model's scores say nothing).
Random-init models with narrow layers: the model's own memory is small, the per-pixel costs are the real ones.
Target: the pipeline's peak <= 0.5x the baseline's at 1.9 MP.
"""
from __future__ import annotations

import argparse
import multiprocessing
from queue import Empty
from typing import Any, Callable, Tuple

import torch

import intern2
from machine import cpu_features, cpu_model

BACKBONE = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0)


def _peak_mib() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry over the parent's peak through fork and exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def _segment(size: Tuple[int, int], banded: bool, queue) -> None:
    from intern2.pipelines.segment import segment_labels, segment_probabilities
    from intern2.weights import SegmentationProtocol
    torch.manual_seed(0)
    model = intern2.create_model("upernet_internimage_t", num_classes=150, backbone=BACKBONE, channels=16,
                                 aux_channels=16).eval()
    image = torch.rand(3, size[1], size[0], generator=torch.Generator().manual_seed(0))
    before = _peak_mib()
    with torch.inference_mode():
        labels = segment_labels(model, image, SegmentationProtocol()) if banded else \
            segment_probabilities(model, image, SegmentationProtocol()).argmax(0)
    queue.put((before, _peak_mib(), tuple(labels.shape)))


def _detector() -> torch.nn.Module:
    torch.manual_seed(0)
    return intern2.create_model("mask_rcnn_internimage_t", backbone=BACKBONE, num_classes=80, fpn_channels=32,
                                box_detections_per_img=100, box_score_thresh=0.0).eval()


def _detect(size: Tuple[int, int], kept_only: bool, threshold: float, queue) -> None:
    from intern2.pipelines.detect import DetectionPipeline
    model = _detector()
    pipeline = DetectionPipeline(model)
    image = torch.rand(3, size[1], size[0], generator=torch.Generator().manual_seed(0))
    before = _peak_mib()
    with torch.inference_mode():
        (output,) = pipeline.raw([image], threshold) if kept_only else model([image])
    queue.put((before, _peak_mib(), len(output["scores"])))


def _threshold(size: Tuple[int, int], keep: int) -> float:
    """The score of the ``keep``-th best detection of the benchmark's model on its photo (in this process)."""
    from intern2.heads.detection import unpasted_masks
    model = _detector()
    image = torch.rand(3, size[1], size[0], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), unpasted_masks():  # scores only
        (output,) = model([image])
    return float(output["scores"].sort(descending=True).values[min(keep, len(output["scores"])) - 1])


def _child(target: Callable[..., None], *args: Any) -> Tuple[float, float, Any]:
    """``target(*args, queue)`` in a fresh process: (peak MiB before the call, after it, what it reports)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    try:
        return queue.get(timeout=1800)
    except Empty:  # killed (out of memory: what this measures) or hung
        raise RuntimeError(f"{target.__name__}{args}: the child process gave no result (exit code "
                           f"{process.exitcode})") from None
    finally:
        process.join(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(1600, 1200), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--keep", type=int, default=10, help="detections the pipeline keeps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    features = ", ".join(cpu_features()) or "none of note"
    print(f"machine: {cpu_model()}; ISA: {features}; torch {torch.__version__}, 1 thread")
    size = tuple(args.size)
    threshold = _threshold(size, args.keep)
    print(f"photo {size[0]} x {size[1]} ({size[0] * size[1] / 1e6:.1f} MP); peak RSS of a child process, MiB "
          f"(before the call -> after)")
    rows = []
    for name, target, new_args, old_args in (
            ("segment (150 classes)", _segment, (size, True), (size, False)),
            ("detect (100 detections)", _detect, (size, True, threshold), (size, False, threshold))):
        old, new = _child(target, *old_args), _child(target, *new_args)
        ratio = (new[1] - new[0]) / max(old[1] - old[0], 1e-9)
        rows.append(ratio)
        detail = f"kept {new[2]} of {old[2]}" if target is _detect else f"class map {new[2]}"
        print(f"{name:24s} whole image {old[0]:6.0f} -> {old[1]:6.0f}   pipeline {new[0]:6.0f} -> {new[1]:6.0f}   "
              f"growth {ratio:.2f}x ({detail})")
    verdict = "met" if max(rows) <= 0.5 else "MISSED"
    print(f"target: the pipeline's memory growth <= 0.5x the whole-image computation's: {max(rows):.2f}x {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
