"""Translation model: parity with transformers' M2M100 (golden fixture), NLLB key layouts, checkpoints, decoding."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import fixture_path, load_fixture
from safetensors.torch import load_file

import intern2
from intern2.models.generation import _ScoreRules
from intern2.models.translator import (
    TIED_KEYS,
    TranslationModel,
    TranslatorConfig,
    apply_linear,
    convert_fairseq_state_dict,
)
from intern2.pipelines.translation import split_sentences, translate_in_sentences

SRC_LANG, TGT_LANG = 480, 490  # the fixture's toy "language tokens"
TINY = TranslatorConfig(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=40, dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def golden():
    """(model loaded with the fixture's HF weights, fixture tensors, fixture metadata)."""
    meta, tensors = load_fixture("translation/m2m100_tiny")
    model = TranslationModel(TranslatorConfig.from_dict(meta["config"])).eval()
    state = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    model.load_state_dict(state, strict=True)
    return model, tensors, meta


def _inputs(tensors):
    return tensors["input.input_ids"], tensors["input.attention_mask"]


def _tiny(seed: int = 0, **kwargs) -> TranslationModel:
    torch.manual_seed(seed)
    return TranslationModel(TranslatorConfig(**{**TINY.to_dict(), **kwargs}))


# ---------------------------------------------------------------------------------------------- golden parity
def test_encoder_and_teacher_forcing_match_transformers(golden):
    model, t, _ = golden
    ids, mask = _inputs(t)
    encoder = model.model.encoder
    assert torch.equal(encoder.embed_positions.weights, t["ref.encoder_embed_positions_weights"])
    with torch.no_grad():
        torch.testing.assert_close(encoder.embed(ids), t["ref.encoder_input_embeds"], rtol=0, atol=1e-6)
        out = model(ids, mask, t["input.decoder_input_ids"], labels=t["input.labels"])
    real = mask.bool()
    torch.testing.assert_close(out.encoder_last_hidden_state[real], t["ref.encoder_last_hidden_state"][real],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, t["ref.decoder_logits"], rtol=0, atol=5e-5)
    torch.testing.assert_close(out.loss, t["ref.loss"][0], rtol=0, atol=1e-5)
    # labels alone: decoder input = labels shifted right behind the start token (pads for -100)
    with torch.no_grad():
        shifted = model(ids, mask, labels=t["input.labels"])
    torch.testing.assert_close(shifted.logits[t["input.labels"] != -100], out.logits[t["input.labels"] != -100])


def test_greedy_matches_transformers_token_for_token(golden):
    model, t, meta = golden
    ids, mask = _inputs(t)
    greedy = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=16)
    assert torch.equal(greedy, t["ref.greedy_sequences"])
    fixed = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=16, min_new_tokens=16)
    assert torch.equal(fixed, t["ref.greedy_fixed16_sequences"])  # decoding past the natural end


def test_beam_search_matches_transformers(golden):
    model, t, _ = golden
    ids, mask = _inputs(t)
    out = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=16, num_beams=4,
                         early_stopping=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, t["ref.beam4_sequences"])
    torch.testing.assert_close(out.sequences_scores, t["ref.beam4_sequences_scores"], rtol=0, atol=1e-5)

    nbest = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=16, num_beams=4,
                           num_return_sequences=4, early_stopping=True, return_dict_in_generate=True)
    ref, ref_scores = t["ref.beam4_nbest4_sequences"], t["ref.beam4_nbest4_scores"]
    for row in range(2):  # the last two hypotheses of input 1 differ by ~5e-4: compare each n-best list as a set
        ours = {tuple(s.tolist()) for s in nbest.sequences[4 * row:4 * row + 4]}
        assert ours == {tuple(s.tolist()) for s in ref[4 * row:4 * row + 4]}
    torch.testing.assert_close(nbest.sequences_scores, ref_scores, rtol=0, atol=1e-3)


