"""CLIP-layout byte-level BPE tokenizer for the video-text model, on the ``tokenizers`` library.

intern2 does not ship or download CLIP's 49408-token vocabulary. A tokenizer is either trained on the captions at
hand (seconds for thousands of captions) or built from CLIP's own merges file, ``bpe_simple_vocab_16e6.txt.gz``
(shipped with OpenAI's CLIP repository and the open_clip_torch package), which the official InternVideo-MM text
tower needs; either way it is saved next to the model as ``tokenizer.json``. The token layout follows
CLIP, which the text tower relies on: ``<start_of_text> tokens <end_of_text>`` then padding with id 0 up to the
context length, with the two special tokens holding the two largest ids, so that the end-of-text position is the
argmax of every sequence. Text is NFC-normalised and lower-cased, as CLIP does.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from . import check_text

__all__ = ["BPETokenizer", "SOT", "EOT", "TOKENIZER_NAME", "CLIP_VOCAB_NAME"]

SOT = "<start_of_text>"  # open_clip's names; OpenAI's CLIP spells them <|startoftext|> / <|endoftext|>
EOT = "<end_of_text>"
TOKENIZER_NAME = "tokenizer.json"
CLIP_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the merges that fill 49408 ids: 2 x 256 byte tokens + merges + the two specials.
_CLIP_MERGES = 49408 - 512 - 2
# CLIP's pre-tokenizer: contractions, letter runs, single digits, punctuation runs; whitespace separates only.
_CLIP_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def _tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError("the video-text tokenizer needs the 'tokenizers' package: pip install "
                          "'intern2[videotext]'") from exc
    return tokenizers


def _byte_alphabet() -> List[str]:
    """GPT-2's byte-to-character map in CLIP's vocabulary order: the printable Latin-1 bytes as themselves, then the
    other bytes (controls, space, ...) as U+0100 onwards. The ``tokenizers`` ByteLevel pre-tokenizer maps the same
    way; only the order, which fixes CLIP's first 256 ids, has to be spelled out here."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(moved))]


