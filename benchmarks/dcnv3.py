"""DCNv3 core benchmark: intern2's paths against the official pure-PyTorch algorithm, in one process.

Every figure is a ratio against the baseline measured in the same run (interleaved rounds, median), plus
absolute medians and peak memory for context. The baseline re-implements the official ``dcnv3_core_pytorch``
algorithm: zero-pad the NHWC input, build normalised sampling grids on every call, one ``F.grid_sample`` over
an (N*G, D, Hp, Wp) copy, multiply by the mask, sum over points, autograd through all of it. The second peer is
``torchvision.ops.deform_conv2d`` made equivalent (depthwise all-ones weight, offset_groups=G, offsets and mask
permuted to its row-major point order, layout conversions included in the time).

    python benchmarks/dcnv3.py                       # CPU: 4 InternImage-T stages, batch 1 and 8, 1 and 2 threads
    python benchmarks/dcnv3.py --quick               # one round of everything, for a smoke test
    python benchmarks/dcnv3.py --device cuda         # GPU: batch 64, float32 and bfloat16, Triton vs baseline
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
import torchvision

from intern2.ops import dcnv3
from machine import Limits, measure_limits

STAGES = [(56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32)]  # (H=W, C, G) of InternImage-T at 224 px
KERNEL, STRIDE, PAD, DILATION = 3, 1, 1, 1
# Issue 20 (CPU: geomean of the 4 stages, batch 8, 1 thread; no stage below "floor"; training memory <= "mem").
TARGETS = {"fwd": 5.0, "fwdbwd": 5.0, "mem": 0.3, "floor": 3.0, "gpu": 5.0}


def official_core(inp: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """The official pure-PyTorch DCNv3 algorithm (k3, s1, p1, d1, offset_scale 1), re-implemented."""
    n, h, w, c = inp.shape
    d = c // group
    points = KERNEL * KERNEL
    padded = F.pad(inp, [0, 0, PAD, PAD, PAD, PAD])
    hp, wp = h + 2 * PAD, w + 2 * PAD
    # Reference points (window centres) and the dilation grid, normalised by the padded size, rebuilt per call.
    half = (DILATION * (KERNEL - 1)) // 2
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(half + 0.5, half + 0.5 + (h - 1) * STRIDE, h, dtype=torch.float32, device=inp.device),
        torch.linspace(half + 0.5, half + 0.5 + (w - 1) * STRIDE, w, dtype=torch.float32, device=inp.device),
        indexing="ij")
    ref = torch.stack((ref_x.reshape(-1)[None] / wp, ref_y.reshape(-1)[None] / hp), -1).reshape(1, h, w, 1, 2)
    lin = torch.linspace(-half, -half + (KERNEL - 1) * DILATION, KERNEL, dtype=torch.float32, device=inp.device)
    gx, gy = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([gx / wp, gy / hp], -1).reshape(-1, 1, 2).repeat(1, group, 1).permute(1, 0, 2)
    grid = grid.reshape(1, 1, 1, group * points, 2)
    norm = torch.tensor([wp, hp], device=inp.device).reshape(1, 1, 1, 2).repeat(1, 1, 1, group * points)
    loc = (ref + grid).repeat(n, 1, 1, 1, 1).flatten(3, 4) + offset / norm
    grids = (2 * loc - 1).to(inp.dtype)
    value = padded.view(n, hp * wp, c).transpose(1, 2).reshape(n * group, d, hp, wp)
    grids = grids.view(n, h * w, group, points, 2).transpose(1, 2).flatten(0, 1)
    sampled = F.grid_sample(value, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = mask.view(n, h * w, group, points).transpose(1, 2).reshape(n * group, 1, h * w, points)
    out = (sampled * weights).sum(-1).view(n, c, h * w)
    return out.transpose(1, 2).reshape(n, h, w, c).contiguous()


def torchvision_core(inp: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` computing exactly DCNv3 (depthwise ones weight, permuted offsets)."""
    n, h, w, c = inp.shape
    k = KERNEL
    # DCNv3 point p = i*k + j (i column, j row), pair (x, y) -> torchvision (row, column) order, pair (y, x).
    off = offset.view(n, h, w, group, k, k, 2).permute(0, 3, 5, 4, 6, 1, 2).flip(4).reshape(n, -1, h, w)
    msk = mask.view(n, h, w, group, k, k).permute(0, 3, 5, 4, 1, 2).reshape(n, -1, h, w)
    weight = torch.ones(c, 1, k, k, dtype=inp.dtype, device=inp.device)
    out = torchvision.ops.deform_conv2d(inp.permute(0, 3, 1, 2), off, weight, padding=PAD, mask=msk)
    return out.permute(0, 2, 3, 1)


