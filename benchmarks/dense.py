"""Dense-prediction inference on CPU against torchvision's maskrcnn_resnet50_fpn, random init, one process,
interleaved rounds, median; the machine's measured limits first, each model's FLOPs (torch's FlopCounterMode) as a
fraction of the sgemm peak.

Section "small": Mask R-CNN and UperNet InternImage-T on one --size image (default 512x512, resized by no model;
the official test sizes take seconds per image on a laptop CPU). Section "cascade": Cascade Mask R-CNN
InternImage-L (the official COCO configuration, 277M parameters) and R50 Mask R-CNN on one 800x1333 image; section
"cascade-onnx": the two on one --size image, where Cascade-L can be exported on 24 GB. With onnxruntime installed,
each detector of the "small" and "cascade-onnx" sections is also exported (`intern2.export.export_detector_onnx`:
the whole pipeline in the graph, checked against PyTorch) and timed under onnxruntime's CPU provider with the same
threads, next to its PyTorch time.

    python benchmarks/dense.py [--size 512] [--rounds 3] [--threads 1] [--no-onnx]
                               [--sections small cascade cascade-onnx]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dcnv3 import peak_bytes  # noqa: E402
from machine import measure_limits  # noqa: E402

import intern2  # noqa: E402


def onnx_times(detectors, image: torch.Tensor, rounds: int, threads: int):
    """Seconds per image of each detector exported to ONNX and run by onnxruntime (CPU provider)."""
    import onnxruntime as ort

    from intern2.export import export_detector_onnx
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # torchvision's traced mask loop warns about every output size it sees
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in detectors.items():
            path = Path(tmp) / "model.onnx"
            export_detector_onnx(model, path, tuple(image.shape[1:]))
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {"image": image.numpy()}
            session.run(None, feed)  # warm-up
            key = f"{name.split(' ')[0]} (onnxruntime)"
            times[key] = []
            for _ in range(rounds):
                start = time.perf_counter()
                session.run(None, feed)
                times[key].append(time.perf_counter() - start)
    return times


def flops_of(model, inputs) -> float:
    """FLOPs torch's FlopCounterMode sees in one forward (convs and matmuls; not DCNv3's sampling, RoIAlign, NMS)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(inputs)
    return float(counter.get_total_flops())


def run_section(title: str, runs, image: torch.Tensor, args, limits, large: bool = False) -> None:
    """Interleaved rounds of every model on ``image``, peak memory and ONNX Runtime timings of the detectors; one
    table with the speed against torchvision's R50 Mask R-CNN and each model's fraction of the sgemm peak. A
    ``large`` section (Cascade-L at 800x1333) skips the peak (the profiler's allocation events outgrow 24 GB) and the
    export (tracing keeps every sampling tensor of the reference DCNv3 alive: also more than 24 GB)."""
    inputs = {name: ([image] if "mask" in name else image[None]) for name in runs}
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for name, model in runs.items():
            model(inputs[name])  # warm-up
        for _ in range(args.rounds):
            for name, model in runs.items():
                start = time.perf_counter()
                model(inputs[name])
                times[name].append(time.perf_counter() - start)
        peaks = {name: peak_bytes(lambda: model(inputs[name]), torch.device("cpu")) / 2**20
                 for name, model in runs.items()} if not large else {}
    flops = {name: flops_of(model, inputs[name]) for name, model in runs.items()}
    onnx = not args.no_onnx and not large
    if onnx and importlib.util.find_spec("onnxruntime") is not None:
        times.update(onnx_times({n: m for n, m in runs.items() if "mask" in n}, image, args.rounds, args.threads))
    elif onnx:
        print("note: onnxruntime is not importable: the ONNX timings are skipped")
    base = statistics.median(times["maskrcnn_resnet50_fpn (torchvision)"])
    height, width = image.shape[1:]
    print(f"\n{title}: one {height}x{width} image, {args.threads} thread(s), {args.rounds} rounds, "
          f"torch {torch.__version__}")
    print(f"{'model':<42} {'s/image':>8} {'img/s':>7} {'vs torchvision R50 Mask R-CNN':>30} {'peak MiB':>9} "
          f"{'GFLOPs':>7} {'% sgemm peak':>12}")
    for name in times:
        median = statistics.median(times[name])
        peak = f"{peaks[name]:>9.1f}" if name in peaks else f"{'':>9}"
        model = name.split(" (onnxruntime)")[0]
        model = next((n for n in flops if n.split(" ")[0] == model), model)
        work = flops.get(model)
        gflops = f"{work / 1e9:>7.1f}" if work else f"{'':>7}"
        fraction = f"{100 * limits.flop_fraction(work, median):>11.1f}%" if work else f"{'':>12}"
        print(f"{name:<42} {median:>8.3f} {1 / median:>7.3f} {base / median:>29.2f}x {peak} {gflops} {fraction}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime timing of the detectors")
    parser.add_argument("--sections", nargs="+", choices=("small", "cascade", "cascade-onnx"),
                        default=["small", "cascade", "cascade-onnx"],
                        help="small: T-size models on one --size image; cascade: Cascade Mask R-CNN InternImage-L "
                             "on one 800x1333 image (the COCO test size), PyTorch only; cascade-onnx: Cascade-L on "
                             "one --size image, PyTorch and ONNX Runtime")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    limits = measure_limits(args.threads)
    print(limits.describe())
    if "small" in args.sections:
        size = args.size
        image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
        run_section("Mask R-CNN / UperNet InternImage-T", {
            "mask_rcnn_internimage_t": intern2.create_model("mask_rcnn_internimage_t", min_size=size,
                                                            max_size=size).eval(),
            "maskrcnn_resnet50_fpn (torchvision)": maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                          min_size=size, max_size=size).eval(),
            "upernet_internimage_t": intern2.create_model("upernet_internimage_t").eval(),
        }, image, args, limits)
    if "cascade" in args.sections:
        image = torch.rand(3, 800, 1333, generator=torch.Generator().manual_seed(0))
        run_section("Cascade Mask R-CNN InternImage-L", {
            "cascade_mask_rcnn_internimage_l": intern2.create_model("cascade_mask_rcnn_internimage_l").eval(),
            "maskrcnn_resnet50_fpn (torchvision)": maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval(),
        }, image, args, limits, large=True)
    if "cascade-onnx" in args.sections:
        size = args.size
        image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
        run_section("Cascade Mask R-CNN InternImage-L, PyTorch and ONNX Runtime", {
            "cascade_mask_rcnn_internimage_l": intern2.create_model("cascade_mask_rcnn_internimage_l", min_size=size,
                                                                    max_size=size).eval(),
            "maskrcnn_resnet50_fpn (torchvision)": maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                          min_size=size, max_size=size).eval(),
        }, image, args, limits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
