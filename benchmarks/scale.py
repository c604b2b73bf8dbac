"""The 1.3B translator at its real size under FSDP2, on one CPU machine.

Training ``intern2_mt_1p3b`` (1,370,638,336 parameters) with AdamW in float32 holds 16 bytes per parameter —
weights, gradients and the two AdamW moments: ~22 GB in one unsharded process, more than a 24 GB machine leaves
free. FSDP2 (``fully_shard`` per layer, through :func:`intern2.engine.distributed.fully_shard_model`, as
``intern2 train --set fsdp=true`` does) keeps 1/N of them on each of N ranks. Sections:

* ``check``: a 2-layer slice of the preset (1 encoder + 1 decoder layer; every width and the 256k-row shared
  embedding real) trained for ``--steps`` AdamW steps by 2 gloo ranks under FSDP2, each on half of every global
  batch, and by one unsharded process on the whole batches. The per-step losses must agree to float32 reduction
  order (relative 1e-5): sharding changes where the numbers live, not what is computed.
* ``rank``: one rank of an N-rank FSDP2 job on the full preset, for each N of ``--world-sizes``: built on the meta
  device, sharded, its shards initialised (the 22 GB model never exists), then trained for ``--steps`` steps on
  short sequences. Prints the rank's peak resident memory during training (whole process: its shards of weights,
  gradients and AdamW states, the all-gathered layers, activations) and its step time as a fraction of the sgemm
  peak. The collectives go through torch's fake process group: this measures one rank's memory and compute
  exactly, not communication or the values (that is what ``check`` verifies). Two real ranks of the full preset
  cannot run here: together they hold the same ~22 GB (plus a whole embedding each while it is gathered).
* ``unsharded``: what one process would need — the parameter count x 16 bytes, plus the activations and buffers
  the rank runs measured — against this machine's memory.

Each measured run is its own process, so every peak is that run's alone.

    python benchmarks/scale.py                                 # all sections (~12 min on 2 cores)
    python benchmarks/scale.py --section rank --world-sizes 8 --steps 3
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import measure_limits  # noqa: E402

from intern2.engine.distributed import fully_shard_model  # noqa: E402
from intern2.models.translator import TRANSLATOR_VARIANTS, TranslationModel  # noqa: E402

PRESET = "intern2_mt_1p3b"
BYTES_PER_TRAINED_PARAM = 16  # float32 weight + gradient + AdamW exp_avg + exp_avg_sq
LOSS_TOLERANCE = 1e-5  # relative, per step


def _config(layers: Optional[int] = None):
    """The preset, or (``layers``) its slice without dropout, whose masks would differ between processes."""
    config = TRANSLATOR_VARIANTS[PRESET]
    if layers is not None:
        config = dataclasses.replace(config, encoder_layers=layers, decoder_layers=layers, dropout=0.0,
                                     attention_dropout=0.0)
    return config


def _batches(vocab: int, steps: int, rows: int, length: int) -> List[Dict[str, torch.Tensor]]:
    """Fixed random batches without padding (every row has ``length`` tokens: a rank's mean token loss then
    weighs each token as the global mean does)."""
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(4, vocab, (rows, length), generator=generator),
             "labels": torch.randint(4, vocab, (rows, length), generator=generator)} for _ in range(steps)]


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)


def _peak_rss_gib() -> float:
    """The process's resident-memory high-water mark (VmHWM) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _reset_peak_rss() -> None:
    """Restart the high-water mark from the current resident size (Linux >= 4.0: ``clear_refs`` value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


# --------------------------------------------------------------------------------------------------------- check
def _check_rank(rank: int, world_size: int, init_file: str, steps: int, rows: int, length: int,
                threads: int, results) -> None:
    torch.set_num_threads(threads)
    sharded = world_size > 1
    if sharded:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # every process builds the same initial weights
    model = TranslationModel(_config(layers=1))
    if sharded:
        fully_shard_model(model)
    optimizer = _optimizer(model)
    losses = []
    for batch in _batches(model.config.vocab_size, steps, rows, length):
        if sharded:  # this rank's half of the global batch
            batch = {k: v.chunk(world_size)[rank] for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if sharded:
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())
    if rank == 0:
        results.put(losses)
    if sharded:
        dist.destroy_process_group()


def run_check(steps: int, rows: int, length: int, threads: int) -> bool:
    """2 gloo ranks under FSDP2 against one unsharded process: same losses at every step."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        ranks = [context.Process(target=_check_rank, args=(r, 2, f"{folder}/init", steps, rows, length, threads,
                                                           results)) for r in range(2)]
        for process in ranks:
            process.start()
        sharded = results.get()
        for process in ranks:
            process.join()
    reference_process = context.Process(target=_check_rank, args=(0, 1, "", steps, rows, length, threads * 2,
                                                                  results))
    reference_process.start()
    reference = results.get()
    reference_process.join()
    worst = max(abs(a - b) / abs(b) for a, b in zip(sharded, reference))
    ok = worst <= LOSS_TOLERANCE
    config = _config(layers=1)
    print(f"check: {PRESET} sliced to 1 encoder + 1 decoder layer (d_model {config.d_model}, ffn "
          f"{config.encoder_ffn_dim}, vocab {config.vocab_size}), {steps} AdamW steps, global batch {rows}x{length}")
    for step, (a, b) in enumerate(zip(sharded, reference)):
        print(f"  step {step}: FSDP2 2 gloo ranks loss {a:.7f}   unsharded 1 process {b:.7f}")
    print(f"  worst relative difference {worst:.2e} (tolerance {LOSS_TOLERANCE:.0e}): {'PASS' if ok else 'FAIL'}")
    return ok


