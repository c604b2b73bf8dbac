"""timm's model contract, checked the way timm's own model tests check it (written here, for InternImage's two
head layouts): pretrained cfgs in timm's registry, default_cfg / pool_size / num_features / head_hidden_size,
classifier and pooling resets, forward_intermediates / prune_intermediate_layers, features_only forms,
group_matcher, FX tracing, the TorchScript refusal, local-dir: folders."""
from __future__ import annotations

import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

import intern2  # noqa: E402
from intern2.layers import FeatureInfo  # noqa: E402

# A T-like model (conv head, stride 32) and an H-like one (clip-projector head on the fused level-2/3 map).
TINY = {"internimage_t": dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0),
        "internimage_h": dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], drop_path_rate=0.0,
                              level2_post_norm_block_ids=[1])}
SIZE = 64


@pytest.fixture(params=sorted(TINY))
def name(request):
    return request.param


def _model(name, **kwargs):
    return timm.create_model(name, **TINY[name], **kwargs).eval()


def test_pretrained_cfgs_are_in_timms_registry():
    tags = timm.list_pretrained("internimage*")
    assert set(tags) == set(intern2.weights.list_pretrained("internimage*"))
    assert timm.get_pretrained_cfg_value("internimage_t", "input_size") == (3, 224, 224)
    assert timm.get_pretrained_cfg_value("internimage_l.in22k", "num_classes") == 21841
    cfg = timm.models.get_pretrained_cfg("internimage_h.in22k_ft_in1k")
    assert (cfg.hf_hub_id, cfg.hf_hub_filename, cfg.pool_size) == ("OpenGVLab/InternImage",
                                                                   "internimage_h_22kto1k_640.pth", (40, 40))
    assert "internimage_t.in1k" in timm.list_models(pretrained=True)


def test_default_cfgs_contract(name):
    """timm's test_model_default_cfgs, on a 64-pixel input."""
    model = _model(name)
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg and model.num_classes > 0 and model.head_hidden_size > 0
    stride = SIZE // (16 if name == "internimage_h" else 32)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert features.shape[1:] == (model.num_features, stride, stride)
        assert pre_logits.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == pre_logits.shape
        model.reset_classifier(0, "")
        assert model(x).dim() == 4 and model(x).shape[-2:] == (stride, stride)
        unpooled = _model(name, num_classes=0, global_pool="")
        assert unpooled(x).dim() == 4 and unpooled(x).shape[-2:] == (stride, stride)
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in _model(name).state_dict()
    assert len(cfg["pool_size"]) == 2
    with pytest.raises(ValueError, match="global_pool='' \\(no pooling\\) needs num_classes=0"):
        _model(name, global_pool="")


def test_official_h_logits_do_not_change_with_num_features():
    """num_features now reports forward_features' 1024 channels; the head still reads the 1024-channel fused map
    and pools it into 768 features, as the official model does."""
    model = _model("internimage_h")
    assert (model.num_features, model.head_hidden_size) == (1024, 768)
    assert model.dcnv3_head_x4[0].in_channels == 128 and model.head.in_features == 768


def test_backward_reaches_every_parameter(name):
    model = _model(name, num_classes=5).train()
    model(torch.randn(2, 3, SIZE, SIZE)).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_forward_intermediates_contract(name):
    model = _model(name)
    x = torch.randn(1, 3, SIZE, SIZE)
    info = FeatureInfo(model.feature_info, range(len(model.feature_info)))
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, output_fmt="NCHW")
        assert torch.allclose(final, model.forward_features(x))
        assert [m.shape[1] for m in maps] == info.channels()
        assert [SIZE // m.shape[-1] for m in maps] == info.reduction()
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape[1] for m in last_two] == info.channels()[-2:]
        first, early = model.forward_intermediates(x, indices=[-4, 1], stop_early=True)
        assert torch.equal(early[1], maps[1]) and torch.equal(first, maps[1])
        model.set_grad_checkpointing()
        assert torch.allclose(model.forward_intermediates(x)[0], final)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
    assert model.prune_intermediate_layers(indices=(0, 1)) == [0, 1]
    with torch.no_grad():
        assert [m.shape for m in model.forward_intermediates(x, intermediates_only=True)] == [m.shape for m in maps[:2]]
        assert model(x).shape == maps[1].shape and model.num_features == info.channels()[1]


def test_features_only_forms():
    base = TINY["internimage_t"]
    x = torch.randn(1, 3, SIZE, SIZE)
    for out_indices, levels in (((1, 2, 3), [1, 2, 3]), ((-1,), [3]), (2, [2, 3])):
        model = timm.create_model("internimage_t", features_only=True, out_indices=out_indices, feature_cls="getter",
                                  **base).eval()
        with torch.no_grad():
            outputs = model(x)
        assert model.feature_info.channels() == [16 * 2 ** i for i in levels]
        assert model.feature_info.reduction() == [4 * 2 ** i for i in levels]
        assert [o.shape[1] for o in outputs] == model.feature_info.channels()
    with pytest.raises(ValueError, match="indices \\(4,\\)"):
        intern2.create_model("internimage_t", features_only=True, out_indices=(4,), **base)
    with pytest.raises(ValueError, match="feature_cls"):
        intern2.create_model("internimage_t", features_only=True, feature_cls="dict", **base)


