"""Parallel text that needs no download, and a FLORES-200 reader.

* CLDR names (babel): every "concept" (territory FR, month 3, unit length-meter, ...) has one phrase per
  language, so any two languages with CLDR data form an aligned corpus. Short (1-4 words) but clean, and
  deterministic for a given babel version.
* gettext catalogs of the system (``/usr/share/locale/*/LC_MESSAGES/*.mo``), optional: short UI sentences with
  the English msgid as the pivot. Contents depend on the installed OS packages, so nothing may rely on them.

Both split train/dev/test by a stable hash of the concept (CLDR key or English msgid), so a held-out concept
is held out in every language and no translation of a test phrase leaks into training through a third
language.
"""
from __future__ import annotations

import hashlib
import logging
import re
import struct
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .languages import get_language

__all__ = [
    "CLDR_KINDS", "DEFAULT_LANGUAGES", "SPLITS", "concept_split", "cldr_phrases", "builtin_concepts",
    "builtin_pairs", "builtin_sentences", "gettext_phrases", "gettext_pairs", "read_flores",
    "read_flores_pair", "read_lines",
]

_logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
CLDR_KINDS = ("language", "territory", "script", "currency", "month", "weekday", "unit", "city", "timezone")
# Languages whose CLDR data is complete (1,000+ concepts each), across five scripts.
DEFAULT_LANGUAGES = ("eng_Latn", "fra_Latn", "deu_Latn", "spa_Latn", "ita_Latn", "por_Latn", "nld_Latn",
                     "pol_Latn", "swe_Latn", "rus_Cyrl", "zho_Hans", "arb_Arab")
GETTEXT_ROOT = Path("/usr/share/locale")

Pair = Tuple[str, str, str, str]  # (src_lang, tgt_lang, src_text, tgt_text)
Langs = Union[str, Sequence[str]]


def concept_split(concept_id: str) -> str:
    """'train' (80%), 'dev' (10%) or 'test' (10%) by a hash of the concept id, stable across machines."""
    bucket = int.from_bytes(hashlib.sha256(concept_id.encode("utf-8")).digest()[:4], "little") % 100
    return "train" if bucket < 80 else "dev" if bucket < 90 else "test"


def _check_split(split: Optional[str]) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or None for all), got {split!r}")


def _keys(langs: Langs) -> List[str]:
    langs = [langs] if isinstance(langs, str) else list(langs)
    return list(dict.fromkeys(get_language(code).key for code in langs))


def _clean(text) -> Optional[str]:
    if not isinstance(text, str):
        return None
    text = " ".join(text.split())
    return text or None


# ---------------------------------------------------------------------------------------------- CLDR (babel)

