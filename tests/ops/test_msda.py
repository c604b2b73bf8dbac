"""MSDA core and module: golden parity with mmcv, gradients, paths against each other, errors, tracing, export."""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import fixture_cases, load_fixture, requires_cuda
from intern2.ops import MultiScaleDeformableAttention, ms_deform_attn

FIXTURE = "dense-heads/msda"
CORE_CASES = fixture_cases(FIXTURE, "core_cases")
MODULE = "msda_e32_h4_l3_p2_bfFalse"
MODULE_CALLS = ("out_selfattn_ref2", "out_cross_ref2_mask", "out_cross_ref4_mask", "out_cross_ref4_nopos")
GRADS = ("out", "grad_value", "grad_sampling_locations", "grad_attention_weights")


def _run(case: dict, tensors: dict, impl: str, dtype: torch.dtype):
    """Output and (value, locations, weights) gradients of sum(out * cotangent) for one fixture case."""
    name = case["name"]
    leaves = [tensors[f"{name}.{k}"].to(dtype).requires_grad_()
              for k in ("value", "sampling_locations", "attention_weights")]
    out = ms_deform_attn(leaves[0], tensors[f"{name}.spatial_shapes"], *leaves[1:], impl=impl)
    return [out, *torch.autograd.grad(out, leaves, tensors[f"{name}.cotangent"].to(dtype))]


def _assert_matches(case: dict, tensors: dict, results, atol: float, rtol: float = 0.0):
    for got, what in zip(results, GRADS):
        torch.testing.assert_close(got.double(), tensors[f"{case['name']}.{what}"], atol=atol, rtol=rtol,
                                   msg=lambda m: f"{case['name']} {what}: {m}")


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", CORE_CASES, ids=lambda c: c["name"] if c else "absent")
def test_core_matches_mmcv_float64(case, impl):
    _, tensors = load_fixture(FIXTURE)
    results = _run(case, tensors, impl, torch.float64)
    assert all(r.dtype == torch.float64 for r in results)
    _assert_matches(case, tensors, results, atol=1e-9)


@pytest.mark.parametrize("case", CORE_CASES, ids=lambda c: c["name"] if c else "absent")
def test_fast_float32_matches_mmcv(case):
    _, tensors = load_fixture(FIXTURE)
    _assert_matches(case, tensors, _run(case, tensors, "fast", torch.float32), atol=1e-5, rtol=1e-5)


# The Triton interpreter executes every program in Python: two small cases, one dtype each.
TRITON_DTYPES = {"l2_h2_p1_d16": torch.float32, "l4_h8_p4_d4_outside": torch.float64}


@pytest.mark.parametrize("case", fixture_cases(FIXTURE, "core_cases", only=TRITON_DTYPES),
                         ids=lambda c: c["name"] if c else "absent")
def test_triton_interpreter_matches_mmcv(case):
    dtype = TRITON_DTYPES[case["name"]]
    _, tensors = load_fixture(FIXTURE)
    atol, rtol = (1e-9, 0.0) if dtype == torch.float64 else (1e-5, 1e-5)
    _assert_matches(case, tensors, _run(case, tensors, "triton", dtype), atol=atol, rtol=rtol)


def _module_call(tensors: dict, call: str) -> dict:
    """The keyword arguments of one fixture call, parsed from its recorded description."""
    prefix = f"{MODULE}."
    kwargs = {}
    for item in call.split(", "):
        key, name = item.split("=")
        kwargs[key] = None if name == "None" else tensors[prefix + name]
    kwargs.pop("key")
    return dict(kwargs, spatial_shapes=tensors[prefix + "spatial_shapes"],
                level_start_index=tensors[prefix + "level_start_index"])


