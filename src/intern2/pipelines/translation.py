"""Translation: text in, text out, sentence by sentence (NLLB is a sentence-level model), with the model's
tokenizer and its decoding defaults (:class:`~intern2.weights.TranslationProtocol`); `intern2 translate`."""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..config import error_message
from ..hub import local_folder, reading_download
from ..text import check_text
from ..text.corpus import read_lines
from ..text.languages import get_language
from ..weights import TranslationProtocol
from .common import Pipeline, device_from_args, local_checkpoint, progress, setup_logging

__all__ = ["Translator", "split_sentences", "translate_in_sentences", "translate_main", "predict_main"]

_BOUNDARY = re.compile(r"(?<=[.!?…])\s+|(?<=[。！？؟।])\s*|\s*\n\s*")
_PADDED = re.compile(r"(\s*)(.*?)(\s*)", re.DOTALL)


def split_sentences(text: str) -> List[Tuple[str, str]]:
    """``(sentence, separator)`` pairs; joining them in order gives back ``text`` exactly."""
    pairs, start = [], 0
    for match in _BOUNDARY.finditer(text):
        if match.end() == start:  # an empty boundary right after the previous one
            continue
        pairs.append((text[start:match.start()], match.group()))
        start = match.end()
    pairs.append((text[start:], ""))
    return pairs


def translate_in_sentences(text: str, translate: Callable[[List[str]], List[str]]) -> str:
    """Translate long text sentence by sentence (whole paragraphs get truncated or summarised) and re-join
    with the original whitespace and line breaks.

    ``translate`` maps a list of sentences to their translations in one call (tokenise, ``generate``, decode),
    so the caller controls batching.
    """
    pairs = split_sentences(text)
    padded = [_PADDED.fullmatch(sentence).groups() for sentence, _ in pairs]
    sentences = [core for _, core, _ in padded if core]
    translated = list(translate(sentences)) if sentences else []
    if len(translated) != len(sentences):
        raise ValueError(f"translate returned {len(translated)} translations for {len(sentences)} sentences")
    translations = iter(translated)
    out = []
    for (lead, core, trail), (_, separator) in zip(padded, pairs):
        out.append(f"{lead}{next(translations) if core else ''}{trail}{separator}")
    return "".join(out)


DEFAULT_BATCH_SIZE = 16  # sentences decoded together: the Python and CLI default (batching changes rounding)


