"""The server's worst case for one translate request at its limits (issue 16's "Measure").

The heaviest request the server accepts: 8 beams, 1,024 new tokens and as many sentences as the step budget
(``--max-translate-steps``, default 50,000 decoding steps x beams) admits, within the 5,000-character text limit,
on a random-init model (an untrained model never emits EOS: the worst case a hostile client can choose). It runs
until its deadline (``--max-request-seconds``, default 60) stops it; then a small request shows that the model is
free again. Both go through the FastAPI app in-process (TestClient), as the HTTP door runs them::

    python benchmarks/serve_limits.py                      # NLLB-600M's shape (12+12 layers, d1024)
    python benchmarks/serve_limits.py --model intern2_mt_small --max-request-seconds 10

The vocabulary is the tokenizer trained here on the built-in phrases (a few thousand pieces, not NLLB's 256k),
so a step costs less than the real model's output projection would; the deadline bounds the request either way.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import intern2
from intern2.pipelines.translation import Translator
from intern2.serve import DEFAULT_MAX_REQUEST_SECONDS, DEFAULT_MAX_TRANSLATE_STEPS
from intern2.serve.app import DEFAULT_MAX_TEXT_CHARS, create_app
from intern2.text.corpus import builtin_sentences
from intern2.text.tokenizer import NllbTokenizer

LANGS = ["eng_Latn", "fra_Latn"]
BEAMS, NEW_TOKENS = 8, 1024


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="intern2_mt_600m")
    parser.add_argument("--max-translate-steps", type=int, default=DEFAULT_MAX_TRANSLATE_STEPS)
    parser.add_argument("--max-request-seconds", type=float, default=DEFAULT_MAX_REQUEST_SECONDS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fastapi.testclient import TestClient

    torch.manual_seed(0)
    tokenizer = NllbTokenizer.train(builtin_sentences(LANGS), 2000, LANGS)
    model = intern2.create_model(args.model, vocab_size=tokenizer.vocab_size)
    translator = Translator(model, tokenizer)
    per_sentence_steps = translator.decoding_steps(["Good morning."], "eng_Latn", BEAMS, NEW_TOKENS)
    sentences = args.max_translate_steps // per_sentence_steps  # the most the budget admits
    per_sentence = DEFAULT_MAX_TEXT_CHARS // max(1, sentences)
    words = []  # the longest sentence the text limit and the model's source length allow
    while (len(" ".join(words + ["morning"])) + 2 <= per_sentence
           and len(tokenizer.encode(" ".join(words + ["morning"]) + ".", "eng_Latn")) <= translator.max_source_tokens):
        words.append(["Good", "morning", "to", "all", "of", "you"][len(words) % 6])
    sentence = " ".join(words) + ". "
    worst = {"text": sentence * sentences, "src_lang": "en", "tgt_lang": "fr", "num_beams": BEAMS,
             "max_new_tokens": NEW_TOKENS}
    small = {"text": "Hello.", "src_lang": "en", "tgt_lang": "fr", "num_beams": 1, "max_new_tokens": 8}
    steps = translator.decoding_steps([worst["text"]], "eng_Latn", BEAMS, NEW_TOKENS)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"CPU: {_cpu()}, {args.threads} threads; torch {torch.__version__}")
    print(f"model: {args.model} shape, {params:.0f}M parameters (vocabulary {tokenizer.vocab_size}), random init")
    print(f"worst request: {sentences} sentences x {per_sentence_steps // BEAMS} new tokens x {BEAMS} beams = "
          f"{steps:,} steps "
          f"(budget {args.max_translate_steps:,}), {len(worst['text'])} characters")
    app = create_app(translator=translator, max_translate_steps=args.max_translate_steps,
                     max_request_seconds=args.max_request_seconds)
    with TestClient(app) as client:
        client.post("/v1/translate", json=small)  # warm-up
        start = time.perf_counter()
        response = client.post("/v1/translate", json=worst)
        worst_s = time.perf_counter() - start
        start = time.perf_counter()
        after = client.post("/v1/translate", json=small)
        small_s = time.perf_counter() - start
    print(f"worst request: HTTP {response.status_code} {response.json().get('error', 'ok')} after {worst_s:.1f} s "
          f"(deadline {args.max_request_seconds:.0f} s: overshoot {worst_s - args.max_request_seconds:+.1f} s)")
    print(f"next small request: HTTP {after.status_code} in {small_s:.2f} s")


if __name__ == "__main__":
    main()
