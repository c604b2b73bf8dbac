"""Translation task end to end, in-process: train -> model folder -> translate / eval; sampling, batching, bad input,
embedding resizing for new languages, save/load round trips."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import intern2
from intern2 import cli
from intern2.models.translator import TIED_KEYS, TranslationModel, resize_embeddings_for_languages
from intern2.tasks.translation import (MultilingualBatches, Translator, directions, load_pairs,
                                       pair_probabilities, token_batches)

pytest.importorskip("sentencepiece")
pytest.importorskip("sacrebleu")
pytest.importorskip("babel")

TINY_ARGS = ("model_args={d_model: 32, encoder_layers: 1, decoder_layers: 1, encoder_attention_heads: 2, "
             "decoder_attention_heads: 2, encoder_ffn_dim: 64, decoder_ffn_dim: 64}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny eng<->fra model trained for a few steps through `intern2 train translation`."""
    out = tmp_path_factory.mktemp("mt") / "run"
    code = cli.main(["train", "translation", "--data", "builtin:cldr", "--out", str(out), "--set", TINY_ARGS,
                     "--set", "tgt_langs=[fra_Latn]", "--set", "vocab_size=300", "--set", "max_tokens=512",
                     "--set", "max_eval_examples=16", "--set", "train.max_steps=4", "--set", "train.warmup_steps=2",
                     "--set", "train.device=cpu", "--set", "train.log_every=2"])
    assert code == 0
    return out / "model"


