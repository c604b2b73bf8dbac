"""CLIP's tokenizer from its merges file: the id layout and encodings on a hand-made merges file, and, where CLIP's
real file is at hand (``INTERN2_CLIP_VOCAB`` or an installed open_clip), parity with open_clip's tokenizer."""
from __future__ import annotations

import gzip
import importlib.util
import os
import random
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

from intern2.text.bpe import CLIP_VOCAB_NAME, EOT, SOT, BPETokenizer  # noqa: E402

# A tiny merges file in CLIP's format: its odd header line, then pairs in rank order.
MERGES = ["c a", "ca t</w>", "t h", "th e</w>", "o g</w>", "d og</w>"]


def _write_merges(path: Path, lines) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(['"bpe_simple_vocab_16e6.txt#version: 0.2', *lines]) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> BPETokenizer:
    return BPETokenizer.from_clip_vocab(_write_merges(tmp_path_factory.mktemp("clip") / CLIP_VOCAB_NAME, MERGES),
                                        context_length=12)


def _ids(tokenizer: BPETokenizer, text: str):
    return [i for i in tokenizer(text)[0].tolist() if i]


def test_tiny_vocabulary_layout(tiny):
    vocab = tiny.tokenizer.get_vocab()
    # 256 byte characters ('!' first, bytes outside printable Latin-1 from U+0100), the same with '</w>',
    # one token per merge, then the two specials.
    assert tiny.vocab_size == 256 + 256 + len(MERGES) + 2 == 520
    assert vocab["!"] == 0 and vocab["a"] == ord("a") - ord("!") and vocab["\u00ff"] == 187
    assert vocab["\u0100"] == 188 and vocab["\u0120"] == 188 + 32  # byte 0, then byte 32 (space)
    assert vocab["!</w>"] == 256 and vocab["a</w>"] == 320  # 320 is "a" in CLIP's real vocabulary too
    assert [vocab[t] for t in ("ca", "cat</w>", "th", "the</w>", "og</w>", "dog</w>")] == list(range(512, 518))
    assert (vocab[SOT], vocab[EOT]) == (tiny.sot_id, tiny.eot_id) == (518, 519)


def test_tiny_encodings_by_hand(tiny):
    # the -> t h e</w> -> th e</w> -> the</w>; "'s" is split off and has no merge: "'" (6), "s</w>" (256 + 82).
    assert _ids(tiny, "The  CAT\u2019s dog!") == [518, 515, 513, 6, 338, 517, 256, 519]
    # Digits one by one; bytes of non-ASCII text: e-acute is C3 A9, the euro sign E2 82 AC (82 is remapped).
    assert _ids(tiny, "2024") == [518, 273, 271, 273, 275, 519]
    assert _ids(tiny, "\u00e9 \u20ac") == [518, 127, 358, 158, 224, 361, 519]
    assert _ids(tiny, "cat\x00dog") == _ids(tiny, "catdog")  # control characters are dropped, as ftfy does
    ids = tiny(["dog " * 20])
    assert ids.shape == (1, 12) and ids[0, -1] == 519 and (ids[0, 1:-1] == 517).all()  # truncated, end kept
    assert tiny.decode(tiny("The cat's dog!")[0].tolist()) == "the cat 's dog !"


def test_tiny_saved_and_loaded(tiny, tmp_path):
    text = ["the cat's \u00e9 dog 42", "\u03a3\u039f\u03a6\u039f\u03a3 caf\u00e9"]
    loaded = BPETokenizer.from_file(tiny.save(tmp_path))
    assert loaded.context_length == 12 and loaded(text).tolist() == tiny(text).tolist()
    # from_file takes the merges file too, at CLIP's context length unless told.
    merges = _write_merges(tmp_path / "merges.txt.gz", MERGES)
    assert BPETokenizer.from_file(merges).context_length == 77
    assert BPETokenizer.from_file(merges, 12)(text).tolist() == tiny(text).tolist()


def test_bad_merges_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=CLIP_VOCAB_NAME):
        BPETokenizer.from_clip_vocab(tmp_path / "missing.txt.gz")
    (tmp_path / "plain.txt").write_text("c a\nca t</w>\n")
    with pytest.raises(ValueError, match="#version"):
        BPETokenizer.from_clip_vocab(tmp_path / "plain.txt")
    with pytest.raises(ValueError, match="two space-separated"):
        BPETokenizer.from_clip_vocab(_write_merges(tmp_path / "bad.txt.gz", ["c a", "cat"]))
    with pytest.raises(ValueError, match="repeat"):
        BPETokenizer.from_clip_vocab(_write_merges(tmp_path / "dup.txt.gz", ["c a", "c a"]))


