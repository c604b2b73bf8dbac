"""CLIP-layout byte-level BPE tokenizer for the video-text model, trained with the ``tokenizers`` library.

intern2 does not ship or download CLIP's 49408-token vocabulary; a tokenizer is trained on the captions at hand
(seconds for thousands of captions) and saved next to the model as ``tokenizer.json``. The token layout follows
CLIP, which the text tower relies on: ``<start_of_text> tokens <end_of_text>`` then padding with id 0 up to the
context length, with the two special tokens holding the two largest ids, so that the end-of-text position is the
argmax of every sequence. Text is NFC-normalised and lower-cased, as CLIP does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

__all__ = ["BPETokenizer", "SOT", "EOT", "TOKENIZER_NAME"]

SOT = "<start_of_text>"
EOT = "<end_of_text>"
TOKENIZER_NAME = "tokenizer.json"


def _tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError("the video-text tokenizer needs the 'tokenizers' package: pip install "
                          "'intern2[videotext]'") from exc
    return tokenizers


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
        # Added after training, the specials take the two largest ids (end-of-text last).
        tokenizer.add_special_tokens([SOT, EOT])
        sot = tokenizer.token_to_id(SOT)
        tokenizer.post_processor = tk.processors.TemplateProcessing(
            single=f"{SOT} $A {EOT}", special_tokens=[(SOT, sot), (EOT, sot + 1)])
        return cls(tokenizer, context_length)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], context_length: Optional[int] = None) -> "BPETokenizer":
        """Read ``tokenizer.json`` (or a folder holding it); the context length saved in it unless given."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer file; a video-text model folder written by intern2 "
                                    f"holds {TOKENIZER_NAME} (intern2 does not download CLIP's vocabulary)")
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
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Token ids, (N, context_length) int64; a single string gives N = 1. Long texts are truncated, keeping
        the end-of-text token."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encodings = self.tokenizer.encode_batch(texts)
        return torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(len(texts), self.context_length)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of one id sequence, without the special tokens and padding."""
        ids = list(ids)
        if self.eot_id in ids:
            ids = ids[:ids.index(self.eot_id)]
        return self.tokenizer.decode([i for i in ids if i != self.sot_id]).strip()
