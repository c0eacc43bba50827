"""Tests for the memory measurement: real storage sizes, and bytes per parameter of each training mode."""

from __future__ import annotations

import pytest
import torch

from dqt_lightning.tools.memory import StateBytes, measure, quantized_state_bytes, storage_bytes
from dqt_lightning.model import LLaMA, Config
from dqt_lightning.train.precision import Method, QuantPrecision

REL = 1e-3  # AdamW's 0-dim step counters add 4 bytes per tensor: ~1e-4 bytes per parameter on the tiny model


@pytest.fixture(scope="module")
def per_param() -> dict[str, dict[str, float]]:
    # One short real Lightning run per mode, shared by every test below (each run takes well under a second).
    return {mode: measure(mode).per_param() for mode in ("fp", "ste", "dqt")}


def test_storage_bytes_counts_allocation_not_shape() -> None:
    assert storage_bytes(torch.zeros(()).expand(8, 8)) == 4
    assert storage_bytes(torch.zeros(8, 8)) == 256
    assert storage_bytes(torch.zeros(8, 8, dtype=torch.int8)) == 64


def test_state_bytes_totals_and_per_param() -> None:
    state = StateBytes(weights=10, grads=40, optimizer_states=80, n_params=10)
    assert state.total == 130
    assert state.per_param() == {"weights": 1.0, "grads": 4.0, "optimizer_states": 8.0, "total": 13.0}


def test_dqt_ternary_keeps_one_byte_weights(per_param: dict[str, dict[str, float]]) -> None:
    dqt = per_param["dqt"]
    # int8 levels + one float scale and one 4-byte placeholder per layer; a float copy left behind would show as 5.
    assert 1.0 < dqt["weights"] < 1.01
    assert dqt["grads"] == 4.0
    assert dqt["optimizer_states"] == pytest.approx(8.0, rel=REL)


@pytest.mark.parametrize("mode", ["fp", "ste"])
def test_float_modes_keep_float32_weights(per_param: dict[str, dict[str, float]], mode: str) -> None:
    state = per_param[mode]
    assert state["weights"] == pytest.approx(4.0, rel=REL)
    assert state["grads"] == pytest.approx(4.0, rel=REL)
    assert state["optimizer_states"] == pytest.approx(8.0, rel=REL)


def test_lean_dqt_state_by_component() -> None:
    # bf16 gradient buffers hold 2 bytes; the update in backward frees them before the step, so none persists.
    bf16_grads = measure("dqt", state_dtype="int8", grad_dtype="bfloat16").per_param()
    in_backward = measure("dqt", state_dtype="int8", update_in_backward=True).per_param()
    assert bf16_grads["grads"] == 2.0
    assert in_backward["grads"] == 0.0
    for state in (bf16_grads, in_backward):
        assert 1.0 < state["weights"] < 1.01
        assert 2.0 < state["optimizer_states"] < 2.1  # int8 codes + one float32 scale per 256-element block
    assert in_backward["total"] < 3.1


def test_dqt_needs_less_than_bitnet(per_param: dict[str, dict[str, float]]) -> None:
    assert per_param["dqt"]["total"] < per_param["ste"]["total"]


@pytest.mark.parametrize("mode", ["fp", "dqt"])
def test_finds_projections_in_bitlinear_layout(mode: str) -> None:
    # Microsoft's layout wraps every projection as (RMSNorm, Linear) in a Sequential named after the projection.
    config = Config(norm_layout="bitlinear", vocab_size=64)
    model = QuantPrecision(Method(mode=mode)).convert_module(LLaMA(config))
    d, h = config.n_embd, config.intermediate_size
    optimizer = torch.optim.AdamW(model.parameters())  # state-less: measured before any step
    state = quantized_state_bytes(model, optimizer)
    assert state.n_params == config.n_layer * (4 * d * d + 3 * d * h)
    assert state.grads == state.optimizer_states == 0
    assert state.weights == state.n_params * (4 if mode == "fp" else 1) + (0 if mode == "fp" else 28 * 8)


def test_model_without_projections_is_an_error() -> None:
    with pytest.raises(TypeError, match="no projection"):
        quantized_state_bytes(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.optim.SGD([torch.zeros(1)]))


def test_measure_restores_thread_count() -> None:
    # measure() runs single-threaded (robust under CPU contention) but must not change the caller's setting.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert measure("fp", steps=1).n_params > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
