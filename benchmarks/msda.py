"""MSDA core benchmark: intern2's fast CPU op against mmcv's pure-PyTorch algorithm, in one process.

Every figure is a ratio against the baseline measured in the same run (interleaved rounds, median), plus absolute
medians and the peak memory of a training step (forward + backward, torch's allocations as the profiler records
them; the numba kernels' per-thread tables, a few KB, are not counted), and the fast op's compulsory bytes per
second as a fraction of the machine's copy bandwidth (benchmarks/machine.py). The baseline re-implements mmcv's
``multi_scale_deformable_attn_pytorch``: split the value per level, one ``F.grid_sample`` per level over
(N*M, D, H, W) maps, stack the samples, multiply by the attention weights, sum, autograd through all of it.

Shapes: DINO-T's encoder at 800x1333 (strides 8-64) and Mask2Former's pixel decoder at 512x512 (strides 8-32);
8 heads of 32 channels, 4 points, one query per key (self-attention), batch 1, locations U(0, 1).

    python benchmarks/msda.py                # both shapes, 1 and 2 threads
    python benchmarks/msda.py --threads 4    # other thread counts
    python benchmarks/msda.py --quick        # 1/5-size maps, one round: a smoke test
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from dcnv3 import geomean, peak_bytes, timed  # the DCNv3 benchmark's helpers (same folder)
from intern2.ops import ms_deform_attn
from machine import Limits, measure_limits

SHAPES = {"DINO-T 800x1333": [(100, 167), (50, 84), (25, 42), (13, 21)],
          "Mask2Former 512x512": [(64, 64), (32, 32), (16, 16)]}
QUICK_SHAPES = {"DINO-T 160x267": [(20, 34), (10, 17), (5, 9), (3, 5)],
                "Mask2Former 128x128": [(16, 16), (8, 8), (4, 4)]}
HEADS, DIM, POINTS = 8, 32, 4
TARGETS = {"fwd": 3.0, "fwdbwd": 3.0, "mem": 0.5}
CPU = torch.device("cpu")


def mmcv_core(value: torch.Tensor, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: torch.Tensor,
              attention_weights: torch.Tensor) -> torch.Tensor:
    """mmcv's pure-PyTorch MSDA algorithm, re-implemented: grid_sample per level, stack, weight, sum."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(spatial_shapes):
        maps = per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, dim, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (N*M, Q, P, 2)
        samples.append(F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(batch, heads * dim, queries)
    return out.transpose(1, 2).contiguous()


def fast_core(value, spatial_shapes, sampling_locations, attention_weights) -> torch.Tensor:
    return ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, impl="fast")


def make_inputs(spatial_shapes: Sequence[Tuple[int, int]]):
    gen = torch.Generator().manual_seed(len(spatial_shapes) * 1000 + spatial_shapes[0][1])
    keys = sum(h * w for h, w in spatial_shapes)
    levels = len(spatial_shapes)
    value = torch.randn(1, keys, HEADS, DIM, generator=gen)
    locations = torch.rand(1, keys, HEADS, levels, POINTS, 2, generator=gen)
    weights = torch.randn(1, keys, HEADS, levels * POINTS, generator=gen).softmax(-1).view(1, keys, HEADS, levels,
                                                                                          POINTS)
    grad = torch.randn(1, keys, HEADS * DIM, generator=gen)
    return value, locations, weights, grad


def runner(core: Callable, spatial_shapes, tensors, mode: str) -> Callable[[], object]:
    value, locations, weights, grad = tensors
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return core(value, spatial_shapes, locations, weights)
        return run
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]

    def run():
        out = core(leaves[0], spatial_shapes, *leaves[1:])
        return torch.autograd.grad(out, leaves, grad)
    return run


def measure(spatial_shapes, mode: str, rounds: int) -> Dict[str, dict]:
    tensors = make_inputs(spatial_shapes)
    runs = {"baseline": runner(mmcv_core, spatial_shapes, tensors, mode),
            "fast": runner(fast_core, spatial_shapes, tensors, mode)}
    want, got = runs["baseline"](), runs["fast"]()  # numerical gate (and warm-up / compile call)
    pairs = [(want, got)] if mode == "fwd" else list(zip(want, got))
    for what, (a, b) in zip(("out/grad_value", "grad_locations", "grad_weights"), pairs):
        err = (a - b).abs() / a.abs().max().clamp_min(1e-30)
        # d/d(location) jumps at pixel boundaries, and grid_sample's float32 pixel coordinates put a few samples
        # within ~1e-5 px of one on the other side: there only the bulk must agree.
        kinked = what == "grad_locations"
        off = (err > 1e-4).float().mean().item() if kinked else err.max().item()
        if off > 1e-4:
            how = "of the elements differ by more than 1e-4 of the max" if kinked else "of the max off"
            raise SystemExit(f"fast {mode} {what}: {off:.1e} {how} from the baseline")
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved: load on a shared machine hits both alike
        for name, run in runs.items():
            times[name].append(timed(run, CPU))
    return {name: {"median_ms": statistics.median(ts), "peak_mib": peak_bytes(runs[name], CPU) / 2**20}
            for name, ts in times.items()}


