"""The whole DQT method: integer grids, absmean initialisation, rounding, and the quantized update.

Direct Quantized Training (Zhao et al., arXiv 2412.04787; reference code github.com/KYuuto1006/DQT) keeps a linear
weight only as ``W = alpha * q`` with an integer tensor ``q`` on a low-bit grid. After every optimizer step the float
step ``delta`` is written straight onto the grid with stochastic rounding: ``q_new = clip(floor(q - delta/alpha + u))``,
``u ~ U[0, 1)``. SR is unbiased, so updates far smaller than one grid step still move the weight in expectation;
round-to-nearest (the ``nearest`` ablation) loses them. Everything here is a pure function of its arguments; random
draws come from an explicit ``torch.Generator`` so that every DDP rank and every resumed run draws the same noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dqt_lightning.errors import ConfigError

ROUNDINGS = ("stochastic", "nearest")


@dataclass(frozen=True)
class Grid:
    """The integer levels a quantized weight may take: ``qmin <= q <= qmax``.

    Args:
        bits: 1.58 for ternary, else the integer bit width 2..8.
        qmin: Lowest level.
        qmax: Highest level.
    """

    bits: float
    qmin: int
    qmax: int

    @classmethod
    def from_bits(cls, bits: float, symmetric: bool = False, field: str = "bits") -> Grid:
        """Ternary {-1, 0, 1} for 1.58 bits; [-2^(n-1), 2^(n-1) - 1] for n = 2..8 (asymmetric, as the official
        code), or [-(2^(n-1) - 1), 2^(n-1) - 1] when ``symmetric``."""
        if math.isclose(bits, 1.58, abs_tol=1e-6):
            return TernaryGrid
        if bits != int(bits) or not 2 <= bits <= 8:
            raise ConfigError(f"{field} must be 1.58 (ternary) or an integer from 2 to 8; got {bits}")
        n = int(bits)
        qmax = 2 ** (n - 1) - 1
        return cls(float(n), -qmax if symmetric else -qmax - 1, qmax)

    @classmethod
    def from_levels(cls, qmin: int, qmax: int) -> Grid:
        """The grid of :meth:`from_bits` whose levels run from ``qmin`` to ``qmax``."""
        if (qmin, qmax) == (-1, 1):
            return TernaryGrid
        grid = cls.from_bits(qmax.bit_length() + 1, symmetric=qmin == -qmax)
        if (grid.qmin, grid.qmax) != (qmin, qmax):
            raise ValueError(f"no grid has levels [{qmin}, {qmax}]")
        return grid

    @property
    def positive_levels(self) -> int:
        """``Qp`` in the absmean rule: the largest positive level."""
        return self.qmax

    @property
    def is_ternary(self) -> bool:
        return self.qmin == -1 and self.qmax == 1


TernaryGrid = Grid(1.58, -1, 1)


@torch.no_grad()
def absmean_quantize(w: torch.Tensor, grid: Grid, per_row: bool = False,
                     statistic: str = "absmean") -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58's absmean quantizer, generalised to n bits as the official DQT code does.

    ``alpha = mean(|w|) / Qp`` (per tensor, or per output row), ``q = clip(round(w / alpha), qmin, qmax)``.
    ``statistic="absmax"`` uses ``max(|w|)`` instead (the start of the ``absmax`` scale policy).
    Computed in float32. Returns ``(q as int8, alpha as float32)``; ``alpha`` is a scalar or shaped ``[rows, 1]``.
    """
    w32 = w.float()
    reduce = torch.amax if statistic == "absmax" else torch.mean
    magnitude = w32.abs()
    stat = reduce(magnitude, dim=1, keepdim=True) if per_row else reduce(magnitude)
    alpha = stat.clamp(min=1e-8) / grid.positive_levels
    q = torch.round(w32 / alpha).clamp_(grid.qmin, grid.qmax)
    return q.to(torch.int8), alpha


def ste_quantize(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """BitNet's weight fake-quantizer: the forward sees ``alpha * q``, the backward passes straight through to ``w``."""
    q, alpha = absmean_quantize(w, grid)
    w_q = (q.to(w.dtype) * alpha.to(w.dtype)).detach()
    return w + (w_q - w).detach()


@torch.no_grad()
def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit fake quantization without autograd: ``s = 127 / max|x|`` per token,
    ``x_q = clip(round(x * s), -128, 127) / s``, computed in float32 and returned in ``x``'s dtype.

    The levels are rounded, clipped and rescaled in place in one buffer; the values are exactly those of the
    textbook expression.
    """
    x32 = x.float()
    s = 127.0 / x32.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-5)
    levels = x32.mul_(s) if x32 is not x else x32 * s  # x.float() made a copy we may overwrite, or it is x itself
    return levels.round_().clamp_(-128, 127).div_(s).to(x.dtype)


@torch.no_grad()
def activation_levels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer side of :func:`fake_quantize_activations`: per-token int8 levels and their float32 scale ``s``,
    ``levels = clip(round(x * s), -128, 127)`` with ``s = 127 / max|x|``, so that ``levels / s`` is ``x_q``. For
    integer matmuls (``torch._int_mm``), where the products of levels are summed exactly."""
    x32 = x.float()
    s = 127.0 / x32.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-5)
    levels = x32.mul_(s) if x32 is not x else x32 * s
    return levels.round_().clamp_(-128, 127).to(torch.int8), s


