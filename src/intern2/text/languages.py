"""Language registry: ~500 languages keyed ``<iso639-3>_<Script>`` (NLLB's convention), from languages.json.

The data file is built offline by ``tools/build_languages.py`` from the NLLB-200 and MADLAD-400 code lists,
CLDR (babel, langcodes) and ISO 639 (pycountry); nothing here needs those libraries or a network.

Lookup accepts any code or name a user is likely to type::

    get_language("fra_Latn") == get_language("fr") == get_language("fra") == get_language("French")
    get_language("ar")        # Arabic macrolanguage -> arb_Arab (Standard Arabic, what NLLB calls Arabic)
    get_language("zh-TW")     # -> zho_Hant
    get_language("<2de>")     # MADLAD-400 target tag -> deu_Latn
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
from functools import lru_cache
from importlib import resources
from typing import Dict, List, Optional, Tuple

__all__ = ["Language", "UnknownLanguageError", "get_language", "list_languages", "macrolanguages",
           "nllb_codes", "main"]


@dataclasses.dataclass(frozen=True)
class Language:
    """One registered language (a language in one script)."""

    key: str  # canonical code and model language token, e.g. 'fra_Latn'
    name: str  # English name (CLDR), e.g. 'French'
    autonym: Optional[str]  # name in the language itself, when CLDR knows it
    other_names: Tuple[str, ...]  # ISO 639-3 name and names of macro/alias codes that mean this entry
    script: str  # ISO 15924, e.g. 'Latn'
    script_name: str
    iso639_3: str
    iso639_1: Optional[str]  # own two-letter code, or that of the macrolanguage it stands for (arb -> ar)
    bcp47: str  # shortest tag that resolves to this entry ('fr', 'zh-Hant', 'ace-Arab')
    macrolanguage: Optional[str]  # ISO 639-3 macrolanguage this language belongs to (arb -> ara)
    nllb_code: Optional[str]  # NLLB-200 language token, when NLLB covers it
    madlad_tag: Optional[str]  # MADLAD-400 target tag such as '<2fr>'
    madlad_code: Optional[str]
    sources: Tuple[str, ...]  # which lists name it: 'nllb', 'madlad', 'cldr' (babel has locale data)

    def __str__(self) -> str:
        return self.key


class UnknownLanguageError(KeyError, ValueError):
    """A code or name the registry cannot resolve; the message lists the closest registered languages."""

    def __init__(self, query: str, message: str, suggestions: List[str]):
        super().__init__(message)
        self.query = query
        self.message = message
        self.suggestions = suggestions

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.message


class _Registry:
    def __init__(self, data: dict):
        self.languages: Dict[str, Language] = {}
        for entry in data["languages"]:
            entry = dict(entry, sources=tuple(entry["sources"]), other_names=tuple(entry["other_names"]))
            self.languages[entry["key"]] = Language(**entry)
        self.nllb_codes: List[str] = list(data["nllb_codes"])
        self.region_scripts: Dict[str, Dict[str, str]] = data["region_scripts"]
        self.macrolanguages: Dict[str, str] = dict(data["macrolanguages"])
        # Codes first, names last, so a code never loses to a name that happens to spell the same.
        codes: Dict[str, str] = {}
        names: Dict[str, str] = {}
        # Default-script entries first: 'ace' and 'Acehnese' mean ace_Latn, not ace_Arab.
        by_script = sorted(self.languages.values(), key=lambda lang: "-" in lang.bcp47)
        for lang in by_script:
            for code in (lang.key, lang.bcp47, lang.iso639_3, lang.iso639_1, lang.nllb_code, lang.madlad_tag,
                         lang.madlad_code):
                if code:
                    codes.setdefault(code.lower(), lang.key)
        for code, key in list(data["macrolanguages"].items()) + list(data["aliases"].items()):
            codes.setdefault(code.lower(), key)
        # CLDR English names first, then other English names, then autonyms: a language's own name wins.
        for lang in by_script:
            names.setdefault(lang.name.lower(), lang.key)
        for lang in by_script:
            for name in (f"{lang.name} ({lang.script_name})",) + lang.other_names:
                names.setdefault(name.lower(), lang.key)
            for name in lang.other_names:
                names.setdefault(f"{name} ({lang.script_name})".lower(), lang.key)
        for lang in by_script:
            if lang.autonym:
                names.setdefault(lang.autonym.lower(), lang.key)
        self.codes = codes
        self.index = {**names, **codes}

    def lookup(self, query: str) -> Language:
        text = " ".join(query.split())
        key = self.index.get(text.lower())
        if key is None:
            key = self._parse_tag(text)
        return self.languages[key]

    def _parse_tag(self, text: str) -> str:
        """Resolve a BCP-47 / locale tag such as 'pt-BR', 'zh_Hant_TW', 'sr-Cyrl' or 'sr@latin'."""
        parts = re.split(r"[-_@]", text)
        base = self.codes.get(parts[0].lower()) if len(parts) > 1 else None
        if base is None:
            raise self._unknown(text)
        lang = self.languages[base]
        script = region = None
        for part in parts[1:]:
            if len(part) == 4 and part.isalpha() and script is None and region is None:
                script = part.title()
            elif (len(part) == 2 and part.isalpha() or len(part) == 3 and part.isdigit()) and region is None:
                region = part.upper()
            elif part.lower() in ("latin", "cyrillic") and text[-len(part) - 1] == "@" and script is None:
                script = "Latn" if part.lower() == "latin" else "Cyrl"  # glibc locale modifier: sr@latin
            else:  # variants and extensions would be silently ignored: better to say we do not know the tag
                raise self._unknown(text)
        if script is None:
            script = self.region_scripts.get(lang.iso639_3, {}).get(region or "")
        if script is None or script == lang.script:
            return base
        key = f"{lang.iso639_3}_{script}"
        if key in self.languages:
            return key
        variants = sorted(k for k, v in self.languages.items() if v.iso639_3 == lang.iso639_3)
        raise UnknownLanguageError(
            text, f"language {text!r}: {lang.name} is registered only as {', '.join(variants)}, not in "
            f"script {script!r}", variants)

    def _unknown(self, query: str) -> UnknownLanguageError:
        matches = difflib.get_close_matches(query.lower(), list(self.index), n=8, cutoff=0.6)
        keys = list(dict.fromkeys(self.index[m] for m in matches))[:5]
        hint = ", ".join(f"{k} ({self.languages[k].name})" for k in keys)
        message = f"unknown language {query!r}" + (f"; did you mean: {hint}?" if hint else "") + \
            " ('intern2 languages --filter TEXT' lists the registered languages)"
        return UnknownLanguageError(query, message, keys)


@lru_cache(maxsize=1)
def _registry() -> _Registry:
    text = resources.files(__package__).joinpath("languages.json").read_text(encoding="utf-8")
    return _Registry(json.loads(text))


def get_language(code_or_name) -> Language:
    """Registered language for any code or name: registry key, NLLB code, ISO 639-1/3, BCP-47 or locale tag,
    MADLAD-400 code or tag, macrolanguage or deprecated code, English name or autonym (case-insensitive).

    Raises ``UnknownLanguageError`` (a ``KeyError`` and a ``ValueError``) naming the closest matches.
    """
    if isinstance(code_or_name, Language):
        return code_or_name
    if not isinstance(code_or_name, str) or not code_or_name.strip():
        raise UnknownLanguageError(str(code_or_name), f"language code must be a non-empty string, got "
                                   f"{code_or_name!r}", [])
    return _registry().lookup(code_or_name)


def list_languages(filter: Optional[str] = None, source: Optional[str] = None) -> List[Language]:
    """Registered languages sorted by key; ``filter`` keeps those whose codes or names contain the text
    (case-insensitive), ``source`` those named by one list ('nllb', 'madlad' or 'cldr')."""
    langs = sorted(_registry().languages.values(), key=lambda lang: lang.key)
    if source is not None:
        if source not in ("nllb", "madlad", "cldr"):
            raise ValueError(f"source must be 'nllb', 'madlad' or 'cldr', got {source!r}")
        langs = [lang for lang in langs if source in lang.sources]
    if filter:
        needle = filter.lower()
        langs = [lang for lang in langs if any(
            needle in field.lower() for field in (lang.key, lang.name, lang.autonym, lang.bcp47,
                                                  lang.iso639_1, lang.madlad_tag, lang.script_name) if field)]
    return langs


def macrolanguages() -> Dict[str, str]:
    """Macrolanguage code (ISO 639-1 or -3) -> the registered language it means, e.g. 'ar' -> 'arb_Arab'.

    The member is CLDR's dominant language unless NLLB-200 trained another one (ps -> pbt_Arab, qu ->
    quy_Latn); the choices are documented in tools/build_languages.py. Macrolanguages that NLLB itself keys
    by the macro code (zh -> zho_Hans, et -> est_Latn) resolve through their ISO 639-1 code instead.
    """
    return dict(_registry().macrolanguages)


def nllb_codes() -> List[str]:
    """The 202 NLLB-200 language codes in tokenizer order (token id = spm size + 1 + index)."""
    return list(_registry().nllb_codes)


def main(argv: Optional[List[str]] = None) -> int:
    """List registered languages (``intern2 languages``)."""
    parser = argparse.ArgumentParser(prog="intern2 languages", description=main.__doc__)
    parser.add_argument("--filter", help="keep languages whose code or name contains this text, e.g. 'fra'")
    parser.add_argument("--source", choices=("nllb", "madlad", "cldr"), help="only languages in this list")
    parser.add_argument("--json", action="store_true", help="print one JSON object per language")
    args = parser.parse_args(argv)
    langs = list_languages(args.filter, args.source)
    if not langs:
        print(f"no registered language matches {args.filter!r}")
        return 1
    for lang in langs:
        if args.json:
            print(json.dumps(dataclasses.asdict(lang), ensure_ascii=False))
            continue
        models = " ".join(t for t in (lang.nllb_code and "nllb", lang.madlad_tag) if t)
        print(f"{lang.key:<10} {lang.bcp47:<9} {lang.name:<28} {lang.autonym or '':<24} {models}".rstrip())
    if not args.json:
        n_lang = len({lang.iso639_3 for lang in langs})
        print(f"{len(langs)} entries, {n_lang} languages")
    return 0