# ---------------------------------------------------------------------------------------------------------- rank
def _rank_run(world_size: int, steps: int, rows: int, length: int, threads: int, results) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # gathered buffers hold no real values (fake collectives): keep them fast
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    with torch.device("meta"):
        model = TranslationModel(_config())
    parameters = sum(p.numel() for p in model.parameters())
    fully_shard_model(model)
    model.to_empty(device="cpu")
    with torch.no_grad():  # initialise the local shards only
        model.init_weights()
    for module in model.modules():
        if hasattr(module, "reset"):  # the sinusoidal position tables
            module.reset("cpu")
    optimizer = _optimizer(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    setup_peak = _peak_rss_gib()
    _reset_peak_rss()
    times = []
    for batch in _batches(model.config.vocab_size, steps + 1, rows, length):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    results.put({"parameters": parameters, "local": local, "setup_peak": setup_peak, "peak": _peak_rss_gib(),
                 "step": statistics.median(times[1:])})  # step 0 allocates the AdamW states
    dist.destroy_process_group()


def train_flops(config, rows: int, length: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward) for ``rows`` sequences of ``length``
    source and ``length`` target tokens."""
    d, tokens = config.d_model, rows * length
    encoder = config.encoder_layers * (4 * d * d + 2 * d * config.encoder_ffn_dim)
    decoder = config.decoder_layers * (8 * d * d + 2 * d * config.decoder_ffn_dim)
    attention = (config.encoder_layers * 2 + config.decoder_layers * 4) * length * d  # scores + weighted values
    return 3 * 2 * tokens * (encoder + decoder + attention + d * config.vocab_size)


def run_rank(world_sizes: List[int], steps: int, rows: int, length: int, threads: int) -> List[Dict[str, float]]:
    """One fake-collective rank per world size; returns each run's figures (GiB, seconds)."""
    # Back large tensors with transparent huge pages (torch's switch, read when a process starts): a training
    # step allocates and first-touches gigabytes (the 256k-row embedding's gradients, the gathered layers), and
    # 4 KiB page faults would otherwise take a third of it.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    limits = measure_limits(threads)
    config = _config()
    flops = train_flops(config, rows, length)
    print(f"rank: one rank of an N-rank FSDP2 job on {PRESET}, {threads} thread(s), {rows} sequences x {length} "
          f"source + {length} target tokens per rank and step, AdamW, float32; fake collectives")
    runs = []
    for world_size in world_sizes:
        process = context.Process(target=_rank_run, args=(world_size, steps, rows, length, threads, results))
        process.start()
        result = results.get()
        process.join()
        state = result["local"] * BYTES_PER_TRAINED_PARAM / 2 ** 30
        runs.append({**result, "state": state})
        print(f"  N={world_size}: {result['local']:,} of {result['parameters']:,} parameters on the rank "
              f"(weights+grads+AdamW {state:.2f} GiB); peak RSS while training {result['peak']:.2f} GiB "
              f"(setup {result['setup_peak']:.2f} GiB); step {result['step']:.2f} s = "
              f"{flops / 1e9:.0f} GFLOP, {100 * limits.flop_fraction(flops, result['step']):.1f}% of sgemm peak")
    return runs


def run_unsharded(runs: List[Dict[str, float]]) -> None:
    """What one unsharded process needs: all the state, plus the smallest rest (activations, the gathered and
    embedding-gradient buffers) a rank run measured."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in TranslationModel(_config()).parameters())
    need = parameters * BYTES_PER_TRAINED_PARAM / 2 ** 30
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    line = f"unsharded: {parameters:,} parameters x {BYTES_PER_TRAINED_PARAM} bytes = {need:.1f} GiB of state"
    if runs:
        rest = min(run["peak"] - run["state"] for run in runs)
        need += rest
        line += (f" + {rest:.1f} GiB of activations and buffers (the least a rank above needed) = {need:.1f} GiB; "
                 f"this machine has {total:.1f} GiB: {'does not fit' if need > total else 'fits'}")
    else:
        line += f" before activations (the rank section measures those); this machine has {total:.1f} GiB"
    print(line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=("check", "rank", "unsharded", "all"), default="all")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps per run (rank: after one warm-up step)")
    parser.add_argument("--rows", type=int, default=4, help="sequences per rank and step")
    parser.add_argument("--length", type=int, default=64, help="source (and target) tokens per sequence")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)
    print(measure_limits(args.threads).describe())
    ok = True
    if args.section in ("check", "all"):
        ok = run_check(args.steps, 2 * args.rows, args.length, args.threads)
    runs = []
    if args.section in ("rank", "all"):
        runs = run_rank(args.world_sizes, args.steps, args.rows, args.length, args.threads)
    if args.section in ("unsharded", "all"):
        run_unsharded(runs)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
