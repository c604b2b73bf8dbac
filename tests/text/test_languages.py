"""Language registry: coverage, lookup by every code kind, error suggestions, macrolanguages, CLI."""
from __future__ import annotations

import json

import pytest

from conftest import fixture_path
from intern2 import cli
from intern2.text.languages import (
    Language, UnknownLanguageError, get_language, list_languages, macrolanguages, nllb_codes,
)


def test_at_least_400_distinct_languages():
    langs = list_languages()
    assert len({lang.iso639_3 for lang in langs}) >= 400
    assert len({lang.key for lang in langs}) == len(langs)
    for lang in langs:
        assert lang.key == f"{lang.iso639_3}_{lang.script}"
        assert get_language(lang.key) is lang
        assert get_language(lang.bcp47) is lang, "bcp47 must resolve back to its entry"


def test_every_nllb200_code_is_registered_in_tokenizer_order():
    codes = json.loads(fixture_path("translation", "nllb200_codes.json").read_text())
    expected = [c["code"] for c in codes["codes"]]
    assert nllb_codes() == expected
    for entry in codes["codes"]:
        lang = get_language(entry["code"])
        assert lang.key == lang.nllb_code == entry["code"]
        assert "nllb" in lang.sources and lang.script == entry["script"]
    # HF token ids follow from the order: 256001 + index.
    for code, token_id in codes["examples"].items():
        assert 256001 + nllb_codes().index(code) == token_id


def test_madlad_codes_resolve_to_their_tag():
    codes = json.loads(fixture_path("translation", "madlad400_codes.json").read_text())["codes"]
    for entry in codes:
        if entry["code"] == "zxx":  # "no linguistic content" is not a language
            continue
        assert get_language(entry["code"]).madlad_tag is not None
        assert get_language(entry["target_tag"]).madlad_code is not None


@pytest.mark.parametrize("query", [
    "fra_Latn", "fr", "fra", "fre", "FR", "fr-FR", "fr_CA", "<2fr>", "French", "french", "  French ",
    "français",
])
def test_lookup_by_any_code_or_name(query):
    assert get_language(query).key == "fra_Latn"


@pytest.mark.parametrize("query, key", [
    ("ar", "arb_Arab"), ("ara", "arb_Arab"), ("Arabic", "arb_Arab"),
    ("no", "nob_Latn"), ("nor", "nob_Latn"), ("nb", "nob_Latn"), ("nn", "nno_Latn"),
    ("zh", "zho_Hans"), ("cmn", "zho_Hans"), ("zh-Hant", "zho_Hant"), ("zh-TW", "zho_Hant"),
    ("zh_CN", "zho_Hans"),
    ("fa", "pes_Arab"), ("ms", "zsm_Latn"), ("sw", "swh_Latn"), ("lv", "lvs_Latn"), ("mn", "khk_Cyrl"),
    ("uz", "uzn_Latn"), ("ps", "pbt_Arab"), ("qu", "quy_Latn"), ("ku", "kmr_Latn"), ("et", "est_Latn"),
    ("ne", "npi_Deva"), ("sq", "als_Latn"), ("yi", "ydd_Hebr"), ("fil", "tgl_Latn"), ("tl", "tgl_Latn"),
    ("iw", "heb_Hebr"), ("ger", "deu_Latn"), ("yue", "yue_Hant"),
])
def test_macrolanguage_and_alias_map(query, key):
    assert get_language(query).key == key


def test_macrolanguage_map_points_at_registered_languages():
    table = macrolanguages()
    assert table["ar"] == table["ara"] == "arb_Arab"
    assert table["no"] == "nob_Latn" and table["fa"] == "pes_Arab" and table["ms"] == "zsm_Latn"
    for code, key in table.items():
        assert get_language(code).key == key
        assert get_language(key).iso639_3 != code


def test_script_variants():
    assert get_language("ace").key == "ace_Latn"  # the likely script is the default
    assert get_language("ace-Arab").key == get_language("ace_Arab").key == "ace_Arab"
    assert get_language("Acehnese (Arabic)").key == "ace_Arab"
    with pytest.raises(UnknownLanguageError, match="registered only as srp_Cyrl"):
        get_language("sr-Latn")
    with pytest.raises(UnknownLanguageError, match="registered only as srp_Cyrl"):
        get_language("sr@latin")  # glibc locale folder name
    with pytest.raises(UnknownLanguageError):
        get_language("en@quot")  # unknown subtags are an error, not silently dropped


def test_fields():
    lang = get_language("arb_Arab")
    assert isinstance(lang, Language) and str(lang) == "arb_Arab"
    assert (lang.iso639_1, lang.iso639_3, lang.bcp47, lang.macrolanguage) == ("ar", "arb", "ar", "ara")
    assert (lang.nllb_code, lang.madlad_tag, lang.autonym) == ("arb_Arab", "<2ar>", "العربية")
    assert get_language("de").autonym == "Deutsch" and get_language("de").script_name == "Latin"


def test_unknown_language_suggests_closest_matches():
    with pytest.raises(UnknownLanguageError) as exc:
        get_language("Frnch")
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, ValueError)
    assert "unknown language 'Frnch'" in str(exc.value) and "fra_Latn (French)" in str(exc.value)
    assert exc.value.suggestions[0] == "fra_Latn"
    with pytest.raises(UnknownLanguageError, match="did you mean: .*deu_Latn"):
        get_language("deu_Latnn")
    with pytest.raises(ValueError, match="non-empty"):
        get_language("")


def test_list_languages_filter_and_source():
    assert [lang.key for lang in list_languages("fra")] == ["fra_Latn"]
    assert len(list_languages(source="nllb")) == 202
    assert all("cldr" in lang.sources for lang in list_languages(source="cldr"))
    with pytest.raises(ValueError, match="source"):
        list_languages(source="wmt")


def test_cli_languages_filter(capsys):
    assert cli.main(["languages", "--filter", "fra"]) == 0
    out = capsys.readouterr().out
    assert "fra_Latn" in out and "French" in out and "<2fr>" in out
    assert cli.main(["languages", "--filter", "no-such-language"]) == 1
    assert "no registered language" in capsys.readouterr().out
    assert cli.main(["languages", "--filter", "de", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "deu_Latn" in {row["key"] for row in rows}
