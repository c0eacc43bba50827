"""The integer forward matmul (``int8_matmul``): the float path's outputs up to float32 rounding, its gradients
exactly, in float32, under bf16 autocast and with packed storage; and the configurations it refuses."""

from __future__ import annotations

import pytest
import torch

from dqt_lightning import QuantPrecision
from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.layers import DQTLinear, dqt_layers
from dqt_lightning.quant.grid import Grid, TernaryGrid
from tests.conftest import fit, make_model


def _twins(grid: Grid, per_row: bool, packed: bool = False) -> tuple[DQTLinear, DQTLinear]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    float_path, int_path = (DQTLinear.from_linear(linear, grid, "stochastic", per_row) for _ in range(2))
    int_path.int8_matmul = True
    if packed:
        int_path.pack_storage()
    return float_path, int_path


def _run(layer: DQTLinear, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.float().square().sum().backward()
    return y, x.grad, layer.update_param.grad


@pytest.mark.parametrize("bits,per_row,packed", [(1.58, False, False), (1.58, True, True), (8, False, False),
                                                 (8, True, False)])
def test_the_integer_forward_is_the_float_forward_with_the_same_gradients(bits, per_row, packed):
    float_path, int_path = _twins(Grid.from_bits(bits), per_row, packed)
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 10, 64)  # tokens of very different ranges
    y_float, gx_float, gw_float = _run(float_path, x, autocast=False)
    y_int, gx_int, gw_int = _run(int_path, x, autocast=False)
    assert y_int.dtype == torch.float32 and y_int.shape == y_float.shape
    assert torch.allclose(y_int, y_float, rtol=1e-5, atol=1e-6 * float(y_float.detach().abs().max()))
    # The upstream gradient depends on y, so compare the backward on equal footing: the float path's own y.
    g = 2 * y_float.detach()
    for layer in (float_path, int_path):
        layer.update_param.grad = None
    xs = [x.detach().requires_grad_() for _ in range(2)]
    for layer, xi in zip((float_path, int_path), xs):
        layer(xi).backward(g)
    assert torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(float_path.update_param.grad, int_path.update_param.grad)


def test_under_bf16_autocast_the_output_is_bf16_and_close():
    float_path, int_path = _twins(TernaryGrid, per_row=False)
    x = torch.randn(4, 64)
    y_float, *_ = _run(float_path, x, autocast=True)
    y_int, *_ = _run(int_path, x, autocast=True)
    assert y_int.dtype == y_float.dtype == torch.bfloat16
    assert torch.allclose(y_int.float(), y_float.float(), rtol=2e-2, atol=2e-2)


def test_training_with_integer_matmuls_keeps_integer_weights_and_learns(one_thread):
    model = make_model()
    trainer = fit(model, bits=1.58, steps=30, int8_matmul=True)
    layers = list(dqt_layers(model))
    assert layers and all(layer.int8_matmul and layer.weight.dtype == torch.int8 for layer in layers)
    assert float(trainer.callback_metrics["train/loss"]) < 4.6  # ln(128) = 4.85 at the start


@pytest.mark.parametrize("plugin,message", [({"mode": "ste"}, "int8_matmul applies to DQT weights only"),
                                           ({"precision": "fp8"}, "choose one")])
def test_int8_matmul_refuses_what_it_cannot_serve(plugin, message):
    with pytest.raises(ConfigError, match=message):
        QuantPrecision.from_settings(int8_matmul=True, **plugin)