class Translator(Pipeline):
    """A translation model with its tokenizer: ``translator.translate(texts, src, tgt)`` -> translations.

    ``tokenizer``: an :class:`~intern2.text.tokenizer.NllbTokenizer`; default: the one in the model folder
    ``source``. Decoding defaults (beams, new tokens) come from the protocol.
    """

    task = "translation"
    expects = "a translation model (intern2_mt_* / an NLLB or M2M-100 folder)"
    protocol: TranslationProtocol

    def __init__(self, model: nn.Module, tokenizer: Any = None, source: Optional[str] = None, **protocol: Any):
        super().__init__(model, source, **protocol)
        if tokenizer is None:
            folder = local_checkpoint(source)  # a Hub repo's snapshot
            if not folder or not Path(folder).is_dir():
                raise ValueError("a translator needs its tokenizer: pass tokenizer=, or load a model folder that "
                                 "holds it")
            from ..text.tokenizer import NllbTokenizer
            tokenizer = NllbTokenizer.from_pretrained(folder)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{model.config.vocab_size} embedding rows: they do not belong together")
        self.tokenizer = tokenizer

    @classmethod
    def model_types(cls) -> Tuple[type, ...]:
        from ..models.translator import TranslationModel
        return (TranslationModel,)

    @property
    def max_source_tokens(self) -> int:
        """The longest sentence, in tokens, the model takes: what NLLB was trained on (512), within its position
        table."""
        trained = getattr(self.model, "max_source_tokens", None) or self.model.config.max_position_embeddings
        return min(trained, self.model.config.max_position_embeddings - 2)

    def decoding_steps(self, texts: Sequence[str], src_lang: Union[str, Sequence[str]],
                       num_beams: Optional[int] = None, max_new_tokens: Optional[int] = None) -> int:
        """An upper bound of the work of translating ``texts`` sentence by sentence: decoding steps times beams,
        summed over the sentences (a server's per-request budget is counted in these); a sentence longer than
        :attr:`max_source_tokens` is a ValueError naming it."""
        langs = [src_lang] * len(texts) if isinstance(src_lang, str) else list(src_lang)
        beams = num_beams or self.protocol.num_beams
        steps = 0
        for text, lang in zip(texts, langs):
            for sentence, _ in split_sentences(text):
                if sentence.strip():
                    length = len(self._encode_checked(sentence.strip(), lang))
                    steps += beams * min(max_new_tokens or self.protocol.max_new_tokens or 2 * length + 10,
                                         self.model.config.max_position_embeddings)
        return steps

    def _encode_checked(self, text: str, lang: str) -> List[int]:
        ids = self.tokenizer.encode(text, lang)
        if len(ids) > self.max_source_tokens:
            raise ValueError(f"a sentence of {len(ids)} tokens is longer than the {self.max_source_tokens} this model "
                             f"takes: split it ({text[:40]!r}...)")
        return ids

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], int8: bool = False,
                        device: Union[str, torch.device] = "cpu", flag: str = "", **protocol: Any) -> "Translator":
        """Model and tokenizer of a model folder (ours or an HF NLLB folder, or a Hub repo of one:
        ``facebook/nllb-200-distilled-600M``, from the Hugging Face cache); ``int8``: dynamic int8 Linear layers
        (CPU); errors name ``flag``, the argument that gave ``folder``."""
        from ..models.translator import TranslationModel
        from ..text.tokenizer import NllbTokenizer
        from .common import requested_dtype
        if int8 and protocol.get("dtype") is not None and requested_dtype(protocol["dtype"]) != torch.float32:
            raise ValueError(f"int8=True and dtype={protocol['dtype']!r}: choose one (int8 layers take float32 "
                             f"activations)")
        with local_folder(folder, flag) as local:
            if not local.is_dir():
                raise FileNotFoundError(f"{flag or 'model folder'} {local} " + (
                    "is a file; expected a folder (config.json, weights, tokenizer)" if local.exists() else
                    "does not exist"))
            tokenizer = NllbTokenizer.from_pretrained(local)
            model = TranslationModel.from_pretrained(local, device=device)
        return cls(model.quantize_dynamic() if int8 else model, tokenizer, source=str(folder), **protocol)

    def __call__(self, texts: Sequence[str], src_lang: Union[str, Sequence[str]], tgt_lang: str,
                 **options: Any) -> List[str]:
        """:meth:`translate`: a pipeline is called on its input, as the other families' are."""
        return self.translate(texts, src_lang, tgt_lang, **options)

    def translate(self, texts: Sequence[str], src_lang: Union[str, Sequence[str]], tgt_lang: str,
                  num_beams: Optional[int] = None, max_new_tokens: Optional[int] = None,
                  batch_size: int = DEFAULT_BATCH_SIZE,
                  split_sentences: bool = True, **generate_kwargs) -> List[str]:
        """Translate ``texts`` (source language: one code, or one per text) into ``tgt_lang``.

        With ``split_sentences`` each text is translated sentence by sentence and re-joined with its original
        whitespace; other keyword arguments go to ``generate`` (e.g. ``stop``, called before every decoding step,
        which raises to abandon the work). ``num_beams`` / ``max_new_tokens`` default to the protocol's. A sentence
        longer than :attr:`max_source_tokens` is a ValueError naming it.
        """
        if isinstance(texts, str):  # iterating it would translate each character
            raise TypeError("texts: expected a list of texts, got one str; pass [text]")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        texts = list(texts)
        langs = [src_lang] * len(texts) if isinstance(src_lang, str) else list(src_lang)
        if len(langs) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(langs)} source languages")
        for i, text in enumerate(texts):  # whole texts: positions count from their start, not a sentence's
            check_text(text, f"texts[{i}]")
        forced = self.tokenizer.lang_token_id(tgt_lang)
        for lang in set(langs):
            self.tokenizer.lang_token_id(lang)  # unknown or missing languages fail before any decoding
        # The protocol's defaults only where nothing was given (0 must reach generate's check, not mean "default").
        options = dict(num_beams=self.protocol.num_beams if num_beams is None else num_beams,
                       max_new_tokens=self.protocol.max_new_tokens if max_new_tokens is None else max_new_tokens,
                       **generate_kwargs)

        def run(sentences: List[str], sentence_langs: List[str]) -> List[str]:
            return self._generate(sentences, sentence_langs, forced, batch_size, **options)
        if not split_sentences:
            return run(list(texts), langs)
        return [translate_in_sentences(text, lambda sentences, lang=lang: run(sentences, [lang] * len(sentences)))
                for text, lang in zip(texts, langs)]

    def _generate(self, texts: List[str], langs: List[str], forced: int, batch_size: int, **kwargs) -> List[str]:
        was_training = self.model.training
        self.model.eval()
        encoded = [self._encode_checked(text, lang) for text, lang in zip(texts, langs)]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths: little padding
        out: List[str] = [""] * len(texts)
        for start in progress(range(0, len(order), batch_size), "batches"):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.tensor([encoded[i] + [self.tokenizer.pad_id] * (width - len(encoded[i])) for i in rows],
                                     device=self.device)
            sequences = self.model.generate(input_ids, input_ids.ne(self.tokenizer.pad_id), forced_bos_token_id=forced,
                                            **kwargs)
            for i, text in zip(rows, self.tokenizer.decode_batch(sequences.cpu())):
                out[i] = text
        self.model.train(was_training)
        return out


