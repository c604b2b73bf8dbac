"""Video ViT on CPU: ViT-B 16x224 forward (1568 tokens) with SDPA attention against the official explicit
attention (softmax(q k^T * scale) v with the matrix materialised), attention peak memory, and a VideoMAE
pre-training step at 90% tube masking against forwarding only the visible tokens plus the decoder.

Random init, one process, interleaved rounds, medians; ratios against baselines measured in the same run. The
machine's limits are measured first; the forward pass and the training step are also stated as a share of the
sgemm peak (their FLOPs counted by torch's FlopCounterMode).

    python benchmarks/video.py [--rounds 3] [--threads 2] [--frames 16] [--size 224]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dcnv3 import peak_bytes  # noqa: E402
from machine import measure_limits  # noqa: E402

import intern2  # noqa: E402
from intern2.models import video_vit  # noqa: E402
from intern2.models.video_vit import keep_visible, pixel_targets, tube_mask, videomae_loss  # noqa: E402


def explicit_attention(self, x: torch.Tensor) -> torch.Tensor:
    """The official VideoMAE attention: the (N, N) matrix is materialised."""
    batch, tokens, dim = x.shape
    heads = self.num_heads
    bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias)) if self.q_bias is not None else None
    qkv = F.linear(x, self.qkv.weight, bias).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (dim // heads) ** -0.5, qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim))


@contextlib.contextmanager
def explicit_attention_patched():
    original = video_vit.Attention.forward
    video_vit.Attention.forward = explicit_attention
    try:
        yield
    finally:
        video_vit.Attention.forward = original


def visible_only_step(model, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference pre-training step written out: embed, keep the visible tokens, encoder blocks, decoder over
    visible + mask tokens, loss on the masked ones — the least work the method needs."""
    encoder = model.encoder
    x = keep_visible(encoder.embed(video), mask)
    for block in encoder.blocks:
        x = block(x)
    x = model.encoder_to_decoder(encoder.norm(x))
    pos = model.pos_embed.expand(video.shape[0], -1, -1)
    masked_pos = keep_visible(pos, ~mask)
    x = torch.cat([x + keep_visible(pos, mask), model.mask_token + masked_pos], dim=1)
    pred = model.decoder(x, masked_pos.shape[1])
    return videomae_loss(pred, pixel_targets(video, 16, 2), mask)


def interleaved(runs: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, float]:
    for fn in runs.values():
        fn()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def counted_flops(run: Callable[[], object]) -> float:
    """FLOPs of one call (torch's FlopCounterMode: matmuls, convolutions and attention; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return float(counter.get_total_flops())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    limits = measure_limits(args.threads)
    print(limits.describe())
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    video = torch.randn(1, 3, args.frames, args.size, args.size)
    model = intern2.create_model("videomae_vit_b", all_frames=args.frames, img_size=args.size).eval()
    tokens = model.pos_embed.shape[1]

    def forward():
        with torch.inference_mode():
            return model(video)

    def forward_explicit():
        with explicit_attention_patched():
            return forward()

    fwd = interleaved({"sdpa": forward, "explicit": forward_explicit}, args.rounds)
    block = model.blocks[0].attn
    x = torch.randn(1, tokens, model.embed_dim)
    with torch.inference_mode():
        attn_peak = peak_bytes(lambda: block(x), torch.device("cpu"))
        with explicit_attention_patched():
            attn_peak_explicit = peak_bytes(lambda: block(x), torch.device("cpu"))

    pretrain = intern2.create_model("videomae_pretrain_vit_b", all_frames=args.frames, img_size=args.size)
    mask = tube_mask(1, pretrain.grid, 0.9, torch.Generator().manual_seed(0))

    def step():
        loss = videomae_loss(pretrain(video, mask), pixel_targets(video, 16, 2), mask)
        loss.backward()
        pretrain.zero_grad(set_to_none=True)

    def reference_step():
        visible_only_step(pretrain, video, mask).backward()
        pretrain.zero_grad(set_to_none=True)

    steps = interleaved({"step": step, "reference": reference_step}, args.rounds)

    forward_flops, step_flops = counted_flops(forward), counted_flops(step)
    forward_ratio = fwd["explicit"] / fwd["sdpa"]
    memory_ratio = attn_peak / attn_peak_explicit
    step_ratio = steps["step"] / steps["reference"]
    print(f"ViT-B/16, {args.frames}x{args.size}x{args.size} ({tokens} tokens), batch 1, fp32, {args.threads} "
          f"thread(s), {args.rounds} rounds, torch {torch.__version__}")
    print(f"{'measurement':<52} {'intern2':>10} {'baseline':>10} {'ratio':>8} {'target':>10}")
    rows = [
        ("forward clips/s (SDPA vs explicit attention)", 1 / fwd["sdpa"], 1 / fwd["explicit"], forward_ratio,
         ">= 1.3x", forward_ratio >= 1.3),
        ("attention peak MiB, one layer (SDPA vs explicit)", attn_peak / 2**20, attn_peak_explicit / 2**20,
         memory_ratio, "<= 0.5x", memory_ratio <= 0.5),
        ("pre-train step s, 90% mask (model vs visible-only)", steps["step"], steps["reference"], step_ratio,
         "<= 1.1x", step_ratio <= 1.1),
    ]
    for name, ours, base, ratio, target, met in rows:
        print(f"{name:<52} {ours:>10.3f} {base:>10.3f} {ratio:>7.2f}x {target:>10} {'met' if met else 'MISSED'}")
    forward_share = 100 * limits.flop_fraction(forward_flops, fwd["sdpa"])
    step_share = 100 * limits.flop_fraction(step_flops, steps["step"])
    print(f"share of the sgemm peak: forward {forward_share:.1f}% ({forward_flops / 1e9:.0f} GFLOP), "
          f"pre-train step {step_share:.1f}% ({step_flops / 1e9:.0f} GFLOP)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