def compulsory_bytes(spatial_shapes: Sequence[Tuple[int, int]], mode: str) -> int:
    """Bytes an ideal kernel must move: the forward reads value, locations and weights once and writes the output;
    the backward reads them and the output gradient again and writes their three gradients."""
    keys = sum(h * w for h, w in spatial_shapes)
    value = keys * HEADS * DIM  # also the output's size: one query per key
    per_point = keys * HEADS * len(spatial_shapes) * POINTS * 3  # locations (x, y) + weights
    forward = 2 * value + per_point
    return 4 * (forward if mode == "fwd" else forward + 3 * value + 2 * per_point)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1/5-size maps, one round, first thread count")
    args = parser.parse_args(argv)
    shapes, threads = SHAPES, args.threads
    if args.quick:
        shapes, threads, args.rounds = QUICK_SHAPES, threads[:1], 1

    print(f"rounds {args.rounds}; heads {HEADS} x {DIM} channels, {POINTS} points, queries = keys, batch 1, float32, "
          f"locations U(0, 1)")
    # The core gathers: its limit is memory bandwidth (% bw: compulsory bytes / time vs one big copy).
    limits: Dict[int, Limits] = {}
    for nthreads in threads:
        limits[nthreads] = measure_limits(nthreads)
        print(limits[nthreads].describe())
    header = (f"{'thr':>3} {'shape':>20} {'S':>6} {'mode':>6} | {'baseline ms':>11} {'fast ms':>9} | {'speed':>7} | "
              f"{'baseline MiB':>12} {'fast MiB':>9} {'mem':>6} | {'fast % bw':>9}")
    print(header)
    print("-" * len(header))
    failed = False
    summary = []
    for nthreads in threads:
        torch.set_num_threads(nthreads)
        speeds: Dict[str, List[float]] = {"fwd": [], "fwdbwd": []}
        mems = []
        for name, spatial_shapes in shapes.items():
            keys = sum(h * w for h, w in spatial_shapes)
            for mode in ("fwd", "fwdbwd"):
                res = measure(spatial_shapes, mode, args.rounds)
                base, fast = res["baseline"], res["fast"]
                speed = base["median_ms"] / fast["median_ms"]
                speeds[mode].append(speed)
                mem = fast["peak_mib"] / base["peak_mib"]
                if mode == "fwdbwd":
                    mems.append(mem)
                bandwidth = limits[nthreads].bandwidth_fraction(compulsory_bytes(spatial_shapes, mode),
                                                                fast["median_ms"] / 1e3)
                print(f"{nthreads:>3} {name:>20} {keys:>6} {mode:>6} | {base['median_ms']:>11.1f} "
                      f"{fast['median_ms']:>9.1f} | {speed:>6.2f}x | {base['peak_mib']:>12.1f} "
                      f"{fast['peak_mib']:>9.1f} {mem:>5.2f}x | {100 * bandwidth:>8.1f}%", flush=True)
        line = f"  threads={nthreads}:"
        for mode in ("fwd", "fwdbwd"):
            ok = min(speeds[mode]) >= TARGETS[mode]
            failed |= not ok
            line += (f"  {mode} geomean {geomean(speeds[mode]):.2f}x (min {min(speeds[mode]):.2f}x) "
                     f"[target {TARGETS[mode]:.0f}x: {'met' if ok else 'MISSED'}]")
        ok = max(mems) <= TARGETS["mem"]
        failed |= not ok
        line += f"  training mem {max(mems):.2f}x [target {TARGETS['mem']}x: {'met' if ok else 'MISSED'}]"
        summary.append(line)
    print("\nSummary (fast vs baseline; speed = baseline median / fast median, min over shapes judged; "
          "mem = peak ratio, max judged):")
    print("\n".join(summary))
    return 1 if failed and not args.quick else 0


if __name__ == "__main__":
    raise SystemExit(main())