def _official_module(meta: dict, tensors: dict, impl: str) -> MultiScaleDeformableAttention:
    cfg = meta["module_configs"][0]
    module = MultiScaleDeformableAttention(cfg["embed_dims"], cfg["num_heads"], cfg["num_levels"], cfg["num_points"],
                                           cfg["dropout"], cfg["batch_first"], impl=impl)
    prefix = f"{MODULE}.state."
    module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    assert sorted(module.state_dict()) == sorted(key for key, _, _ in cfg["state_keys"])
    return module.double().eval()


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("output", MODULE_CALLS)
def test_module_matches_mmcv(output, impl):
    meta, tensors = load_fixture(FIXTURE)
    module = _official_module(meta, tensors, impl)
    kwargs = _module_call(tensors, meta["module_configs"][0]["calls"][output])
    with torch.no_grad():
        torch.testing.assert_close(module(**kwargs), tensors[f"{MODULE}.{output}"], atol=1e-9, rtol=0)
        if impl == "fast":
            as_float = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                        for k, v in kwargs.items()}
            torch.testing.assert_close(module.float()(**as_float).double(), tensors[f"{MODULE}.{output}"],
                                       atol=1e-4, rtol=1e-4)


def test_module_initialisation_is_mmcvs():
    _, tensors = load_fixture(FIXTURE)
    module = MultiScaleDeformableAttention(32, 4, 3, 2)
    for name in ("sampling_offsets.weight", "sampling_offsets.bias", "attention_weights.weight",
                 "attention_weights.bias"):  # the deterministic part of the official init, bit for bit
        torch.testing.assert_close(module.state_dict()[name], tensors[f"{MODULE}.init_state.{name}"], atol=0, rtol=0)
    bound = math.sqrt(6 / 64)  # xavier_uniform for a 32x32 Linear
    for layer in (module.value_proj, module.output_proj):
        assert layer.weight.abs().max() <= bound and layer.weight.std() > bound / 4 and not layer.bias.any()


def test_module_dropout_then_identity():
    """Dropout hits the attention output only: at p=1 in training, the result is the identity."""
    module = MultiScaleDeformableAttention(8, 2, 1, 2, dropout=1.0, batch_first=True).train()
    query = torch.randn(2, 5, 8)
    identity = torch.randn(2, 5, 8)
    out = module(query, identity=identity, value=torch.randn(2, 12, 8), reference_points=torch.rand(2, 5, 1, 2),
                 spatial_shapes=[(3, 4)])
    torch.testing.assert_close(out, identity, atol=0, rtol=0)


def _random_inputs(n, shapes, heads, dim, queries, points, dtype=torch.float64, low=-0.2, high=1.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    value = torch.randn(n, sum(h * w for h, w in shapes), heads, dim, generator=gen, dtype=dtype)
    locations = low + (high - low) * torch.rand(n, queries, heads, levels, points, 2, generator=gen, dtype=dtype)
    weights = torch.randn(n, queries, heads, levels * points, generator=gen, dtype=dtype).softmax(-1)
    return value, locations, weights.view(n, queries, heads, levels, points)


def _with_grads(impl, shapes, inputs, cotangent):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = ms_deform_attn(leaves[0], shapes, *leaves[1:], impl=impl)
    return [out, *torch.autograd.grad(out, leaves, cotangent)]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 2), shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3),
    heads=st.integers(1, 3), dim=st.sampled_from([1, 3, 16, 17, 32, 40]), queries=st.integers(1, 5),
    points=st.integers(1, 3), spread=st.sampled_from([(0.0, 1.0), (-0.5, 1.5), (-3.0, 4.0)]),
    seed=st.integers(0, 2**16),
)
def test_fast_matches_reference(n, shapes, heads, dim, queries, points, spread, seed):
    inputs = _random_inputs(n, shapes, heads, dim, queries, points, low=spread[0], high=spread[1], seed=seed)
    cotangent = torch.randn(n, queries, heads * dim, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64)
    fast = _with_grads("fast", shapes, inputs, cotangent)
    reference = _with_grads("reference", shapes, inputs, cotangent)
    for what, got, want in zip(GRADS, fast, reference):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9, msg=what)