def test_cached_decoding_equals_full_recompute(golden):
    """Greedy with the KV cache = argmax over a full teacher-forced forward of the prefix at every step."""
    model, t, _ = golden
    ids, mask = _inputs(t)
    cached = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=12, min_new_tokens=12)
    seqs = cached[:, :2]  # start token + forced language token
    with torch.no_grad():
        for _ in range(11):
            logits = model(ids, mask, decoder_input_ids=seqs).logits[:, -1]
            logits[:, model.config.eos_token_id] = -float("inf")  # min_new_tokens
            seqs = torch.cat([seqs, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seqs)


def test_unpadded_sources_decode_without_a_mask(golden):
    """Row 0 of the fixture has no padding: alone it takes the mask-free attention path and still matches
    transformers, greedy and beam (sequence and score)."""
    model, t, _ = golden
    ids, mask = _inputs(t)
    assert mask[0].all()
    greedy = model.generate(ids[:1], forced_bos_token_id=TGT_LANG, max_new_tokens=16)
    assert torch.equal(greedy[0], t["ref.greedy_sequences"][0])
    beam = model.generate(ids[:1], forced_bos_token_id=TGT_LANG, max_new_tokens=16, num_beams=4, early_stopping=True,
                          return_dict_in_generate=True)
    ref, length = t["ref.beam4_sequences"][0], beam.sequences.shape[1]
    assert torch.equal(beam.sequences[0], ref[:length]) and (ref[length:] == model.config.pad_token_id).all()
    torch.testing.assert_close(beam.sequences_scores, t["ref.beam4_sequences_scores"][:1], rtol=0, atol=1e-5)


def test_inference_linear_matches_the_module_and_leaves_autograd_alone(golden, monkeypatch):
    """``apply_linear`` (oneDNN on CPU outside autograd) = ``nn.Linear``; with mkldnn disabled generate takes the module
    path and decodes the same tokens."""
    layer = torch.nn.Linear(16, 48)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(apply_linear(layer, x), layer(x))
    assert apply_linear(layer, x).grad_fn is not None  # training: the module's own, differentiable forward
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        apply_linear(layer, x)
    assert seen == [(3, 5, 48)]  # a hooked module runs its own forward, so its hooks fire
    plain, called = torch.nn.Linear(16, 8), []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: called.append(module) if module is plain else None)
    try:
        with torch.no_grad():
            apply_linear(plain, x)
    finally:
        handle.remove()
    assert called == [plain]  # global hooks too
    model, t, _ = golden
    ids, mask = _inputs(t)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert torch.equal(model.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=16),
                       t["ref.greedy_sequences"])


def test_decoding_stacks_self_attention_projections_only_for_plain_modules(golden):
    """A decoding step's q/k/v run as one matmul over the stacked weights: the same heads as the three projections,
    built per generate call (a weight edited between calls is seen), and not where a module is replaced or hooked."""
    model, t, _ = golden
    attn = model.model.decoder.layers[0].self_attn
    stacked = attn.stacked_projection()
    x = torch.randn(3, 1, attn.q_proj.in_features)
    assert stacked(x).shape == (3, 1, 3 * attn.q_proj.out_features)
    with torch.inference_mode():
        for ours, want in zip(attn.queries_keys_values(x, stacked), attn.queries_keys_values(x)):
            torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    ids, mask = _inputs(t)
    before = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=12, min_new_tokens=12)
    original = attn.v_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            attn.v_proj.weight.mul_(3.0)
        edited = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=12, min_new_tokens=12)
        seqs = edited[:, :2]
        with torch.no_grad():  # teacher forcing: the three projections, no stacking
            for _ in range(11):
                logits = model(ids, mask, decoder_input_ids=seqs).logits[:, -1]
                logits[:, model.config.eos_token_id] = -float("inf")  # min_new_tokens
                seqs = torch.cat([seqs, logits.argmax(-1, keepdim=True)], dim=1)
    finally:
        with torch.no_grad():
            attn.v_proj.weight.copy_(original)
    assert torch.equal(edited, seqs) and not torch.equal(edited, before)
    attn.q_proj.register_forward_hook(lambda *args: None)
    try:
        assert attn.stacked_projection() is None
    finally:
        attn.q_proj._forward_hooks.clear()


