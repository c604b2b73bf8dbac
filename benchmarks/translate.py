"""Translation decoding speed: target tokens/s of intern2's TranslationModel.generate vs HF transformers and
CTranslate2 on the same weights, in the same process.

Setup (issue 7): random-init d512 6+6 layers, 32k vocabulary (``intern2_mt_small``), source 30 tokens, exactly 32
generated tokens (min_new_tokens = max_new_tokens = 32, the forced target-language token included), batch 1 and
16, greedy and beam 4, CPU. Peers run when importable (neither is a dependency of intern2); a missing one is
skipped with a note::

    pip install --target /tmp/peers transformers ctranslate2
    PYTHONPATH=/tmp/peers python benchmarks/translate.py --threads 2

Every figure in the ratio columns is relative to HF ``generate`` (fp32, SDPA attention) measured in this run.
Targets: intern2 >= 1.5x HF at batch 1 greedy, >= 1.0x HF at batch 16 beam 4, intern2 int8 >= 0.8x CT2 int8.

CTranslate2 runs in a child process that takes its turn in every round like the others: in-process, its library
binds to the OpenMP runtime torch loaded, and the thread team of its worker thread there gives libgomp more threads
than cores, so libgomp stops letting torch's idle threads spin and every multi-threaded torch op after it waits for
sleeping threads to wake (intern2 int8 ran 2x slower once CT2 had run once in the process).
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import intern2
from machine import measure_limits

NEW_TOKENS = 32
SOURCE_TOKENS = 30
SETTINGS = ((1, 1), (1, 4), (16, 1), (16, 4))  # (batch, beams)


def median_seconds(runs: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Median seconds per system; the systems take turns in every round, so a burst of load from elsewhere on a
    shared machine hits them alike instead of spoiling one system's whole measurement."""
    for run in runs.values():
        run()  # warm-up: allocations, int8 weight packing, CT2 model load
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def source_batch(batch: int, vocab: int, lang: int, seed: int = 0) -> torch.Tensor:
    """[batch, 30] ids in the NLLB layout: language token, 28 random pieces, </s>."""
    pieces = torch.randint(4, vocab - 300, (batch, SOURCE_TOKENS - 2), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.full((batch, 1), lang), pieces, torch.full((batch, 1), 2)], dim=1)


def intern2_runner(model, ids: torch.Tensor, beams: int, tgt: int) -> Callable[[], None]:
    def run():
        out = model.generate(ids, torch.ones_like(ids), forced_bos_token_id=tgt, num_beams=beams,
                             min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS)
        assert out.shape[1] == NEW_TOKENS + 1, out.shape
    return run


def hf_model(folder: Path):
    try:
        import transformers
    except ImportError:
        print("note: transformers is not importable: HF baseline skipped (ratios need it)")
        return None
    model = transformers.M2M100ForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")
    return model.eval()


def hf_runner(model, ids: torch.Tensor, beams: int, tgt: int) -> Callable[[], None]:
    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), forced_bos_token_id=tgt,
                                 num_beams=beams, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS,
                                 do_sample=False, early_stopping=False)
        assert out.shape[1] == NEW_TOKENS + 1, out.shape
    return run


