"""What this machine can do, measured in the benchmark's own process, so every figure can say how close it is.

A ratio against a peer on one machine does not say whether a kernel is good: CPUs of one kind differ (AMD EPYC
with AVX-512, AMD EPYC with AVX2 only, Intel Xeon with AVX-512-BF16 and AMX). Each benchmark prints
:func:`measure_limits` first — the CPU model, the ISA features that matter, torch's thread count, sgemm (and, where
the CPU has bf16 instructions, bf16 gemm) GFLOP/s from one large matmul, and copy bandwidth — and states its results
as a fraction of the relevant limit: FLOP-bound work against the gemm peak, memory-bound work against the copy
bandwidth.

The sgemm peak is the faster of the two libraries in torch's x86 wheels: MKL (``torch.mm``, what ``F.linear``
calls) and oneDNN (what :class:`intern2.layers.Linear` calls at inference). They differ by CPU: on the AVX-512 AMD EPYC
we measured, MKL reaches ~70 GFLOP/s at one thread and oneDNN ~100, so MKL's figure alone understated the machine.

    python benchmarks/machine.py            # the limits at 1 thread and at every core
"""
from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from intern2.layers import linear, onednn_linear_available

ISA_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo states it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> Tuple[str, ...]:
    """Which of :data:`ISA_FEATURES` the CPU reports (its /proc/cpuinfo flags)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return tuple(f for f in ISA_FEATURES if f in flags)


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch pages, oneDNN kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class Limits:
    """The machine's measured limits at ``threads`` threads."""
    cpu: str
    features: Tuple[str, ...]
    threads: int
    sgemm_gflops: float  # the faster library's
    sgemm_by_library: Tuple[Tuple[str, float], ...]
    bf16_gflops: Optional[float]  # None: no bf16 instructions (torch would emulate them)
    copy_gbs: float  # bytes read + bytes written per second, of one large copy

    def describe(self) -> str:
        bf16 = f"{self.bf16_gflops:.0f} GFLOP/s" if self.bf16_gflops else "n/a (no bf16 instructions)"
        return (f"machine: {self.cpu}; ISA: {' '.join(self.features) or 'none of ' + ', '.join(ISA_FEATURES)}; "
                f"torch {torch.__version__}, {self.threads} thread(s); limits: sgemm {self.sgemm_gflops:.0f} GFLOP/s "
                f"({', '.join(f'{name} {value:.0f}' for name, value in self.sgemm_by_library)}), "
                f"bf16 gemm {bf16}, copy {self.copy_gbs:.1f} GB/s")

    def flop_fraction(self, flops: float, seconds: float, dtype: torch.dtype = torch.float32) -> float:
        """``flops`` done in ``seconds`` as a fraction of the gemm peak of ``dtype``."""
        peak = self.bf16_gflops if dtype == torch.bfloat16 and self.bf16_gflops else self.sgemm_gflops
        return flops / seconds / (peak * 1e9)

    def bandwidth_fraction(self, moved_bytes: float, seconds: float) -> float:
        """``moved_bytes`` (read + written) in ``seconds`` as a fraction of the copy bandwidth."""
        return moved_bytes / seconds / (self.copy_gbs * 1e9)


def measure_limits(threads: Optional[int] = None, gemm_size: int = 2048, copy_mib: int = 256,
                   repeats: int = 5) -> Limits:
    """Measure the limits at ``threads`` threads (default: torch's current count, which is restored)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        features = cpu_features()
        a, b = torch.randn(gemm_size, gemm_size), torch.randn(gemm_size, gemm_size)
        flops = 2.0 * gemm_size ** 3
        by_library = {"MKL": flops / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9}
        if onednn_linear_available():
            weight = b.t().contiguous()  # linear(a, weight) = a @ b
            with torch.inference_mode():
                by_library["oneDNN"] = flops / _best_seconds(lambda: linear(a, weight), repeats) / 1e9
        bf16 = None
        if {"avx512_bf16", "amx_bf16"} & set(features):
            a16, b16 = a.bfloat16(), b.bfloat16()
            bf16 = flops / _best_seconds(lambda: torch.mm(a16, b16), repeats) / 1e9
        source = torch.ones(copy_mib * 2 ** 18)  # float32: copy_mib MiB
        target = torch.empty_like(source)
        copy = 2 * source.numel() * 4 / _best_seconds(lambda: target.copy_(source), repeats) / 1e9
        return Limits(cpu_model(), features, torch.get_num_threads(), max(by_library.values()),
                      tuple(by_library.items()), bf16, copy)
    finally:
        torch.set_num_threads(previous)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}))
    args = parser.parse_args(argv)
    for threads in args.threads:
        print(measure_limits(threads).describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
