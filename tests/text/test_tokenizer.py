"""NLLB-layout SentencePiece tokenizer, trained on the built-in CLDR corpus."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("babel")

from intern2.text.corpus import builtin_sentences  # noqa: E402
from intern2.text.languages import UnknownLanguageError, nllb_codes  # noqa: E402
from intern2.text.tokenizer import MissingLanguageTokenError, NllbTokenizer  # noqa: E402

LANGS = ["eng_Latn", "fra_Latn", "deu_Latn", "rus_Cyrl", "zho_Hans"]
VOCAB = 1500


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tok = NllbTokenizer.train(builtin_sentences(LANGS), VOCAB, LANGS, path=folder)
    return tok, folder


def test_token_layout(trained):
    tok, _ = trained
    n = tok.num_pieces
    assert n == VOCAB
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    # piece p -> p + 1, except spm's own <unk> (piece 0) which is fairseq's <unk> (3)
    for piece in (3, 10, n - 1):
        assert tok.convert_tokens_to_ids([tok.sp.id_to_piece(piece)]) == [piece + 1]
    assert tok.convert_tokens_to_ids(["never-a-piece-\u2603"]) == [3]
    assert [tok.lang_token_id(code) for code in LANGS] == list(range(n + 1, n + 1 + len(LANGS)))
    assert tok.mask_id == n + 1 + len(LANGS) == tok.vocab_size - 1 == len(tok) - 1
    assert tok.convert_ids_to_tokens([tok.mask_id]) == ["<mask>"]
    assert tok.lang_code(n + 1) == "eng_Latn"
    assert tok.lang_code(5) is None and tok.lang_code(tok.mask_id) is None


def test_training_is_deterministic(trained):
    tok, _ = trained
    again = NllbTokenizer.train(builtin_sentences(LANGS), VOCAB, LANGS)
    assert again.sp.serialized_model_proto() == tok.sp.serialized_model_proto()


def test_encode_decode_round_trip(trained):
    tok, _ = trained
    ids = tok.encode("Frankreich und Deutschland", "de")
    assert ids[0] == tok.lang_token_id("deu_Latn") and ids[-1] == tok.eos_id
    assert all(4 <= i <= tok.num_pieces for i in ids[1:-1])
    assert tok.decode(ids) == "Frankreich und Deutschland"
    assert tok.decode(ids, skip_special_tokens=False) == "deu_Latn Frankreich und Deutschland </s>"
    for text, lang in [("Франция", "rus_Cyrl"), ("法国", "zho_Hans"), ("lundi", "fra")]:
        assert tok.decode(tok.encode(text, lang)) == text
    assert tok.encode("", "en") == [tok.lang_token_id("en"), tok.eos_id]
    unknown = tok.encode("Paris\u2603Rome", "en")  # the snowman is not in the corpus: <unk>
    assert tok.unk_id in unknown
    assert tok.decode(unknown) == "ParisRome"
    assert tok.decode(unknown, skip_special_tokens=False) == "eng_Latn Paris <unk> Rome </s>"
    assert len(tok.encode("Frankreich und Deutschland", "de", max_length=4)) == 4


def test_batch_padding_and_mask(trained):
    tok, _ = trained
    batch = tok.encode_batch(["France", "Allemagne et Autriche"], ["en", "fr"], return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    short = len(tok.encode("France", "en"))
    assert mask[0].tolist() == [1] * short + [0] * (ids.shape[1] - short)
    assert (ids[0, short:] == tok.pad_id).all() and ids[0, short - 1] == tok.eos_id
    assert mask[1].all()
    assert tok.decode_batch(ids) == ["France", "Allemagne et Autriche"]
    with pytest.raises(ValueError, match="2 texts but 1"):
        tok.encode_batch(["a", "b"], ["en"])


def test_unknown_and_missing_languages(trained):
    tok, _ = trained
    with pytest.raises(UnknownLanguageError, match="did you mean"):
        tok.encode("x", "frx_Latn")
    with pytest.raises(MissingLanguageTokenError, match=r"add_languages\(\['hin_Deva'\]\)"):
        tok.lang_token_id("hi")


def test_add_languages_appends_after_mask_and_round_trips(trained, tmp_path):
    tok, folder = trained
    tok = NllbTokenizer.from_pretrained(folder)  # a private copy
    mask, size = tok.mask_id, tok.vocab_size
    ids = tok.add_languages(["hi", "swh_Latn"])
    assert ids == [size, size + 1] and tok.mask_id == mask and tok.vocab_size == size + 2
    assert tok.lang_token_id("hin_Deva") == size and tok.lang_code(size + 1) == "swh_Latn"
    assert tok.encode("Ufaransa", "sw")[0] == size + 1
    with pytest.raises(ValueError, match="already have tokens: hin_Deva"):
        tok.add_languages(["hin_Deva"])
    tok.save_pretrained(tmp_path)
    loaded = NllbTokenizer.from_pretrained(tmp_path)
    assert loaded.languages == tok.languages and loaded.vocab_size == tok.vocab_size
    assert loaded.encode("Ufaransa", "sw") == tok.encode("Ufaransa", "sw")


def test_save_load_round_trip(trained, tmp_path):
    tok, folder = trained
    loaded = NllbTokenizer.from_pretrained(folder)
    assert loaded.languages == LANGS and loaded.vocab_size == tok.vocab_size
    assert loaded.encode("Paris et Londres", "fr") == tok.encode("Paris et Londres", "fr")
    config = json.loads((folder / "intern2_tokenizer.json").read_text())
    config["num_pieces"] += 1
    (tmp_path / "sentencepiece.bpe.model").write_bytes((folder / "sentencepiece.bpe.model").read_bytes())
    (tmp_path / "intern2_tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pieces"):
        NllbTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="sentencepiece.bpe.model"):
        NllbTokenizer.from_pretrained(tmp_path / "missing")


def test_from_file_defaults_to_nllb200_ids(trained, tmp_path):
    """An NLLB spm file gets the NLLB-200 language ids: spm size + 1 + index, <mask> after the 202 codes."""
    _, folder = trained
    tok = NllbTokenizer.from_file(folder / "sentencepiece.bpe.model")
    assert tok.languages == nllb_codes() and len(tok.languages) == 202
    # Ids of the released NLLB-200 tokenizer (256,000 pieces), shifted to this model's piece count.
    released = {"eng_Latn": 256047, "fra_Latn": 256057, "zho_Hans": 256200, "ace_Arab": 256001}
    for code, hf_id in released.items():
        assert tok.lang_token_id(code) - (tok.num_pieces + 1) == hf_id - 256001
    assert tok.mask_id - tok.num_pieces == 256203 - 256000
    # A Hugging Face NLLB folder has the spm file but not our JSON.
    (tmp_path / "sentencepiece.bpe.model").write_bytes((folder / "sentencepiece.bpe.model").read_bytes())
    assert NllbTokenizer.from_pretrained(tmp_path).languages == nllb_codes()
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model") as error:
        NllbTokenizer.from_file(tmp_path / "bad.model")
    assert "download" not in str(error.value)  # the user's own file: only a file from the Hub gets that advice
