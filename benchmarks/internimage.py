"""InternImage-T inference throughput at 224 px against its baseline-core twin and timm peers, in one process.

Models (random init, eval, inference_mode), interleaved rounds, median seconds per batch -> images/s; every
ratio is against figures measured in the same run. "baseline core" is the same InternImage-T instance with the
DCNv3 core swapped for the official pure-PyTorch algorithm (re-implemented in benchmarks/dcnv3.py), i.e. what the
official code runs on a CPU. Peers: timm convnext_tiny, swin_tiny_patch4_window7_224, resnet50.

    python benchmarks/internimage.py                 # batch 1 and 8, 1 and 2 threads
    python benchmarks/internimage.py --quick         # one round, batch 1, 1 thread
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dcnv3 import official_core, peak_bytes  # noqa: E402
from machine import measure_limits  # noqa: E402

import intern2  # noqa: E402
import intern2.ops.dcnv3_module as dcnv3_module  # noqa: E402
from intern2.ops.dcnv3 import mask_softmax  # noqa: E402

# convnext_tiny: 0.9 is the FLOP ratio (4.5 vs 5.0 GMACs), i.e. equal efficiency.
TARGETS = {"vs_baseline": 1.5, "vs_convnext_tiny": 0.9}


def baseline_dcnv3(input, offset, mask, kernel_size, stride, pad, dilation, group, offset_scale=1.0,
                   remove_center=False, impl=None, softmax_mask=False):
    if (kernel_size, stride, pad, dilation, offset_scale, remove_center) != (3, 1, 1, 1, 1.0, False):
        raise ValueError("the baseline core is written for InternImage-T's k3 s1 p1 d1 layers")
    if softmax_mask:  # the mask softmax the module asks for, as intern2 computes it outside its CPU kernel
        mask = mask_softmax(mask, group)
    return official_core(input, offset, mask, group)


@contextlib.contextmanager
def core_swapped(core: Callable):
    original = dcnv3_module.dcnv3
    dcnv3_module.dcnv3 = core
    try:
        yield
    finally:
        dcnv3_module.dcnv3 = original


def build_models(names: List[str]) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    model = intern2.create_model("internimage_t").eval()
    runs: Dict[str, Callable] = {"internimage_t": model}

    def baseline(x):
        with core_swapped(baseline_dcnv3):
            return model(x)
    runs["internimage_t (baseline core)"] = baseline
    try:
        import timm
    except ImportError:
        print("timm not installed: skipping the timm peers")
        return runs
    for name in names:
        runs[name] = timm.create_model(name, pretrained=False).eval()
    return runs


def image_flops(run: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Floating-point operations of one 224 px image (multiply-adds count two)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        run(torch.zeros(1, 3, 224, 224))
    return float(counter.get_total_flops())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peers", nargs="*", default=["convnext_tiny", "swin_tiny_patch4_window7_224", "resnet50"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.threads, args.rounds = [1], [1], 1
    runs = build_models(args.peers)
    flops = {name: image_flops(run) for name, run in runs.items()}
    print(f"InternImage-T at 224 px, inference_mode, float32, rounds {args.rounds}; torch {torch.__version__}")
    print("GFLOP per image (torch's FlopCounterMode, 2 per multiply-add: papers' 'FLOPs' are multiply-adds, half "
          "of these; convolutions and matmuls, the DCNv3 core not counted): "
          + ", ".join(f"{name} {value / 1e9:.2f}" for name, value in flops.items()))
    failed = False
    for threads in args.threads:
        limits = measure_limits(threads)
        print(limits.describe())
        print(f"{'thr':>3} {'batch':>5} {'model':<32} {'ms/batch':>10} {'img/s':>8} {'vs baseline':>12} "
              f"{'vs convnext':>12} {'peak MiB':>9} {'% sgemm':>8}")
        torch.set_num_threads(threads)
        for batch in args.batches:
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            times: Dict[str, List[float]] = {name: [] for name in runs}
            with torch.inference_mode():
                for run in runs.values():  # warm-up (numba kernels compile or load from cache here)
                    run(x)
                for _ in range(args.rounds):
                    for name, run in runs.items():
                        start = time.perf_counter()
                        run(x)
                        times[name].append(time.perf_counter() - start)
                peaks = {name: peak_bytes(lambda: run(x), torch.device("cpu")) / 2**20 for name, run in runs.items()}
            median = {name: statistics.median(ts) for name, ts in times.items()}
            for name in runs:
                vs_base = median["internimage_t (baseline core)"] / median[name]
                vs_convnext = median["convnext_tiny"] / median[name] if "convnext_tiny" in median else float("nan")
                peak = 100 * limits.flop_fraction(flops[name] * batch, median[name])
                print(f"{threads:>3} {batch:>5} {name:<32} {median[name] * 1e3:>10.1f} {batch / median[name]:>8.2f} "
                      f"{vs_base:>11.2f}x {vs_convnext:>11.2f}x {peaks[name]:>9.1f} {peak:>7.1f}%")
            if threads == 1 and batch == 8:
                # Targets use the median of per-round ratios: the models of one round ran back to back, so a
                # machine slowing down between rounds moves both.
                def paired(peer: str) -> float:
                    return statistics.median(p / t for p, t in zip(times[peer], times["internimage_t"]))
                ratios = {"vs_baseline": paired("internimage_t (baseline core)")}
                if "convnext_tiny" in median:
                    ratios["vs_convnext_tiny"] = paired("convnext_tiny")
                for key, value in ratios.items():
                    ok = value >= TARGETS[key]
                    failed |= not ok
                    print(f"    target {key} >= {TARGETS[key]}x (median of per-round ratios): {value:.2f}x "
                          f"{'met' if ok else 'MISSED'}")
    return 1 if failed and not args.quick else 0


if __name__ == "__main__":
    raise SystemExit(main())
