"""Integer grids, absmean initialisation, BitNet's weight and activation quantizers, and ternary packing.

Direct Quantized Training (Zhao et al., arXiv 2412.04787; reference code github.com/KYuuto1006/DQT) keeps a linear
weight only as ``W = alpha * q`` with an integer tensor ``q`` on a low-bit grid (:class:`Grid`). After every optimizer
step the float step ``delta`` is written straight onto the grid with stochastic rounding,
``q_new = clip(floor(q - delta/alpha + u))``, ``u ~ U[0, 1)``: that step is :mod:`dqt_lightning.quant.step`, its
rounding rules and noise :mod:`dqt_lightning.quant.rounding`. Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from dqt_lightning.errors import ConfigError


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


def ste_quantize(w: torch.Tensor, grid: Grid, strength: float = 1.0) -> torch.Tensor:
    """BitNet's weight fake-quantizer: the forward sees ``alpha * q``, the backward passes straight through to ``w``.

    ``strength`` (lambda, in [0, 1]) blends the two, ``w + lambda * (alpha * q - w)``: the warm-up of Hugging Face's
    1.58-bit fine-tuning, which turns a pretrained float model ternary gradually. 1 is BitNet's quantizer exactly.
    """
    q, alpha = absmean_quantize(w, grid)
    w_q = (q.to(w.dtype) * alpha.to(w.dtype)).detach()
    return w + (w_q - w).detach() if strength == 1.0 else w + strength * (w_q - w).detach()


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


def quantize_activations(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Per-token absmax 8-bit fake quantization with a straight-through estimator, as in BitNet b1.58.

    ``s = 127 / max|x|`` per token, ``x_q = clip(round(x * s), -128, 127) / s``; the gradient passes to ``x`` unchanged.
    One custom autograd node instead of the usual ``x + (x_q - x).detach()``: the same values (``x_q - x`` is exact,
    since ``x_q`` lies within a factor of two of ``x``, so adding ``x`` back gives ``x_q`` bit for bit) and the same
    gradient, without two full-size temporaries and two autograd nodes per projection. ``strength`` below 1 blends,
    ``x + strength * (x_q - x)`` (see :func:`ste_quantize`).
    """
    x_q = _ActivationQuantizer.apply(x)
    return x_q if strength == 1.0 else x + strength * (x_q - x)


class SharedInputQuantizer:
    """Quantizes a projection's input once however many projections read it.

    ``q_proj``, ``k_proj`` and ``v_proj`` read the same tensor, as do ``gate_proj`` and ``up_proj``. The quantized
    activation depends on that tensor alone, so the first of them computes it (in the compute dtype) and the others
    reuse it: 4 instead of 7 quantizations per block, and one saved copy for their backward instead of three. The
    cache is one slot, keyed by the very tensor object (a weak reference, so it never keeps an input alive), its
    in-place version counter and the compute dtype; it is emptied as soon as that input is freed.
    """

    def __init__(self) -> None:
        self._input: weakref.ref | None = None
        self._key: tuple[int, torch.dtype] | None = None
        self._quantized: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, dtype: torch.dtype):
        """``x_q`` in ``dtype``; or, for ``dtype=torch.int8``, the int8 levels and their scale
        (:func:`activation_levels`)."""
        if torch.compiler.is_compiling() or x.is_inference():
            # The compiler dedupes on its own; inference tensors carry no version counter to key on.
            return self._quantize(x, dtype)
        key = (x._version, dtype)
        if self._input is not None and self._input() is x and self._key == key:
            return self._quantized
        quantized = self._quantize(x, dtype)
        self._input, self._key, self._quantized = weakref.ref(x, self._forget), key, quantized
        return quantized

    @staticmethod
    def _quantize(x: torch.Tensor, dtype: torch.dtype):
        return activation_levels(x) if dtype == torch.int8 else fake_quantize_activations(x).to(dtype)

    def _forget(self, ref: weakref.ref) -> None:
        if ref is self._input:
            self._input = self._key = self._quantized = None


quantize_input = SharedInputQuantizer()


def pack_ternary(q: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Pack ternary levels {-1, 0, 1} four per byte (2 bits each, stored as level + 1) into a flat uint8 tensor.

    ``check=False`` skips the range check (and its host sync) for levels that come straight off the ternary grid.
    """
    # One byte-sized temporary for int8 levels (a 7B model packs 6.5 billion of them at every step): level + 1 in
    # int8 is exact for {-1, 0, 1}, and anything else lands outside [0, 2] as uint8, wrapped or not.
    flat = q.reshape(-1)
    flat = (flat + 1).view(torch.uint8) if flat.dtype == torch.int8 else (flat.to(torch.int16) + 1).to(torch.uint8)
    if check and flat.numel() and (flat.max() > 2):
        raise ValueError("pack_ternary takes only the levels -1, 0 and 1")
    pad = (-flat.numel()) % 4
    flat = (torch.cat([flat, flat.new_zeros(pad)]) if pad else flat).view(-1, 4)
    return flat[:, 0] | (flat[:, 1] << 2) | (flat[:, 2] << 4) | (flat[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 levels of the given shape, in one byte-sized temporary."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts).bitwise_and_(3)  # element 4k + i in bits 2i of byte k, as 0, 1, 2
    return codes.view(torch.int8).reshape(-1)[:math.prod(shape)].sub_(1).reshape(shape)
