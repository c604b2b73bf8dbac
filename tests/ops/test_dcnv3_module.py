"""DCNv3 module: official state dicts and outputs, gradients, init, save/load, ONNX export."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import fixture_cases, load_fixture
from intern2.ops import DCNv3

MODULE_CASES = fixture_cases("internimage/dcnv3_module", "modules")
CONFIG_KEYS = ("channels", "kernel_size", "dw_kernel_size", "stride", "pad", "dilation", "group", "offset_scale",
               "center_feature_scale", "remove_center", "act_layer", "norm_layer")


def _official(case: dict, tensors: dict, impl: str) -> DCNv3:
    module = DCNv3(**{k: case[k] for k in CONFIG_KEYS}, impl=impl).eval()
    prefix = f"{case['name']}.state."
    module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return module


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: c["name"] if c else "absent")
def test_official_module_outputs(case, impl):
    _, tensors = load_fixture("internimage/dcnv3_module")
    module = _official(case, tensors, impl)
    assert sorted(module.state_dict()) == sorted(case["state_keys"])
    x = tensors[f"{case['name']}.input"]
    with torch.no_grad():
        torch.testing.assert_close(module(x.float()), tensors[f"{case['name']}.output_f32"], atol=1e-4, rtol=1e-4)
        # The official float64 run built its sampling grid in float32 (~1e-6 px off); ours is exact.
        torch.testing.assert_close(module.double()(x), tensors[f"{case['name']}.output_f64"], atol=1e-5, rtol=0)


def _randomised(module: DCNv3, seed: int = 0) -> DCNv3:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return module


@pytest.mark.parametrize("kwargs", [dict(), dict(center_feature_scale=True, dw_kernel_size=5, offset_scale=2.0),
                                    dict(kernel_size=5, pad=2, remove_center=True), dict(norm_layer="BN")])
def test_every_parameter_gets_a_gradient(kwargs):
    module = _randomised(DCNv3(16, group=4, **kwargs))
    x = torch.randn(2, 6, 5, 16, requires_grad=True)
    module(x).square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_official_initialisation():
    module = DCNv3(32, group=4, center_feature_scale=True)
    for name in ("offset", "mask"):
        layer = getattr(module, name)
        assert not layer.weight.any() and not layer.bias.any()
    bound = math.sqrt(6 / 64)  # xavier_uniform for a 32x32 Linear
    for layer in (module.input_proj, module.output_proj):
        assert layer.weight.abs().max() <= bound and layer.weight.std() > bound / 4 and not layer.bias.any()
    assert not module.center_feature_scale_proj_weight.any() and not module.center_feature_scale_proj_bias.any()
    # Zero offsets and uniform masks: the core is a 3x3 box filter of the projected input.
    x = torch.randn(1, 5, 5, 32)
    with torch.no_grad():
        v = module.input_proj(x).permute(0, 3, 1, 2)
        box = torch.nn.functional.avg_pool2d(v, 3, 1, 1, count_include_pad=True).permute(0, 2, 3, 1)
        cfs_blend = box * 0.5 + module.input_proj(x) * 0.5  # centre-feature-scale gate sigmoid(0) = 0.5
        torch.testing.assert_close(module(x), module.output_proj(cfs_blend), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    module = _randomised(DCNv3(16, group=2, center_feature_scale=True)).eval()
    save_file(module.state_dict(), tmp_path / "dcn.safetensors")
    clone = DCNv3(16, group=2, center_feature_scale=True).eval()
    clone.load_state_dict(load_file(tmp_path / "dcn.safetensors"), strict=True)
    x = torch.randn(1, 4, 4, 16)
    torch.testing.assert_close(clone(x), module(x), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(channels=30, group=4), r"channels \(30\) must be divisible by group \(4\)"),
    (dict(stride=2), "needs stride=1"),
    (dict(pad=0), "needs stride=1 and pad="),
    (dict(kernel_size=4, pad=2, dilation=1, remove_center=True), "needs stride=1 and pad="),
    (dict(norm_layer="GN"), "norm_layer: expected 'LN' or 'BN'"),
    (dict(act_layer="Tanh"), "act_layer: expected one of"),
    (dict(impl="cuda"), "impl: expected one of"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DCNv3(**{"channels": 16, **kwargs})


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"expected \(N, H, W, 16\) channels-last, got \(1, 16, 4, 4\)"):
        DCNv3(16, group=2)(torch.randn(1, 16, 4, 4))


def test_onnx_export_uses_grid_sample(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    module = _randomised(DCNv3(16, group=2, center_feature_scale=True), seed=1).eval()
    x = torch.randn(1, 7, 9, 16)
    path = tmp_path / "dcnv3.onnx"
    torch.onnx.export(module, (x,), str(path), dynamo=True, opset_version=18)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    domains = {node.domain for node in model.graph.node}
    assert "GridSample" in ops and domains <= {"", "ai.onnx"}, (ops, domains)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), module(x), atol=1e-4, rtol=1e-4)