def test_int8_decoding_stacks_the_quantized_projections_exactly(golden):
    """After quantize_dynamic the three int8 q/k/v weights are stacked as they are (one scale per row): the stacked
    matmul equals the three modules bit for bit, decoding gives the unstacked model's tokens, and a hooked module
    keeps its own call."""
    model, t, _ = golden
    int8 = model.quantize_dynamic()
    attn = int8.model.decoder.layers[0].self_attn
    stacked = attn.stacked_projection()
    x = torch.randn(3, 1, model.config.d_model)
    with torch.inference_mode():
        for ours, want in zip(attn.queries_keys_values(x, stacked), attn.queries_keys_values(x)):
            assert torch.equal(ours, want)
        assert attn.stacked_projection() is stacked  # packed once, not per generate call
        w = attn.q_proj.weight()
        attn.q_proj.set_weight_bias(torch.quantize_per_tensor(w.dequantize().flip(0), w.q_scale(), 0, torch.qint8),
                                    attn.q_proj.bias())
        edited = attn.stacked_projection()
        assert edited is not stacked and torch.equal(edited(x)[..., :model.config.d_model], attn.q_proj(x))
    ids, mask = _inputs(t)
    stacked_tokens = int8.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=12, min_new_tokens=12)
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda *args: None) for layer in int8.model.decoder.layers]
    try:
        assert attn.stacked_projection() is None
        separate_tokens = int8.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=12, min_new_tokens=12)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(stacked_tokens, separate_tokens)


def test_sampling_with_top_k_1_is_greedy_and_groups_rows_per_source(golden):
    model, t, _ = golden
    ids, mask = _inputs(t)
    greedy = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=16)
    sampled = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=16, do_sample=True, top_k=1,
                             num_return_sequences=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy.repeat_interleave(3, dim=0))
    random = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=8, do_sample=True,
                            temperature=5.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert (random[:, 1] == TGT_LANG).all()


@pytest.mark.parametrize("kwargs", [dict(num_beams=3), dict(do_sample=True), dict(num_beams=2, do_sample=True),
                                    dict(repetition_penalty=3.0, no_repeat_ngram_size=1)])
def test_target_language_is_always_forced(golden, kwargs):
    model, t, _ = golden
    out = model.generate(*_inputs(t), forced_bos_token_id=7, max_new_tokens=4, **kwargs)
    assert (out[:, 0] == 2).all() and (out[:, 1] == 7).all()
    with pytest.warns(UserWarning, match="forced_bos_token_id"):
        model.generate(*_inputs(t), max_new_tokens=2)


# ---------------------------------------------------------------------------------------------- anti-repetition
def test_no_repeat_ngram_rule_bans_the_completing_token():
    scores = torch.zeros(2, 10)
    seqs = torch.tensor([[2, 5, 6, 7, 5, 6], [2, 5, 6, 7, 5, 8]])
    out = _ScoreRules(eos_token_id=2, no_repeat_ngram_size=3)(seqs, scores)
    assert torch.isinf(out[0, 7]) and torch.isinf(out).sum() == 1  # (5, 6, 7) seen: 7 may not follow (5, 6)
    seqs = torch.tensor([[2, 4, 4]])
    out = _ScoreRules(eos_token_id=2, no_repeat_ngram_size=1)(seqs, torch.zeros(1, 10))
    assert torch.isinf(out[0, [2, 4]]).all() and torch.isinf(out).sum() == 2


def test_repetition_penalty_and_min_new_tokens_rules():
    scores = torch.tensor([[1.0, -1.0, 2.0, 3.0, -3.0]])
    out = _ScoreRules(eos_token_id=2, repetition_penalty=2.0)(torch.tensor([[2, 3, 4]]), scores.clone())
    torch.testing.assert_close(out, torch.tensor([[1.0, -1.0, 1.0, 1.5, -6.0]]))
    out = _ScoreRules(eos_token_id=2, min_new_tokens=2)(torch.tensor([[2, 3]]), scores.clone())
    assert torch.isinf(out[0, 2]) and torch.isinf(out).sum() == 1
    out = _ScoreRules(eos_token_id=2, min_new_tokens=1)(torch.tensor([[2, 3]]), scores.clone())
    assert not torch.isinf(out).any()


