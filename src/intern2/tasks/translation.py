"""Translation: `intern2 train translation`, `intern2 eval translation` and the demo (inference, `intern2
translate`: :mod:`intern2.pipelines.translation`).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import atomic_write
from ..config import check_positive, check_range, error_message
from ..engine import TrainConfig
from ..models.translator import TranslationModel, resize_embeddings_for_languages
from ..pipelines.common import local_checkpoint, positive, setup_logging
from ..pipelines.translation import Translator
from ..text.corpus import read_lines
from ..text.languages import get_language
from .common import train_cli

__all__ = ["TranslationConfig", "TranslationTask", "Translator", "MultilingualBatches", "pair_probabilities",
           "token_batches", "load_pairs", "translation_metrics", "train_main", "eval_main"]

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
        check_positive(self, "temperature", "eval_beams", "eval_batch_size", "max_eval_examples", "vocab_size")
        check_range(self, "label_smoothing", "[0, 1)")
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
        (s, t), sources, targets = pairs[0], read_lines(files[0]), read_lines(files[1])
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

    # Fields a resumed run may change: the evaluation's sample (the checkpoint folder also gives the tokenizer:
    # not resumable).
    resume_may_change = frozenset({"max_eval_examples"})

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
        from ..hub import local_folder
        from ..text.tokenizer import NllbTokenizer
        name, given = (("tokenizer", self.cfg.tokenizer) if self.cfg.tokenizer else
                       ("checkpoint", self.cfg.checkpoint))
        if given:
            with local_folder(given, name, weights=False) as folder:  # a Hub repo (facebook/nllb-...) too
                tokenizer = NllbTokenizer.from_pretrained(folder)
            missing = [lang for lang in self._languages() if lang not in tokenizer.languages]
            if missing:
                log.info("adding language tokens %s to the tokenizer of %s", ", ".join(missing), given)
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
        translator = Translator(getattr(model, "module", model), self.tokenizer)  # DDP wraps it in .module
        return evaluate_translations(translator, dataset, self.cfg.eval_beams, self.cfg.eval_batch_size)

    def save_model(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        info = {"directions": [list(d) for d in self.directions], "data": self.cfg.data}
        text = json.dumps(info, indent=1) + "\n"
        atomic_write(Path(directory) / DIRECTIONS_FILE, lambda tmp: Path(tmp).write_text(text))


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
    parser.add_argument("--checkpoint", "--model", dest="model", required=True,
                        help="model folder, or a Hub repo of one (owner/name)")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # given by `intern2 eval --task translation`
    parser.add_argument("--data", help="builtin:cldr or flores:ROOT (default: the data the model was trained on)")
    parser.add_argument("--split", default="test", choices=("dev", "test"),
                        help="held-out split (FLORES: both mean devtest)")
    parser.add_argument("--src", help="source language(s), comma-separated (default: the trained directions)")
    parser.add_argument("--tgt", help="target language(s), comma-separated")
    parser.add_argument("--src-file", help="source sentences, one per line (with --ref-file, --src, --tgt)")
    parser.add_argument("--ref-file", help="reference translations of --src-file, line by line")
    parser.add_argument("--beams", type=int, help="beam size (default: the model's, 4; 1: greedy)")
    parser.add_argument("--batch-size", type=positive(int), default=64)
    parser.add_argument("--max-examples", type=int, default=None, help="score a fixed sample of this size")
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantisation (CPU)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    setup_logging()
    if bool(args.src_file) != bool(args.ref_file):
        parser.error("--src-file and --ref-file go together")
    try:
        translator = Translator.from_pretrained(args.model, int8=args.int8)
        info_path = Path(local_checkpoint(translator.source)) / DIRECTIONS_FILE  # a Hub repo: its snapshot
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
        beams = args.beams or translator.protocol.num_beams
        metrics = evaluate_translations(translator, examples, beams, args.batch_size)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        parser.error(error_message(exc))
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{spec} ({args.split}): chrF++ {metrics['chrf']:.2f}  BLEU {metrics['bleu']:.2f}  "
          f"copy-the-source chrF++ {metrics['copy_chrf']:.2f}  ({metrics['count']} sentences, beam {beams})")
    for name, values in metrics["pairs"].items():
        print(f"  {name}: chrF++ {values['chrf']:.2f}  BLEU {values['bleu']:.2f}  copy {values['copy_chrf']:.2f}"
              f"  ({values['count']})")
    return 0
