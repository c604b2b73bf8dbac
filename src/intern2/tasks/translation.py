"""Translation: `intern2 train translation`, `intern2 eval translation`, `intern2 translate`, and the demo.

Training follows the NLLB / fairseq multilingual recipe on the shared engine: each epoch draws examples across
language pairs with temperature sampling (pair probability proportional to ``n ** (1 / T)``, so small pairs are
up-sampled), packs them into batches bounded by a token count (``max_tokens``, padding included) rather than
a sentence count, and optimises label-smoothed cross-entropy under an inverse-square-root schedule with warmup
(``train.schedule: inverse_sqrt``). Evaluation decodes the held-out set (greedy or beam) and reports chrF++ and
BLEU (sacrebleu, offline) next to the copy-the-source baseline, overall and per pair.

Data (``data`` / ``--data``):

* ``builtin:cldr``: CLDR names from babel (no download), split by concept so held-out concepts are unseen in
  every language; train on ``train``, evaluate on ``dev`` (``intern2 eval`` defaults to ``test``).
* ``builtin:gettext``: short UI sentences from the system's gettext catalogs, when installed (same splits).
* ``flores:ROOT``: a FLORES-200 directory; train on ``dev``, evaluate on ``devtest``.
* ``files:SRC_FILE,TGT_FILE``: aligned plain-text files (one sentence per line) for one direction.

A model folder holds the HF-layout model (``config.json`` + ``model.safetensors``), the tokenizer
(``sentencepiece.bpe.model`` + ``intern2_tokenizer.json``) and ``intern2_translation.json`` (the trained
directions); an HF NLLB folder works too.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..engine import TrainConfig
from ..models.translator import TranslationModel, resize_embeddings_for_languages, translate_in_sentences
from ..text.languages import get_language
from .common import setup_logging, train_cli

__all__ = ["TranslationConfig", "TranslationTask", "Translator", "MultilingualBatches", "pair_probabilities",
           "token_batches", "load_pairs", "translation_metrics", "run_translation_demo", "train_main", "eval_main",
           "predict_main", "translate_main"]

log = logging.getLogger(__name__)

Pair = Tuple[str, str, str, str]  # (src_lang, tgt_lang, source, target)
DIRECTIONS_FILE = "intern2_translation.json"
# Scripts written without spaces between words: BLEU needs sacrebleu's character-level tokenisers there.
_BLEU_TOKENIZE = {"Hans": "zh", "Hant": "zh", "Jpan": "char", "Kore": "char", "Thai": "char", "Khmr": "char",
                  "Laoo": "char", "Mymr": "char"}


@dataclass(frozen=True)
class TranslationConfig:
    model: str = "intern2_mt_tiny"
    model_args: Optional[Dict[str, Any]] = None  # TranslatorConfig overrides, e.g. {d_model: 256}
    checkpoint: Optional[str] = None  # model folder to fine-tune (ours or HF NLLB/M2M-100), tokenizer included
    tokenizer: Optional[str] = None  # tokenizer folder; default: the checkpoint's, else one trained on the data
    vocab_size: int = 1000  # SentencePiece pieces of a tokenizer trained here (an upper bound for tiny corpora)
    data: str = "builtin:cldr"
    val_data: Optional[str] = None  # default: the held-out split of `data`
    src_langs: Tuple[str, ...] = ("eng_Latn",)
    tgt_langs: Tuple[str, ...] = ("fra_Latn", "deu_Latn")
    both_directions: bool = True  # also train/evaluate tgt -> src
    temperature: float = 5.0  # pair sampling: p ~ n ** (1 / temperature); 1 = proportional, large = uniform
    max_tokens: int = 4096  # per token batch, padding included (train.batch_size token batches make a step)
    max_length: int = 128  # tokens per sentence, language token and </s> included; longer ones are cut
    label_smoothing: float = 0.1
    eval_beams: int = 1
    eval_batch_size: int = 64  # sentences per decoding batch
    max_eval_examples: Optional[int] = 1000  # a fixed sample of the held-out set keeps evaluation short
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=20, batch_size=1, lr=1e-3, warmup_steps=200, schedule="inverse_sqrt", weight_decay=0.0,
        clip_grad=1.0))

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_length < 3 or self.max_tokens < self.max_length:
            raise ValueError(f"need 3 <= max_length <= max_tokens, got max_length={self.max_length}, "
                             f"max_tokens={self.max_tokens}")


# ----------------------------------------------------------------------------------------------------------- data
def directions(src_langs: Sequence[str], tgt_langs: Sequence[str], both: bool = False) -> List[Tuple[str, str]]:
    """Ordered (source, target) registry keys of every src x tgt pair of distinct languages (and reversed)."""
    src = [get_language(code).key for code in src_langs]
    tgt = [get_language(code).key for code in tgt_langs]
    pairs = [(s, t) for s in src for t in tgt if s != t]
    if both:
        pairs += [(t, s) for s, t in pairs]
    return list(dict.fromkeys(pairs))


def _read_lines(path: str) -> List[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"text file {file} does not exist")
    try:
        return file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text: {exc}") from None


def load_pairs(spec: str, split: str, pairs: Sequence[Tuple[str, str]]) -> List[Pair]:
    """Parallel examples of ``spec`` (see the module docstring) for the ``pairs`` directions.

    ``split`` is 'train', 'dev' or 'test'; FLORES maps train -> dev and dev/test -> devtest; files ignore it.
    """
    kind, _, rest = spec.partition(":")
    if kind == "builtin":
        from ..text.corpus import builtin_pairs, gettext_pairs
        read = {"cldr": builtin_pairs, "gettext": gettext_pairs}.get(rest)
        if read is None:
            raise ValueError(f"unknown built-in translation corpus {spec!r}; expected builtin:cldr or builtin:gettext")
        return [p for s, t in pairs for p in read(split, [s], [t])]
    if kind == "flores":
        from ..text.corpus import read_flores_pair
        flores_split = "dev" if split == "train" else "devtest"
        out = []
        for s, t in pairs:
            sources, targets = read_flores_pair(rest, flores_split, s, t)
            out += [(s, t, a, b) for a, b in zip(sources, targets)]
        return out
    if kind == "files":
        files = rest.split(",")
        if len(files) != 2 or len(pairs) != 1:
            raise ValueError(f"{spec!r}: expected files:SRC_FILE,TGT_FILE with exactly one direction "
                             f"(one source and one target language), got {len(files)} files, {len(pairs)} directions")
        (s, t), sources, targets = pairs[0], _read_lines(files[0]), _read_lines(files[1])
        if len(sources) != len(targets):
            raise ValueError(f"{files[0]} has {len(sources)} lines but {files[1]} has {len(targets)}; "
                             "the files must be aligned line by line")
        return [(s, t, a, b) for a, b in zip(sources, targets) if a.strip() and b.strip()]
    raise ValueError(f"unknown translation data {spec!r}; expected builtin:cldr, builtin:gettext, flores:ROOT "
                     "or files:SRC,TGT")


def pair_probabilities(sizes: Sequence[int], temperature: float) -> List[float]:
    """Sampling probability of each language pair: ``n_i ** (1/T) / sum_j n_j ** (1/T)`` (T=1: proportional to
    size; T -> inf: uniform). Empty pairs get 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weights = [n ** (1.0 / temperature) if n > 0 else 0.0 for n in sizes]
    total = sum(weights)
    if total == 0:
        raise ValueError("every language pair is empty: no training examples")
    return [w / total for w in weights]