def test_anti_repetition_options_in_generate(golden):
    model, t, _ = golden
    ids, mask = _inputs(t)
    base = dict(forced_bos_token_id=TGT_LANG, max_new_tokens=16, min_new_tokens=16)
    looping = model.generate(ids, mask, **base)
    assert len(set(looping[0, 1:].tolist())) < 16  # the fixture's fixed-length decode repeats itself
    for row in model.generate(ids, mask, no_repeat_ngram_size=2, **base).tolist():
        bigrams = list(zip(row[1:], row[2:]))
        assert len(bigrams) == len(set(bigrams))
    for row in model.generate(ids, mask, no_repeat_ngram_size=1, num_beams=2, **base).tolist():
        assert len(row[1:]) == len(set(row[1:]))
    penalised = model.generate(ids, mask, repetition_penalty=5.0, **base)
    assert sum(len(set(r[1:].tolist())) for r in penalised) > sum(len(set(r[1:].tolist())) for r in looping)


def test_default_length_follows_source_and_long_input_warns(golden):
    model, t, _ = golden
    ids, mask = _inputs(t)
    out = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, min_new_tokens=1000)  # EOS never allowed
    assert out.shape[1] == 1 + min(2 * 11 + 10, model.config.max_position_embeddings)
    long = torch.cat([torch.full((1, 1), SRC_LANG), torch.randint(4, 470, (1, 520)), torch.full((1, 1), 2)], 1)
    with pytest.warns(UserWarning, match="512"):
        model.generate(long, forced_bos_token_id=TGT_LANG, max_new_tokens=1)


def test_each_source_has_its_own_default_budget(golden):
    """The default budget of new tokens is per source row: a short sentence batched with longer ones gets what it
    gets alone, greedy and beam (before, every row got the longest row's budget, so a translation that runs on
    depended on what shared its batch, and the server's batches differed from the CLI's)."""
    model, t, _ = golden
    ids, mask = _inputs(t)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1
    pad = model.config.pad_token_id
    for kwargs in ({}, {"num_beams": 3}):
        batched = model.generate(ids, mask, forced_bos_token_id=TGT_LANG, min_new_tokens=1000, **kwargs)  # no EOS
        for row, length in enumerate(lengths.tolist()):
            budget = min(2 * length + 10, model.config.max_position_embeddings)
            alone = model.generate(ids[row:row + 1][mask[row:row + 1].bool()][None], forced_bos_token_id=TGT_LANG,
                                   min_new_tokens=1000, **kwargs)[0]
            assert len(alone) == 1 + budget
            assert torch.equal(batched[row, :len(alone)], alone) and (batched[row, len(alone):] == pad).all()


