import pytest
import torch
from torch import nn

from dqt_lightning.layers import BitLinear, DQTLinear, quantized_parameters
from dqt_lightning.quant import Grid, absmean_quantize


def _linear(n_in=24, n_out=16, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=False)
    nn.init.normal_(layer.weight, std=0.02)
    return layer


def _act_quant64(x):
    s = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return torch.round(x * s).clamp(-128, 127) / s


@pytest.mark.parametrize("bits", [1.58, 4, 8])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_dqt_linear_gradients_match_float64_reference(bits, lead):
    grid = Grid.from_bits(bits)
    layer = DQTLinear.from_linear(_linear(), grid, "stochastic")
    x = torch.randn(*lead, 24, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    # Reference in float64: y = x_q @ (alpha q)^T; grad_x passes the activation STE; grad_W = g^T x_q (no weight STE).
    w64 = layer.weight.double() * layer.scale.double()
    x64 = x.detach().double()
    xq = _act_quant64(x64)
    assert torch.allclose(y.double(), xq @ w64.t(), atol=1e-5)
    assert torch.allclose(x.grad.double(), g.double() @ w64, atol=1e-5)
    grad_w = g.double().reshape(-1, 16).t() @ xq.reshape(-1, 24)
    assert torch.allclose(layer.update_param.grad.double(), grad_w, atol=1e-5)


def test_dqt_linear_stores_only_integers():
    layer = DQTLinear.from_linear(_linear(), Grid.from_bits(8), "stochastic")
    state = layer.state_dict()
    assert state["weight"].dtype == torch.int8
    assert not any(t.is_floating_point() and t.shape == layer.weight.shape for t in state.values())
    assert list(layer.parameters()) == []  # DDP, .parameters() and checkpoints see integer storage only
    assert layer.update_param.untyped_storage().nbytes() == 4
    assert quantized_parameters(nn.Sequential(layer)) == [layer.update_param]


def test_dqt_linear_init_is_absmean_of_the_float_weight():
    linear = _linear()
    layer = DQTLinear.from_linear(linear, Grid.from_bits(1.58), "nearest")
    q, alpha = absmean_quantize(linear.weight, Grid.from_bits(1.58))
    assert torch.equal(layer.weight, q) and torch.allclose(layer.scale, alpha)


def test_materialize_and_release_round_trip():
    layer = DQTLinear.from_linear(_linear(), Grid.from_bits(4), "stochastic")
    layer.materialize()
    assert layer.update_param.is_contiguous() and torch.equal(layer.update_param.data, layer.dequantize())
    layer.release()
    assert layer.update_param.untyped_storage().nbytes() == 4


def test_bitlinear_matches_float64_reference_with_ste():
    grid = Grid.from_bits(1.58)
    layer = BitLinear.from_linear(_linear(), grid)
    x = torch.randn(4, 24, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    w = layer.weight.detach().double()
    alpha = w.abs().mean()
    wq = torch.round(w / alpha).clamp(-1, 1) * alpha
    xq = _act_quant64(x.detach().double())
    assert torch.allclose(y.double(), xq @ wq.t(), atol=1e-5)
    assert torch.allclose(x.grad.double(), g.double() @ wq, atol=1e-5)
    # The straight-through estimator hands the float master weight the gradient of the quantized one.
    assert torch.allclose(layer.weight.grad.double(), g.double().t() @ xq, atol=1e-5)


def test_dqt_linear_under_bf16_autocast_keeps_float32_gradient_buffer():
    layer = DQTLinear.from_linear(_linear(), Grid.from_bits(8), "stochastic")
    x = torch.randn(3, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.update_param.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = _act_quant64(x.detach().double()) @ (layer.weight.double() * layer.scale.double()).t()
    assert torch.allclose(y.double(), ref, rtol=0.05, atol=0.02)