def token_batches(lengths: Sequence[int], max_tokens: int, rng: np.random.Generator) -> List[List[int]]:
    """Indices grouped so that ``len(batch) * longest(batch) <= max_tokens`` (a padded batch's token count);
    examples of similar length go together, ties and batch order are shuffled by ``rng``. An example longer than
    ``max_tokens`` gets a batch of its own."""
    order = np.lexsort((rng.random(len(lengths)), np.asarray(lengths)))
    batches: List[List[int]] = []
    current: List[int] = []
    longest = 0
    for index in order.tolist():
        grown = max(longest, lengths[index])
        if current and grown * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, grown = [], lengths[index]
        current.append(index)
        longest = grown
    if current:
        batches.append(current)
    return [batches[i] for i in rng.permutation(len(batches))]


Encoded = Tuple[List[int], List[int]]  # (source ids, label ids)


class MultilingualBatches(Dataset):
    """One epoch of token batches drawn across language pairs with temperature sampling.

    Each epoch (:meth:`set_epoch`, seeded by (seed, epoch), so resume is exact) draws ``epoch_size`` examples:
    the pair of each from :func:`pair_probabilities`, the examples of a pair from its shuffled list (cycled when
    a small pair is up-sampled). Item ``i`` is a list of (source ids, label ids). The engine's sampler needs a
    fixed size, so every epoch has the number of batches of epoch 0; an epoch that packs into fewer repeats its
    first ones, one that packs into more leaves the last ones out.
    """

    def __init__(self, groups: Sequence[Sequence[Encoded]], max_tokens: int, temperature: float, seed: int = 0,
                 epoch_size: Optional[int] = None):
        self.groups = [list(group) for group in groups]
        self.probabilities = pair_probabilities([len(g) for g in self.groups], temperature)
        self.epoch_size = epoch_size or sum(len(g) for g in self.groups)
        self.max_tokens, self.seed = max_tokens, seed
        self.batches: List[List[Encoded]] = []
        self.set_epoch(0)
        self.size = len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        counts = rng.multinomial(self.epoch_size, self.probabilities)
        examples: List[Encoded] = []
        for group, count in zip(self.groups, counts.tolist()):
            if count:
                rounds = math.ceil(count / len(group))
                order = np.concatenate([rng.permutation(len(group)) for _ in range(rounds)])[:count]
                examples += [group[i] for i in order.tolist()]
        lengths = [max(len(src), len(tgt)) for src, tgt in examples]
        self.batches = [[examples[i] for i in batch] for batch in token_batches(lengths, self.max_tokens, rng)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> List[Encoded]:
        return self.batches[index % len(self.batches)]


def collate_token_batches(samples: Sequence[Sequence[Encoded]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Merge token batches into one right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    examples = [example for batch in samples for example in batch]
    src_width = max(len(src) for src, _ in examples)
    tgt_width = max(len(tgt) for _, tgt in examples)
    input_ids = torch.full((len(examples), src_width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), tgt_width), -100, dtype=torch.long)
    for row, (src, tgt) in enumerate(examples):
        input_ids[row, :len(src)] = torch.tensor(src)
        labels[row, :len(tgt)] = torch.tensor(tgt)
    return {"input_ids": input_ids, "attention_mask": input_ids.ne(pad_id).long(), "labels": labels}


# ------------------------------------------------------------------------------------------------------- metrics
def _bleu_tokenize(tgt_langs: Sequence[str]) -> str:
    kinds = {_BLEU_TOKENIZE.get(get_language(lang).script, "13a") for lang in tgt_langs}
    return kinds.pop() if len(kinds) == 1 else "char"


def translation_metrics(hypotheses: Sequence[str], references: Sequence[str], sources: Sequence[str],
                        tgt_langs: Sequence[str]) -> Dict[str, float]:
    """Corpus chrF++ (sacrebleu CHRF word_order=2), BLEU (tokeniser chosen by the target scripts) and the
    chrF++ of copying the source (what a model that learnt nothing but to copy would score)."""
    from sacrebleu.metrics import BLEU, CHRF
    chrf = CHRF(word_order=2)
    return {"chrf": chrf.corpus_score(list(hypotheses), [list(references)]).score,
            "bleu": BLEU(tokenize=_bleu_tokenize(tgt_langs)).corpus_score(list(hypotheses), [list(references)]).score,
            "copy_chrf": chrf.corpus_score(list(sources), [list(references)]).score,
            "count": len(hypotheses)}


# ------------------------------------------------------------------------------------------------------ inference
class Translator:
    """A translation model with its tokenizer: text in, text out."""

    def __init__(self, model: TranslationModel, tokenizer):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{model.config.vocab_size} embedding rows: they do not belong together")
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], int8: bool = False,
                        device: Union[str, torch.device] = "cpu") -> "Translator":
        """Model and tokenizer of a model folder (ours or an HF NLLB folder); ``int8``: dynamic int8 Linear
        layers (CPU)."""
        from ..text.tokenizer import NllbTokenizer
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} does not exist")
        tokenizer = NllbTokenizer.from_pretrained(folder)
        model = TranslationModel.from_pretrained(folder, device=device)
        return cls(model.quantize_dynamic() if int8 else model, tokenizer)

    def translate(self, texts: Sequence[str], src_lang: Union[str, Sequence[str]], tgt_lang: str,
                  num_beams: int = 1, max_new_tokens: Optional[int] = None, batch_size: int = 32,
                  split_sentences: bool = True, **generate_kwargs) -> List[str]:
        """Translate ``texts`` (source language: one code, or one per text) into ``tgt_lang``.

        With ``split_sentences`` each text is translated sentence by sentence and re-joined with its original
        whitespace (the models are sentence-level); other keyword arguments go to ``generate``.
        """
        langs = [src_lang] * len(texts) if isinstance(src_lang, str) else list(src_lang)
        if len(langs) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(langs)} source languages")
        forced = self.tokenizer.lang_token_id(tgt_lang)
        for lang in set(langs):
            self.tokenizer.lang_token_id(lang)  # unknown or missing languages fail before any decoding

        def run(sentences: List[str], sentence_langs: List[str]) -> List[str]:
            return self._generate(sentences, sentence_langs, forced, batch_size, num_beams=num_beams,
                                  max_new_tokens=max_new_tokens, **generate_kwargs)
        if not split_sentences:
            return run(list(texts), langs)
        return [translate_in_sentences(text, lambda sentences, lang=lang: run(sentences, [lang] * len(sentences)))
                for text, lang in zip(texts, langs)]

    def _generate(self, texts: List[str], langs: List[str], forced: int, batch_size: int, **kwargs) -> List[str]:
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        encoded = [self.tokenizer.encode(text, lang) for text, lang in zip(texts, langs)]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths: little padding
        out: List[str] = [""] * len(texts)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.tensor([encoded[i] + [self.tokenizer.pad_id] * (width - len(encoded[i])) for i in rows],
                                     device=device)
            sequences = self.model.generate(input_ids, input_ids.ne(self.tokenizer.pad_id), forced_bos_token_id=forced,
                                            **kwargs)
            for i, text in zip(rows, self.tokenizer.decode_batch(sequences.cpu())):
                out[i] = text
        self.model.train(was_training)
        return out


