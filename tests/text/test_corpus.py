"""Built-in CLDR corpus, optional gettext corpus, FLORES-200 reader."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("babel")

from intern2.text.corpus import (  # noqa: E402
    DEFAULT_LANGUAGES, builtin_concepts, builtin_pairs, concept_split, gettext_pairs, read_flores,
    read_flores_pair,
)


def test_pairs_are_deterministic_and_use_registry_keys():
    first = builtin_pairs("dev", ["en", "fr"], ["de", "zh"])
    assert first == builtin_pairs("dev", ["eng_Latn", "fra_Latn"], ["deu_Latn", "zho_Hans"])
    assert len(first) > 500
    assert {(s, t) for s, t, _, _ in first} == {(s, t) for s in ("eng_Latn", "fra_Latn")
                                               for t in ("deu_Latn", "zho_Hans")}
    everything = [p for split in ("train", "dev", "test") for p in builtin_pairs(split, "en", "de")]
    assert ("eng_Latn", "deu_Latn", "France", "Frankreich") in everything


def test_split_is_by_concept_and_disjoint_in_every_language():
    langs = DEFAULT_LANGUAGES[:6]
    splits = {split: builtin_concepts(langs, split) for split in ("train", "dev", "test")}
    ids = {split: set(concepts) for split, concepts in splits.items()}
    assert not ids["train"] & ids["dev"] and not ids["train"] & ids["test"] and not ids["dev"] & ids["test"]
    assert len(ids["train"]) > 4 * len(ids["test"]) > 0
    for split, concepts in splits.items():
        assert all(concept_split(concept) == split for concept in concepts)
    # The split depends on the concept only: held out for one language pair, held out for every other pair.
    held_out = set(builtin_concepts(["en", "fr"], "test"))
    assert held_out and not held_out & set(builtin_concepts(["de", "ru", "zh", "ar"], "train"))


def test_split_hash_is_pinned():
    # The split must not change between Python versions or machines (it decides what is held out).
    assert [concept_split(c) for c in ("territory:FR", "territory:AD", "month:5", "territory:BG")] == [
        "train", "dev", "test", "dev"]


def test_drop_identical_and_bad_split():
    pairs = builtin_pairs("test", "en", "nl", drop_identical=True)
    assert pairs and all(src != tgt for _, _, src, tgt in pairs)
    with pytest.raises(ValueError, match="split"):
        builtin_pairs("validation", "en", "fr")
    with pytest.raises(ValueError, match="no CLDR data for ace_Arab"):
        builtin_pairs("train", "en", "ace_Arab")


def test_gettext_pairs_when_present():
    pairs = gettext_pairs("test", "en", "fr")
    if not pairs:
        pytest.skip("no French gettext catalogs under /usr/share/locale on this machine")
    assert all(s == "eng_Latn" and t == "fra_Latn" and len(src.split()) >= 3 for s, t, src, _ in pairs)
    assert pairs == gettext_pairs("test", "en", "fr")
    assert not {p[2] for p in pairs} & {p[2] for p in gettext_pairs("train", "en", "fr")}
    assert gettext_pairs("test", "en", "fr", root="/nonexistent") == []


def _flores(root: Path) -> Path:
    for split in ("dev", "devtest"):
        (root / split).mkdir(parents=True)
        (root / split / f"eng_Latn.{split}").write_text("Hello.\nTwo lines.\n", encoding="utf-8")
        (root / split / f"fra_Latn.{split}").write_text("Bonjour.\nDeux lignes.\n", encoding="utf-8")
    (root / "dev" / "deu_Latn.dev").write_text("Hallo.\n", encoding="utf-8")
    return root


def test_read_flores(tmp_path):
    root = _flores(tmp_path / "flores200_dataset")
    assert read_flores(root, "devtest", "fra_Latn") == ["Bonjour.", "Deux lignes."]
    assert read_flores(tmp_path, "dev", "fr") == ["Bonjour.", "Deux lignes."]  # parent folder, short code
    src, tgt = read_flores_pair(root, "dev", "en", "fr")
    assert src == ["Hello.", "Two lines."] and tgt == ["Bonjour.", "Deux lignes."]
    with pytest.raises(FileNotFoundError, match=r"spa_Latn not found: expected .*devtest/spa_Latn\.devtest"):
        read_flores(root, "devtest", "es")
    with pytest.raises(ValueError, match="not aligned"):
        read_flores_pair(root, "dev", "en", "de")
    with pytest.raises(ValueError, match="'dev' or 'devtest'"):
        read_flores(root, "test", "en")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_flores(tmp_path / "nowhere", "dev", "en")
