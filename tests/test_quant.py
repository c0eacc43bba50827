import math

import pytest
import torch

from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.grid import (Grid, TernaryGrid, absmean_quantize, pack_ternary, quantize_activations,
                                     unpack_ternary)
from dqt_lightning.quant.rounding import WEIGHTS, counter_uniform, noise_keys, step_seed
from dqt_lightning.quant.step import dqt_step, rescaled_step, round_to_grid


def _key(seed: int) -> torch.Tensor:
    return noise_keys(seed)[WEIGHTS]


@pytest.mark.parametrize("bits,qmin,qmax", [(1.58, -1, 1), (2, -2, 1), (3, -4, 3), (4, -8, 7), (8, -128, 127)])
def test_grid_ranges(bits, qmin, qmax):
    grid = Grid.from_bits(bits)
    assert (grid.qmin, grid.qmax) == (qmin, qmax)


def test_symmetric_grid_and_ternary():
    assert (Grid.from_bits(4, symmetric=True).qmin, Grid.from_bits(4, symmetric=True).qmax) == (-7, 7)
    assert Grid.from_bits(1.58) is TernaryGrid and TernaryGrid.is_ternary


@pytest.mark.parametrize("bits", [0, 1, 9, 2.5, -3])
def test_bad_bits_name_the_field(bits):
    with pytest.raises(ConfigError, match="bits must be 1.58"):
        Grid.from_bits(bits)


@pytest.mark.parametrize("bits", [1.58, 4, 8])
def test_absmean_init_follows_the_rule(bits):
    grid = Grid.from_bits(bits)
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.02
    q, alpha = absmean_quantize(w, grid)
    assert q.dtype == torch.int8 and q.min() >= grid.qmin and q.max() <= grid.qmax
    assert torch.allclose(alpha, w.abs().mean() / grid.qmax)
    expected = torch.round(w / alpha).clamp(grid.qmin, grid.qmax)
    assert torch.equal(q.float(), expected)


def test_absmean_per_row_scale_has_one_per_row():
    w = torch.randn(16, 8)
    q, alpha = absmean_quantize(w, TernaryGrid, per_row=True)
    assert alpha.shape == (16, 1)
    assert torch.allclose(alpha.squeeze(1), w.abs().mean(dim=1))


def test_stochastic_rounding_is_unbiased():
    # 200k draws of each of 16 fractional values: the mean of floor(y + u) has standard deviation
    # sqrt(p(1-p)/n) <= 0.0011, so a tolerance of 0.006 is over 5 sigma.
    y = torch.linspace(-2.9, 2.9, 16)
    draws = round_to_grid(y.expand(200_000, 16), Grid.from_bits(8), "stochastic", _key(1)).float()
    assert torch.allclose(draws.mean(0), y, atol=0.006)
    # ... and it is really random: both neighbours occur for a non-integer value.
    assert set(draws[:, 3].unique().tolist()) == {math.floor(y[3].item()), math.ceil(y[3].item())}


def test_nearest_is_deterministic_and_loses_small_updates():
    y = torch.tensor([0.3, 0.49, -0.3, 1.7])
    a = round_to_grid(y, TernaryGrid, "nearest", None)
    b = round_to_grid(y, TernaryGrid, "nearest", _key(5))
    assert torch.equal(a, b) and a.tolist() == [0, 0, 0, 1]


def test_round_to_grid_clips_to_the_grid():
    y = torch.tensor([-7.0, 5.0, 0.2])
    out = round_to_grid(y, TernaryGrid, "stochastic", _key(0))
    assert out.dtype == torch.int8 and out[0] == -1 and out[1] == 1


def test_same_seed_same_noise_different_layer_different_noise():
    y = torch.rand(1000) * 4 - 2
    draw = lambda seed: round_to_grid(y, Grid.from_bits(4), "stochastic", _key(seed))
    assert torch.equal(draw(step_seed(7, 3, 0)), draw(step_seed(7, 3, 0)))
    assert not torch.equal(draw(step_seed(7, 3, 0)), draw(step_seed(7, 3, 1)))
    assert not torch.equal(draw(step_seed(7, 3, 0)), draw(step_seed(7, 4, 0)))


def test_dqt_step_without_a_move_keeps_every_level():
    grid = Grid.from_bits(8)
    q, alpha = absmean_quantize(torch.randn(128, 64) * 0.02, grid)
    unmoved = q.float() * alpha
    for seed in range(5):
        assert torch.equal(dqt_step(q, alpha, unmoved, grid, "stochastic", _key(seed)), q)


def test_dqt_step_moves_by_delta_over_alpha_in_expectation():
    grid = Grid.from_bits(8)
    q = torch.zeros(200_000, dtype=torch.int8)
    alpha = torch.tensor(0.01)
    stepped = q.float() * alpha - 0.0023  # a move of -0.23 grid steps, below half a step
    sr = dqt_step(q, alpha, stepped, grid, "stochastic", _key(0))
    nearest = dqt_step(q, alpha, stepped, grid, "nearest", None)
    assert abs(sr.float().mean().item() + 0.23) < 0.005
    assert torch.count_nonzero(nearest) == 0  # round-to-nearest loses the update entirely