# ------------------------------------------------------------------------------------------------------------ CLI
def _default_model() -> Path:
    """NLLB-200-distilled-600M from $INTERN2_HOME or the Hugging Face cache (not downloaded: no --model means the
    user did not ask for it; the error says how to get it)."""
    from ..hub import resolve_weights
    from ..weights import get_weights
    try:
        return resolve_weights(get_weights("intern2_mt_600m", "nllb200_distilled").pretrained_cfg(), download=False)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no --model given and the default model is not here: {exc}; or pass --model DIR "
                                f"(e.g. a folder from 'intern2 train translation')") from None


def translate_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="intern2 translate", description="Translate text between registered languages.",
        epilog="Text comes from the arguments (one translation each), --input (one per line) or stdin.")
    parser.add_argument("text", nargs="*", help="text to translate")
    parser.add_argument("--src", required=True, help="source language: any code or name, e.g. eng_Latn, en, English")
    parser.add_argument("--tgt", required=True, help="target language, e.g. fra_Latn")
    parser.add_argument("--model", help="model folder or a Hub repo of one, e.g. facebook/nllb-200-distilled-600M "
                        "(default: nllb-200-distilled-600M in $INTERN2_HOME or the Hugging Face cache)")
    parser.add_argument("--input", help="file with one text per line")
    parser.add_argument("--output", help="write the translations here (one per line) instead of stdout")
    parser.add_argument("--beams", type=int, default=None, help="beam size (1: greedy; default: the model's, 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens per sentence (default: 2 x source length + 10)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"sentences decoded together ({DEFAULT_BATCH_SIZE}, as the Python default)")
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of the Linear layers (CPU)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="run the model in bfloat16 (fast where the CPU "
                        "has AVX-512-BF16 or AMX; elsewhere it falls back to fp32 and says so)")
    parser.add_argument("--device", help="where the model runs: cpu (default), cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.int8 and args.dtype == "bf16":
        parser.error("--int8 and --dtype bf16: choose one (int8 layers take float32 activations)")
    device = device_from_args(parser, args)
    if args.int8 and device is not None and device.type != "cpu":
        parser.error(f"--int8 and --device {args.device}: int8 layers run on the CPU only")
    for flag in ("beams", "max_new_tokens", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive integer")
    from ..checkpoint import atomic_write, check_output
    try:
        if args.output:
            check_output(args.output, "--output")
        src, tgt = (_language_of(flag, value) for flag, value in (("--src", args.src), ("--tgt", args.tgt)))
        if args.input and args.text:
            parser.error("give the text as arguments or with --input, not both")
        if args.input:
            texts = read_lines(args.input)
        elif args.text:
            texts = list(args.text)
        elif not sys.stdin.isatty():
            texts = sys.stdin.read().splitlines()
        else:
            parser.error("no text to translate: give it as an argument, with --input FILE or on stdin")
        if not any(text.strip() for text in texts):
            parser.error("empty input: nothing to translate")
        setup_logging()
        folder = args.model or _default_model()
        with contextlib.nullcontext() if args.model else reading_download(folder):  # from the cache: a download
            translator = Translator.from_pretrained(folder, int8=args.int8, dtype=args.dtype, device=device or "cpu",
                                                    flag="--model" if args.model else "")
        rows = [i for i, text in enumerate(texts) if text.strip()]  # blank lines stay blank
        source = args.input or ("text" if args.text else "stdin")
        for i in rows:  # text the model cannot take (not Unicode, too long), named by its line before any work
            where = f"{source} line {i + 1}" if source != "text" else f"text {i + 1}"
            check_text(texts[i], where)
            try:
                translator.decoding_steps([texts[i]], src)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        outputs = translator.translate([texts[i] for i in rows], src, tgt, num_beams=args.beams,
                                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        parser.error(error_message(exc))
    lines = [""] * len(texts)
    for i, translation in zip(rows, outputs):
        lines[i] = translation
    text = "\n".join(lines) + "\n"
    if args.output:
        atomic_write(args.output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    else:
        sys.stdout.write(text)
    return 0


def _language_of(flag: str, value: str) -> str:
    """The registry key of a --src / --tgt value; an unknown one is a ValueError naming the flag."""
    try:
        return get_language(value).key
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{flag}: {error_message(exc)}") from None


def predict_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 predict` on a translation model: text goes through `intern2 translate`."""
    print("intern2 predict: a translation model translates text: intern2 translate --model DIR --src eng_Latn "
          "--tgt fra_Latn 'text'", file=sys.stderr)
    return 2
