"""Video ViT / VideoMAE: parity with the official models (fixtures), key layouts, masks, targets, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

import intern2
from intern2.checkpoint import load_checkpoint
from intern2.models.video_vit import (VideoMAEPretrain, VideoViT, hf_to_official, keep_visible, official_to_hf,
                                      pixel_targets, resize_pos_embed, running_cell_mask, tube_mask, videomae_loss)

from conftest import fixture_path, load_fixture

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4)
SMALL_PRETRAIN = dict(img_size=32, patch_size=8, encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=4,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
FINETUNE_VARIANTS = {
    "A_qkvbias_meanpool": {},
    "B_noqkvbias_firsttoken": dict(qkv_bias=False, use_mean_pooling=False),
    "C_qkvbias_meanpool_layerscale_learnpos": dict(init_values=0.1, use_learnable_pos_emb=True),
}


def _state(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _pretrain_fixture(name, all_frames):
    _, t = load_fixture(f"internvideo/{name}")
    model = VideoMAEPretrain(**SMALL_PRETRAIN, all_frames=all_frames).eval()
    model.load_state_dict(_state(t, "state_dict."))
    return model, t


# ------------------------------------------------------------------------------------------------ parity
def test_videomae_v1_pretrain_parity():
    model, t = _pretrain_fixture("videomae_pretrain_small", 16)
    video, mask = t["input.video"], t["input.bool_masked_pos"]
    torch.testing.assert_close(model.encoder.pos_embed, t["buffer.encoder_pos_embed"], rtol=0, atol=1e-7)
    torch.testing.assert_close(model.pos_embed, t["buffer.decoder_pos_embed"], rtol=0, atol=1e-7)
    with torch.no_grad():
        visible = model.encoder.forward_features(video, mask)
        pred = model(video, mask)
    torch.testing.assert_close(visible, t["output.encoder_visible"], rtol=0, atol=1e-5)
    torch.testing.assert_close(pred, t["output.decoder_pred"], rtol=0, atol=1e-5)
    for kind, normalize in (("norm", True), ("unnorm", False)):
        targets = pixel_targets(video, 8, 2, normalize=normalize)
        torch.testing.assert_close(keep_visible(targets, ~mask), t[f"output.labels_{kind}"], rtol=0, atol=1e-5)
        loss = videomae_loss(pred, targets, mask)
        torch.testing.assert_close(loss, t[f"output.loss_{kind}"][0], rtol=0, atol=1e-6)


def test_videomae_v2_dual_mask_parity():
    model, t = _pretrain_fixture("videomaev2_pretrain_dualmask_small", 8)
    video, mask, decode_mask = t["input.video"], t["input.bool_masked_pos"], t["input.decode_masked_pos"]
    with torch.no_grad():
        pred = model(video, mask, decode_mask)
    torch.testing.assert_close(pred, t["output.decoder_pred"], rtol=0, atol=1e-5)
    targets = pixel_targets(video, 8, 2)
    torch.testing.assert_close(keep_visible(targets, decode_mask), t["output.labels_norm"], rtol=0, atol=1e-5)
    torch.testing.assert_close(videomae_loss(pred, targets, mask, decode_mask), t["output.loss"][0],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", sorted(FINETUNE_VARIANTS))
def test_videomae_finetune_parity(variant):
    _, t = load_fixture("internvideo/videomae_finetune_small")
    model = VideoViT(**SMALL, all_frames=4, num_classes=5, **FINETUNE_VARIANTS[variant]).eval()
    model.load_state_dict(_state(t, f"{variant}.state_dict."))
    if f"{variant}.buffer.pos_embed" in t:
        torch.testing.assert_close(model.pos_embed, t[f"{variant}.buffer.pos_embed"], rtol=0, atol=1e-7)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(t["input.video"]), pre_logits=True)
        logits = model(t["input.video"])
    torch.testing.assert_close(features, t[f"{variant}.output.features"], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, t[f"{variant}.output.logits"], rtol=0, atol=1e-5)


_KEY_CASES = {
    "official_videomae_v1.vit_base_patch16_224.ft_k400_16f": ("videomae_vit_b", {}),
    "official_videomae_v1.vit_large_patch16_224.ft_k400_16f": ("videomae_vit_l", {}),
    "official_videomae_v1.vit_huge_patch16_224.ft_k400_16f": ("videomae_vit_h", {}),
    "official_videomae_v1.pretrain_videomae_base_patch16_224.decoder_depth4": ("videomae_pretrain_vit_b", {}),
    # The fixture keeps the modeling code's default decoder depth 4; the released L files (VideoMAE v1,
    # InternVideo) have 12 decoder blocks, the preset's.
    "official_videomae_v1.pretrain_videomae_large_patch16_224.decoder_depth4": ("videomae_pretrain_vit_l",
                                                                                dict(decoder_depth=4)),
    "official_videomaev2.vit_giant_patch14_224.ft_k710_16f": ("videomae_vit_g", dict(num_classes=710)),
    "official_videomaev2.pretrain_videomae_giant_patch14_224.decoder_depth4": ("videomae_pretrain_vit_g", {}),
}


@pytest.fixture(scope="module")
def official_keys():
    return json.loads(fixture_path("internvideo", "videomae_keys.json").read_text())


@pytest.mark.parametrize("case", sorted(_KEY_CASES))
def test_registered_sizes_match_official_key_layouts(case, official_keys):
    name, kwargs = _KEY_CASES[case]
    with torch.device("meta"):
        model = intern2.create_model(name, **kwargs)
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == official_keys[case]


def test_hf_mapping_matches_transformers_layout(official_keys):
    for case, (name, _) in _KEY_CASES.items():
        mapping = official_keys["_mapping_official_to_hf_v5"].get(
            f"{case} -> hf_transformers.VideoMAEFor"
            f"{'PreTraining.base_16f_decoder4' if 'pretrain' in case else 'VideoClassification.base_k400_16f'}")
        if mapping is None:
            continue
        with torch.device("meta"):
            state = intern2.create_model(name).state_dict()
        hf = official_to_hf(state)
        expected = {(h, tuple(s)) for _, h, s in mapping["pairs"]}
        assert {(k, tuple(v.shape)) for k, v in hf.items()} == expected


def test_hf_round_trip_and_legacy_names():
    model = VideoMAEPretrain(**SMALL_PRETRAIN, all_frames=4)
    state = model.state_dict()
    back = hf_to_official(official_to_hf(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    legacy = {k.replace("attention.attention.query.bias", "attention.attention.q_bias")
               .replace("attention.attention.value.bias", "attention.attention.v_bias"): v
              for k, v in official_to_hf(state).items()}
    back = hf_to_official(legacy)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="no HF VideoMAE counterpart"):
        official_to_hf(VideoViT(**SMALL, all_frames=4, init_values=0.1).state_dict())


# ------------------------------------------------------------------------------------------------ masks and targets
def test_tube_mask_counts_and_determinism():
    gen = torch.Generator().manual_seed(0)
    mask = tube_mask(3, (4, 14, 14), 0.9, gen)
    assert mask.shape == (3, 4 * 196) and mask.dtype == torch.bool
    per_slice = mask.view(3, 4, 196)
    assert (per_slice.sum(-1) == 176).all() and (per_slice == per_slice[:, :1]).all()
    assert not torch.equal(per_slice[0, 0], per_slice[1, 0])
    again = tube_mask(3, (4, 14, 14), 0.9, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    with pytest.raises(ValueError, match="no visible token"):
        tube_mask(1, (2, 2, 2), 1.0)


def test_running_cell_mask_reproduces_official_patterns():
    _, t = load_fixture("internvideo/videomaev2_pretrain_dualmask_small")
    patterns = running_cell_mask(64, (4, 4, 4), 0.5, torch.Generator().manual_seed(0))
    distinct = {tuple(p.tolist()) for p in patterns}
    assert len(distinct) == 4 and all((p.sum() == 32).item() for p in patterns)
    for sample in t["input.decode_masked_pos"]:
        assert tuple(sample.tolist()) in distinct


def test_pixel_targets_layout():
    video = torch.randn(1, 3, 4, 16, 16)
    targets = pixel_targets(video, 8, 2, normalize=False)
    raw = video * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1) + \
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
    # token 3 = (t=0, h=1, w=1); its first value is pixel (t=0, y=8, x=8), channel 0; channels are innermost.
    assert targets.shape == (1, 2 * 2 * 2, 2 * 8 * 8 * 3)
    torch.testing.assert_close(targets[0, 3, :3], raw[0, :, 0, 8, 8])
    torch.testing.assert_close(targets[0, 3, 3:6], raw[0, :, 0, 8, 9])
    normed = pixel_targets(video, 8, 2).view(1, 8, 128, 3)
    torch.testing.assert_close(normed.mean(2), torch.zeros(1, 8, 3), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ invariants
def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = VideoMAEPretrain(**SMALL_PRETRAIN, all_frames=4)
    video = torch.randn(2, 3, 4, 32, 32)
    mask = tube_mask(2, model.grid, 0.75)
    decode = running_cell_mask(2, model.grid, 0.5)
    loss = videomae_loss(model(video, mask, decode), pixel_targets(video, 8, 2), mask, decode)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    classifier = VideoViT(**SMALL, all_frames=4, num_classes=3, use_learnable_pos_emb=True, init_values=0.1)
    classifier(video).logsumexp(-1).sum().backward()
    assert [n for n, p in classifier.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_grad_checkpointing_and_bf16_autocast():
    torch.manual_seed(0)
    model = VideoMAEPretrain(**SMALL_PRETRAIN, all_frames=4)
    video = torch.randn(2, 3, 4, 32, 32, requires_grad=True)
    mask = tube_mask(2, model.grid, 0.75, torch.Generator().manual_seed(1))
    reference = model(video, mask)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(video, mask), reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(video, mask)
        loss = videomae_loss(pred, pixel_targets(video, 8, 2), mask)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, videomae_loss(reference, pixel_targets(video, 8, 2), mask), rtol=0.05, atol=0.05)


def test_other_frame_counts_and_sizes_resample_positions():
    model = VideoViT(**SMALL, all_frames=4, num_classes=2).eval()
    assert model(torch.randn(1, 3, 8, 48, 48)).shape == (1, 2)
    table = model.pos_embed
    assert torch.equal(resize_pos_embed(table, model.grid, model.grid), table)
    resized = resize_pos_embed(table, model.grid, (4, 4, 4))
    assert resized.shape == (1, 64, 48)
    torch.testing.assert_close(resized.view(4, 4, 4, 48)[::3], table.view(2, 4, 4, 48))


def test_bad_inputs_are_named():
    model = VideoViT(**SMALL, all_frames=4, num_classes=2)
    with pytest.raises(ValueError, match=r"expected \(B, 3, T, H, W\)"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of the tubelet"):
        model(torch.randn(1, 3, 3, 32, 32))
    with pytest.raises(ValueError, match="mask: expected a bool"):
        model.forward_features(torch.randn(1, 3, 4, 32, 32), torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="decoder_num_classes"):
        VideoMAEPretrain(**SMALL_PRETRAIN, all_frames=4, decoder_num_classes=10)
    for field, rate in (("drop_path_rate", 1.0), ("attn_drop_rate", -0.1), ("fc_drop_rate", "0.1")):
        with pytest.raises(ValueError, match=rf"{field}: expected a rate in \[0, 1\), got {rate!r}"):
            VideoViT(**SMALL, all_frames=4, **{field: rate})


# ------------------------------------------------------------------------------------------------ checkpoints
def test_pretraining_checkpoint_fine_tunes(caplog):
    """A VideoMAE pre-training file ({'model': ...}, encoder./decoder. keys) loads into a classifier: the encoder
    weights transfer, pre-training-only tensors are dropped, fc_norm and head keep their init (logged)."""
    pretrain = VideoMAEPretrain(**SMALL_PRETRAIN, all_frames=4)
    classifier = VideoViT(**SMALL, all_frames=4, num_classes=3)
    wrapped = {"model": {f"_orig_mod.{k}": v for k, v in pretrain.state_dict().items()}, "epoch": 3}
    with caplog.at_level("INFO"):
        load_checkpoint(classifier, wrapped)
    assert "keeping their initialisation" in caplog.text and "pre-training-only" in caplog.text
    for key, value in pretrain.encoder.state_dict().items():
        if key.startswith("blocks."):
            assert torch.equal(classifier.state_dict()[key], value)
    # A tagged classifier given a file without a head: its random head is not labelled with the tag's classes.
    tagged = intern2.create_model("videomae_vit_s.k400", **{**SMALL, "all_frames": 4})
    assert tagged.pretrained_cfg["label_names"]
    load_checkpoint(tagged, wrapped)
    assert "label_names" not in tagged.pretrained_cfg and "metrics" not in tagged.pretrained_cfg


def test_hf_checkpoint_and_resampled_learnable_positions():
    source = VideoViT(**SMALL, all_frames=4, num_classes=3).eval()
    target = VideoViT(**SMALL, all_frames=4, num_classes=3).eval()
    load_checkpoint(target, official_to_hf(source.state_dict()))
    video = torch.randn(1, 3, 4, 32, 32)
    torch.testing.assert_close(target(video), source(video))
    learnable = VideoViT(**SMALL, all_frames=4, num_classes=3, use_learnable_pos_emb=True)
    bigger = VideoViT(**{**SMALL, "img_size": 48}, all_frames=8, num_classes=3, use_learnable_pos_emb=True)
    load_checkpoint(bigger, {"module": learnable.state_dict()})
    torch.testing.assert_close(bigger.pos_embed, resize_pos_embed(learnable.pos_embed, (2, 4, 4), (4, 6, 6)))


def test_head_replaced_when_class_count_differs():
    source = VideoViT(**SMALL, all_frames=4, num_classes=7)
    target = VideoViT(**SMALL, all_frames=4, num_classes=3)
    load_checkpoint(target, {"module": source.state_dict()})
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_reset_classifier_initialises_the_head_as_construction():
    torch.manual_seed(0)
    built = VideoViT(**SMALL, all_frames=4, num_classes=400, init_scale=0.001)
    reset = VideoViT(**SMALL, all_frames=4, num_classes=7, init_scale=0.001)
    reset.reset_classifier(400)
    for model in (built, reset):  # trunc-normal(0.02) scaled by init_scale: near-zero initial logits
        assert model.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.1)
        assert not model.head.bias.any()


@pytest.mark.parametrize("name,kwargs", [
    ("videomae_vit_s", dict(img_size=32, depth=2, all_frames=4, num_classes=3, patch_size=8)),
    ("videomae_pretrain_vit_s", dict(img_size=32, encoder_depth=2, decoder_depth=1, all_frames=4, patch_size=8)),
])
def test_save_pretrained_round_trip(tmp_path, name, kwargs):
    model = intern2.create_model(name, **kwargs).eval()
    intern2.save_pretrained(model, tmp_path / "m")
    loaded = intern2.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is type(model)
    video = torch.randn(1, 3, 4, 32, 32)
    if isinstance(model, VideoMAEPretrain):
        mask = tube_mask(1, model.grid, 0.75, torch.Generator().manual_seed(0))
        torch.testing.assert_close(loaded(video, mask), model(video, mask))
    else:
        torch.testing.assert_close(loaded(video), model(video))
