"""SentencePiece tokenizer with the NLLB-200 (fairseq) token layout.

Token ids::

    0 <s>   1 <pad>   2 </s>   3 <unk>          fairseq specials
    p + 1                                       SentencePiece piece p (spm's own <unk>, piece 0, is id 3)
    n + 1 + i                                   language token i (n = number of pieces), e.g. 'eng_Latn'
    n + 1 + L                                   <mask>, after the L languages the tokenizer was built with
    n + 2 + L + j                               language j added later with ``add_languages``

With NLLB's 256,000-piece model and its 202 languages this gives eng_Latn = 256047 and <mask> = 256203, the
ids of the released checkpoints. Languages added later go after <mask> so no existing id ever changes and a
model only appends embedding rows.

Sequences use the non-legacy NLLB layout: source ``[src_lang] pieces </s>``; labels ``[tgt_lang] pieces </s>``
(the decoder starts from ``</s>`` and the target language token is forced as the first generated token).
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from ..checkpoint import UnreadableFileError
from . import check_text
from .languages import get_language, nllb_codes

__all__ = ["NllbTokenizer", "MissingLanguageTokenError"]

_logger = logging.getLogger(__name__)

MODEL_FILE = "sentencepiece.bpe.model"  # the name in NLLB's Hugging Face folders
CONFIG_FILE = "intern2_tokenizer.json"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


class MissingLanguageTokenError(KeyError):
    """A registered language that has no token in this tokenizer."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def _spm():
    try:
        import sentencepiece
    except ImportError:
        raise ImportError("the tokenizer needs sentencepiece: pip install 'intern2[text]'") from None
    return sentencepiece