def _read_clip_merges(path: Path) -> List[Tuple[str, str]]:
    """The merges CLIP uses from its merges file (gzip or plain text): a header line naming the ``#version``, then
    one space-separated pair per line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no CLIP merges file ({CLIP_VOCAB_NAME} ships with the open_clip_torch "
                                f"package and OpenAI's CLIP repository)")
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a CLIP merges file ({exc})") from exc
    if "#version" not in lines[0]:  # CLIP's own file starts '"bpe_simple_vocab_16e6.txt#version: 0.2'
        raise ValueError(f"{path}: not a CLIP merges file (expected a '#version' header line, got {lines[0][:40]!r})")
    merges = []
    for number, line in enumerate(lines[1:_CLIP_MERGES + 1], start=2):
        pair = tuple(line.split())
        if len(pair) != 2:
            if not line.strip():  # a short file's trailing newline
                continue
            raise ValueError(f"{path}, line {number}: expected two space-separated symbols, got {line[:40]!r}")
        merges.append(pair)
    return merges


def _add_specials(tokenizer) -> None:
    """Append the start/end-of-text tokens (the two largest ids) and wrap every text in them."""
    tk = _tokenizers()
    tokenizer.add_special_tokens([SOT, EOT])
    sot = tokenizer.token_to_id(SOT)
    tokenizer.post_processor = tk.processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, sot), (EOT, sot + 1)])


class BPETokenizer:
    """Token ids (N, context_length) for a list of texts; see the module docstring for the layout."""

    def __init__(self, tokenizer, context_length: int = 77):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (start, one token, end), got {context_length}")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.sot_id, self.eot_id = tokenizer.token_to_id(SOT), tokenizer.token_to_id(EOT)
        if self.sot_id is None or self.eot_id is None:
            raise ValueError(f"tokenizer has no {SOT}/{EOT} tokens: not a video-text tokenizer")
        if self.eot_id != tokenizer.get_vocab_size() - 1:
            raise ValueError(f"tokenizer: {EOT} must hold the largest id ({tokenizer.get_vocab_size() - 1}), "
                             f"it has {self.eot_id}; the text tower pools at the largest id")
        # The layout lives in the tokenizer itself, so tokenizer.json alone reproduces it.
        tokenizer.enable_truncation(max_length=context_length)
        tokenizer.enable_padding(length=context_length, pad_id=0, pad_token=tokenizer.id_to_token(0))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048, context_length: int = 77,
              min_frequency: int = 1) -> "BPETokenizer":
        """Learn byte-level BPE merges from ``texts`` (at most ``vocab_size`` tokens including the two specials;
        a small corpus stops earlier, when no pair repeats)."""
        tk = _tokenizers()
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise ValueError("BPETokenizer.train: no non-empty texts to learn from")
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.normalizer = tk.normalizers.Sequence([tk.normalizers.NFC(), tk.normalizers.Lowercase()])
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=max(vocab_size - 2, 256), min_frequency=min_frequency,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        _add_specials(tokenizer)  # after training, so that the specials take the two largest ids
        return cls(tokenizer, context_length)

    @classmethod
    def from_clip_vocab(cls, path: Union[str, os.PathLike], context_length: int = 77) -> "BPETokenizer":
        """CLIP's tokenizer (49408 ids) from its merges file, ``bpe_simple_vocab_16e6.txt.gz``.

        Ids match CLIP's own tokenizer: the 256 byte characters, the same with the end-of-word suffix ``</w>``, one
        token per merge, then start/end-of-text (49406, 49407); text is cleaned, lower-cased and split as CLIP does
        it. Of CLIP's ``ftfy`` clean-up, NFC, control-character removal and quote straightening are reproduced;
        HTML entities (``&amp;``), full-width forms, Latin ligatures (``\ufb01``) and mojibake are tokenized as
        written, where CLIP would fix them first.
        """
        tk = _tokenizers()
        merges = _read_clip_merges(Path(path))
        alphabet = _byte_alphabet()
        tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in merges]
        vocab = {token: i for i, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"{path}: merges repeat a token; not a CLIP merges file")
        tokenizer = tk.Tokenizer(tk.models.BPE(vocab, merges, end_of_word_suffix="</w>"))
        # CLIP cleans text with ftfy, then lower-cases it; the ftfy fixes that plain text meets are reproduced.
        # Collapsing whitespace, as CLIP also does, changes no token: the split below drops every space.
        tokenizer.normalizer = tk.normalizers.Sequence([
            tk.normalizers.NFC(),
            tk.normalizers.Replace(tk.Regex("[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]"), ""),
            tk.normalizers.Replace(tk.Regex("[\u02bc\u2018-\u201b]"), "'"),  # so that "don\u2019t" has "'t"
            tk.normalizers.Replace(tk.Regex("[\u201c-\u201f]"), '"'),
            # Python's lower() writes a word-final capital sigma as the final form; Lowercase() does not.
            tk.normalizers.Replace(tk.Regex(r"(?<=\p{Cased})\u03a3(?!\p{Case_Ignorable}*\p{Cased})"), "\u03c2"),
            tk.normalizers.Lowercase()])
        tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split(tk.Regex(_CLIP_PATTERN), behavior="removed", invert=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        # A word ends in "</w>", not in a space byte: made the byte character of a space (U+0120), it decodes to one.
        tokenizer.decoder = tk.decoders.Sequence([tk.decoders.Replace("</w>", "\u0120"), tk.decoders.ByteLevel()])
        _add_specials(tokenizer)
        return cls(tokenizer, context_length)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], context_length: Optional[int] = None) -> "BPETokenizer":
        """Read ``tokenizer.json`` (or a folder holding it), or build CLIP's tokenizer from its merges file (a
        ``.txt.gz``/``.txt`` path, see :meth:`from_clip_vocab`); the context length saved in the JSON unless
        given (77 for CLIP's)."""
        path = Path(path)
        if path.suffix in (".gz", ".txt"):
            return cls.from_clip_vocab(path, context_length or 77)
        if path.is_dir():
            path = path / TOKENIZER_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer file; a video-text model folder written by intern2 "
                                    f"holds {TOKENIZER_NAME}; for CLIP's vocabulary pass its {CLIP_VOCAB_NAME}")
        tk = _tokenizers()
        try:
            tokenizer = tk.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses for bad JSON
            raise ValueError(f"{path}: not a tokenizers JSON file ({exc})") from exc
        saved = (tokenizer.truncation or {}).get("max_length")
        return cls(tokenizer, context_length or saved or 77)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a folder)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / TOKENIZER_NAME
        from ..checkpoint import atomic_write
        atomic_write(path, lambda tmp: self.tokenizer.save(str(tmp)))
        return path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Token ids, (N, context_length) int64; a single string gives N = 1. Long texts are truncated, keeping
        the end-of-text token."""
        texts = [check_text(text) for text in ([texts] if isinstance(texts, str) else texts)]
        encodings = self.tokenizer.encode_batch(texts)
        return torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(len(texts), self.context_length)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of one id sequence, without the special tokens and padding."""
        ids = list(ids)
        if self.eot_id in ids:
            ids = ids[:ids.index(self.eot_id)]
        return self.tokenizer.decode([i for i in ids if i != self.sot_id]).strip()