@lru_cache(maxsize=64)
def cldr_phrases(lang: str, kinds: Tuple[str, ...] = CLDR_KINDS) -> Mapping[str, str]:
    """``{concept_id: phrase}`` of one language from babel's CLDR data, e.g. ``'territory:FR': 'France'``."""
    from babel import Locale, UnknownLocaleError
    from babel.core import get_global

    unknown = set(kinds) - set(CLDR_KINDS)
    if unknown:
        raise ValueError(f"unknown CLDR kinds {sorted(unknown)}; choose from {CLDR_KINDS}")
    language = get_language(lang)
    try:
        locale = Locale.parse(language.bcp47.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        raise ValueError(f"no CLDR data for {language.key} ({language.name}) in babel; languages with data: "
                         f"list_languages(source='cldr') or 'intern2 languages --source cldr'") from None
    phrases: Dict[str, str] = {}

    def put(kind: str, code, text) -> None:
        text = _clean(text)
        if text is not None:
            phrases[f"{kind}:{code}"] = text

    tables = {"language": locale.languages, "territory": locale.territories, "script": locale.scripts}
    for kind, table in tables.items():
        if kind in kinds:
            for code, name in table.items():
                put(kind, code, name)
    if "currency" in kinds:
        for code, name in locale.currencies.items():
            put("currency", code, name)
    if "month" in kinds:
        for number, name in locale.months["format"]["wide"].items():
            put("month", number, name)
    if "weekday" in kinds:
        for number, name in locale.days["format"]["wide"].items():
            put("weekday", number, name)
    if "unit" in kinds:
        for unit, names in locale._data["unit_display_names"].items():
            put("unit", unit, names.get("long"))
    if "city" in kinds:
        for zone, names in locale.time_zones.items():
            put("city", zone, names.get("city"))
        if language.iso639_3 == "eng":
            # CLDR stores an English city only when it differs from the zone id, which is the English name.
            for zone in get_global("zone_territories"):
                if not zone.startswith("Etc/"):
                    phrases.setdefault(f"city:{zone}", zone.rsplit("/", 1)[-1].replace("_", " "))
    if "timezone" in kinds:
        for zone, names in locale.meta_zones.items():
            put("timezone", zone, (names.get("long") or {}).get("standard"))
    return MappingProxyType(phrases)  # cached: read-only


def builtin_concepts(langs: Langs = DEFAULT_LANGUAGES, split: Optional[str] = None,
                     kinds: Iterable[str] = CLDR_KINDS) -> Dict[str, Dict[str, str]]:
    """``{concept_id: {lang: phrase}}`` for the concepts in ``split`` (None: all), sorted by concept id."""
    _check_split(split)
    keys = _keys(langs)
    per_lang = {key: cldr_phrases(key, tuple(kinds)) for key in keys}
    concepts: Dict[str, Dict[str, str]] = {}
    for concept in sorted(set().union(*per_lang.values())):
        if split is None or concept_split(concept) == split:
            concepts[concept] = {key: per_lang[key][concept] for key in keys if concept in per_lang[key]}
    return concepts


def _pairs(concepts: Dict[str, Dict[str, str]], src_keys: List[str], tgt_keys: List[str],
           drop_identical: bool) -> List[Pair]:
    pairs = []
    for phrases in concepts.values():
        for src in src_keys:
            for tgt in tgt_keys:
                if src != tgt and src in phrases and tgt in phrases:
                    if not (drop_identical and phrases[src] == phrases[tgt]):
                        pairs.append((src, tgt, phrases[src], phrases[tgt]))
    return pairs


def builtin_pairs(split: str = "train", src_langs: Langs = DEFAULT_LANGUAGES,
                  tgt_langs: Langs = DEFAULT_LANGUAGES, kinds: Iterable[str] = CLDR_KINDS,
                  drop_identical: bool = False) -> List[Pair]:
    """Parallel CLDR phrases ``(src_lang, tgt_lang, src, tgt)`` for every ordered pair of distinct languages.

    Languages may be given by any code the registry knows and come back as registry keys. About half of the
    name pairs between Latin-script languages are identical (proper names); ``drop_identical`` removes them,
    e.g. to evaluate against a copy-the-source baseline.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    src_keys, tgt_keys = _keys(src_langs), _keys(tgt_langs)
    concepts = builtin_concepts(list(dict.fromkeys(src_keys + tgt_keys)), split, kinds)
    return _pairs(concepts, src_keys, tgt_keys, drop_identical)


def builtin_sentences(langs: Langs = DEFAULT_LANGUAGES, split: str = "train") -> List[str]:
    """Monolingual CLDR phrases of ``langs`` (e.g. to train a tokenizer), deduplicated, in a fixed order."""
    lines = (text for phrases in builtin_concepts(langs, split).values() for text in phrases.values())
    return list(dict.fromkeys(lines))


# ---------------------------------------------------------------------------------------- gettext catalogs

def _read_mo(path: Path) -> Dict[str, str]:
    """msgid -> msgstr of a compiled gettext catalog (first plural form; message contexts dropped)."""
    data = path.read_bytes()
    if len(data) < 20:
        raise ValueError(f"{path}: too short for a .mo file")
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if order is None:
        raise ValueError(f"{path}: not a .mo file (magic {magic:#x})")
    count, orig_at, trans_at = struct.unpack(order + "3I", data[8:20])
    raw = []
    for i in range(count):
        olen, opos = struct.unpack(order + "2I", data[orig_at + 8 * i: orig_at + 8 * i + 8])
        tlen, tpos = struct.unpack(order + "2I", data[trans_at + 8 * i: trans_at + 8 * i + 8])
        raw.append((data[opos: opos + olen], data[tpos: tpos + tlen]))
    charset = "utf-8"
    for msgid, msgstr in raw:
        if msgid == b"":  # the header names the catalog's charset
            found = re.search(rb"charset=([\w.-]+)", msgstr)
            charset = found.group(1).decode("ascii") if found else charset
    catalog = {}
    for msgid, msgstr in raw:
        if msgid and msgstr:
            source = msgid.decode(charset).split("\x04")[-1].split("\x00")[0]
            catalog[source] = msgstr.decode(charset).split("\x00")[0]
    return catalog


_SENTENCE_SKIP = re.compile(r"[%{}<>\\_&$@|\t\n]|https?:|\.\.\.$")


def _sentence_like(text: str) -> bool:
    # UI strings with placeholders, markup or mnemonics are not translations a model should learn.
    return len(text.split()) >= 3 and len(text) <= 200 and not _SENTENCE_SKIP.search(text)


@lru_cache(maxsize=32)
def gettext_phrases(lang: str, root: Union[str, Path] = GETTEXT_ROOT) -> Mapping[str, str]:
    """``{English msgid: translation}`` of one language from the system's gettext catalogs ({} when none).

    Locale folders are matched through the registry ('pt_BR', 'zh_CN', 'sr@latin'); the folder that is exactly
    the language's tag comes first, and the first catalog (sorted by path) wins for a repeated msgid.
    """
    key = get_language(lang).key
    root = Path(root)
    folders = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            if get_language(folder.name).key == key:
                folders.append(folder)
        except KeyError:
            continue
    bcp47 = get_language(key).bcp47.replace("-", "_")
    folders.sort(key=lambda f: f.name != bcp47)
    phrases: Dict[str, str] = {}
    for folder in folders:
        for path in sorted(folder.glob("LC_MESSAGES/*.mo")):
            try:
                catalog = _read_mo(path)
            except (ValueError, UnicodeDecodeError, LookupError, struct.error) as err:
                _logger.warning("skipping unreadable gettext catalog %s: %s", path, err)
                continue
            for msgid, msgstr in catalog.items():
                msgid, msgstr = " ".join(msgid.split()), " ".join(msgstr.split())
                if msgid != msgstr and _sentence_like(msgid) and _sentence_like(msgstr):
                    phrases.setdefault(msgid, msgstr)
    return MappingProxyType(phrases)  # cached: read-only


def gettext_pairs(split: str = "train", src_langs: Langs = "eng_Latn", tgt_langs: Langs = ("fra_Latn",),
                  root: Union[str, Path] = GETTEXT_ROOT) -> List[Pair]:
    """Parallel UI sentences from the system's gettext catalogs, pivoting on the English msgid (so non-English
    pairs are aligned too); split by a hash of the msgid. Empty when the catalogs are not installed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    src_keys, tgt_keys = _keys(src_langs), _keys(tgt_langs)
    keys = list(dict.fromkeys(src_keys + tgt_keys))
    per_lang = {key: gettext_phrases(key, root) for key in keys if not key.startswith("eng_")}
    msgids = sorted(set().union(*per_lang.values())) if per_lang else []
    concepts = {}
    for msgid in msgids:
        if concept_split(f"gettext:{msgid}") == split:
            phrases = {key: table[msgid] for key, table in per_lang.items() if msgid in table}
            concepts[msgid] = dict(phrases, **{key: msgid for key in keys if key.startswith("eng_")})
    return _pairs(concepts, src_keys, tgt_keys, drop_identical=False)