class _ActivationQuantizer(torch.autograd.Function):
    """:func:`fake_quantize_activations` with a straight-through gradient, as one autograd node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activations(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit fake quantization with a straight-through estimator, as in BitNet b1.58.

    ``s = 127 / max|x|`` per token, ``x_q = clip(round(x * s), -128, 127) / s``; the gradient passes to ``x`` unchanged.
    One custom autograd node instead of the usual ``x + (x_q - x).detach()``: the same values (``x_q - x`` is exact,
    since ``x_q`` lies within a factor of two of ``x``, so adding ``x`` back gives ``x_q`` bit for bit) and the same
    gradient, without two full-size temporaries and two autograd nodes per projection.
    """
    return _ActivationQuantizer.apply(x)


def stochastic_round(y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``floor(y + u)`` with ``u ~ U[0, 1)``: rounds up with probability equal to the fractional part, so
    ``E[stochastic_round(y)] = y``."""
    u = torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)
    return u.add_(y.float()).floor_()  # u + y == y + u bit for bit; the noise buffer doubles as the result


def round_to_grid(y: torch.Tensor, grid: Grid, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    """Round float grid coordinates onto ``grid`` (stochastic or nearest) and return int8 levels."""
    if rounding == "stochastic":
        r = stochastic_round(y, generator)
    elif rounding == "nearest":
        r = torch.round(y.float())
    else:
        raise ConfigError(f"rounding must be one of {', '.join(ROUNDINGS)}; got '{rounding}'")
    return r.clamp_(grid.qmin, grid.qmax).to(torch.int8)


@torch.no_grad()
def quantized_step(
    q: torch.Tensor,
    alpha: torch.Tensor,
    stepped: torch.Tensor,
    grid: Grid,
    rounding: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The DQT update: the optimizer moved the dequantized weight ``alpha * q`` to ``stepped``; write that move onto the
    grid with one rounding: ``y = q + (stepped - alpha*q) / alpha`` (``= q - delta/alpha``), ``q_new = round(y)``.

    Taking the difference against the very same ``alpha * q`` product the optimizer started from makes ``y == q``
    exactly when the optimizer did not move the weight, so an idle weight never flips by float noise.
    """
    # In place in one float buffer: y = q + ((-(alpha*q)) + stepped) / alpha, the same IEEE operations, in an order
    # that float addition's commutativity makes bit-identical to the textbook q + (stepped - alpha*q) / alpha.
    levels = q.float()
    y = levels * alpha
    y.neg_().add_(stepped.float()).div_(alpha).add_(levels)
    return round_to_grid(y, grid, rounding, generator)


@torch.no_grad()
def rescaled_step(stepped: torch.Tensor, grid: Grid, per_row: bool, rounding: str,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``absmax`` scale policy (torchao's int8 quantized training): the scale follows the weight instead of staying
    fixed. From the optimizer's stepped weight ``W'``, ``alpha' = max|W'| / Qp`` (per row, or per tensor), then
    ``q' = round(W' / alpha')`` with one rounding as in :func:`quantized_step`. Nothing is clipped except the
    asymmetric grid's unused lowest level, and SR keeps ``E[alpha' q'] = W'``.

    Returns:
        ``(q' as int8, alpha' as float32)``, ``alpha'`` shaped ``[rows, 1]`` or a scalar.
    """
    w = stepped.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
    alpha = amax.clamp_(min=1e-8) / grid.positive_levels
    return round_to_grid(w / alpha, grid, rounding, generator), alpha


def step_seed(run_seed: int, step: int, layer: int) -> int:
    """A 63-bit seed for one layer at one optimizer step. Every rank and every resumed run derives the same seed, so
    they draw the same SR noise without sharing generator state."""
    mixed = (run_seed * 1_000_003 + step) * 1_000_033 + layer
    return mixed % (2**63 - 1)


def pack_ternary(q: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Pack ternary levels {-1, 0, 1} four per byte (2 bits each, stored as level + 1) into a flat uint8 tensor.

    ``check=False`` skips the range check (and its host sync) for levels that come straight off the ternary grid.
    """
    flat = (q.reshape(-1).to(torch.int16) + 1).to(torch.uint8)
    if check and flat.numel() and (flat.max() > 2):
        raise ValueError("pack_ternary takes only the levels -1, 0 and 1")
    pad = (-flat.numel()) % 4
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 4)
    return flat[:, 0] | (flat[:, 1] << 2) | (flat[:, 2] << 4) | (flat[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 levels of the given shape."""
    codes = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)
    n = math.prod(shape)
    return (codes[:n].to(torch.int8) - 1).reshape(shape)
