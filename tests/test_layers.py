"""Norm/activation factories (module layout = checkpoint key indices, errors) and the oneDNN Linear."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import intern2.layers as layers
from intern2.layers import (Linear, ToChannelsFirst, ToChannelsLast, build_act_layer, build_norm_layer,
                            residual_add)


def test_layer_norm_from_channels_first_keeps_official_indices():
    norm = build_norm_layer(8, "LN", "channels_first", "channels_last")
    assert isinstance(norm[0], ToChannelsLast) and isinstance(norm[1], nn.LayerNorm) and norm[1].eps == 1e-6
    x = torch.randn(2, 8, 3, 4)
    torch.testing.assert_close(norm(x), nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,), eps=1e-6))


def test_batch_norm_round_trip_layouts():
    norm = build_norm_layer(8, "BN", "channels_last", "channels_last").eval()
    assert isinstance(norm[0], ToChannelsFirst) and isinstance(norm[1], nn.BatchNorm2d)
    x = torch.randn(2, 3, 4, 8)
    assert norm(x).shape == x.shape


@pytest.mark.parametrize("name,cls", [("GELU", nn.GELU), ("ReLU", nn.ReLU), ("SiLU", nn.SiLU)])
def test_activations(name, cls):
    assert isinstance(build_act_layer(name), cls)
    assert isinstance(build_act_layer(nn.Tanh), nn.Tanh)


def test_bad_names():
    with pytest.raises(ValueError, match="norm_layer: expected 'LN' or 'BN', got 'GN'"):
        build_norm_layer(8, "GN")
    with pytest.raises(ValueError, match="in_format/out_format"):
        build_norm_layer(8, "LN", "nchw")
    with pytest.raises(ValueError, match="act_layer: expected one of"):
        build_act_layer("Mish")


def test_gelu_is_in_place_only_where_autograd_does_not_need_its_input():
    act = build_act_layer("GELU")
    x = torch.randn(4, 8)
    want = nn.functional.gelu(x)
    with torch.inference_mode():
        inference = x.clone()
        assert act(inference).data_ptr() == inference.data_ptr()  # overwrote its input: no new buffer
        torch.testing.assert_close(inference, want, atol=0, rtol=0)
    leaf = x.clone().requires_grad_()
    out = act(leaf)
    out.sum().backward()
    torch.testing.assert_close(leaf.detach(), x, atol=0, rtol=0)  # the input autograd needs is left alone
    torch.testing.assert_close(out.detach(), want, atol=0, rtol=0)
    reference = x.clone().requires_grad_()
    nn.functional.gelu(reference).sum().backward()
    torch.testing.assert_close(leaf.grad, reference.grad, atol=0, rtol=0)


def test_gelu_is_traced_as_one_call():
    traced = torch.fx.symbolic_trace(nn.Sequential(build_act_layer("GELU")))
    x = torch.randn(3, 5)
    torch.testing.assert_close(traced(x.clone()), nn.functional.gelu(x), atol=0, rtol=0)


needs_onednn = pytest.mark.skipif(not layers._onednn_dtypes(), reason="this torch build has no oneDNN linear")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the calls that reach oneDNN's linear."""
    calls, onednn = [], layers._ONEDNN_LINEAR

    def counted(*args):
        calls.append(args[0].dtype)
        return onednn(*args)

    def counted_binary(*args):
        calls.append(("add", args[0].dtype))
        return onednn.binary(*args)
    counted.binary = counted_binary
    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", counted)
    return calls


@needs_onednn
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_linear_runs_onednn_at_inference_with_f_linear_values(onednn_calls, dtype, atol):
    if dtype not in layers._onednn_dtypes():
        pytest.skip("no bf16 oneDNN on this CPU")
    torch.manual_seed(0)
    layer = Linear(24, 40).to(dtype)
    x = torch.randn(2, 5, 7, 24, dtype=dtype).permute(0, 2, 1, 3)  # 4-d and not contiguous, as NHWC blocks pass
    with torch.inference_mode():
        out = layer(x)
    assert onednn_calls == [dtype] and out.dtype == dtype and out.shape == (2, 7, 5, 40)
    torch.testing.assert_close(out.float(), nn.functional.linear(x, layer.weight, layer.bias).float(),
                               atol=atol, rtol=atol)
    with torch.no_grad():
        no_bias = Linear(24, 3, bias=False)(x.float())
    assert onednn_calls == [dtype, torch.float32] and no_bias.shape == (2, 7, 5, 3)