# ------------------------------------------------------------------------------------------------ FLORES-200

def _flores_file(root: Path, split: str, code: str) -> Optional[Path]:
    for base in (root, root / "flores200_dataset"):
        for name in (f"{code}.{split}", code, f"{code}.txt"):
            if (base / split / name).is_file():
                return base / split / name
    return None


def read_flores(root: Union[str, Path], split: str, code: str) -> List[str]:
    """Sentences of one language of a FLORES-200 directory: ``<root>/{dev,devtest}/<code>.{dev,devtest}``
    (also accepted: ``<root>/flores200_dataset/...`` and FLORES+ files named ``<code>`` or ``<code>.txt``).

    ``code`` may be any registered code ('fr' finds fra_Latn.devtest).
    """
    if split not in ("dev", "devtest"):
        raise ValueError(f"FLORES split must be 'dev' or 'devtest', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"FLORES-200 directory {root} does not exist")
    path = _flores_file(root, split, code)
    if path is None:
        key = get_language(code).key
        path = _flores_file(root, split, key)
        if path is None:
            folder = root / split if (root / split).is_dir() else root / "flores200_dataset" / split
            have = sorted(p.name.split(".")[0] for p in folder.glob("*")) if folder.is_dir() else []
            hint = f"; {folder} has {len(have)} files" + (f", e.g. {', '.join(have[:5])}" if have else "") \
                if folder.is_dir() else f"; there is no {split}/ folder under {root}"
            expected = root / split / f"{key}.{split}"
            raise FileNotFoundError(f"FLORES-200 file for {key} not found: expected {expected}{hint}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None


def read_flores_pair(root: Union[str, Path], split: str, src: str, tgt: str) -> Tuple[List[str], List[str]]:
    """Aligned source and target sentences of a FLORES-200 split; raises if the line counts differ."""
    src_lines, tgt_lines = read_flores(root, split, src), read_flores(root, split, tgt)
    if len(src_lines) != len(tgt_lines):
        raise ValueError(f"FLORES {split}: {src} has {len(src_lines)} lines but {tgt} has {len(tgt_lines)}; "
                         "the files are not aligned")
    return src_lines, tgt_lines


def read_lines(path: Union[str, Path]) -> List[str]:
    """The lines of a UTF-8 text file; a missing or non-UTF-8 file is an error naming it."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"text file {file}: is a folder; expected a UTF-8 text file")
    if not file.is_file():
        raise FileNotFoundError(f"text file {file} does not exist")
    try:
        return file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text: {exc}") from None