def test_generate_rejects_bad_arguments(golden):
    model, t, _ = golden
    ids, mask = _inputs(t)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(ids[0], forced_bos_token_id=TGT_LANG)
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate(ids, mask, forced_bos_token_id=10_000)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(ids, mask, forced_bos_token_id=TGT_LANG, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="greedy"):
        model.generate(ids, mask, forced_bos_token_id=TGT_LANG, num_return_sequences=2)
    vocab = model.config.vocab_size
    for kwargs, error, message in [  # each named, before any work; none an IndexError or RuntimeError inside
        (dict(input_ids=ids.tolist()), TypeError, "input_ids: expected a tensor of integer token ids, got list"),
        (dict(input_ids=ids.float()), TypeError, "got torch.float32"),
        (dict(input_ids=ids[:0]), ValueError, r"input_ids: expected \[batch, length\] token ids, got shape \(0,"),
        (dict(input_ids=ids[:, :0]), ValueError, "got shape"),
        (dict(input_ids=ids.clamp(max=0) - 1), ValueError, f"ids from -1 to -1, expected 0 to {vocab - 1}"),
        (dict(max_new_tokens=-1, num_beams=2), ValueError, "max_new_tokens: expected a non-negative integer"),
        (dict(max_new_tokens=10 ** 12), ValueError, "max_new_tokens: expected 1 to"),
        (dict(num_beams=1.5), ValueError, "num_beams: expected a non-negative integer, got 1.5"),
        (dict(no_repeat_ngram_size=-1), ValueError, "no_repeat_ngram_size"),
        (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature: expected a finite number"),
        (dict(forced_bos_token_id=1.5), ValueError, "forced_bos_token_id=1.5"),
    ]:
        call = {"input_ids": ids, "forced_bos_token_id": TGT_LANG, **kwargs}
        with pytest.raises(error, match=message):
            model.generate(**call)


# ---------------------------------------------------------------------------------------------- layouts, checkpoints
def test_presets_match_nllb_key_layout_on_meta_device():
    ref = json.loads(fixture_path("translation", "nllb_1p3b_keys.json").read_text())
    for name, hf_name in [("intern2_mt_1p3b", "nllb-200-1.3B"), ("intern2_mt_600m", "nllb-200-distilled-600M"),
                          ("intern2_mt_3p3b", "nllb-200-3.3B")]:
        with torch.device("meta"):
            model = intern2.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == ref[hf_name]["n_params_unique"], name
        assert model.model.shared.weight.numel() == ref[hf_name]["n_params_embedding"], name
        if "state_dict" in ref[hf_name]:
            ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
            assert ours == ref[hf_name]["state_dict"]
    assert model.lm_head.weight is model.model.shared.weight is model.model.decoder.embed_tokens.weight


def test_presets_and_overrides():
    assert {"intern2_mt_tiny", "intern2_mt_small", "intern2_mt_600m", "intern2_mt_1p3b",
            "intern2_mt_3p3b"} <= set(intern2.list_models("intern2_mt_*"))
    model = intern2.create_model("intern2_mt_tiny", vocab_size=300)
    assert model.config.vocab_size == 300 and model.lm_head.out_features == 300
    with torch.device("meta"):
        distilled = intern2.create_model("intern2_mt_1p3b.nllb200_distilled")
    assert distilled.pretrained_cfg["hf_hub_id"] == "facebook/nllb-200-distilled-1.3B"
    with pytest.raises(ValueError, match="intern2_mt_tiny: unknown config key 'no_such_field'"):
        intern2.create_model("intern2_mt_tiny", no_such_field=1)
    with pytest.raises(ValueError, match="divisible"):
        TranslatorConfig(d_model=30, encoder_attention_heads=4)


def test_save_pretrained_round_trip_in_hf_layout(golden, tmp_path):
    model, t, _ = golden
    ids, mask = _inputs(t)
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "m2m_100" and config["architectures"] == ["M2M100ForConditionalGeneration"]
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "model.shared.weight" in stored and not set(TIED_KEYS[1:]) & set(stored)  # embedding stored once
    loaded = TranslationModel.from_pretrained(tmp_path / "hf")
    assert not loaded.training and loaded.lm_head.weight is loaded.model.shared.weight
    assert loaded.model.decoder.embed_positions.weights.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, t["input.decoder_input_ids"]).logits, t["ref.decoder_logits"],
                                   rtol=0, atol=5e-5)
    # the same folder through intern2's generic checkpoint loader (and a pickled .bin with all four tied names)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    generic = TranslationModel(model.config)
    intern2.load_checkpoint(generic, tmp_path / "pytorch_model.bin")
    assert torch.equal(generic.lm_head.weight, model.lm_head.weight)