class NllbTokenizer:
    """SentencePiece pieces shifted by one behind four fairseq specials, then language tokens and <mask>."""

    bos_id = 0
    pad_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(self, model_proto: bytes, languages: Optional[Sequence[str]] = None,
                 added_languages: Sequence[str] = ()):
        """``model_proto``: a serialized SentencePiece model; ``languages``: language codes in token order
        (default: the 202 NLLB-200 codes in NLLB's order); ``added_languages``: languages after <mask>."""
        self.sp = _spm().SentencePieceProcessor(model_proto=model_proto)
        self.num_pieces = self.sp.get_piece_size()
        base = nllb_codes() if languages is None else list(languages)
        self._base_languages = self._canonical(base, "languages")
        self._added_languages: List[str] = []
        self._lang_to_id: Dict[str, int] = {
            code: self.num_pieces + 1 + i for i, code in enumerate(self._base_languages)}
        self.mask_id = self.num_pieces + 1 + len(self._base_languages)
        self.add_languages(added_languages)

    @staticmethod
    def _canonical(codes: Iterable[str], what: str) -> List[str]:
        keys = [get_language(code).key for code in codes]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise ValueError(f"{what} name the same language more than once: {', '.join(duplicates)}")
        return keys

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_file(cls, spm_model_path: Union[str, Path], languages: Optional[Sequence[str]] = None
                  ) -> "NllbTokenizer":
        """Tokenizer on an existing SentencePiece model file, e.g. NLLB's ``sentencepiece.bpe.model``
        (``languages`` default: the NLLB-200 codes, which reproduces the released checkpoints' ids)."""
        path = Path(spm_model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {path} does not exist")
        return cls._read(path, languages)

    @classmethod
    def _read(cls, path: Path, languages: Optional[Sequence[str]], added_languages: Sequence[str] = ()
              ) -> "NllbTokenizer":
        try:
            return cls(path.read_bytes(), languages, added_languages)
        except RuntimeError as err:  # sentencepiece's parse error names neither file nor format
            reason = " ".join(str(err).split())[:160]
            raise UnreadableFileError(f"{path} is not a SentencePiece model file ({reason})") from None

    @classmethod
    def train(cls, corpus_lines: Iterable[str], vocab_size: int, languages: Sequence[str],
              path: Optional[Union[str, Path]] = None, model_type: str = "unigram",
              character_coverage: float = 1.0, **spm_options) -> "NllbTokenizer":
        """Train a new SentencePiece model on ``corpus_lines`` (in memory, single-threaded, so the same lines
        give the same model) with ``vocab_size`` pieces; save it to the folder ``path`` when given.

        Extra keyword arguments go to ``SentencePieceTrainer.train`` (e.g. ``byte_fallback=True``).
        """
        lines = (line for line in corpus_lines if line and line.strip())
        model = io.BytesIO()
        options = dict(model_type=model_type, vocab_size=vocab_size, character_coverage=character_coverage,
                       unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # NLLB's spm: <unk> <s> </s>, no pad piece
                       num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
        options.update(spm_options)
        try:
            _spm().SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, **options)
        except RuntimeError as err:
            raise ValueError(f"SentencePiece training failed: {err}") from None
        tokenizer = cls(model.getvalue(), languages)
        if path is not None:
            tokenizer.save_pretrained(path)
        return tokenizer

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path]) -> "NllbTokenizer":
        """Load a folder written by ``save_pretrained``, or a Hugging Face NLLB folder
        (``sentencepiece.bpe.model`` without our JSON: the NLLB-200 languages are assumed)."""
        folder = Path(folder)
        model_path = folder / MODEL_FILE
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer folder {folder} has no {MODEL_FILE}")
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            _logger.info("%s has no %s; assuming the NLLB-200 language tokens", folder, CONFIG_FILE)
            return cls.from_file(model_path)
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("format") != "intern2-nllb-tokenizer":
            raise ValueError(f"{config_path}: not an intern2 tokenizer config "
                             f"(format {config.get('format')!r})")
        tokenizer = cls._read(model_path, config["languages"], config.get("added_languages", ()))
        if tokenizer.num_pieces != config["num_pieces"]:
            raise ValueError(f"{config_path} was written for a SentencePiece model with "
                             f"{config['num_pieces']} pieces but {model_path} has {tokenizer.num_pieces}")
        return tokenizer

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Write ``sentencepiece.bpe.model`` and ``intern2_tokenizer.json`` (language order) to ``folder``."""
        from ..checkpoint import atomic_write
        folder = Path(folder)
        proto = self.sp.serialized_model_proto()
        atomic_write(folder / MODEL_FILE, lambda tmp: Path(tmp).write_bytes(proto))
        config = {"format": "intern2-nllb-tokenizer", "version": 1, "num_pieces": self.num_pieces,
                  "languages": self._base_languages, "added_languages": self._added_languages}
        text = json.dumps(config, indent=1) + "\n"
        atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return folder

    # ------------------------------------------------------------------------------------------- vocabulary

    @property
    def languages(self) -> List[str]:
        """Language tokens in id order (construction languages, then added ones)."""
        return self._base_languages + self._added_languages

    @property
    def vocab_size(self) -> int:
        """Number of ids (an NLLB checkpoint's embedding may have a few more, unused, rows)."""
        return self.mask_id + 1 + len(self._added_languages)

    def __len__(self) -> int:
        return self.vocab_size

    def lang_token_id(self, code: str) -> int:
        """Id of a language token; any registered code works ('fr', 'fra', 'fra_Latn').

        Unknown codes raise the registry's ``UnknownLanguageError``; a registered language without a token in
        this tokenizer raises ``MissingLanguageTokenError`` (a ``KeyError``) that says how to add it.
        """
        key = get_language(code).key
        if key not in self._lang_to_id:
            raise MissingLanguageTokenError(
                f"language {key} is registered but this tokenizer has no token for it "
                f"({len(self.languages)} languages); add it with add_languages([{key!r}])")
        return self._lang_to_id[key]

    def lang_code(self, token_id: int) -> Optional[str]:
        """Language key of a language-token id, else None."""
        if token_id <= self.num_pieces or token_id == self.mask_id or token_id >= self.vocab_size:
            return None
        return self.languages[token_id - self.num_pieces - 1 - (token_id > self.mask_id)]

    def add_languages(self, codes: Sequence[str]) -> List[int]:
        """Append language tokens after all existing ids and return their ids, in the order of ``codes``.

        Contract for the model side (``resize_embeddings_for_languages``): every returned id needs an
        embedding row, initialised e.g. from ``lang_token_id(init_from)`` of a related language; rows are only
        appended and the tied output projection must grow with the input embedding. A returned id can be
        smaller than an existing checkpoint's row count (NLLB-200 has two unused rows after <mask>, 256204 and
        256205): such a row exists but was never trained and must be initialised all the same.
        Raises ``ValueError`` if a language already has a token (re-initialising its row would lose training).
        """
        keys = self._canonical(codes, "add_languages codes")
        present = [key for key in keys if key in self._lang_to_id]
        if present:
            raise ValueError(f"languages already have tokens: {', '.join(present)}")
        ids = []
        for key in keys:
            self._lang_to_id[key] = self.vocab_size
            ids.append(self.vocab_size)
            self._added_languages.append(key)
        return ids

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> List[str]:
        tokens = []
        for i in ids:
            i = int(i)
            if 0 <= i < 4:
                tokens.append(SPECIAL_TOKENS[i])
            elif i <= self.num_pieces:
                tokens.append(self.sp.id_to_piece(i - 1))
            elif i == self.mask_id:
                tokens.append("<mask>")
            elif i < self.vocab_size:
                tokens.append(self.lang_code(i))
            else:
                raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return tokens

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> List[int]:
        ids = []
        for token in tokens:
            if token in SPECIAL_TOKENS:
                ids.append(SPECIAL_TOKENS.index(token))
            elif token == "<mask>":
                ids.append(self.mask_id)
            elif token in self._lang_to_id:
                ids.append(self._lang_to_id[token])
            else:
                piece = self.sp.piece_to_id(token)
                ids.append(piece + 1 if piece else self.unk_id)
        return ids

    # ------------------------------------------------------------------------------------- encode / decode

    def tokenize(self, text: str) -> List[str]:
        """SentencePiece pieces of ``text`` (no special tokens)."""
        return self.sp.encode(check_text(text), out_type=str)

    def encode(self, text: str, src_lang: str, max_length: Optional[int] = None) -> List[int]:
        """``[lang_token, pieces..., </s>]`` for ``text`` in language ``src_lang`` (also the label layout,
        with the target language). ``max_length`` truncates the pieces, keeping the language token and
        </s>."""
        lang_id = self.lang_token_id(src_lang)
        pieces = [p + 1 if p else self.unk_id for p in self.sp.encode(check_text(text))]
        if max_length is not None:
            if max_length < 2:
                raise ValueError(f"max_length must be >= 2 (language token and </s>), got {max_length}")
            pieces = pieces[:max_length - 2]
        return [lang_id] + pieces + [self.eos_id]

    def encode_batch(self, texts: Sequence[str], src_lang: Union[str, Sequence[str]],
                     max_length: Optional[int] = None, return_tensors: Optional[str] = None) -> dict:
        """Encode and right-pad a batch: ``{'input_ids', 'attention_mask'}`` as lists, or torch tensors with
        ``return_tensors='pt'``. ``src_lang`` is one code for all texts or one per text."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts; use encode for one text")
        langs = [src_lang] * len(texts) if isinstance(src_lang, str) else list(src_lang)
        if len(langs) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(langs)} source languages")
        rows = [self.encode(text, lang, max_length) for text, lang in zip(texts, langs)]
        width = max((len(row) for row in rows), default=0)
        input_ids = [row + [self.pad_id] * (width - len(row)) for row in rows]
        attention_mask = [[1] * len(row) + [0] * (width - len(row)) for row in rows]
        if return_tensors is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        import torch
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long).reshape(len(rows), width),
                "attention_mask": torch.tensor(attention_mask, dtype=torch.long).reshape(len(rows), width)}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids. With ``skip_special_tokens`` the fairseq specials (<unk> included, as in
        Hugging Face), language tokens and <mask> are dropped; otherwise they appear as token strings."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        parts: List[str] = []
        run: List[int] = []  # consecutive SentencePiece ids, decoded together so spacing is right
        for i in map(int, ids):
            if 4 <= i <= self.num_pieces:
                run.append(i - 1)
            elif skip_special_tokens:  # a skipped token does not split the text around it
                if not 0 <= i < self.vocab_size:
                    raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            else:
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                parts.append(self.convert_ids_to_tokens([i])[0])
        if run:
            parts.append(self.sp.decode(run))
        return " ".join(part for part in parts if part)

    def decode_batch(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> List[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(pieces={self.num_pieces}, languages={len(self.languages)}, "
                f"vocab_size={self.vocab_size})")