def test_group_matcher_gives_timm_layer_decay_its_groups():
    from timm.optim import create_optimizer_v2
    model = _model("internimage_t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when layer decay would put everything in one group
        optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.9)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert len(scales) == sum(TINY["internimage_t"]["depths"]) + 2  # stem, every block, the head


def test_fx_tracing_and_feature_extraction(name):
    from torchvision.models.feature_extraction import create_feature_extractor
    model = _model(name)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))
        out = create_feature_extractor(model, {"levels.1.norm": "level1", "head": "logits"})(x)
        assert torch.equal(out["logits"], model(x)) and out["level1"].shape[-1] == 32
    traced = torch.fx.symbolic_trace(_model(name).train())
    traced(torch.randn(2, 3, SIZE, SIZE)).sum().backward()


def test_torchscript_is_refused_with_a_reason():
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script.*torch.compile"):
        torch.jit.script(_model("internimage_t"))


def test_local_dir_folders_load_through_timm(tmp_path):
    model = _model("internimage_t", num_classes=7)
    intern2.save_pretrained(model, tmp_path / "folder")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'folder'}", pretrained=True).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.num_classes == 7


def test_num_classes_zero_and_in_chans_through_timm(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERN2_HOME", str(tmp_path))
    reference = _model("internimage_t")
    torch.save({"model": reference.state_dict()}, tmp_path / "internimage_t_1k_224.pth")
    features = _model("internimage_t", pretrained=True, num_classes=0)
    grey = _model("internimage_t", pretrained=True, in_chans=1)
    x = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(features(x.repeat(1, 3, 1, 1)),
                              reference.forward_head(reference.forward_features(x.repeat(1, 3, 1, 1)), True))
        assert torch.allclose(grey(x), reference(x.repeat(1, 3, 1, 1)), atol=1e-5)


@pytest.mark.parametrize("tag,crop", [("internimage_t.in1k", {}), ("internimage_l.in22k_ft_in1k", {}),
                                      ("internimage_t.in1k", dict(crop_pct=0.95, crop_mode="squash")),
                                      ("internimage_t.in1k", dict(crop_pct=0.9, crop_mode="border")),
                                      ("internimage_t.in1k", dict(crop_pct=0.95, crop_mode="center"))])
def test_timm_transform_is_the_pipelines_preprocessing(tag, crop):
    """timm's create_transform(resolve_data_config(model)) and the image pipeline prepare an image alike, for
    each of timm's crop modes and a crop_pct whose scaled size is not whole: both resize with PIL, as the official
    evaluation does."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from intern2.pipelines.image_cls import ImageClassificationPipeline
    model = intern2.create_model(tag, **TINY["internimage_t"])
    model.pretrained_cfg.update(crop)
    for shape in ((300, 400, 3), (401, 250, 3)):
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8))
        ours = ImageClassificationPipeline(model).transform(image)
        theirs = create_transform(**resolve_data_config({}, model=model))(image)
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5


def test_pretrained_cfg_has_timms_crop_keys():
    """A model's own pretrained_cfg carries timm's crop_mode and fixed_input_size, as timm's registry does; an
    unknown crop mode is refused by name."""
    import timm
    model = intern2.create_model("internimage_t.in1k", **TINY["internimage_t"])
    registered = timm.get_pretrained_cfg("internimage_t.in1k")
    assert (model.pretrained_cfg["crop_mode"], model.pretrained_cfg["fixed_input_size"]) == \
        (registered.crop_mode, registered.fixed_input_size) == ("center", False)
    from intern2.pipelines.image_cls import ImageClassificationPipeline
    model.pretrained_cfg["crop_mode"] = "letterbox"
    with pytest.raises(ValueError, match="crop_mode: expected one of center, squash, border, got 'letterbox'"):
        ImageClassificationPipeline(model)


@pytest.mark.parametrize("name,key", [("mask_rcnn_internimage_t", "box_score_treshold"),
                                      ("cascade_mask_rcnn_internimage_l", "box_score_treshold"),
                                      ("upernet_internimage_t", "backbone.channels"),
                                      ("dino_4scale_internimage_t", "bogus"), ("videomae_vit_s", "embed_dimm")])
def test_an_unknown_config_key_is_named(name, key):
    """A misspelt key is refused by name (torchvision's Mask R-CNN would ignore it; other constructors say
    TypeError in their own words) before any weights are built."""
    with pytest.raises(ValueError, match=rf"unknown config key.*{key}") as refused:
        intern2.create_model(name, **{key: 0.9})
    assert ("mapping" in str(refused.value)) == ("." in key)