@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_absmax_rescale_spans_the_stepped_weight_and_is_unbiased(per_row):
    grid = Grid.from_bits(4)
    stepped = torch.randn(6, 50_000, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 7).unsqueeze(1)
    q, alpha = rescaled_step(stepped, grid, per_row, "stochastic", _key(2))
    amax = stepped.abs().amax(dim=1, keepdim=True) if per_row else stepped.abs().amax()
    assert torch.allclose(alpha, amax / 7)
    assert alpha.shape == ((6, 1) if per_row else ())
    assert q.dtype == torch.int8 and int(q.max()) <= 7 and int(q.min()) >= -7  # nothing clipped: the grid spans W'
    # E[alpha * q] = W': the row means of the rounding error shrink like 1/sqrt(n), far below one grid step.
    error = (q.float() * alpha - stepped) / alpha
    assert error.mean(dim=1).abs().max() < 0.01
    nearest, _ = rescaled_step(stepped, grid, per_row, "nearest", None)
    assert torch.equal(nearest, torch.round(stepped / alpha).to(torch.int8))


def test_absmax_initialisation_uses_the_largest_magnitude():
    w = torch.tensor([[0.5, -2.0, 1.0], [0.1, 0.2, -0.4]])
    q, alpha = absmean_quantize(w, Grid.from_bits(8), per_row=True, statistic="absmax")
    assert torch.allclose(alpha, torch.tensor([[2.0 / 127], [0.4 / 127]]))
    assert q[0, 1] == -127 and q[1, 2] == -127


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (1,), (7, 3, 2)])
def test_pack_unpack_ternary_round_trip(shape):
    q = torch.randint(-1, 2, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(q.numel() / 4)
    assert torch.equal(unpack_ternary(packed, shape), q)


def test_pack_ternary_rejects_other_levels():
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([2, 0], dtype=torch.int8))


def test_activation_quantizer_levels_and_straight_through():
    x = torch.randn(3, 5, 16, requires_grad=True)
    xq = quantize_activations(x)
    s = 127 / x.detach().abs().amax(-1, keepdim=True)
    levels = xq.detach() * s
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.abs().max() <= 127.001
    xq.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _textbook_activations(x: torch.Tensor) -> torch.Tensor:
    # BitNet b1.58's expression with the usual detach-style STE, written out as the paper gives it.
    x32 = x.float()
    s = 127.0 / x32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    x_q = (torch.round(x32 * s).clamp(-128, 127) / s).to(x.dtype)
    return x + (x_q - x).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_activation_quantizer_is_bit_identical_to_the_textbook_ste(dtype):
    gen = torch.Generator().manual_seed(0)
    for magnitude in (1e-6, 1e-2, 1.0, 1e3):
        x = torch.randn(16, 64, 96, generator=gen) * magnitude
        x = x * torch.rand(x.shape, generator=gen) ** 4  # many values far below the token's peak
        x[:, :, :7] = 0
        x[0] = 0  # an all-zero token: the 1e-5 floor on the peak
        x = x.to(dtype).requires_grad_()
        fused, textbook = quantize_activations(x), _textbook_activations(x)
        assert fused.dtype == textbook.dtype == dtype
        assert torch.equal(fused, textbook)
        upstream = torch.randn(x.shape, generator=gen).to(dtype)
        (grad_fused,) = torch.autograd.grad(fused, x, upstream)
        (grad_textbook,) = torch.autograd.grad(textbook, x, upstream)
        assert torch.equal(grad_fused, grad_textbook) and torch.equal(grad_fused, upstream)


@pytest.mark.parametrize("bits,per_row", [(1.58, False), (8, False), (4, True)])
def test_dqt_step_is_bit_identical_to_the_textbook_update(bits, per_row):
    grid = Grid.from_bits(bits)
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(grid.qmin, grid.qmax + 1, (48, 40), generator=gen, dtype=torch.int8)
    alpha = torch.rand(48, 1, generator=gen) * 0.05 + 0.001 if per_row else torch.tensor(0.0173)
    unmoved = q.float() * alpha
    stepped = unmoved + torch.randn(q.shape, generator=gen) * alpha * 0.7
    stepped[:5] = unmoved[:5]  # rows the optimizer did not move
    y = q.float() + (stepped - q.float() * alpha) / alpha
    for seed in (0, 1, 2):
        u = counter_uniform(_key(seed), q.shape)
        expected = torch.floor(y + u).clamp(grid.qmin, grid.qmax).to(torch.int8)
        got = dqt_step(q, alpha, stepped, grid, "stochastic", _key(seed))
        assert torch.equal(got, expected)
        assert torch.equal(got[:5], q[:5])
    nearest = dqt_step(q, alpha, stepped, grid, "nearest", None)
    assert torch.equal(nearest, torch.round(y).clamp(grid.qmin, grid.qmax).to(torch.int8))
    # The caller's tensors are read only: the update works in its own buffers.
    assert torch.equal(stepped[:5], unmoved[:5])


def test_rounding_leaves_its_input_alone():
    y = torch.linspace(-2, 2, 101)
    before = y.clone()
    for rounding in ("stochastic", "nearest"):
        round_to_grid(y, Grid.from_bits(4), rounding, _key(0))
        assert torch.equal(y, before)