def test_from_pretrained_reads_sharded_folders_and_rejects_other_models(tmp_path):
    model = _tiny()
    state = {k: v for k, v in model.state_dict().items() if k not in TIED_KEYS[1:]}
    first = {k: v for i, (k, v) in enumerate(state.items()) if i % 2 == 0}
    second = {k: v for k, v in state.items() if k not in first}
    torch.save(first, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(second, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {**{k: "pytorch_model-00001-of-00002.bin" for k in first},
                  **{k: "pytorch_model-00002-of-00002.bin" for k in second}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    loaded = TranslationModel.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.model.shared.weight.dtype == torch.float64
    assert torch.equal(loaded.model.encoder.layers[1].fc2.weight, model.model.encoder.layers[1].fc2.weight.double())
    (tmp_path / "config.json").write_text(json.dumps({**model.config.to_hf_dict(), "model_type": "nllb-moe"}))
    with pytest.raises(ValueError, match="nllb-moe"):
        TranslationModel.from_pretrained(tmp_path)


def test_vocabulary_mismatch_is_a_clear_error():
    model = _tiny()
    state = {k: v for k, v in _tiny(vocab_size=101).state_dict().items()}
    with pytest.raises(ValueError, match="vocab_size=101"):
        intern2.load_checkpoint(model, state)
    untied = dict(model.state_dict(), **{"lm_head.weight": torch.zeros(97, 32)})
    with pytest.raises(ValueError, match="differs"):
        model.checkpoint_filter(untied)


def _fairseq_layout(model: TranslationModel) -> dict:
    """A synthetic fairseq NLLB checkpoint: no 'model.' prefix, three embedding names, bookkeeping keys."""
    state = {k[len("model."):]: v.clone() for k, v in model.state_dict().items()
             if k.startswith("model.") and k != "model.shared.weight"}
    state["decoder.output_projection.weight"] = state["decoder.embed_tokens.weight"]
    state.update({"encoder.version": torch.tensor([3.0]), "decoder.version": torch.tensor([3.0]),
                  "encoder.embed_positions._float_tensor": torch.zeros(1),
                  "decoder.embed_positions._float_tensor": torch.zeros(1)})
    return state


def test_fairseq_conversion_round_trip():
    model = _tiny().eval()
    fairseq = _fairseq_layout(model)
    converted = convert_fairseq_state_dict(fairseq, vocab_size=97)
    assert set(converted) == set(model.state_dict())
    loaded = TranslationModel(model.config).eval()
    loaded.load_state_dict(converted, strict=True)
    intern2.load_checkpoint(fresh := TranslationModel(model.config).eval(), fairseq)  # detected by the filter
    ids = torch.tensor([[5, 20, 30, 2]])
    dec = torch.tensor([[2, 6, 21]])
    with torch.no_grad():
        ref = model(ids, decoder_input_ids=dec).logits
        torch.testing.assert_close(loaded(ids, decoder_input_ids=dec).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(fresh(ids, decoder_input_ids=dec).logits, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="256206"):
        convert_fairseq_state_dict(fairseq, vocab_size=256206)
    with pytest.raises(ValueError, match="shape"):
        convert_fairseq_state_dict({**fairseq, "encoder.embed_tokens.weight": torch.zeros(90, 32)})
    with pytest.raises(ValueError, match="outside encoder"):
        convert_fairseq_state_dict({**fairseq, "optimizer_history": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------- training, int8
def test_gradients_reach_every_parameter_and_checkpointing_matches():
    model = _tiny().train()
    ids = torch.tensor([[5, 20, 30, 2, 1], [5, 40, 41, 42, 2]])
    mask = ids.ne(1).long()
    labels = torch.tensor([[6, 25, 35, 2, -100], [6, 45, 46, 47, 2]])
    out = model(ids, mask, labels=labels, label_smoothing=0.1)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(ids, mask, labels=labels, label_smoothing=0.1).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_int8_dynamic_quantisation_runs_and_stays_close(golden):
    model, t, _ = golden
    ids, mask = _inputs(t)
    quantized = model.quantize_dynamic()
    assert quantized is not model and isinstance(model.lm_head, torch.nn.Linear)  # original untouched
    assert isinstance(quantized.model.encoder.layers[0].fc1, torch.ao.nn.quantized.dynamic.Linear)
    with torch.no_grad():
        logits = quantized(ids, mask, t["input.decoder_input_ids"]).logits
    real = t["input.labels"] != -100
    agree = (logits.argmax(-1) == t["ref.decoder_logits"].argmax(-1))[real].float().mean()
    assert agree > 0.9
    assert (logits - t["ref.decoder_logits"]).abs().max() < 0.1 * t["ref.decoder_logits"].abs().max()
    out = quantized.generate(ids, mask, forced_bos_token_id=TGT_LANG, max_new_tokens=16, num_beams=2)
    assert (out[:, 1] == TGT_LANG).all()


# ---------------------------------------------------------------------------------------------- long text
def test_sentence_splitting_round_trips_and_rejoins():
    text = "  Hello world. How are you?\n\nFine!  你好。世界。 Pi is 3.14 today…"
    pairs = split_sentences(text)
    assert "".join(s + sep for s, sep in pairs) == text
    calls = []

    def translate(batch):
        calls.append(batch)
        return [s.upper() for s in batch]

    out = translate_in_sentences(text, translate)
    assert calls == [["Hello world.", "How are you?", "Fine!", "你好。", "世界。", "Pi is 3.14 today…"]]
    assert out == text.upper()
    assert translate_in_sentences(" \n ", translate) == " \n " and len(calls) == 1
    with pytest.raises(ValueError, match="translations"):
        translate_in_sentences("One. Two.", lambda batch: batch[:1])
