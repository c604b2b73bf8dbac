"""InternImage: golden parity with the official model, official key layouts, the timm-style surface."""
from __future__ import annotations

import json

import pytest
import torch

import intern2
import intern2.ops.dcnv3_module as dcnv3_module
from conftest import fixture_path, load_fixture
from intern2.models.internimage import InternImage, InternImageConfig
from official_dcnv3 import official_grid_core

VARIANTS = ("tiny_t_style", "tiny_ls_postnorm", "tiny_h_style", "tiny_g_style")
TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), num_classes=10, drop_path_rate=0.0)


def _fixture(variant: str):
    meta = json.loads(fixture_path("internimage", "internimage_small_random.json").read_text())[variant]
    _, tensors = load_fixture(f"internimage/{meta['file'].removesuffix('.safetensors')}")
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    for key, shape in meta.get("lowrank_keys", {}).items():  # large clip-head weights are stored factorised
        state[key] = (tensors[f"lowrank.{key}.A"].double() @ tensors[f"lowrank.{key}.B"].double()).reshape(shape)
    return meta, tensors, state


def _model(meta: dict, state: dict, dtype: torch.dtype, **kwargs) -> InternImage:
    model = InternImage(**meta["config"], **kwargs).eval().to(dtype)  # cast first: float64 weights stay exact
    if kwargs.get("features_only"):
        state = {k: v for k, v in state.items() if not k.startswith(InternImage.HEAD_PREFIXES)}
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_architecture_matches_official_float64(variant, monkeypatch):
    """With the official core's float32-grid arithmetic swapped in, everything else is exact."""
    meta, tensors, state = _fixture(variant)
    monkeypatch.setattr(dcnv3_module, "dcnv3", official_grid_core)
    x = tensors["input"].double()
    with torch.no_grad():
        torch.testing.assert_close(_model(meta, state, torch.float64)(x), tensors["logits_f64"], atol=1e-8, rtol=0)
        features = _model(meta, state, torch.float64, features_only=True)(x)
    for i, feature in enumerate(features):
        torch.testing.assert_close(feature, tensors[f"features.{i}"], atol=1e-8, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_features_with_intern2_cores(variant):
    meta, tensors, state = _fixture(variant)
    x = tensors["input"]
    with torch.no_grad():
        # Exact core vs the official float32 grid: ~1e-6 apart by construction.
        torch.testing.assert_close(_model(meta, state, torch.float64)(x.double()), tensors["logits_f64"],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(_model(meta, state, torch.float32)(x), tensors["logits_f32"], atol=1e-4, rtol=0)
        features = _model(meta, state, torch.float32, features_only=True)(x)
    for i, feature in enumerate(features):
        torch.testing.assert_close(feature.double(), tensors[f"features.{i}"], atol=1e-4, rtol=0)


def _official_keys():
    return json.loads(fixture_path("internimage", "internimage_keys.json").read_text())


@pytest.mark.parametrize("name", ["t", "s", "b", "l", "xl", "h", "g"])
def test_official_keys_shapes_and_parameter_counts(name):
    entry = next(v for k, v in _official_keys()["models"].items() if k.startswith(f"internimage_{name}_"))
    with torch.device("meta"):
        model = intern2.create_model(f"internimage_{name}", num_classes=entry["config"]["num_classes"])
    state = model.state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == [(k, shape) for k, shape, _ in entry["keys"]]
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    backbone = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("patch_embed.", "levels.")))
    assert backbone == entry["num_params_backbone_only"]
    # The official config dict builds the same model.
    with torch.device("meta"):
        rebuilt = InternImage(**entry["config"])
    assert list(rebuilt.state_dict()) == list(state)


@pytest.mark.parametrize("name", ["mask_rcnn_internimage_t_fpn_1x_coco", "cascade_internimage_l_fpn_3x_coco",
                                  "upernet_internimage_h_896_160k_ade20k"])
def test_det_seg_backbone_keys(name):
    entry = _official_keys()["det_seg_backbones"][f"{name}.backbone"]
    config = {k: v for k, v in entry["config"].items() if k != "out_indices"}
    with torch.device("meta"):
        model = InternImage(**config, features_only=True, out_indices=entry["config"]["out_indices"])
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(k, s) for k, s, _ in entry["keys"]]
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]


def test_det_backbone_loads_imagenet_t_without_gammas():
    """The det/seg T config adds layer-scale gammas the ImageNet T checkpoint lacks: they become 1.0."""
    classifier = intern2.create_model("internimage_t", **TINY)
    backbone = intern2.create_model("internimage_t", **TINY, layer_scale=1.0, features_only=True)
    with torch.no_grad():
        for p in backbone.parameters():
            p.fill_(0.5)
    intern2.load_checkpoint(backbone, classifier.state_dict())
    gammas = [v for k, v in backbone.state_dict().items() if k.endswith(("gamma1", "gamma2"))]
    assert gammas and all(bool((g == 1).all()) for g in gammas)
    torch.testing.assert_close(backbone.state_dict()["patch_embed.conv1.weight"],
                               classifier.state_dict()["patch_embed.conv1.weight"])