@needs_onednn
def test_linear_is_f_linear_under_autograd_autocast_tracing_and_empty_input(onednn_calls):
    layer = Linear(6, 4)
    x = torch.randn(3, 6)
    out = layer(x)  # grad mode, parameters require grad: autograd must record aten.linear
    out.sum().backward()
    want = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert layer.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's cast, which the oneDNN call would skip
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)  # its check would rerun forward untraced
        assert layer(torch.empty(0, 6)).shape == (0, 4)
    assert "aten::linear" in str(traced.graph)
    assert onednn_calls == []
    with torch.inference_mode():
        torch.testing.assert_close(traced(x), want.detach(), atol=0, rtol=0)


def test_linear_keeps_nn_linear_state_dict_and_is_traced_as_one_call():
    layer = Linear(6, 4)
    plain = nn.Linear(6, 4)
    plain.load_state_dict(layer.state_dict())
    assert isinstance(layer, nn.Linear) and list(layer.state_dict()) == ["weight", "bias"]
    graph = torch.fx.symbolic_trace(nn.Sequential(layer)).graph
    assert [n.target.__name__ for n in graph.nodes if n.op == "call_function"] == ["linear"]
    x = torch.randn(3, 6)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), plain(x), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_flop_counter_counts_the_onednn_linear():
    from torch.utils.flop_counter import FlopCounterMode
    layer = Linear(16, 8)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        layer(torch.randn(2, 3, 16))
    assert counter.get_total_flops() == 2 * 6 * 16 * 8


def test_onednn_probe_leaves_the_global_generator_alone():
    layers._onednn_dtypes.cache_clear()
    state = torch.random.get_rng_state()
    layers._onednn_dtypes()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_residual_add_writes_into_the_branch_only_at_inference():
    x, branch = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    want = x + branch
    with torch.inference_mode():
        fresh = branch.clone()
        out = residual_add(x, fresh)
        assert out.data_ptr() == fresh.data_ptr()  # no new buffer
        torch.testing.assert_close(out, want, atol=0, rtol=0)
    leaf = x.clone().requires_grad_()
    kept = branch.clone()
    out = residual_add(leaf, kept)
    assert out.data_ptr() != kept.data_ptr() and torch.equal(kept, branch)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), want, atol=0, rtol=0)
    assert torch.equal(leaf.grad, torch.ones_like(x))


@needs_onednn
@pytest.mark.parametrize("epilogues", [True, False])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
def test_linear_fuses_the_residual_sum_at_inference(onednn_calls, monkeypatch, dtype, atol, epilogues):
    """The residual sum in oneDNN's epilogue where epilogues are faster (AVX-512 CPUs), else oneDNN's matmul and an
    in-place sum; the same values, and the residual is never overwritten."""
    if dtype not in layers._onednn_dtypes():
        pytest.skip("no bf16 oneDNN on this CPU")
    monkeypatch.setattr(layers, "_epilogues_preferred", lambda: epilogues)
    torch.manual_seed(0)
    layer = Linear(24, 16).to(dtype)
    x = torch.randn(2, 5, 7, 24, dtype=dtype)
    residual = torch.randn(2, 5, 7, 16, dtype=dtype)
    want = (nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float()) + residual.float())
    with torch.inference_mode():
        out = layer(x, residual)
    fused = [("add", dtype)] if epilogues else [dtype]
    assert onednn_calls == fused and out.dtype == dtype and out.data_ptr() != residual.data_ptr()
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=atol)
    with torch.inference_mode():  # a residual that only broadcasts to the output: the separate sum
        row = residual[:1]
        torch.testing.assert_close(layer(x, row).float(), want - residual.float() + row.float(), atol=atol, rtol=atol)
    assert onednn_calls == fused + ([] if epilogues else [dtype])  # a matmul, then the in-place sum


def test_linear_residual_under_autograd_is_differentiable():
    layer = Linear(6, 4)
    x = torch.randn(3, 6)
    residual = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        fused = layer(x, residual)  # nothing to record: the fused path where oneDNN runs
    out = layer(x, residual)  # autograd records F.linear and the sum
    out.sum().backward()
    torch.testing.assert_close(out.detach(), fused, atol=1e-5, rtol=1e-5)
    assert torch.equal(residual.grad, torch.ones_like(residual)) and layer.weight.grad is not None