def evaluate_translations(translator: Translator, examples: Sequence[Pair], num_beams: int = 1,
                          batch_size: int = 64, num_examples: int = 3) -> Dict[str, Any]:
    """Decode ``examples`` and score them: overall metrics, per-direction metrics under 'pairs', and a few
    'examples' (source, reference, hypothesis)."""
    hypotheses: List[str] = [""] * len(examples)
    by_target: Dict[str, List[int]] = {}
    for i, (_, tgt, _, _) in enumerate(examples):
        by_target.setdefault(tgt, []).append(i)
    for tgt, rows in by_target.items():  # one forced target-language token per generate call
        outputs = translator.translate([examples[i][2] for i in rows], [examples[i][0] for i in rows], tgt,
                                       num_beams=num_beams, batch_size=batch_size, split_sentences=False)
        for i, hypothesis in zip(rows, outputs):
            hypotheses[i] = hypothesis
    if not examples:
        return {"count": 0}

    def score(rows: List[int]) -> Dict[str, float]:
        return translation_metrics([hypotheses[i] for i in rows], [examples[i][3] for i in rows],
                                   [examples[i][2] for i in rows], [examples[i][1] for i in rows])
    metrics: Dict[str, Any] = score(list(range(len(examples))))
    by_pair: Dict[str, List[int]] = {}
    for i, (src, tgt, _, _) in enumerate(examples):
        by_pair.setdefault(f"{src}-{tgt}", []).append(i)
    metrics["pairs"] = {name: score(rows) for name, rows in by_pair.items()}
    shown = random.Random(0).sample(range(len(examples)), min(num_examples, len(examples)))
    metrics["examples"] = [{"src_lang": examples[i][0], "tgt_lang": examples[i][1], "source": examples[i][2],
                            "reference": examples[i][3], "translation": hypotheses[i]} for i in shown]
    return metrics