def test_train_writes_model_folder_and_metrics(model_dir, capsys):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "sentencepiece.bpe.model", "intern2_tokenizer.json",
            "intern2_translation.json"} <= names
    records = [json.loads(line) for line in (model_dir.parent / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert evals and {"chrf", "bleu", "copy_chrf"} <= set(evals[-1]) and evals[-1]["count"] == 16
    assert set(evals[-1]["pairs"]) == {"eng_Latn-fra_Latn", "fra_Latn-eng_Latn"}
    lrs = [r["lr"] for r in records if r["split"] == "train"]
    # inverse square root after 2 warmup steps: lr * sqrt(2 / (step + 1)) at steps 2 and 4
    assert lrs == pytest.approx([1e-3 * (2 / 3) ** 0.5, 1e-3 * (2 / 5) ** 0.5])
    # intern2.from_pretrained opens the HF-layout folder; the tokenizer fits the embedding.
    model = intern2.from_pretrained(model_dir)
    translator = Translator.from_pretrained(model_dir)
    assert isinstance(model, TranslationModel) and model.lm_head.weight is model.model.shared.weight
    assert translator.tokenizer.vocab_size == model.config.vocab_size


def test_translate_cli(model_dir, tmp_path, capsys, monkeypatch):
    assert cli.main(["translate", "--src", "en", "--tgt", "French", "--model", str(model_dir), "--beams", "2",
                     "--max-new-tokens", "5", "Monday", "Japan. France"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    source = tmp_path / "in.txt"
    source.write_text("Monday\n\nGermany\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert cli.main(["translate", "--src", "eng_Latn", "--tgt", "fra_Latn", "--model", str(model_dir),
                     "--input", str(source), "--output", str(out), "--max-new-tokens", "4", "--int8"]) == 0
    assert out.read_text(encoding="utf-8").split("\n")[1] == ""  # blank lines stay blank
    monkeypatch.setattr("sys.stdin", io.StringIO("Spain\n"))
    assert cli.main(["translate", "--src", "eng_Latn", "--tgt", "fra_Latn", "--model", str(model_dir),
                     "--beams", "1", "--max-new-tokens", "3"]) == 0
    from_cli = capsys.readouterr().out.splitlines()
    assert len(from_cli) == 1
    # The Python pipeline, called as the other families' are, gives the CLI's answer.
    from intern2.pipelines.translation import Translator
    translator = Translator.from_pretrained(model_dir)
    assert translator(["Spain"], "eng_Latn", "fra_Latn", num_beams=1, max_new_tokens=3) == from_cli


@pytest.mark.parametrize("args, message", [
    (["--src", "eng_Latn", "--tgt", "fra_Latn", "   "], "empty input"),
    (["--src", "eng_Latn", "--tgt", "frenh", "Hello"], "unknown language 'frenh'; did you mean: fra_Latn"),
    (["--src", "eng_Latn", "--tgt", "jpn_Jpan", "Hello"], "no token for it"),
    (["--src", "eng_Latn", "--tgt", "fra_Latn", "--model", "/nonexistent/model", "Hello"], "does not exist"),
])
def test_translate_bad_input(model_dir, capsys, args, message):
    if "--model" not in args:
        args = [*args, "--model", str(model_dir)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["translate", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_cli(model_dir, tmp_path, capsys):
    assert cli.main(["eval", "translation", "--checkpoint", str(model_dir), "--max-examples", "6", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 6 and 0 <= metrics["chrf"] <= 100 and metrics["copy_chrf"] > 0
    # --src-file/--ref-file, and the task found from the folder's config (model_type m2m_100).
    (tmp_path / "src.txt").write_text("Monday\nFrance\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("lundi\nFrance\n", encoding="utf-8")
    assert cli.main(["eval", "--checkpoint", str(model_dir), "--src-file", str(tmp_path / "src.txt"),
                     "--ref-file", str(tmp_path / "ref.txt"), "--src", "eng_Latn", "--tgt", "fra_Latn"]) == 0
    assert "copy-the-source chrF++" in capsys.readouterr().out
    assert cli.main(["predict", "--checkpoint", str(model_dir)]) == 2
    assert "intern2 translate" in capsys.readouterr().err
    # A FLORES-200 directory.
    for split in ("dev", "devtest"):
        (tmp_path / "flores" / split).mkdir(parents=True)
        (tmp_path / "flores" / split / f"eng_Latn.{split}").write_text("One.\nTwo.\n", encoding="utf-8")
        (tmp_path / "flores" / split / f"fra_Latn.{split}").write_text("Un.\nDeux.\n", encoding="utf-8")
    assert cli.main(["eval", "translation", "--checkpoint", str(model_dir), "--data", f"flores:{tmp_path / 'flores'}",
                     "--src", "eng_Latn", "--tgt", "fra_Latn", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 2
    with pytest.raises(SystemExit):
        cli.main(["eval", "translation", "--checkpoint", str(model_dir), "--data", f"flores:{tmp_path / 'flores'}",
                  "--src", "eng_Latn", "--tgt", "deu_Latn"])
    assert "FLORES-200 file for deu_Latn not found" in capsys.readouterr().err


def test_a_hub_repo_trains_and_evaluates(model_dir, tmp_path, monkeypatch, capsys):
    """`--set checkpoint=owner/name` fine-tunes a repo's snapshot (its tokenizer too) and `eval translation
    --checkpoint owner/name` reads the directions file in it, as for a local folder."""
    import shutil

    from conftest import hub_path
    shutil.copytree(model_dir, hub_path(tmp_path / "hub", "someone/tiny-mt"), dirs_exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cli.main(["train", "translation", "--data", "builtin:cldr", "--out", str(tmp_path / "ft"), "--set",
                     "checkpoint=someone/tiny-mt", "--set", "tgt_langs=[fra_Latn]", "--set", "max_tokens=512",
                     "--set", "max_eval_examples=4", "--set", "train.max_steps=1", "--set", "train.device=cpu"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "translation", "--checkpoint", "someone/tiny-mt", "--max-examples", "4", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["pairs"]) == {"eng_Latn-fra_Latn", "fra_Latn-eng_Latn"}


def test_pair_probabilities():
    assert pair_probabilities([900, 100], 1.0) == pytest.approx([0.9, 0.1])
    assert pair_probabilities([900, 100], 5.0) == pytest.approx([900 ** 0.2 / (900 ** 0.2 + 100 ** 0.2),
                                                                 100 ** 0.2 / (900 ** 0.2 + 100 ** 0.2)])
    assert pair_probabilities([900, 100, 0], 1e9) == pytest.approx([0.5, 0.5, 0.0])
    with pytest.raises(ValueError):
        pair_probabilities([1, 2], 0.0)


def test_token_batches_bound_and_cover():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=500).tolist() + [300]
    batches = token_batches(lengths, 256, np.random.default_rng(1))
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 256 or batch == [500]  # the 300-token one alone
    assert [500] in batches


def test_multilingual_batches_sample_pairs_by_temperature():
    big = [([0, 5, 2], [1, 5, 2])] * 900
    small = [([0, 6, 6, 2], [1, 6, 6, 2])] * 100
    data = MultilingualBatches([big, small], max_tokens=64, temperature=5.0, seed=3, epoch_size=20000)
    size = len(data)
    share = sum(len(src) == 4 for batch in data.batches for src, _ in batch) / 20000
    assert share == pytest.approx(pair_probabilities([900, 100], 5.0)[1], abs=0.02)
    first = data[0]
    data.set_epoch(1)
    assert len(data) == size and data[size - 1]  # a fixed size every epoch
    data.set_epoch(0)
    assert data[0] == first  # an epoch is a function of (seed, epoch): resume is exact


def test_directions_and_data_specs(tmp_path):
    assert directions(["en"], ["fr", "en", "de"], both=True) == [
        ("eng_Latn", "fra_Latn"), ("eng_Latn", "deu_Latn"), ("fra_Latn", "eng_Latn"), ("deu_Latn", "eng_Latn")]
    (tmp_path / "a.txt").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("un\n", encoding="utf-8")
    for spec, message in (("builtin:wiki", "expected builtin:cldr or builtin:gettext"),
                          ("web:x", "unknown translation data"),
                          (f"files:{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", "has 2 lines but .* has 1"),
                          (f"files:{tmp_path / 'a.txt'},{tmp_path / 'none.txt'}", "does not exist")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_pairs(spec, "train", [("eng_Latn", "fra_Latn")])


def test_resize_embeddings_for_new_languages():
    from intern2.text.tokenizer import NllbTokenizer
    tokenizer = NllbTokenizer.train(["bonjour le monde", "hello world", "guten tag"] * 20, 40,
                                    ["eng_Latn", "fra_Latn"], hard_vocab_limit=False)
    model = intern2.create_model("intern2_mt_tiny", vocab_size=tokenizer.vocab_size, d_model=32,
                                 encoder_attention_heads=2, decoder_attention_heads=2)
    old_rows = model.config.vocab_size
    before = model.model.shared.weight.detach().clone()
    new_ids = tokenizer.add_languages(["oci_Latn", "deu_Latn"])
    resize_embeddings_for_languages(model, new_ids[:1], init_from=tokenizer.lang_token_id("fra_Latn"))
    mean = model.model.shared.weight.detach().mean(0)
    resize_embeddings_for_languages(model, new_ids[1:])  # mean initialisation
    weight = model.model.shared.weight
    assert weight.shape[0] == model.config.vocab_size == tokenizer.vocab_size == old_rows + 2
    for name in ("model.encoder.embed_tokens", "model.decoder.embed_tokens", "lm_head"):
        assert model.get_submodule(name).weight is weight  # tying holds
    assert model.lm_head.out_features == tokenizer.vocab_size
    torch.testing.assert_close(weight[:old_rows], before)  # existing rows untouched
    torch.testing.assert_close(weight[new_ids[0]], before[tokenizer.lang_token_id("fra_Latn")])
    torch.testing.assert_close(weight[new_ids[1]], mean)
    ids = torch.tensor([tokenizer.encode("hello", "oci_Latn")])
    logits = model(ids, decoder_input_ids=torch.tensor([[2, new_ids[1]]])).logits
    assert logits.shape[-1] == tokenizer.vocab_size
    weight.sum().backward()  # one tensor, one gradient
    assert model.lm_head.weight.grad is model.model.shared.weight.grad


def test_save_pretrained_round_trip_with_tied_weights(tmp_path):
    model = intern2.create_model("intern2_mt_tiny", vocab_size=120, d_model=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2).eval()
    intern2.save_pretrained(model, tmp_path / "ours")
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert sum(k in stored for k in TIED_KEYS) == 1  # the shared embedding is written once
    loaded = intern2.from_pretrained(tmp_path / "ours")
    assert loaded.lm_head.weight is loaded.model.shared.weight
    model.save_pretrained(tmp_path / "hf")  # HF layout: model_type m2m_100
    hf = intern2.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([[5, 6, 7, 2]])
    for other in (loaded, hf):
        torch.testing.assert_close(other.eval()(ids, decoder_input_ids=ids).logits,
                                   model(ids, decoder_input_ids=ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_ranks(tmp_path, mode):
    """Translation on the shared engine under torchrun (gloo, CPU): every rank trains the same tokenizer, DDP ranks
    end with identical weights, FSDP2 (the 1.3B path) trains, evaluates and saves a loadable, still-tied model."""
    script = Path(__file__).with_name("dist_translation.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path), *(["fsdp"] if mode == "fsdp" else [])],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()
    if mode == "ddp":
        rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    model = intern2.from_pretrained(tmp_path / "model")
    assert model.lm_head.weight is model.model.shared.weight