def test_gradcheck_fast_float64():
    inputs = [t.requires_grad_() for t in _random_inputs(1, [(3, 4), (2, 2)], 2, 3, 3, 2, seed=1)]
    assert torch.autograd.gradcheck(lambda *t: ms_deform_attn(t[0], [(3, 4), (2, 2)], *t[1:], impl="fast"), inputs,
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "fast", "triton"])
def test_locations_outside_contribute_zeros(impl):
    value, locations, weights = _random_inputs(1, [(3, 4), (2, 2)], 2, 4, 6, 2, seed=2)
    # More than a pixel beyond an edge on every level (no corner inside), on either side.
    far = torch.tensor([-2.0, -0.6, 1.6, 7.0], dtype=torch.float64)
    locations = far[torch.randint(0, 4, locations.shape, generator=torch.Generator().manual_seed(0))]
    out, grad_value, grad_locations, grad_weights = _with_grads(impl, [(3, 4), (2, 2)], (value, locations, weights),
                                                                torch.ones(1, 6, 8, dtype=torch.float64))
    for t in (out, grad_value, grad_locations, grad_weights):
        assert not t.any()


@pytest.mark.parametrize("impl", ["fast", "triton"])
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_half_precision_within_tolerance(impl, dtype, atol):
    """Half inputs are computed with float32 accumulation: error ~ the output's own rounding (stated atol)."""
    shapes = [(4, 5), (2, 3)]
    inputs = _random_inputs(1, shapes, 2, 16, 4, 2, dtype=torch.float32, low=0.0, high=1.0, seed=3)
    want = ms_deform_attn(inputs[0], shapes, *[t.to(dtype).float() for t in inputs[1:]], impl="reference")
    half = [t.to(dtype).requires_grad_() for t in inputs]
    out = ms_deform_attn(half[0], shapes, *half[1:], impl=impl)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=atol)
    grads = torch.autograd.grad(out.float().sum(), half)
    assert [g.dtype for g in grads] == [dtype] * 3 and all(torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("n,queries", [(0, 3), (2, 0), (3, 2)])
def test_any_batch_and_query_count(n, queries):
    shapes = [(2, 3), (1, 2)]
    inputs = _random_inputs(n, shapes, 2, 4, queries, 2, dtype=torch.float32)
    cotangent = torch.ones(n, queries, 8)
    for got, want in zip(_with_grads("fast", shapes, inputs, cotangent),
                         _with_grads("reference", shapes, inputs, cotangent)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fast_saves_only_inputs_for_backward():
    leaves = [t.requires_grad_() for t in _random_inputs(1, [(3, 4)], 2, 8, 5, 2, dtype=torch.float32)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        ms_deform_attn(leaves[0], [(3, 4)], *leaves[1:], impl="fast")
    assert saved == [tuple(leaves[0].shape), (1, 2), *(tuple(t.shape) for t in leaves[1:])]


def test_default_impl_on_cpu_is_fast(monkeypatch):
    module = importlib.import_module("intern2.ops.msda")
    calls = []
    real = module._kernels
    monkeypatch.setattr(module, "_kernels", lambda backend: calls.append(backend) or real(backend))
    value, locations, weights = _random_inputs(1, [(2, 2)], 1, 4, 3, 1, dtype=torch.float32)
    ms_deform_attn(value, [(2, 2)], locations, weights)
    assert calls == ["fast"]


def test_first_call_keeps_torch_thread_count():
    """numba's OpenMP pool, launched by the first kernel call of a process, resets OpenMP's thread count (torch's):
    the kernels' wrapper restores it, so torch.set_num_threads(1) before that call still holds after it."""
    code = ("import torch; from intern2.ops import ms_deform_attn; torch.set_num_threads(1); "
            "ms_deform_attn(torch.randn(1, 4, 1, 2), [(2, 2)], torch.rand(1, 3, 1, 1, 1, 2), "
            "torch.rand(1, 3, 1, 1, 1)); print(torch.get_num_threads())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "NUMBA_NUM_THREADS": "2"})
    assert result.stdout.split()[-1] == "1", result.stderr


def _good_arguments() -> dict:
    value, locations, weights = _random_inputs(1, [(3, 4), (2, 2)], 2, 4, 5, 2, dtype=torch.float32)
    return dict(value=value, spatial_shapes=torch.tensor([[3, 4], [2, 2]]), sampling_locations=locations,
                attention_weights=weights)


@pytest.mark.parametrize("change,message", [
    (dict(value=torch.randn(1, 16, 8)), r"value: expected a 4-D tensor \(N, S, num_heads, head_dim\)"),
    (dict(value=torch.ones(1, 16, 2, 4, dtype=torch.long)), "value: expected a floating dtype"),
    (dict(spatial_shapes=torch.tensor([[3.0, 4.0], [2.0, 2.0]])), "spatial_shapes: expected integer"),
    (dict(spatial_shapes=[[3, 4, 1], [2, 2, 1]]), r"spatial_shapes: expected shape \(L, 2\)"),
    (dict(spatial_shapes=[[3, 4], [2]]), r"spatial_shapes: expected an \(L, 2\) integer"),
    (dict(spatial_shapes=[[3, 4], [2, 3]]), r"spatial_shapes: .* sum\(H\*W\) = 18 keys, but value has S = 16"),
    (dict(spatial_shapes=[[3, 4], [0, 2], [2, 2]]), r"sampling_locations: expected shape .* \(1, Q, 2, 3, P, 2\)"),
    (dict(sampling_locations=torch.rand(1, 5, 2, 2, 2, 3)), r"sampling_locations: expected shape"),
    (dict(sampling_locations=torch.rand(1, 5, 2, 2, 2)), r"sampling_locations: expected shape"),
    (dict(attention_weights=torch.rand(1, 5, 2, 2, 3)), r"attention_weights: expected shape .* \(1, 5, 2, 2, 2\)"),
    (dict(sampling_locations=torch.rand(1, 5, 2, 2, 2, 2, dtype=torch.float64)),
     "sampling_locations: expected dtype torch.float32"),
    (dict(attention_weights=torch.rand(1, 5, 2, 2, 2, device="meta")), "attention_weights: expected device cpu"),
    (dict(level_start_index=torch.tensor([0, 10])), r"level_start_index: expected the cumulative level starts "
                                                     r"\[0, 12\]"),
    (dict(impl="cuda"), "impl: expected one of"),
])
def test_bad_arguments_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(**{**_good_arguments(), **change})


def test_zero_size_level_is_refused():
    arguments = _good_arguments()
    with pytest.raises(ValueError, match=r"spatial_shapes: expected positive \(H, W\) rows"):
        ms_deform_attn(**dict(arguments, spatial_shapes=[[4, 4], [0, 7]]))


def test_fast_refuses_other_devices():
    arguments = {k: v.to("meta") for k, v in _good_arguments().items()}
    arguments["spatial_shapes"] = [(3, 4), (2, 2)]  # meta tensors hold no values to check
    with pytest.raises(ValueError, match="impl: 'fast' runs on CPU tensors"):
        ms_deform_attn(**arguments, impl="fast")


@pytest.mark.parametrize("kwargs,call,message", [
    (dict(embed_dims=30, num_heads=4), {}, r"embed_dims \(30\) must be divisible by num_heads \(4\)"),
    (dict(impl="cuda"), {}, "impl: expected one of"),
    ({}, dict(reference_points=torch.rand(2, 5, 1, 3)), r"reference_points: expected shape .* \(2, 5, 1, 2 or 4\)"),
    ({}, dict(reference_points=None), "needs reference_points and spatial_shapes"),
    ({}, dict(query=torch.randn(5, 2, 16)), r"query: expected a 3-D tensor with 8 channels last"),
])
def test_module_bad_arguments(kwargs, call, message):
    with pytest.raises(ValueError, match=message):
        module = MultiScaleDeformableAttention(**{"embed_dims": 8, "num_heads": 2, "num_levels": 1, **kwargs})
        module(**{"query": torch.randn(5, 2, 8), "reference_points": torch.rand(2, 5, 1, 2),
                  "spatial_shapes": [(2, 3)], **call})


def test_custom_op_passes_opcheck():
    arguments = _good_arguments()
    leaves = [arguments["value"], arguments["sampling_locations"], arguments["attention_weights"]]
    leaves = [t.requires_grad_() for t in leaves]
    torch.library.opcheck(torch.ops.intern2.ms_deform_attn.default,
                          (leaves[0], arguments["spatial_shapes"], leaves[1], leaves[2], "fast"))


def test_torch_compile_traces_custom_op():
    shapes = [(3, 4), (2, 2)]
    inputs = _random_inputs(2, shapes, 2, 8, 5, 2, dtype=torch.float32)

    def fn(value, locations, weights):
        return ms_deform_attn(value, shapes, locations, weights, impl="fast").square().sum()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in inputs]
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    compiled(*leaves).backward()
    fn(*eager_leaves).backward()
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_onnx_export_uses_grid_sample(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    shapes = ((4, 5), (2, 3))

    class Encoder(torch.nn.Module):  # a self-attention call as DINO's encoder makes it, at fixed level sizes
        def __init__(self):
            super().__init__()
            self.attn = MultiScaleDeformableAttention(16, 2, 2, 2, batch_first=True)

        def forward(self, query, reference_points):
            return self.attn(query, reference_points=reference_points, spatial_shapes=shapes)

    module = Encoder().eval()
    torch.nn.init.normal_(module.attn.sampling_offsets.weight, std=0.5)
    inputs = (torch.randn(1, 26, 16), torch.rand(1, 26, 2, 2))
    path = tmp_path / "msda.onnx"
    torch.onnx.export(module, inputs, str(path), dynamo=True, opset_version=18)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    assert "GridSample" in ops and {node.domain for node in model.graph.node} <= {"", "ai.onnx"}, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), module(*inputs), atol=1e-4, rtol=1e-4)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float64, 1e-10), (torch.bfloat16, 5e-2)])