def _sample(examples: List[Pair], limit: Optional[int]) -> List[Pair]:
    """At most ``limit`` examples, the same share of every direction, in a fixed pseudo-random choice."""
    if limit is None or len(examples) <= limit:
        return examples
    by_pair: Dict[Tuple[str, str], List[Pair]] = {}
    for example in examples:
        by_pair.setdefault(example[:2], []).append(example)
    share = max(1, limit // len(by_pair))
    return [e for group in by_pair.values() for e in random.Random(0).sample(group, min(share, len(group)))]


# ----------------------------------------------------------------------------------------------------------- task
class TranslationTask:
    """Multilingual NLLB-architecture training on the shared engine (see the module docstring)."""

    def __init__(self, cfg: TranslationConfig):
        self.cfg = cfg
        self.directions = directions(cfg.src_langs, cfg.tgt_langs, cfg.both_directions)
        if not self.directions:
            raise ValueError("src_langs x tgt_langs gives no direction with two different languages")
        self.train_pairs = load_pairs(cfg.data, "train", self.directions)
        if not self.train_pairs:
            raise ValueError(f"{cfg.data} has no training examples for {self.directions}")
        held_out = load_pairs(cfg.val_data, "dev", self.directions) if cfg.val_data else (
            [] if cfg.data.startswith("files:") else load_pairs(cfg.data, "dev", self.directions))
        self.eval_pairs = _sample(held_out, cfg.max_eval_examples)
        self.tokenizer, self.added_ids = self._tokenizer()

    def _languages(self) -> List[str]:
        return list(dict.fromkeys(lang for pair in self.directions for lang in pair))

    def _tokenizer(self):
        """(tokenizer, ids of language tokens it had to add)."""
        from ..text.tokenizer import NllbTokenizer
        folder = self.cfg.tokenizer or self.cfg.checkpoint
        if folder:
            tokenizer = NllbTokenizer.from_pretrained(folder)
            missing = [lang for lang in self._languages() if lang not in tokenizer.languages]
            if missing:
                log.info("adding language tokens %s to the tokenizer of %s", ", ".join(missing), folder)
            return tokenizer, tokenizer.add_languages(missing)
        lines = dict.fromkeys(text for pair in self.train_pairs for text in pair[2:])
        log.info("training a SentencePiece tokenizer (<= %d pieces) on %d training lines", self.cfg.vocab_size,
                 len(lines))
        return NllbTokenizer.train(lines, self.cfg.vocab_size, self._languages(), hard_vocab_limit=False), []

    def build_model(self) -> nn.Module:
        from ..factory import create_model, from_pretrained
        if self.cfg.checkpoint:
            model = from_pretrained(self.cfg.checkpoint)
            if not isinstance(model, TranslationModel):
                raise ValueError(f"{self.cfg.checkpoint} is not a translation model folder")
            # New languages start from the mean embedding; rows are appended and the output projection grows.
            resize_embeddings_for_languages(model, self.added_ids)
            return model.train()
        return create_model(self.cfg.model, **{**(self.cfg.model_args or {}), "vocab_size": self.tokenizer.vocab_size})

    def _encode(self, pairs: Sequence[Pair]) -> Dict[Tuple[str, str], List[Encoded]]:
        """Token ids per direction (directions without examples left out)."""
        groups: Dict[Tuple[str, str], List[Encoded]] = {}
        for src, tgt, source, target in pairs:
            groups.setdefault((src, tgt), []).append((self.tokenizer.encode(source, src, self.cfg.max_length),
                                                      self.tokenizer.encode(target, tgt, self.cfg.max_length)))
        return groups

    def train_dataset(self) -> Dataset:
        groups = self._encode(self.train_pairs)
        dataset = MultilingualBatches(list(groups.values()), self.cfg.max_tokens, self.cfg.temperature,
                                      self.cfg.train.seed)
        shares = ", ".join(f"{s}-{t} {len(group)} (p={p:.2f})"
                           for ((s, t), group), p in zip(groups.items(), dataset.probabilities))
        log.info("%d training examples, %d token batches per epoch; pairs: %s", len(self.train_pairs), len(dataset),
                 shares)
        return dataset

    def eval_dataset(self) -> Optional[List[Pair]]:
        return self.eval_pairs or None

    def collate(self, samples):
        return collate_token_batches(samples, self.tokenizer.pad_id)

    def training_step(self, model: nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    label_smoothing=self.cfg.label_smoothing)
        return out.loss, {"tokens": float(batch["labels"].ne(-100).sum())}

    def evaluate(self, model: nn.Module, dataset: Sequence[Pair], batch_size: int, device) -> Dict[str, Any]:
        """Decode and score the held-out set (``batch_size``, the engine's count of token batches, is not used:
        decoding batches hold ``eval_batch_size`` sentences)."""
        return evaluate_translations(Translator(model, self.tokenizer), dataset, self.cfg.eval_beams,
                                     self.cfg.eval_batch_size)

    def save_model(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        info = {"directions": [list(d) for d in self.directions], "data": self.cfg.data}
        (Path(directory) / DIRECTIONS_FILE).write_text(json.dumps(info, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------------------ CLI
def train_main(argv: Optional[List[str]] = None) -> int:
    return train_cli(argv, "translation", "Train a multilingual translation model (NLLB architecture).",
                     TranslationConfig, TranslationTask,
                     "builtin:cldr, builtin:gettext, flores:ROOT or files:SRC_FILE,TGT_FILE", "intern2_mt_tiny",
                     hide=("pairs", "examples"))


def _codes(text: Optional[str]) -> List[str]:
    return [code for code in (text or "").split(",") if code]


def eval_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="intern2 eval translation",
                                     description="Translate a held-out set and score it (chrF++, BLEU, copy baseline).")
    parser.add_argument("--checkpoint", "--model", dest="model", required=True, help="model folder")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # given by `intern2 eval --task translation`
    parser.add_argument("--data", help="builtin:cldr or flores:ROOT (default: the data the model was trained on)")
    parser.add_argument("--split", default="test", choices=("dev", "test"),
                        help="held-out split (FLORES: both mean devtest)")
    parser.add_argument("--src", help="source language(s), comma-separated (default: the trained directions)")
    parser.add_argument("--tgt", help="target language(s), comma-separated")
    parser.add_argument("--src-file", help="source sentences, one per line (with --ref-file, --src, --tgt)")
    parser.add_argument("--ref-file", help="reference translations of --src-file, line by line")
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-examples", type=int, default=None, help="score a fixed sample of this size")
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantisation (CPU)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    setup_logging()
    if bool(args.src_file) != bool(args.ref_file):
        parser.error("--src-file and --ref-file go together")
    try:
        translator = Translator.from_pretrained(args.model, int8=args.int8)
        info_path = Path(args.model) / DIRECTIONS_FILE
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if bool(args.src) != bool(args.tgt):
            parser.error("--src and --tgt go together")
        if args.src:
            pairs = directions(_codes(args.src), _codes(args.tgt))
        elif "directions" in info:
            pairs = [tuple(d) for d in info["directions"]]
        else:
            parser.error(f"{args.model} records no trained directions: give --src and --tgt")
        if args.src_file:
            spec = f"files:{args.src_file},{args.ref_file}"
        else:
            spec = args.data or info.get("data") or parser.error("--data (or --src-file/--ref-file) is required")
        examples = _sample(load_pairs(spec, args.split, pairs), args.max_examples)
        if not examples:
            parser.error(f"{spec} has no {args.split} examples for {pairs}")
        metrics = evaluate_translations(translator, examples, args.beams, args.batch_size)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{spec} ({args.split}): chrF++ {metrics['chrf']:.2f}  BLEU {metrics['bleu']:.2f}  "
          f"copy-the-source chrF++ {metrics['copy_chrf']:.2f}  ({metrics['count']} sentences, beam {args.beams})")
    for name, values in metrics["pairs"].items():
        print(f"  {name}: chrF++ {values['chrf']:.2f}  BLEU {values['bleu']:.2f}  copy {values['copy_chrf']:.2f}"
              f"  ({values['count']})")
    return 0


def predict_main(argv: Optional[List[str]] = None) -> int:
    """`intern2 predict` on a translation model: text goes through `intern2 translate`."""
    print("intern2 predict: a translation model translates text: intern2 translate --model DIR --src eng_Latn "
          "--tgt fra_Latn 'text'", file=sys.stderr)
    return 2


def _default_model() -> Path:
    """NLLB-200-distilled-600M in $INTERN2_HOME (intern2 never downloads; the error says where to put it)."""
    from ..factory import pretrained_file
    from ..models.translator import TRANSLATOR_VARIANTS
    cfg = TRANSLATOR_VARIANTS["intern2_mt_600m"][1]["nllb200_distilled"]
    try:
        return pretrained_file(cfg)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no --model given and {str(exc).split('. ')[0]}; intern2 does not download: put "
                                f"the folder of https://huggingface.co/{cfg['hf_hub_id']} there (or set "
                                f"$INTERN2_HOME), or pass --model DIR (e.g. a folder from "
                                f"'intern2 train translation')") from None


def translate_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="intern2 translate", description="Translate text between registered languages.",
        epilog="Text comes from the arguments (one translation each), --input (one per line) or stdin.")
    parser.add_argument("text", nargs="*", help="text to translate")
    parser.add_argument("--src", required=True, help="source language: any code or name, e.g. eng_Latn, en, English")
    parser.add_argument("--tgt", required=True, help="target language, e.g. fra_Latn")
    parser.add_argument("--model", help="model folder (default: nllb-200-distilled-600M in $INTERN2_HOME)")
    parser.add_argument("--input", help="file with one text per line")
    parser.add_argument("--output", help="write the translations here (one per line) instead of stdout")
    parser.add_argument("--beams", type=int, default=4, help="beam size (1: greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens per sentence (default: 2 x source length + 10)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of the Linear layers (CPU)")
    args = parser.parse_args(argv)
    if args.beams < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        parser.error("--beams and --max-new-tokens must be positive")
    try:
        src, tgt = get_language(args.src).key, get_language(args.tgt).key
        if args.input and args.text:
            parser.error("give the text as arguments or with --input, not both")
        if args.input:
            texts = _read_lines(args.input)
        elif args.text:
            texts = list(args.text)
        elif not sys.stdin.isatty():
            texts = sys.stdin.read().splitlines()
        else:
            parser.error("no text to translate: give it as an argument, with --input FILE or on stdin")
        if not any(text.strip() for text in texts):
            parser.error("empty input: nothing to translate")
        setup_logging()
        translator = Translator.from_pretrained(args.model or _default_model(), int8=args.int8)
        rows = [i for i, text in enumerate(texts) if text.strip()]  # blank lines stay blank
        outputs = translator.translate([texts[i] for i in rows], src, tgt, num_beams=args.beams,
                                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        parser.error(str(exc))
    lines = [""] * len(texts)
    for i, translation in zip(rows, outputs):
        lines[i] = translation
    text = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


# ----------------------------------------------------------------------------------------------------------- demo
# English <-> Russian: CLDR names are mostly transliterated between the two scripts, so copying the source scores
# almost nothing and every point of chrF++ is learnt. A character-level vocabulary (200 pieces: the characters of
# both scripts) makes transliteration learnable; small token batches, no dropout and a high peak lr give the most
# progress in a few CPU minutes (measured: 1,000+ steps of 1,024 tokens in 150 s on one contended core).
DEMO_CONFIG = dict(model="intern2_mt_tiny", model_args={"dropout": 0.0, "attention_dropout": 0.0},
                   src_langs=("eng_Latn",), tgt_langs=("rus_Cyrl",), both_directions=True, vocab_size=200,
                   max_tokens=1024, max_eval_examples=200)
DEMO_TRAIN = dict(epochs=10_000, batch_size=1, lr=5e-3, warmup_steps=100, schedule="inverse_sqrt", weight_decay=0.0,
                  clip_grad=1.0, device="cpu", log_every=50, eval_every=10**9, checkpoint_every=10**9)

def run_translation_demo(out_dir: Path, seconds: float = 150, threads: Optional[int] = 1,
                         **overrides) -> Dict[str, Any]:
    """Train a small model on the built-in CLDR corpus for about ``seconds`` on CPU, then score the held-out
    (test) concepts with chrF++ next to the copy-the-source baseline and translate a few of them.

    ``threads``: torch intra-op threads while it runs (None: leave as is). One by default: this 1M-parameter
    model gains little from more, and on a busy shared machine 2 threads ran 10x fewer steps than 1 (measured).
    Returns the metrics ('chrf', 'bleu', 'copy_chrf', 'pairs'), 'examples', 'train_seconds', 'steps',
    'parameters' and 'model_dir'. ``overrides`` replace :data:`DEMO_CONFIG` / TranslationConfig fields.
    """
    from ..config import to_dict
    from ..engine import Trainer
    out_dir = Path(out_dir)
    train = TrainConfig(**DEMO_TRAIN, time_limit_s=seconds, out_dir=str(out_dir))
    cfg = TranslationConfig(**{**DEMO_CONFIG, "train": train, **overrides})
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        task = TranslationTask(cfg)
        trainer = Trainer(task, cfg.train, config_to_save=to_dict(cfg))
        trainer.fit()
        test = load_pairs(cfg.data, "test", task.directions)
        metrics = evaluate_translations(Translator(trainer.model, task.tokenizer), test, num_examples=6)
    finally:
        torch.set_num_threads(previous)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    last = [record for record in records if record["split"] == "train"][-1]
    return {**metrics, "train_seconds": last["time_s"], "steps": last["step"],
            "parameters": sum(p.numel() for p in trainer.model.parameters()), "model_dir": str(out_dir / "model")}
