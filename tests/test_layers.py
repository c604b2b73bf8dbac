"""Norm/activation factories: module layout (checkpoint key indices) and errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from intern2.layers import ToChannelsFirst, ToChannelsLast, build_act_layer, build_norm_layer


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