@contextlib.contextmanager
def _kineto_quiet():
    """Silence the C++ stderr of a profiler session: kineto prints 'USDT ... profiler_start/stop' lines (and a
    'gpuGetDeviceCount failed' error on CPU-only machines) whatever KINETO_LOG_LEVEL says, which buried the
    benchmark's table. Python exceptions still propagate; only file descriptor 2 is redirected, and restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated above the level at call start."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    # CPU: running sum of the profiler's raw allocation events (deterministic, load-independent).
    with _kineto_quiet(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                  profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def make_inputs(batch: int, size: int, channels: int, group: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(size * 1000 + channels + batch)
    points = KERNEL * KERNEL
    inp = torch.randn(batch, size, size, channels, generator=gen)
    offset = torch.rand(batch, size, size, group * points * 2, generator=gen) * 4 - 2
    mask = torch.randn(batch, size, size, group, points, generator=gen).softmax(-1).flatten(3)
    grad = torch.randn(batch, size, size, channels, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (inp, offset, mask, grad)]


def runner(core: Callable, tensors, group: int, mode: str) -> Callable[[], object]:
    inp, offset, mask, grad = tensors
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return core(inp, offset, mask, group)
        return run
    leaves = [t.detach().requires_grad_() for t in (inp, offset, mask)]

    def run():
        out = core(*leaves, group)
        return torch.autograd.grad(out, leaves, grad)
    return run


def timed(fn: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def intern2_core(impl: str) -> Callable:
    def core(inp, offset, mask, group):
        return dcnv3(inp, offset, mask, KERNEL, STRIDE, PAD, DILATION, group, impl=impl)
    return core


def measure(impls: Dict[str, Callable], tensors, group: int, mode: str, rounds: int, device) -> Dict[str, dict]:
    runs = {name: runner(core, tensors, group, mode) for name, core in impls.items()}
    # The gate's reference: the baseline in float32 at least. In half precision the baseline (its sampling grid is
    # built in bfloat16: ~0.2 px off at 56 px) is only a timing peer.
    half = tensors[0].dtype in (torch.bfloat16, torch.float16)
    reference = runner(impls["baseline"], [t.float() for t in tensors] if half else tensors, group, mode)()
    for name, run in runs.items():  # numerical gate before timing (also the warm-up / compile call)
        result = run()
        if half and name == "baseline":
            continue
        pairs = [(reference, result)] if mode == "fwd" else list(zip(reference, result))
        err = max((a.float() - b.float()).abs().max().item() for a, b in pairs[:1])
        tol = 1e-4 if tensors[0].dtype == torch.float32 else 5e-2
        if err > tol:
            raise SystemExit(f"{name} {mode}: output differs from the baseline by {err:.2e} (> {tol})")
        run()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved: load on a shared machine hits every implementation alike
        for name, run in runs.items():
            times[name].append(timed(run, device))
    return {name: {"median_ms": statistics.median(ts), "min_ms": min(ts),
                   "peak_mib": peak_bytes(runs[name], device) / 2**20}
            for name, ts in times.items()}


def compulsory_bytes(batch: int, size: int, channels: int, group: int, mode: str, dtype: torch.dtype) -> int:
    """Bytes an ideal kernel must move: read input, offsets, mask and write the output once; the backward also
    reads them and the output gradient and writes the three gradients."""
    pixels, points = batch * size * size, KERNEL * KERNEL
    tensors = pixels * (channels + group * points * 3)  # input + offset (x, y) + mask ...
    once = (tensors + pixels * channels) * torch.finfo(dtype).bits // 8  # ... + output
    return once if mode == "fwd" else 3 * once


def geomean(values: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=None, help="float32 bfloat16 float16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-torchvision", action="store_true", help="skip the (slow) torchvision peer")
    parser.add_argument("--quick", action="store_true", help="1 round, batch 1, 1 thread: a smoke test")
    parser.add_argument("--json", help="also write all measurements to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batches = args.batches or ([64] if gpu else [1, 8])
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["float32", "bfloat16"] if gpu else ["float32"]))]
    threads = [torch.get_num_threads()] if gpu else args.threads
    if args.quick:
        batches, threads, args.rounds = batches[:1] if gpu else [1], threads[:1], 1
    impls = {"baseline": official_core}
    if not args.no_torchvision:
        impls["torchvision"] = torchvision_core
    impls["reference"] = intern2_core("reference")
    impls["triton" if gpu else "fast"] = intern2_core("triton" if gpu else "fast")
    ours = "triton" if gpu else "fast"

    print(f"device: {torch.cuda.get_device_name() if gpu else 'cpu'}; torch {torch.__version__}; "
          f"rounds {args.rounds}; kernel 3x3 stride 1 pad 1; offsets U[-2, 2] px; mask softmax")
    limits: Dict[int, Limits] = {}
    if not gpu:  # the core gathers: its limit is memory bandwidth (% bw: compulsory bytes / time vs one big copy)
        for nthreads in threads:
            limits[nthreads] = measure_limits(nthreads)
            print(limits[nthreads].describe())
    header = (f"{'dtype':>8} {'thr':>3} {'N':>3} {'HxW':>5} {'C':>4} {'G':>3} {'mode':>6} | "
              + " ".join(f"{name + ' ms':>16}" for name in impls) + " | "
              + " ".join(f"{name + ' x':>14}" for name in impls if name != "baseline") + " | "
              + " ".join(f"{name + ' mem':>12}" for name in impls if name != "baseline")
              + (f" | {ours + ' % bw':>10}" if limits else ""))
    print(header)
    print("-" * len(header))
    records = []
    for dtype in dtypes:
        for nthreads in threads:
            torch.set_num_threads(nthreads)
            for batch in batches:
                for size, channels, group in STAGES:
                    tensors = make_inputs(batch, size, channels, group, dtype, device)
                    for mode in ("fwd", "fwdbwd"):
                        res = measure(impls, tensors, group, mode, args.rounds, device)
                        base = res["baseline"]
                        moved = compulsory_bytes(batch, size, channels, group, mode, dtype)
                        bandwidth = (limits[nthreads].bandwidth_fraction(moved, res[ours]["median_ms"] / 1e3)
                                     if limits else None)
                        rec = dict(dtype=str(dtype).split(".")[-1], threads=nthreads, batch=batch, size=size,
                                   channels=channels, group=group, mode=mode, results=res,
                                   bandwidth_fraction=bandwidth)
                        records.append(rec)
                        print(f"{rec['dtype']:>8} {nthreads:>3} {batch:>3} {size:>2}x{size:<2} "
                              f"{channels:>4} {group:>3} {mode:>6} | "
                              + " ".join(f"{r['median_ms']:>16.2f}" for r in res.values()) + " | "
                              + " ".join(f"{base['median_ms'] / r['median_ms']:>13.2f}x"
                                         for n, r in res.items() if n != "baseline") + " | "
                              + " ".join(f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):>11.2f}x"
                                         for n, r in res.items() if n != "baseline")
                              + (f" | {100 * bandwidth:>9.1f}%" if bandwidth is not None else ""), flush=True)
    print()
    print(f"Summary ({ours} vs baseline; speed = baseline median / {ours} median; mem = peak ratio):")
    failed = False
    for dtype in dtypes:
        for nthreads in threads:
            for batch in batches:
                rows = [r for r in records if r["threads"] == nthreads and r["batch"] == batch
                        and r["dtype"] == str(dtype).split(".")[-1]]
                line = f"  {str(dtype).split('.')[-1]} threads={nthreads} batch={batch}:"
                for mode in ("fwd", "fwdbwd"):
                    ratios = [r["results"]["baseline"]["median_ms"] / r["results"][ours]["median_ms"]
                              for r in rows if r["mode"] == mode]
                    mems = [r["results"][ours]["peak_mib"] / r["results"]["baseline"]["peak_mib"]
                            for r in rows if r["mode"] == mode]
                    line += f"  {mode} geomean {geomean(ratios):.2f}x (min {min(ratios):.2f}x), mem {max(mems):.2f}x"
                    # The stated targets: CPU float32, 1 thread, batch 8; GPU batch 64.
                    judged = (gpu and batch == 64) or (not gpu and nthreads == 1 and batch == 8
                                                       and dtype == torch.float32)
                    if judged:
                        goal = TARGETS["gpu"] if gpu else TARGETS[mode]
                        ok = geomean(ratios) >= goal and (gpu or (min(ratios) >= TARGETS["floor"]
                                                                  and (mode == "fwd" or max(mems) <= TARGETS["mem"])))
                        failed |= not ok
                        floor = "" if gpu else f", no stage < {TARGETS['floor']:.0f}x"
                        line += f" [target {goal:.0f}x{floor}: {'met' if ok else 'MISSED'}]"
                print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
    return 1 if failed and not args.quick else 0


if __name__ == "__main__":
    raise SystemExit(main())