@needs_onednn
@pytest.mark.parametrize("dtype,intel,gemv", [(torch.bfloat16, True, True), (torch.bfloat16, False, False),
                                              (torch.float32, True, True), (torch.float32, False, False)])
def test_one_row_linear_runs_gemv_where_it_is_faster(onednn_calls, monkeypatch, dtype, intel, gemv):
    """One-row linears (batch-1 decoding): on Intel CPUs ATen's gemv (MKL's sgemv in float32), elsewhere oneDNN;
    the same values either way."""
    if dtype not in layers._onednn_dtypes():
        pytest.skip("no bf16 oneDNN on this CPU")
    monkeypatch.setattr(layers, "_intel_cpu", lambda: intel)
    torch.manual_seed(0)
    atol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    for bias in (True, False):
        layer = Linear(512, 160, bias=bias).to(dtype)  # above the small weights that float32 leaves to F.linear
        x = torch.randn(1, 1, 512, dtype=dtype)
        with torch.inference_mode():
            out = layer(x)
        want = nn.functional.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
        assert out.shape == (1, 1, 160) and out.dtype == dtype
        torch.testing.assert_close(out.float(), want, atol=atol, rtol=atol)
    assert onednn_calls == ([] if gemv else [dtype, dtype])


@needs_onednn
def test_small_float32_matmuls_of_few_rows_skip_onednn(onednn_calls):
    """A few rows over a small float32 weight (a small model's decoding step) run F.linear, exactly; more rows, a
    larger weight or bfloat16 still reach oneDNN."""
    torch.manual_seed(0)
    small = Linear(256, 256)  # 65536 weight elements: the largest "small" weight
    x = torch.randn(2, 8, 256)  # 16 rows
    residual = torch.randn(2, 8, 256)
    with torch.inference_mode():
        assert torch.equal(small(x), nn.functional.linear(x, small.weight, small.bias))
        assert torch.equal(small(x, residual), residual + nn.functional.linear(x, small.weight, small.bias))
        assert torch.equal(layers.linear_gelu(x, small.weight, small.bias),
                           nn.functional.gelu(nn.functional.linear(x, small.weight, small.bias)))
        assert onednn_calls == []
        small(torch.randn(17, 256))  # 17 rows
        Linear(257, 256)(x[..., :1].expand(2, 8, 257))  # one weight element over
        assert onednn_calls == [torch.float32, torch.float32]
        if torch.bfloat16 in layers._onednn_dtypes():
            small.to(torch.bfloat16)(x.to(torch.bfloat16))
            assert onednn_calls[2:] == [torch.bfloat16]


def test_mlp_residual_equals_the_separate_sum():
    torch.manual_seed(0)
    mlp = layers.Mlp(8, 32, drop=0.5)
    x, residual = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mlp.eval()
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x, residual), residual + mlp(x), atol=1e-5, rtol=1e-5)
    mlp.train()
    torch.manual_seed(1)
    trained = mlp(x, residual)
    torch.manual_seed(1)
    torch.testing.assert_close(trained, residual + mlp(x), atol=1e-6, rtol=1e-6)  # dropout before the sum


