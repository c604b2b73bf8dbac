"""Build ``src/intern2/text/languages.json``, the language registry's data (run offline; output committed).

    python tools/build_languages.py [--fixtures ../shared/fixtures/translation]

Inputs: the NLLB-200 code list (tokenizer order) and the partial MADLAD-400 list from the translation
fixtures, langcodes + language_data (CLDR names, likely scripts, macrolanguage data), pycountry (ISO 639
tables) and babel (CLDR locales: autonyms, script names, which languages have locale data). langcodes and
pycountry are needed here only; the package reads the JSON this writes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

import langcodes
import pycountry
from babel import Locale, UnknownLocaleError
from babel.localedata import locale_identifiers
from langcodes.data_dicts import LANGUAGE_REPLACEMENTS, MACROLANGUAGES, NORMALIZED_MACROLANGUAGES

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "intern2" / "text" / "languages.json"
ENGLISH = Locale("en")

# Macrolanguage (ISO 639-3) -> the individual language a bare macro code means. CLDR's "dominant language"
# table (langcodes NORMALIZED_MACROLANGUAGES: ar->arb, fa->pes, ms->zsm, sw->swh, ...) is the default; these
# entries override it where NLLB-200 chose a different member, so that the code a user types reaches a
# language the models were trained on.
MACRO_OVERRIDES: Dict[str, str] = {
    "nor": "nob",  # Norwegian: Bokmal is ~90% of written Norwegian; NLLB has nob and nno, MADLAD only 'no'.
    "pus": "pbt",  # Pashto: NLLB trained Southern Pashto (pbt), CLDR names Northern (pbu) dominant.
    "que": "quy",  # Quechua: NLLB's only Quechua is Ayacucho (quy); CLDR picks Cusco (quz).
    "ful": "fuv",  # Fula: NLLB's only Fula is Nigerian Fulfulde (fuv); CLDR picks Pulaar (fuc).
    "kon": "kon",  # Kongo: NLLB uses the macro code itself (kon_Latn), not Koongo (kng).
    "est": "est",  # Estonian: NLLB uses est, not Standard Estonian (ekk); the two are the same language.
    "grn": "grn",  # Guarani: NLLB uses grn, not Paraguayan Guarani (gug).
    "srd": "srd",  # Sardinian: NLLB uses srd, not Campidanese (src).
    "aka": "aka",  # Akan: NLLB has both aka and twi; the macro code stays Akan.
    "zho": "zho",  # Chinese: NLLB keys Mandarin as zho_Hans/zho_Hant, not cmn; Cantonese is yue.
    "kur": "kmr",  # Kurdish: 'ku' in MADLAD/CLDR is Kurmanji (Latin); Central Kurdish keeps its own code ckb.
    "aze": "azj",  # Azerbaijani: North Azerbaijani (Latin); NLLB has azj_Latn and azb_Arab.
}
# Individual codes that are the same language under another name: folded into the entry NLLB uses.
SAME_LANGUAGE = {
    "fil": "tgl",  # Filipino is standardised Tagalog; NLLB has only tgl, MADLAD and CLDR only fil.
    "cmn": "zho",  # Mandarin: NLLB's zho_Hans/zho_Hant are Mandarin under the macrolanguage code.
    "ekk": "est",  # Standard Estonian: NLLB uses the macro code est.
}
# langcodes' likely script is wrong or missing for these (grc -> Cypriot; the others are written in Cyrillic).
SCRIPT_OVERRIDES = {"grc": "Grek", "xal": "Cyrl", "kjh": "Cyrl", "nog": "Cyrl"}
# CLDR names that would hide the language NLLB means (langcodes folds tgl into fil and prs into fa-AF).
NAME_OVERRIDES = {"tgl": "Tagalog", "prs": "Dari"}
# Not languages: 'zxx' is MADLAD's "no linguistic content" tag.
SKIP = {"zxx", "und", "mul", "mis"}
# Region subtags that imply a script (zh-TW means Traditional characters).
REGION_SCRIPTS = {"zho": {"TW": "Hant", "HK": "Hant", "MO": "Hant"}}


def alpha3(code: str) -> str:
    """ISO 639-3 code of a 2- or 3-letter language code (terminology form: 'de' -> 'deu')."""
    lang = pycountry.languages.get(alpha_2=code) if len(code) == 2 else pycountry.languages.get(alpha_3=code)
    return lang.alpha_3 if lang is not None else langcodes.Language.get(code).to_alpha3()


def alpha2(code3: str) -> Optional[str]:
    lang = pycountry.languages.get(alpha_3=code3)
    return getattr(lang, "alpha_2", None) if lang is not None else None


def likely_script(code: str) -> str:
    if code in SCRIPT_OVERRIDES:
        return SCRIPT_OVERRIDES[code]
    return langcodes.Language.get(code).maximize().script or "Latn"


def iso_name(code3: str) -> Optional[str]:
    """ISO 639-3 reference name; None for retired codes (ajp was merged into apc in 2023, NLLB keeps it)."""
    lang = pycountry.languages.get(alpha_3=code3)
    return lang.name if lang is not None else None


def english_name(code3: str) -> str:
    if code3 in NAME_OVERRIDES:
        return NAME_OVERRIDES[code3]
    name = langcodes.Language.get(code3).display_name()
    if name.startswith("Unknown language") or name == code3:
        name = iso_name(code3) or code3
    return name.replace(" (individual language)", "").replace(" (macrolanguage)", "")


def babel_locale(code3: str, script: str, iso1: Optional[str] = None) -> Optional[Locale]:
    """The CLDR locale babel has for a language written in ``script`` (2-letter code preferred), or None."""
    for code in filter(None, (iso1, alpha2(code3), code3)):
        for ident, needs_likely in ((f"{code}_{script}", False), (code, True)):
            try:
                loc = Locale.parse(ident)
            except (UnknownLocaleError, ValueError):
                continue
            if not needs_likely or likely_script(code) == script:
                return loc
    return None


def autonym(code3: str, script: str, name: str, iso1: Optional[str]) -> Optional[str]:
    loc = babel_locale(code3, script, iso1)
    if loc is not None and loc.get_language_name(loc):
        return loc.get_language_name(loc)
    tag = langcodes.Language.get(alpha2(code3) or code3)
    own = tag.autonym()
    # langcodes falls back to the English name (or a placeholder) when CLDR has no autonym.
    if own and own not in (name, tag.display_name()) and not own.startswith("Unknown"):
        return own
    return None


def macro_target(code3: str, present: Dict[str, str]) -> Optional[str]:
    """Individual language (ISO 639-3) a macrolanguage code stands for, when that language is registered."""
    if code3 in MACRO_OVERRIDES:
        return MACRO_OVERRIDES[code3]
    if code3 in present:
        return code3
    for indiv, macro in NORMALIZED_MACROLANGUAGES.items():
        if alpha3(macro) == code3 and alpha3(indiv) in present:
            return alpha3(indiv)
    return None


def build(fixtures: Path) -> dict:
    nllb = json.loads((fixtures / "nllb200_codes.json").read_text())["codes"]
    madlad = json.loads((fixtures / "madlad400_codes.json").read_text())["codes"]
    nllb_codes = [c["code"] for c in nllb]

    entries: Dict[str, dict] = {}  # key -> entry
    default_key: Dict[str, str] = {}  # iso639-3 -> key of its default-script entry

    def add(code3: str, script: str, source: str) -> dict:
        key = f"{code3}_{script}"
        if key not in entries:
            entries[key] = {"key": key, "iso639_3": code3, "script": script, "sources": []}
        if source not in entries[key]["sources"]:
            entries[key]["sources"].append(source)
        return entries[key]

    for c in nllb:
        add(c["iso639_3"], c["script"], "nllb")["nllb_code"] = c["code"]
    by_lang: Dict[str, List[str]] = {}
    for key, e in entries.items():
        by_lang.setdefault(e["iso639_3"], []).append(key)
    for code3, keys in by_lang.items():
        likely = f"{code3}_{likely_script(code3)}"
        default_key[code3] = likely if likely in keys else keys[0]

    macros: Dict[str, str] = {}  # any code (2/3 letters, macro or alias) -> key

    def resolve_or_add(code: str, source: str) -> Optional[dict]:
        """Registry entry for a bare language code from MADLAD/CLDR, merging macro/alias codes into NLLB's."""
        code3 = SAME_LANGUAGE.get(alpha3(code), alpha3(code))
        if code3 in SKIP:
            return None
        pyc = pycountry.languages.get(alpha_3=code3)
        if pyc is not None and getattr(pyc, "scope", "") == "M" or code3 in MACRO_OVERRIDES:
            target = macro_target(code3, default_key)
            if target is not None and target in default_key:
                macros[code] = macros[code3] = default_key[target]
                code3 = target
        if code3 in default_key:
            entry = entries[default_key[code3]]
            if source not in entry["sources"]:
                entry["sources"].append(source)
            if code != code3 and len(code) == 2 and alpha3(code) != code3:
                macros.setdefault(code, entry["key"])
            return entry
        entry = add(code3, likely_script(code3), source)
        default_key[code3] = entry["key"]
        return entry

    for c in madlad:
        entry = resolve_or_add(c["code"], "madlad")
        if entry is not None:
            entry.setdefault("madlad_code", c["code"])
            entry.setdefault("madlad_tag", c["target_tag"])

    cldr_langs = sorted({ident.split("_")[0] for ident in locale_identifiers()} - {"root"})
    for code in cldr_langs:
        resolve_or_add(code, "cldr")

    # Macrolanguages whose dominant member is registered but that no list named directly (e.g. 'lah' -> pnb).
    for indiv, macro in NORMALIZED_MACROLANGUAGES.items():
        m3 = alpha3(macro)
        if "-" in macro or m3 in default_key:
            continue
        target = macro_target(m3, default_key)
        if target in default_key:
            macros.setdefault(macro, default_key[target])
            macros.setdefault(m3, default_key[target])
    for m3, target in MACRO_OVERRIDES.items():
        if target in default_key and m3 != target:
            macros[m3] = default_key[target]
            if alpha2(m3):
                macros[alpha2(m3)] = default_key[target]

    # Deprecated and bibliographic codes (iw -> he, ger -> de, ...) that land on a registered language.
    aliases: Dict[str, str] = {}
    for old, new in LANGUAGE_REPLACEMENTS.items():
        if "-" in old or "-" in new:
            continue
        target = SAME_LANGUAGE.get(alpha3(new), alpha3(new))
        key = default_key.get(target) or macros.get(new) or macros.get(target)
        if key is not None and old not in default_key and old not in macros:
            aliases[old] = key
    for code, target in SAME_LANGUAGE.items():
        aliases[code] = default_key[target]
        if alpha2(code):
            aliases[alpha2(code)] = default_key[target]

    # The two-letter code (own, or of the macrolanguage the entry stands for) and the BCP-47 tag users type.
    short: Dict[str, str] = {}
    for code, key in sorted(macros.items()):
        if len(code) == 2:
            short.setdefault(key, code)
    # Other English names users type: ISO 639-3's and those of macro/alias codes ('Arabic' -> arb).
    other_names: Dict[str, List[str]] = {}
    for key, e in entries.items():
        other_names[key] = [iso_name(e["iso639_3"])]
    for code, key in sorted({**aliases, **macros}.items()):
        if iso_name(alpha3(code)):
            other_names[key] += [english_name(alpha3(code)), iso_name(alpha3(code))]
    languages = []
    for key in sorted(entries):
        e = entries[key]
        code3, script = e["iso639_3"], e["script"]
        iso1 = alpha2(code3) or short.get(default_key[code3])
        base = iso1 or code3
        name = english_name(code3)
        macro = MACROLANGUAGES.get(alpha2(code3) or code3)
        languages.append({
            "key": key,
            "name": name,
            "autonym": autonym(code3, script, name, iso1),
            "other_names": [n for n in dict.fromkeys(other_names[key]) if n and n != name],
            "script": script,
            "script_name": ENGLISH.scripts.get(script, script),
            "iso639_3": code3,
            "iso639_1": iso1,
            "bcp47": base if default_key[code3] == key else f"{base}-{script}",
            "macrolanguage": alpha3(macro) if macro and "-" not in macro else None,
            "nllb_code": e.get("nllb_code"),
            "madlad_tag": e.get("madlad_tag"),
            "madlad_code": e.get("madlad_code"),
            "sources": sorted(e["sources"]),
        })
    # Codes that are simply the entry's own ISO 639-1/3 code (sa -> san_Deva) are not macrolanguage choices.
    macro_names = {code: key for code, key in sorted(macros.items())
                   if code not in (entries[key]["iso639_3"], alpha2(entries[key]["iso639_3"]))}
    return {
        "format": "intern2-languages",
        "version": 1,
        "generated_by": "tools/build_languages.py",
        "inputs": {
            "nllb": "nllb200_codes.json (202 codes, fairseq/HF tokenizer order)",
            "madlad": f"madlad400_codes.json ({len(madlad)} of ~419 codes; partial)",
            "cldr": f"babel {__import__('babel').__version__} locales",
            "langcodes": langcodes.__version__ if hasattr(langcodes, "__version__") else "3.x",
            "pycountry": pycountry.__version__ if hasattr(pycountry, "__version__") else "",
        },
        "nllb_codes": nllb_codes,
        "macrolanguages": macro_names,
        "aliases": dict(sorted(aliases.items())),
        "region_scripts": REGION_SCRIPTS,
        "languages": languages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=ROOT.parent / "shared" / "fixtures" / "translation")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = build(args.fixtures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One language per line: small diffs when the data is regenerated.
    lines = ",\n".join(json.dumps(lang, ensure_ascii=False) for lang in data.pop("languages"))
    head = json.dumps(data, ensure_ascii=False, indent=1)
    args.out.write_text(head[:-2] + ',\n "languages": [\n' + lines + "\n ]\n}\n", encoding="utf-8")
    n_lang = len({lang["iso639_3"] for lang in json.loads(args.out.read_text())["languages"]})
    print(f"wrote {args.out} ({n_lang} distinct languages)")


if __name__ == "__main__":
    main()
