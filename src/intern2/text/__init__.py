"""Text side of the translation model: language registry, NLLB-layout tokenizer, built-in corpora.

Only the registry is imported here (standard library only); ``tokenizer`` needs sentencepiece and ``corpus``
needs babel (the ``text`` extra).
"""
from .languages import (
    Language, UnknownLanguageError, get_language, list_languages, macrolanguages, nllb_codes,
)

__all__ = ["Language", "UnknownLanguageError", "get_language", "list_languages", "macrolanguages",
           "nllb_codes"]
