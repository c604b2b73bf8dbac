"""Text side of the translation model: language registry, NLLB-layout tokenizer, built-in corpora.

Only the registry is imported here (standard library only); ``tokenizer`` needs sentencepiece and ``corpus``
needs babel (the ``text`` extra).
"""
from .languages import (
    Language, UnknownLanguageError, get_language, list_languages, macrolanguages, nllb_codes,
)

__all__ = ["Language", "UnknownLanguageError", "get_language", "list_languages", "macrolanguages",
           "nllb_codes", "check_text"]


def check_text(text: object, what: str = "text") -> str:
    """``text`` if it is a string the tokenizers can take, else a ValueError naming ``what``: not a string, or
    holding a lone surrogate, which is what Python makes of bytes that were not UTF-8 (command-line arguments,
    ``surrogateescape``) and what JSON's ``"\\ud800"`` escape gives; sentencepiece and tokenizers fail on it with
    errors that name neither."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what}: not valid Unicode text: {text[exc.start]!r} at character {exc.start} (bytes "
                         f"that are not UTF-8?)") from None
    return text
