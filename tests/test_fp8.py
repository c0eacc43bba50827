"""The fp8 precision: FP8 matmul numerics, the hardware check, its one-line refusal, and the wiring into every mode.

``torch._scaled_mm`` (and torchao's float8 layers) run on CPU, so everything but the speed and the CUDA kernels is
checked here; training on a GPU with FP8 tensor cores has not been run in this project.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dqt_lightning.cli import main
from dqt_lightning.quant import fp8
from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.fp8 import convert_fp_linears, fp8_linear, fp8_matmul, fp8_unsupported_reason
from dqt_lightning.quant.layers import BitLinear, DQTLinear
from dqt_lightning.train.precision import Execution, is_projection, PROJECTIONS, QuantPrecision
from dqt_lightning.quant.grid import Grid
from tests.conftest import fit, make_model

REPO = Path(__file__).resolve().parents[1]


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference).norm() / reference.norm()).item()


def test_fp8_matmul_is_a_float_matmul_within_fp8_tolerance():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 5, 64, generator=gen), torch.randn(48, 64, generator=gen)
    y = fp8_matmul(x, weight)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    error = _relative_error(y, x @ weight.t())
    # e4m3 keeps 3 mantissa bits: a few percent, and never exact (that would mean no FP8 cast happened).
    assert 1e-3 < error < 0.06, error


def test_fp8_matmul_scales_each_row_on_its_own():
    # Rows of wildly different magnitudes: one scale per tensor would flush the small ones to zero (an error of
    # about 2 on this measure; per-row scales stay near 0.1 at worst).
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 256, generator=gen) * torch.tensor([[1e-4], [1.0], [1e3], [0.0]])
    weight = torch.randn(16, 256, generator=gen) * torch.logspace(-3, 3, 16).unsqueeze(1)
    y, reference = fp8_matmul(x, weight), x @ weight.t()
    assert torch.isfinite(y).all() and (y[3] == 0).all()
    # Each output's error relative to the typical size of a dot product of these two rows.
    typical = x[:3].norm(dim=1, keepdim=True) * weight.norm(dim=1) / 256**0.5
    assert ((y[:3] - reference[:3]).abs() / typical).max() < 0.25


def test_fp8_matmul_falls_back_to_a_plain_matmul_for_unaligned_widths():
    gen = torch.Generator().manual_seed(2)
    x, weight = torch.randn(2, 3, 24, generator=gen), torch.randn(32, 24, generator=gen)
    torch.testing.assert_close(fp8_matmul(x, weight), F.linear(x, weight), rtol=0, atol=0)


def test_fp8_linear_runs_in_bf16_under_autocast_with_bf16_gradients():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 64, generator=gen, requires_grad=True)
    weight = torch.randn(32, 64, generator=gen, requires_grad=True)
    x_ref, weight_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    g = torch.randn(2, 8, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, weight)
        reference = F.linear(x_ref, weight_ref)
    assert y.dtype == torch.bfloat16
    assert 1e-3 < _relative_error(y, reference.float()) < 0.06
    y.backward(g)
    reference.backward(g)
    assert x.grad.dtype == weight.grad.dtype == torch.float32
    # The backward matmuls are the bf16 ones autocast's F.linear runs, on the same bf16 operands.
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(weight.grad, weight_ref.grad, rtol=1e-2, atol=1e-2)


def test_dqt_and_bitnet_layers_use_fp8_only_in_the_forward_matmul():
    gen = torch.Generator().manual_seed(4)
    source = nn.Linear(64, 32, bias=False)
    x = torch.randn(2, 8, 64, generator=gen)
    g = torch.randn(2, 8, 32, generator=gen)
    for make in (lambda: DQTLinear.from_linear(source, Grid.from_bits(1.58), "stochastic"),
                 lambda: BitLinear.from_linear(source, Grid.from_bits(1.58))):
        outputs, grads = [], []
        for use_fp8 in (False, True):
            layer, x_in = make(), x.clone().requires_grad_()
            layer.fp8 = use_fp8
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x_in)
            y.backward(g)
            weight_grad = layer.update_param.grad if isinstance(layer, DQTLinear) else layer.weight.grad
            outputs.append(y.float())
            grads.append((x_in.grad, weight_grad))
        assert 1e-3 < _relative_error(outputs[1], outputs[0]) < 0.06
        # Same upstream gradient, same bf16 backward: identical gradients.
        for plain, with_fp8 in zip(*grads):
            torch.testing.assert_close(with_fp8, plain, rtol=0, atol=0)


def test_the_reason_names_the_missing_hardware(monkeypatch):
    assert fp8_unsupported_reason(torch.device("cpu")) == "this machine trains on cpu"
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    reason = fp8_unsupported_reason(torch.device("cuda:0"))
    assert reason.startswith("cuda:0 is compute capability 8.0") and "8.9+" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    assert fp8_unsupported_reason(torch.device("cuda:0")) is None
    find_spec = importlib.util.find_spec
    without_torchao = lambda name, *args: None if name == "torchao" else find_spec(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", without_torchao)
    assert fp8_unsupported_reason(torch.device("cuda:0")) == "torchao is not installed"


def test_fp8_on_cpu_stops_before_training_with_the_field_name(one_thread):
    with pytest.raises(ConfigError) as error:
        fit(make_model(), mode="dqt", precision="fp8")
    message = str(error.value)
    assert message.startswith("trainer.plugins.execution.precision: fp8 needs") and "cpu" in message
    assert message.endswith("use bf16-mixed") and "\n" not in message


def test_the_fp8_overlay_on_cpu_ends_in_one_error_line(tmp_path, data_cache, monkeypatch, capsys, one_thread):
    # `python -m dqt_lightning fit ...`'s main(), in this process (tests/test_cli.py runs the real entry point).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dqt_lightning"])
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "configs/ternary.yaml"), "--config", str(REPO / "configs/precision/fp8.yaml"),
              "--config", str(REPO / "configs/model/tiny.yaml"), "--trainer.max_steps", "1",
              "--data.init_args.vocab_size", "512", "--data.init_args.cache_dir", data_cache])
    stderr = capsys.readouterr().err
    assert done.value.code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    naming = [line for line in stderr.splitlines() if "trainer.plugins.execution.precision" in line]
    assert len(naming) == 1 and naming[0].startswith("error: trainer.plugins.execution.precision: fp8"), stderr[-2000:]
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == naming


def test_fp_mode_conversion_swaps_exactly_the_projections():
    from torchao.float8.float8_linear import Float8Linear

    model = make_model()
    parameters = dict(model.named_parameters())
    convert_fp_linears(model, is_projection)
    converted = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    expected = {name for name, m in make_model().named_modules()
                if type(m) is nn.Linear and name.rsplit(".", 1)[-1] in PROJECTIONS}
    assert converted == expected and len(expected) == len(PROJECTIONS) * model.config.n_layer
    assert type(model.model.lm_head) is nn.Linear
    # The optimizer, built before the swap, keeps training the same tensors.
    assert all(parameters[name] is p for name, p in model.named_parameters()) and parameters.keys() == dict(
        model.named_parameters()).keys()
    convert_fp_linears(model, is_projection)  # a second call must not wrap Float8Linear again
    assert {name for name, m in model.named_modules() if isinstance(m, Float8Linear)} == converted


def test_fp_mode_conversion_leaves_unaligned_widths_alone():
    from torchao.float8.float8_linear import Float8Linear

    block = nn.ModuleDict({"q_proj": nn.Linear(32, 24, bias=False), "k_proj": nn.Linear(32, 32, bias=False)})
    convert_fp_linears(block, is_projection)
    assert type(block["q_proj"]) is nn.Linear and isinstance(block["k_proj"], Float8Linear)


@pytest.mark.parametrize("mode", ["fp", "ste", "dqt"])
def test_every_mode_trains_with_fp8_matmuls_where_the_hardware_check_passes(mode, monkeypatch, one_thread):
    # CPU stands in for an FP8 GPU: only the device check is bypassed, every matmul below is a real _scaled_mm.
    monkeypatch.setattr("dqt_lightning.quant.fp8.fp8_unsupported_reason", lambda device: None)
    scaled_mm_calls = []
    scaled_mm = torch._scaled_mm

    def counting(*args, **kwargs):
        scaled_mm_calls.append(args[0].shape)
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    model = make_model()
    trainer = fit(model, mode=mode, steps=2, precision="fp8")
    assert trainer.global_step == 2
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    projections = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS]
    assert len(projections) == len(PROJECTIONS) * model.config.n_layer
    if mode == "fp":
        from torchao.float8.float8_linear import Float8Linear

        assert all(isinstance(m, Float8Linear) for m in projections)
    else:
        assert all(m.fp8 for m in projections)
        assert not getattr(model.model.lm_head, "fp8", False)
    assert len(scaled_mm_calls) >= 2 * len(projections)  # every projection, every step


def test_fp8_runs_under_bf16_autocast_and_bad_values_are_still_refused():
    plugin = QuantPrecision(execution=Execution(precision="fp8"))
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="trainer.plugins.execution.precision"):
        QuantPrecision(execution=Execution(precision="fp4"))
    assert fp8.FP8_MAX == 448