class _IdTokenizer:
    """The few tokenizer members CTranslate2's M2M-100 converter reads; token i is named 't<i>'."""

    bos_token, eos_token, unk_token, unk_token_id = "<s>", "</s>", "<unk>", 3
    special_tokens_map: Dict = {}

    def __init__(self, size: int):
        self.tokens = ["<s>", "<pad>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, size)]

    def get_vocab(self) -> Dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    def convert_ids_to_tokens(self, index):
        return self.tokens[index] if isinstance(index, int) else [self.tokens[i] for i in index]


def _ct2_serve(connection, folder: str, vocab: int, out: str, threads: int) -> None:
    """Child process: convert the HF folder, load fp32 and int8 translators, then answer translate requests."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _IdTokenizer(vocab)  # our folder has no HF tokenizer; CT2 only needs token names

    Converter(folder).convert(out, force=True)
    translators = {compute: ctranslate2.Translator(out, device="cpu", compute_type=compute, inter_threads=1,
                                                   intra_threads=threads) for compute in ("float32", "int8")}
    connection.send("ready")
    for compute, source, prefix, beams in iter(connection.recv, None):
        # CT2 counts the target prefix in the decoding length, like min/max_new_tokens count the forced token.
        results = translators[compute].translate_batch(source, target_prefix=prefix, beam_size=beams,
                                                       max_decoding_length=NEW_TOKENS,
                                                       min_decoding_length=NEW_TOKENS)
        connection.send(len(results[0].hypotheses[0]))


class CT2Process:
    """CTranslate2 (fp32 and int8) in a child process (see the module docstring for why not in this one)."""

    def __init__(self, folder: Path, vocab: int, out: Path, threads: int):
        self.connection, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_ct2_serve, args=(child, str(folder), vocab, str(out), threads), daemon=True)
        self.process.start()
        child.close()  # so that a child that dies makes recv raise EOFError instead of waiting forever
        self.connection.recv()  # "ready"

    def runner(self, compute: str, ids: torch.Tensor, beams: int, tgt: int) -> Callable[[], None]:
        source = [["<s>" if i == 0 else "</s>" if i == 2 else f"t{i}" for i in row] for row in ids.tolist()]
        request = (compute, source, [[f"t{tgt}"]] * len(source), beams)

        def run():
            self.connection.send(request)
            length = self.connection.recv()
            assert length == NEW_TOKENS, length
        return run

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per setting (median)")
    args = parser.parse_args(argv)
    limits = measure_limits(args.threads)
    print(limits.describe())
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = intern2.create_model("intern2_mt_small").eval()  # random init, d512 6+6, vocab 32000
    vocab = model.config.vocab_size
    src_lang, tgt_lang = vocab - 200, vocab - 100  # two ids standing in for language tokens
    int8 = model.quantize_dynamic()
    systems: Dict[str, Tuple[object, Callable]] = {"intern2": (model, intern2_runner),
                                                   "intern2 int8": (int8, intern2_runner)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = model.save_pretrained(Path(tmp) / "hf")
        hf = hf_model(folder)
        if hf is not None:
            systems["HF"] = (hf, hf_runner)
        ct2 = None
        if hf is not None and importlib.util.find_spec("ctranslate2") is None:
            print("note: ctranslate2 is not importable: CTranslate2 peers skipped")
        elif hf is not None:
            ct2 = CT2Process(folder, vocab, Path(tmp) / "ct2", args.threads)
            systems["CT2"], systems["CT2 int8"] = ("float32", ct2.runner), ("int8", ct2.runner)
        rates: Dict[Tuple[int, int], Dict[str, float]] = {}
        for batch, beams in SETTINGS:
            ids = source_batch(batch, vocab, src_lang)
            seconds = median_seconds({name: make(system, ids, beams, tgt_lang)
                                      for name, (system, make) in systems.items()}, args.repeats)
            rates[batch, beams] = {name: batch * NEW_TOKENS / value for name, value in seconds.items()}
        if ct2 is not None:
            ct2.close()
    names = list(systems)
    print(f"\ntarget tokens/s, CPU {args.threads} threads, torch {torch.__version__}, source {SOURCE_TOKENS} tokens, "
          f"{NEW_TOKENS} generated; ratios vs HF generate (fp32, sdpa) of the same run")
    print(f"{'batch':>5} {'beams':>5} " + " ".join(f"{n + ' tok/s':>14}" for n in names) + "  "
          + " ".join(f"{n + ' /HF':>13}" for n in names if n != "HF"))
    for (batch, beams), row in rates.items():
        ratios = " ".join(f"{row[n] / row['HF']:>13.2f}" for n in names if n != "HF") if "HF" in row else ""
        print(f"{batch:>5} {beams:>5} " + " ".join(f"{row[n]:>14.1f}" for n in names) + "  " + ratios)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (this process: all but CT2)")
    # A batch-1 greedy step reads every decoder weight matrix and the output projection once (the cross-attention
    # keys/values are cached): memory-bound, so it is stated against the copy bandwidth.
    step_linears = [m for name, m in model.model.decoder.named_modules() if isinstance(m, nn.Linear)
                    and not name.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj"))] + [model.lm_head]
    step_bytes = sum(m.weight.numel() * m.weight.element_size() for m in step_linears)
    print(f"batch-1 greedy reads {step_bytes / 1e6:.0f} MB of float32 weights per token: "
          + ", ".join(f"{name} {100 * limits.bandwidth_fraction(step_bytes * rates[1, 1][name], 1.0):.0f}%"
                      for name in names if name in ("intern2", "HF"))
          + " of the copy bandwidth")
    checks = []
    if "HF" in names:
        checks += [("intern2 >= 1.5x HF, batch 1 greedy", rates[1, 1]["intern2"] / rates[1, 1]["HF"], 1.5),
                   ("intern2 >= 1.0x HF, batch 16 beam 4", rates[16, 4]["intern2"] / rates[16, 4]["HF"], 1.0)]
    if "CT2 int8" in names:
        checks += [(f"intern2 int8 >= 0.8x CT2 int8, batch {b} beams {k}",
                    rates[b, k]["intern2 int8"] / rates[b, k]["CT2 int8"], 0.8) for b, k in SETTINGS]
    for text, value, target in checks:
        print(f"{'PASS' if value >= target else 'MISS'}  {text}: {value:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