@needs_onednn
@pytest.mark.parametrize("epilogues", [True, False])
def test_linear_gelu_is_the_gelu_of_the_linear_on_every_path(onednn_calls, monkeypatch, epilogues):
    monkeypatch.setattr(layers, "_epilogues_preferred", lambda: epilogues)
    torch.manual_seed(0)
    weight, bias = torch.randn(32, 16), torch.randn(32)
    x = torch.randn(2, 10, 16) * 3  # more rows than F.linear keeps (test_small_float32_matmuls_of_few_rows_skip_onednn)
    want = nn.functional.gelu(nn.functional.linear(x, weight, bias))
    with torch.inference_mode():
        torch.testing.assert_close(layers.linear_gelu(x, weight, bias), want, atol=1e-5, rtol=1e-5)
    assert onednn_calls == [torch.float32]  # float32 inference: oneDNN's matmul (the GELU in its epilogue or not)
    if torch.bfloat16 in layers._onednn_dtypes():
        with torch.inference_mode():  # bfloat16: oneDNN's matmul, then ATen's GELU pass
            half = layers.linear_gelu(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
        torch.testing.assert_close(half.float(), want, atol=0.1, rtol=3e-2)
        assert onednn_calls == [torch.float32, torch.bfloat16]
    leaf = weight.clone().requires_grad_()
    out = layers.linear_gelu(x, leaf, bias)  # autograd: F.linear then F.gelu
    out.sum().backward()
    torch.testing.assert_close(out.detach(), want, atol=1e-6, rtol=1e-6)
    assert leaf.grad is not None and len(onednn_calls) <= 2


def test_mlp_with_exact_gelu_fuses_it_only_where_dropout_is_inactive():
    torch.manual_seed(0)
    mlp = layers.Mlp(8, 32, drop=0.0).eval()
    x = torch.randn(2, 3, 8)
    want = mlp.fc2(nn.functional.gelu(mlp.fc1(x)))
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)
    tanh = layers.Mlp(8, 32, act_layer=lambda: nn.GELU(approximate="tanh")).eval()
    with torch.inference_mode():
        torch.testing.assert_close(tanh(x), tanh.fc2(nn.functional.gelu(tanh.fc1(x), approximate="tanh")),
                                   atol=1e-5, rtol=1e-5)
    graph = torch.fx.symbolic_trace(mlp).graph
    assert "linear_gelu" in [n.target.__name__ for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("width", [64, 200, 512])
def test_bfloat16_layer_norm_kernel_matches_aten(width):
    """bfloat16 CPU inference runs the numba kernel: ATen's values within one bfloat16 rounding (the float32 sums may
    run in another order), on non-contiguous input; other cases are F.layer_norm itself."""
    torch.manual_seed(0)
    norm = layers.LayerNorm(width, eps=1e-6).bfloat16()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(3, width, 7) * 4 + 2).bfloat16().transpose(1, 2)  # rows not contiguous; 21 rows
    want = nn.functional.layer_norm(x, (width,), norm.weight, norm.bias, 1e-6)
    with torch.inference_mode():
        got = norm(x)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    exact = nn.functional.layer_norm(x.float(), (width,), norm.weight.float(), norm.bias.float(), 1e-6)
    torch.testing.assert_close(got.float(), exact, atol=0.1, rtol=1 / 128)  # bf16 rounding of values up to ~10
    assert (got != want).float().mean() < 0.01  # the same bits as ATen's almost everywhere


def test_layer_norm_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    from intern2.ops import layer_norm_cpu
    calls = []
    monkeypatch.setattr(layer_norm_cpu, "layer_norm_bfloat16", lambda *args: calls.append(args) or args[0])
    norm = layers.LayerNorm(8).bfloat16()
    x = torch.randn(2, 8).bfloat16()
    norm(x.float().requires_grad_().bfloat16())  # autograd records: ATen
    with torch.inference_mode():
        layers.LayerNorm(8)(x.float())  # float32: ATen
        layers.LayerNorm(8, elementwise_affine=False).bfloat16()(x)  # no affine parameters: ATen
        wide = layer_norm_cpu.MAX_WIDTH + 1  # wider than the kernel's stack buffer: ATen
        layers.LayerNorm(wide).bfloat16()(torch.randn(1, wide).bfloat16())
        assert not calls
        norm(x)
    assert len(calls) == 1
    graph = torch.fx.symbolic_trace(nn.Sequential(norm)).graph
    assert [n.target.__name__ for n in graph.nodes if n.op == "call_function"] == ["layer_norm"]


def test_mlp_fuses_nothing_that_a_hook_or_a_replacement_would_observe():
    torch.manual_seed(0)
    mlp = layers.Mlp(8, 32).eval()
    x, residual = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with torch.inference_mode():
        want = residual + mlp(x)
    seen = {}
    for name in ("fc1", "act", "fc2"):
        getattr(mlp, name).register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, out))
    with torch.inference_mode():
        got = mlp(x, residual)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seen["fc2"], want - residual, atol=1e-5, rtol=1e-5)  # fc2's own output
        assert seen["fc1"].shape == seen["act"].shape == (2, 3, 32)  # the separate calls ran
    quantized = torch.ao.quantization.quantize_dynamic(layers.Mlp(8, 32).eval(), {nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode():
        assert quantized(x, residual).shape == x.shape  # replaced linears: the plain calls
