"""DCNv3 core: golden parity with the official operator, gradients, paths against each other, errors."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import fixture_cases, load_fixture, requires_cuda
from intern2.ops import DCNv3Geometry, dcnv3

CORE_CASES = fixture_cases("internimage/dcnv3_core", "cases")
# The Triton interpreter executes every program in Python: only the small cases.
TRITON_CASES = ("k3_s1_p1_d1_g1_c16_os1", "k3_s2_p1_d1_g2_c8_os0.5", "k3_s1_p1_d1_g2_c8_os1_removecenter")


def _run(case: dict, tensors: dict, impl: str, dtype: torch.dtype):
    """Output and (input, offset, mask) gradients of sum(out * cotangent) for one fixture case."""
    name = case["name"]
    leaves = [tensors[f"{name}.{k}"].to(dtype).requires_grad_() for k in ("input", "offset", "mask")]
    out = dcnv3(*leaves, case["k"], case["s"], case["p"], case["d"], case["G"], case["os"], bool(case["rc"]),
                impl=impl)
    grads = torch.autograd.grad(out, leaves, tensors[f"{name}.cotangent"].to(dtype))
    return [out, *grads]


def _expected(case: dict, tensors: dict, suffix: str = "_grid64"):
    name = case["name"]
    return [tensors[f"{name}.{k}{suffix}"] for k in ("out", "grad_input", "grad_offset", "grad_mask")]


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", CORE_CASES, ids=lambda c: c["name"] if c else "absent")
def test_core_matches_exact_official_float64(case, impl):
    _, tensors = load_fixture("internimage/dcnv3_core")
    for got, want, what in zip(_run(case, tensors, impl, torch.float64), _expected(case, tensors),
                               ("out", "grad_input", "grad_offset", "grad_mask")):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=f"{case['name']} {impl} {what}")


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", CORE_CASES, ids=lambda c: c["name"] if c else "absent")
def test_core_float32_matches_official(case, impl):
    _, tensors = load_fixture("internimage/dcnv3_core")
    results = _run(case, tensors, impl, torch.float32)
    for got, want in zip(results, _expected(case, tensors)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    # Against the official operator as shipped (its float32 grids put samples ~1e-5 px off).
    expected = _expected(case, tensors, "")
    for got, want in zip(results[:2] + results[3:], expected[:2] + expected[3:]):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["reference", "fast", "triton"])
@pytest.mark.parametrize("name", ["small", "stage4like"])
def test_core_matches_dcn_perf_golden(name, impl):
    meta, tensors = load_fixture("dcn-perf/dcnv3_core_golden")
    cfg = meta[name]
    leaves = [tensors[f"{name}.{k}"].clone().requires_grad_() for k in ("input", "offset", "mask")]
    out = dcnv3(*leaves, cfg["kernel"], cfg["stride"], cfg["pad"], cfg["dilation"], cfg["group"],
                cfg["offset_scale"], bool(cfg["remove_center"]), impl=impl)
    grad_input, grad_offset, grad_mask = torch.autograd.grad(out, leaves, tensors[f"{name}.grad_output"])
    torch.testing.assert_close(out, tensors[f"{name}.output"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_input, tensors[f"{name}.grad_input"], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(grad_mask, tensors[f"{name}.grad_mask"], atol=1e-3, rtol=1e-3)
    # Bilinear kink: where the official float32 grid puts a sample on the other side of an integer pixel,
    # single grad_offset elements legitimately differ; the bulk must agree.
    diff = (grad_offset - tensors[f"{name}.grad_offset"]).abs().flatten()
    assert torch.quantile(diff, 0.999) <= 1e-3
    assert (diff > 1e-3).float().mean() < 1e-3


@pytest.mark.parametrize("case", fixture_cases("internimage/dcnv3_core", "cases", only=TRITON_CASES),
                         ids=lambda c: c["name"] if c else "absent")
def test_triton_matches_exact_official(case):
    _, tensors = load_fixture("internimage/dcnv3_core")
    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        for got, want in zip(_run(case, tensors, "triton", dtype), _expected(case, tensors)):
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)


def _random_inputs(n, h, w, group, d, geo: DCNv3Geometry, dtype=torch.float64, amplitude=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ho, wo = geo.output_size(h, w)
    p = geo.points
    inp = torch.randn(n, h, w, group * d, generator=gen, dtype=dtype)
    offset = (torch.rand(n, ho, wo, group * p * 2, generator=gen, dtype=dtype) * 2 - 1) * amplitude
    mask = torch.rand(n, ho, wo, group, p, generator=gen, dtype=dtype).softmax(-1).flatten(3)
    return inp, offset, mask


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_gradcheck_float64(impl):
    geo = DCNv3Geometry.create(3, (1, 2), 1, (1, 2), 2, offset_scale=0.75)
    inputs = [t.requires_grad_() for t in _random_inputs(2, 5, 6, 2, 3, geo, seed=1)]

    def fn(inp, offset, mask):
        return dcnv3(inp, offset, mask, 3, (1, 2), 1, (1, 2), 2, 0.75, impl=impl)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3), h=st.integers(3, 9), w=st.integers(3, 9), group=st.integers(1, 3),
    d=st.sampled_from([1, 3, 16, 17, 32, 40]), kernel=st.sampled_from([(1, 1), (3, 3), (5, 5), (3, 5), (2, 3)]),
    stride=st.sampled_from([1, 2, (2, 1)]), dilation=st.sampled_from([1, 2, (1, 2)]), pad=st.integers(0, 3),
    offset_scale=st.sampled_from([0.5, 1.0, 2.0]), remove_center=st.booleans(),
    amplitude=st.sampled_from([0.0, 2.0, 6.0]),
    seed=st.integers(0, 2**16),
)
def test_fast_matches_reference(n, h, w, group, d, kernel, stride, dilation, pad, offset_scale, remove_center,
                                amplitude, seed):
    remove_center = remove_center and kernel[0] == kernel[1] and kernel[0] % 2 == 1
    geo = DCNv3Geometry.create(kernel, stride, pad, dilation, group, offset_scale, remove_center)
    ho, wo = geo.output_size(h, w)
    if ho < 1 or wo < 1:
        return
    inputs = _random_inputs(n, h, w, group, d, geo, amplitude=amplitude, seed=seed)
    cotangent = torch.randn(n, ho, wo, group * d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    results = {}
    for impl in ("reference", "fast"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = dcnv3(*leaves, kernel, stride, pad, dilation, group, offset_scale, remove_center, impl=impl)
        results[impl] = [out, *torch.autograd.grad(out, leaves, cotangent)]
    names = ("out", "grad_input", "grad_offset", "grad_mask")
    for what, got, want in zip(names, results["fast"], results["reference"]):
        if what == "grad_offset" and amplitude == 0.0:
            continue  # samples exactly on pixel centres: the bilinear kink makes d/d(offset) one-sided by convention
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9, msg=what)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_no_sampling_points_gives_zeros(impl):
    """A 1x1 kernel without its centre samples nothing: zero output and gradients (as the official kernel)."""
    geo = DCNv3Geometry.create(1, 1, 0, 1, 2, remove_center=True)
    leaves = [t.requires_grad_() for t in _random_inputs(1, 3, 4, 2, 3, geo)]
    out = dcnv3(*leaves, 1, 1, 0, 1, 2, remove_center=True, impl=impl)
    assert out.shape == (1, 3, 4, 6) and not out.any()
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("n,kernel,group", [(1, 15, 3), (4, 3, 40)])
def test_fast_splits_many_points_into_tables(n, kernel, group):
    """More (group, point) entries per pixel than one geometry table holds (256): the kernels work through them in
    chunks of whole groups (225 points: one group per table; 40 groups of 9: two tables per pixel)."""
    geo = DCNv3Geometry.create(kernel, 1, kernel // 2, 1, group)
    inputs = _random_inputs(n, 5, 6, group, 3, geo, seed=2)
    cotangent = torch.randn(n, 5, 6, group * 3, dtype=torch.float64)
    results = {}
    for impl in ("reference", "fast"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = dcnv3(*leaves, kernel, 1, kernel // 2, 1, group, impl=impl)
        results[impl] = [out, *torch.autograd.grad(out, leaves, cotangent)]
    names = ("out", "grad_input", "grad_offset", "grad_mask")
    for what, got, want in zip(names, results["fast"], results["reference"]):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9, msg=what)


def test_fast_reads_and_writes_bfloat16_with_float32_arithmetic():
    """bfloat16 tensors go into the CPU kernels as they are: the output is exactly the float32 result on the same
    (bfloat16) values rounded to nearest even, NaN stays NaN, and the gradients are the float32 ones rounded."""
    geo = DCNv3Geometry.create(3, 1, 1, 1, 3)
    inputs = [t.to(torch.bfloat16) for t in _random_inputs(2, 7, 6, 3, 16, geo, dtype=torch.float32, seed=4)]
    widened = [t.float() for t in inputs]
    out = dcnv3(*inputs, 3, 1, 1, 1, 3, impl="fast")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dcnv3(*widened, 3, 1, 1, 1, 3, impl="fast").to(torch.bfloat16))
    leaves = [t.clone().requires_grad_() for t in inputs]
    leaves32 = [t.clone().requires_grad_() for t in widened]
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(dcnv3(*leaves, 3, 1, 1, 1, 3, impl="fast"), leaves, cotangent.to(torch.bfloat16))
    grads32 = torch.autograd.grad(dcnv3(*leaves32, 3, 1, 1, 1, 3, impl="fast"), leaves32,
                                  cotangent.to(torch.bfloat16).float())
    for got, want in zip(grads, grads32):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    poisoned = inputs[0].clone()
    poisoned[0, 3, 3, 0] = float("nan")
    assert torch.isnan(dcnv3(poisoned, *inputs[1:], 3, 1, 1, 1, 3, impl="fast")).any()


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("kernel,group,remove_center", [(3, 2, False), (3, 3, True), (3, 40, False), (15, 1, False)])
def test_softmax_mask_equals_the_softmax_then_the_core(impl, kernel, group, remove_center):
    """softmax_mask=True: the mask holds logits, normalised over each group's points (in the fast kernel as it reads
    them, also when a pixel's groups span several geometry tables); gradients reach the logits."""
    geo = DCNv3Geometry.create(kernel, 1, kernel // 2, 1, group, remove_center=remove_center)
    inp, offset, _ = _random_inputs(2, 5, 6, group, 3, geo, seed=6)
    logits = torch.randn(offset.shape[:3] + (group * geo.points,), generator=torch.Generator().manual_seed(6),
                         dtype=torch.float64) * 4
    args = (kernel, 1, kernel // 2, 1, group, 1.0, remove_center)
    cotangent = torch.randn(2, 5, 6, group * 3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (inp, offset, logits)]
    out = dcnv3(*leaves, *args, impl=impl, softmax_mask=True)
    grads = torch.autograd.grad(out, leaves, cotangent)
    want_leaves = [t.clone().requires_grad_() for t in (inp, offset, logits)]
    weights = torch.softmax(want_leaves[2].view(2, 5, 6, group, -1), -1).flatten(3)
    want = dcnv3(want_leaves[0], want_leaves[1], weights, *args, impl="reference")
    want_grads = torch.autograd.grad(want, want_leaves, cotangent)
    for what, got, expected in zip(("out", "grad_input", "grad_offset", "grad_logits"), (out, *grads),
                                   (want, *want_grads)):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9, msg=what)
    with torch.inference_mode():  # float32: the kernel's polynomial exp against ATen's
        got32 = dcnv3(inp.float(), offset.float(), logits.float(), *args, impl=impl, softmax_mask=True)
    torch.testing.assert_close(got32.double(), want.detach(), atol=1e-5, rtol=1e-5)


def test_softmax_mask_is_stable_for_extreme_logits():
    """Logits far beyond exp's range (and -inf for points switched off) give F.softmax's weights, not inf/NaN."""
    geo = DCNv3Geometry.create(3, 1, 1, 1, 2)
    inp, offset, _ = _random_inputs(1, 4, 5, 2, 16, geo, dtype=torch.float32, seed=7)
    logits = torch.randn(1, 4, 5, 18, generator=torch.Generator().manual_seed(7)) * 1e4
    logits[..., 3] = float("-inf")
    weights = torch.softmax(logits.view(1, 4, 5, 2, 9), -1).flatten(3)
    want = dcnv3(inp, offset, weights, 3, 1, 1, 1, 2, impl="reference")
    for dtype in (torch.float32, torch.bfloat16):
        got = dcnv3(inp.to(dtype), offset.to(dtype), logits.to(dtype), 3, 1, 1, 1, 2, impl="fast", softmax_mask=True)
        assert torch.isfinite(got).all()
        want_dtype = dcnv3(inp.to(dtype).float(), offset.to(dtype).float(),
                           torch.softmax(logits.to(dtype).float().view(1, 4, 5, 2, 9), -1).flatten(3),
                           3, 1, 1, 1, 2, impl="reference")
        torch.testing.assert_close(got.float(), want_dtype, atol=3e-2 if dtype == torch.bfloat16 else 1e-5,
                                   rtol=3e-2 if dtype == torch.bfloat16 else 1e-5)
    assert torch.isfinite(want).all()


@pytest.mark.parametrize("impl", ["fast", "triton"])
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_half_precision_within_tolerance(impl, dtype, atol):
    """Half inputs are computed with float32 accumulation: error ~ the output's own rounding (stated atol)."""
    geo = DCNv3Geometry.create(3, 1, 1, 1, 2)
    inputs = _random_inputs(2, 6, 7, 2, 16, geo, dtype=torch.float32, seed=3)
    want = dcnv3(*inputs, 3, 1, 1, 1, 2, impl="reference")
    half = [t.to(dtype).requires_grad_() for t in inputs]
    out = dcnv3(*half, 3, 1, 1, 1, 2, impl=impl)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=atol)
    grads = torch.autograd.grad(out.float().sum(), half)
    assert [g.dtype for g in grads] == [dtype] * 3 and all(torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("n", [0, 1, 5])
def test_any_batch_size(n):
    geo = DCNv3Geometry.create(3, 1, 1, 1, 4)
    inputs = _random_inputs(n, 5, 5, 4, 4, geo, dtype=torch.float32)
    results = []
    for impl in ("fast", "reference"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = dcnv3(*leaves, 3, 1, 1, 1, 4, impl=impl)
        results.append([out, *torch.autograd.grad(out.sum(), leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fast_saves_only_inputs_for_backward():
    geo = DCNv3Geometry.create(3, 1, 1, 1, 2)
    leaves = [t.requires_grad_() for t in _random_inputs(1, 6, 6, 2, 8, geo, dtype=torch.float32)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        dcnv3(*leaves, 3, 1, 1, 1, 2, impl="fast")
    assert saved == [t.shape for t in leaves]


def test_default_impl_on_cpu_is_fast(monkeypatch):
    module = importlib.import_module("intern2.ops.dcnv3")  # the submodule, shadowed by the function
    calls = []
    real = module._kernels
    monkeypatch.setattr(module, "_kernels", lambda backend: calls.append(backend) or real(backend))
    geo = DCNv3Geometry.create(3, 1, 1, 1, 2)
    dcnv3(*_random_inputs(1, 4, 4, 2, 4, geo, dtype=torch.float32), 3, 1, 1, 1, 2)
    assert calls == ["fast"]


def _good_inputs():
    geo = DCNv3Geometry.create(3, 1, 1, 1, 2)
    return list(_random_inputs(1, 5, 5, 2, 4, geo, dtype=torch.float32))


@pytest.mark.parametrize("mutate,args,message", [
    (lambda t: [t[0][0], t[1], t[2]], {}, "input: expected a 4-D"),
    (lambda t: [t[0][..., :7], t[1], t[2]], {}, r"channels \(7\) must be divisible by group \(2\)"),
    (lambda t: [t[0], t[1][..., :-2], t[2]], {}, r"offset: expected shape \(1, 5, 5, 36\)"),
    (lambda t: [t[0], t[1], t[2][:, :4]], {}, r"mask: expected shape \(1, 5, 5, 18\)"),
    (lambda t: [t[0], t[1].double(), t[2]], {}, "offset: expected dtype torch.float32"),
    (lambda t: [t[0], t[1], t[2].to("meta")], {}, "mask: expected device cpu"),
    (lambda t: [t[0].long(), t[1], t[2]], {}, "input: expected a floating dtype"),
    (lambda t: t, {"kernel_size": (3, 3, 3)}, "kernel_size: expected an int or an"),
    (lambda t: t, {"stride": 0}, "stride: expected values >= 1"),
    (lambda t: t, {"kernel_size": 2, "remove_center": True}, "remove_center: needs a square odd kernel"),
    (lambda t: t, {"impl": "cuda"}, "impl: expected one of"),
    (lambda t: [x.to("meta") for x in t], {"impl": "fast"}, "impl: 'fast' runs on CPU tensors"),
    (lambda t: [t[0][:, :1, :1], t[1][:, :0, :0], t[2][:, :0, :0]], {"pad": 0}, "is too small"),
])
def test_bad_arguments_raise_clear_errors(mutate, args, message):
    kwargs = dict(kernel_size=3, stride=1, pad=1, dilation=1, group=2)
    kwargs.update(args)
    with pytest.raises(ValueError, match=message):
        dcnv3(*mutate(_good_inputs()), **kwargs)


def test_kernels_larger_than_the_cpu_tables_use_the_reference():
    """A 17x17 kernel (289 points per group) exceeds the CPU kernels' tables: the default path is the reference,
    and asking for the fast kernels says why not."""
    geo = DCNv3Geometry.create(17, 1, 8, 1, 1)
    inputs = _random_inputs(1, 4, 4, 1, 4, geo, dtype=torch.float32)
    torch.testing.assert_close(dcnv3(*inputs, 17, 1, 8, 1, 1), dcnv3(*inputs, 17, 1, 8, 1, 1, impl="reference"),
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"impl: 'fast' takes kernels of at most 256 points, got 17x17 \(289"):
        dcnv3(*inputs, 17, 1, 8, 1, 1, impl="fast")


def test_torch_compile_traces_custom_op():
    geo = DCNv3Geometry.create(3, 1, 1, 1, 2)
    inputs = _random_inputs(2, 6, 6, 2, 8, geo, dtype=torch.float32)

    def fn(inp, offset, mask):
        return dcnv3(inp, offset, mask, 3, 1, 1, 1, 2, impl="fast").square().sum()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in inputs]
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    compiled(*leaves).backward()
    fn(*eager_leaves).backward()
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_export_and_decomposition():
    from intern2.ops import DCNv3, dcnv3_decompositions
    module = DCNv3(16, group=2, impl="fast").eval()
    torch.nn.init.normal_(module.offset.weight, std=0.5)
    x = torch.randn(1, 6, 7, 16)
    program = torch.export.export(module, (x,))
    assert "intern2.dcnv3" in str(program.graph)
    decomposed = program.run_decompositions(dcnv3_decompositions())
    assert "intern2" not in str(decomposed.graph) and "grid_sampler" in str(decomposed.graph)
    torch.testing.assert_close(decomposed.module()(x), module(x), atol=1e-5, rtol=1e-5)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float64, 1e-10), (torch.bfloat16, 5e-2)])
def test_triton_on_cuda_matches_reference(dtype, atol):
    geo = DCNv3Geometry.create(3, 1, 1, 1, 4)
    inputs = [t.cuda() for t in _random_inputs(8, 14, 14, 4, 32, geo, dtype=torch.float64, seed=5)]
    cotangent = torch.randn_like(inputs[0])
    want_leaves = [t.clone().requires_grad_() for t in inputs]
    want = dcnv3(*want_leaves, 3, 1, 1, 1, 4, impl="reference")
    want_grads = torch.autograd.grad(want, want_leaves, cotangent)
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    out = dcnv3(*leaves, 3, 1, 1, 1, 4)  # default on CUDA: triton
    grads = torch.autograd.grad(out, leaves, cotangent.to(dtype))
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=atol)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), ref, atol=atol * 10, rtol=atol * 10)