def test_triton_on_cuda_matches_reference(dtype, atol):
    shapes = [(20, 34), (10, 17), (5, 9), (3, 5)]
    inputs = [t.cuda() for t in _random_inputs(2, shapes, 8, 32, 300, 4, low=0.0, high=1.0, seed=5)]
    cotangent = torch.randn(2, 300, 256, dtype=torch.float64, device="cuda")
    want = _with_grads("reference", shapes, inputs, cotangent)
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    out = ms_deform_attn(leaves[0], torch.tensor(shapes, device="cuda"), *leaves[1:])  # default on CUDA: triton
    got = [out, *torch.autograd.grad(out, leaves, cotangent.to(dtype))]
    torch.testing.assert_close(got[0].double(), want[0], atol=atol, rtol=atol)
    for what, g, w in zip(GRADS[1:], got[1:], want[1:]):
        torch.testing.assert_close(g.double(), w, atol=atol * 10, rtol=atol * 10, msg=what)


def test_module_takes_mmcv_config_arguments():
    """An mmcv attn_cfgs dict (the Mask2Former configs pass im2col_step, norm_cfg, init_cfg) builds the module."""
    cfg = dict(embed_dims=64, num_heads=8, num_levels=3, num_points=4, im2col_step=64, dropout=0.0, batch_first=False,
               norm_cfg=None, init_cfg=None)
    module = MultiScaleDeformableAttention(**cfg)
    assert module.sampling_offsets.out_features == 8 * 3 * 4 * 2 and not module.batch_first