def test_shapes_surface_and_errors():
    model = intern2.create_model("internimage_t", **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 10)
    assert model.forward_features(x).shape == (2, 128, 2, 2)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 192)
    assert [f.shape for f in model.forward_intermediates(x, intermediates_only=True)] == [
        (2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    backbone = intern2.create_model("internimage_t", **TINY, features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in backbone(x)] == [32, 128]
    assert not any(k.startswith(InternImage.HEAD_PREFIXES) for k in backbone.state_dict())
    with pytest.raises(ValueError, match=r"expected \(N, 3, H, W\)"):
        model(torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match="unknown config keys \\['chanels'\\]"):
        InternImage(chanels=16)
    with pytest.raises(ValueError, match="groups\\[0\\]=3 must divide"):
        InternImageConfig(channels=16, groups=(3, 2, 4, 8))
    with pytest.raises(ValueError, match=r"drop_path_rate: expected a rate in \[0, 1\), got 2.0"):
        intern2.create_model("internimage_t", **{**TINY, "drop_path_rate": 2.0})  # torch: only in training
    with pytest.raises(KeyError, match="unknown model 'internimage_q'"):
        intern2.create_model("internimage_q")


@pytest.mark.parametrize("config", [dict(), dict(layer_scale=1e-5, post_norm=True), dict(post_norm=True),
                                    dict(res_post_norm=True, dw_kernel_size=5, center_feature_scale=True,
                                         level2_post_norm=True, level2_post_norm_block_ids=(1,),
                                         use_clip_projector=True)])
def test_every_parameter_gets_a_gradient(config):
    model = intern2.create_model("internimage_t", **{**TINY, **config}).train()
    with torch.no_grad():  # off the official zero init (zero offset/mask weights block the dw-conv gradient)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("config", [dict(), dict(post_norm=True), dict(res_post_norm=True)])
def test_hooks_see_the_official_branches_at_inference(config):
    """At inference a block fuses its residual sums into its last linears or writes them over the branch outputs;
    a forward hook on a branch's module (block-level or global) must still see the branch itself, as in the
    official code, and the logits stay the same."""
    torch.manual_seed(0)
    model = intern2.create_model("internimage_t", **{**TINY, **config}).eval()
    with torch.no_grad():  # off the official zero init, so the branches are not trivial
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    x = torch.randn(2, 3, 64, 64)
    block = model.levels[0].blocks[0]
    inputs, outputs = {}, {}
    with torch.inference_mode():
        want = model(x)
        names = (["dcn", "mlp"] + (["norm1", "norm2"] if config.get("post_norm") else [])
                 + (["res_post_norm1", "res_post_norm2"] if config.get("res_post_norm") else []))

        def keep(name):
            def hook(module, args, out):
                inputs[name], outputs[name] = args[0].clone(), out
            return hook
        handles = [getattr(block, name).register_forward_hook(keep(name)) for name in names]
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        for name in names:  # what the hook kept is the module's own output, not a sum written over it
            torch.testing.assert_close(outputs[name], getattr(block, name)(inputs[name]), atol=1e-6, rtol=1e-6)
        for handle in handles:
            handle.remove()
        seen = []

        def keep_dcn(module, args, out):
            if module is block.dcn:
                seen.append((args[0].clone(), out))
        handle = torch.nn.modules.module.register_module_forward_hook(keep_dcn)
        try:
            torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        finally:
            handle.remove()
        (dcn_in, dcn_out), = seen
        torch.testing.assert_close(dcn_out, block.dcn(dcn_in), atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = intern2.create_model("internimage_t", **TINY).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        model(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_drop_path_schedule_is_linear():
    model = intern2.create_model("internimage_t", **{**TINY, "drop_path_rate": 0.3})
    rates = [getattr(block.drop_path, "p", 0.0) for level in model.levels for block in level.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 5))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_whole_model_compiles_as_one_graph(training):
    """torch.compile sees InternImage as one graph: a graph break (the CPU-capability query of the oneDNN linear
    path) made dynamo recompile its frames with dynamic shapes, and inductor then failed on the backward."""
    model = intern2.create_model("internimage_t", num_classes=3, channels=16, depths=[1, 1, 1, 1],
                                 groups=[1, 2, 4, 8]).train(training)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(torch.randn(2, 3, 64, 64))
    if training:
        out.sum().backward()
        assert model.head.weight.grad is not None
    assert out.shape == (2, 3)