# ------------------------------------------------------------------------------------------- CLIP's real vocabulary
def _real_vocab() -> Path:
    path = os.environ.get("INTERN2_CLIP_VOCAB")
    if path:
        return Path(path)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"CLIP's {CLIP_VOCAB_NAME} is not at hand: set INTERN2_CLIP_VOCAB or install open_clip_torch")
    return Path(list(spec.submodule_search_locations)[0]) / CLIP_VOCAB_NAME


@pytest.fixture(scope="module")
def clip() -> BPETokenizer:
    return BPETokenizer.from_clip_vocab(_real_vocab())


def test_real_vocabulary_known_ids(clip):
    """Ids open_clip 3.3.0 gives these texts."""
    assert (clip.vocab_size, clip.sot_id, clip.eot_id) == (49408, 49406, 49407)
    assert _ids(clip, "a photo of a cat's toy") == [49406, 320, 1125, 539, 320, 2368, 568, 5988, 49407]
    assert _ids(clip, "A man is PLAYING guitar, 2 times!") == [49406, 320, 786, 533, 1629, 5084, 267, 273, 1661,
                                                                256, 49407]
    assert _ids(clip, "caf\u00e9 \U0001f600 \u5317\u4eac") == [49406, 15304, 7334, 161, 234, 245, 21078, 361, 49407]


def _parity_texts():
    texts = ["a photo of a cat's toy", "they'll've done it; we'd, I'm, you're, it's", "don't DON'T Don'T it'S",
             "Don\u2019t stop \u2014 \u201cquoted\u201d \u2018single\u2019", "  many   spaces\tand\nlines\r\n ",
             "caf\u00e9 na\u00efve Zo\u00eb \u00c5ngstr\u00f6m cafe\u0301", "12345 3.14159 1,000,000 2nd",
             "emoji \U0001f600\U0001f389\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467",
             "\u5317\u4eac\u6b22\u8fce\u4f60 \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \uc11c\uc6b8",
             "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 \u03a3\u039f\u03a6\u039f\u03a3",
             "hello!!! ??? ... --- ***", "", "   ", f"{SOT} inside {EOT} text", "x" * 300, "word " * 100,
             "\u0130stanbul stra\u00dfe", "nul\x00ctrl\x07 vt\x0bjoin tab\x1cfile", "non\u00a0breaking\u3000space",
             "https://example.com/a?b=c#f user@mail.com #tag", "snake_case camelCase", "\u00a1Hola! \u00bfQu\u00e9?"]
    rng = random.Random(0)
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " " * 10 + "\t\n",
             ".,;:!?'\"()[]{}-_/\\@#$%^*+=<>|~`", "\u00e9\u00e8\u00ea\u00e0\u00e2\u00e7\u00f1\u00c9\u00c7",
             "\u03b1\u03b2\u03b3\u03b4\u03c0\u03a9", "\u0430\u0431\u0432\u0433\u0416\u0417",
             "\u7684\u4e00\u662f\u4e0d\u4e86\u4eba", "\u3042\u3044\u3046\u30ab\u30ad",
             "\U0001f600\U0001f389\U0001f44d\U0001f525\u2728", "\u2019\u2018\u201c\u201d\u2013\u2014\u2026"]
    words = ["the", "a", "person", "dog", "is", "running", "across", "field", "video", "of", "shows", "it's",
             "isn't", "they're", "we've", "I'm", "you'll", "he'd", "Cooking", "KITCHEN"]
    for i in range(300):
        if i % 2:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 20))))
        else:
            pool = "".join(rng.sample(pools, rng.randint(1, 4)))
            texts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 60))))
    return texts


def test_real_vocabulary_matches_open_clip(clip):
    """Same ids as open_clip's SimpleTokenizer on text that ftfy leaves alone (ftfy's HTML, full-width, ligature
    and mojibake fixes are not reproduced; see BPETokenizer.from_clip_vocab)."""
    pytest.importorskip("ftfy")
    open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
    reference = open_clip_tokenizer.SimpleTokenizer(str(_real_vocab()))
    texts = _parity_texts()
    mismatches = [t for t, a, b in zip(texts, clip(texts).tolist(), reference(texts).tolist()) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts differ, e.g. {mismatches[:3]}"
