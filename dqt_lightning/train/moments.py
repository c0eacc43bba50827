"""Lean optimizer-state formats: how a float32 moment is stored between steps, and read back.

- ``float32``: as computed (8 bytes per parameter for two moments);
- ``bfloat16``: 4 bytes per parameter, written back with stochastic rounding. Nearest rounding would freeze a moment
  whose per-step change is below half a bf16 step (0.2 %): with ``beta2 = 0.999`` the second moment could never decay;
- ``int8``: about 2 bytes per parameter. Each moment is cut into blocks of ``block_size`` elements with one float32
  scale (the block's absolute maximum) and one 8-bit code per element on a logarithmic grid, so small entries keep
  the same *relative* precision as large ones (a linear grid would round most second-moment entries of a block to
  zero, and ``m / sqrt(v)`` would explode). Codes are also written with stochastic rounding, unbiased in value.

The rounding noise is the counter-based noise of :mod:`dqt_lightning.quant.rounding`, one stream per moment; the
unfused optimizer (:class:`dqt_lightning.train.optim.AdamW`) and the fused DQT update call the same functions here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from dqt_lightning.quant.rounding import EXP_AVG, EXP_AVG_SQ, counter_bits, counter_uniform

STATE_DTYPES = ("float32", "bfloat16", "int8")

# The 8-bit grids, relative to a block's absolute maximum. First moment: a sign and 127 magnitudes from 2**-16 to 1
# (about 9 % apart) plus zero. Second moment (a square, so twice the dynamic range in log2): 255 magnitudes from
# 2**-32 to 1 (also about 9 % apart in v, 4.5 % in sqrt(v), which is what the update divides by) plus zero.
SIGNED_TOP, SIGNED_RANGE_LOG2 = 127, 16.0
UNSIGNED_TOP, UNSIGNED_RANGE_LOG2 = 255, 32.0


def _code_values(codes: torch.Tensor, top: int, range_log2: float) -> torch.Tensor:
    # Magnitude of each (float, non-negative) code: 0 for code 0, else 2**((code - top) * range_log2 / (top - 1)), so
    # code 1 is 2**-range_log2 and code ``top`` is 1. Encoder and decoder share this formula, hence the same values.
    values = torch.exp2((codes - top) * (range_log2 / (top - 1)))
    return values.mul_(codes > 0)


def stochastic_round_bf16(x: torch.Tensor, key: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Round float32 values to bfloat16 up or down at random, with ``E[result] = x``.

    bfloat16 is float32 without the low 16 bits of the mantissa. Adding a uniform integer from ``[0, 2**16)`` to the
    bit pattern and then dropping those bits rounds the magnitude up with probability equal to the dropped fraction.
    Sign and magnitude are separate bits, so this is unbiased for negative values too.

    Args:
        x: A float32 tensor.
        key: The noise stream (a row of :func:`~dqt_lightning.quant.rounding.noise_keys`); the top 16 of its 32
            counter-based bits per element are the integer added.

    Returns:
        A bfloat16 tensor of ``x``'s shape.
    """
    bits = x.contiguous().view(torch.int32)
    noise = (counter_bits(key, x.shape, offset) >> 16).to(torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 = 0xFFFF0000: exact in bf16


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    pad = (-flat.numel()) % block_size
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, block_size)


def _unblock(blocks: torch.Tensor, numel: int) -> torch.Tensor:
    # Flat again, without the padding. No slice when there is none: a compiled fused update would otherwise index
    # every element through a modulo and lose vectorization.
    flat = blocks.view(-1)
    return flat if numel % blocks.shape[1] == 0 else flat[:numel]


def _grid(signed: bool) -> tuple[int, float]:
    return (SIGNED_TOP, SIGNED_RANGE_LOG2) if signed else (UNSIGNED_TOP, UNSIGNED_RANGE_LOG2)


def quantize_blockwise(x: torch.Tensor, block_size: int, signed: bool, key: torch.Tensor,
                       offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` as 8-bit logarithmic codes and one float32 scale (absolute maximum) per block, rounding at random.

    Args:
        x: Float32 values; a signed code for the first moment, an unsigned one for the (non-negative) second moment.
        block_size: Elements per scale, taken from ``x`` flattened.
        signed: Whether ``x`` may be negative. An unsigned code never rounds a positive value to zero: the second
            moment divides the update, so it is rounded up to the smallest level instead (a smaller, safe step).
        key: The noise stream (a row of :func:`~dqt_lightning.quant.rounding.noise_keys`): uniform ``i`` rounds
            element ``i`` of ``x`` flattened.

    Returns:
        ``(codes, scales)``: ``int8`` codes (signed) or ``uint8`` codes (unsigned) of ``x``'s shape, and ``ceil(numel /
        block_size)`` float32 scales.
    """
    top, range_log2 = _grid(signed)
    flat = x.reshape(-1).float()
    blocks = _blocks(flat.abs(), block_size)
    scales = blocks.amax(dim=1)
    magnitude = _unblock(blocks / scales.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1), x.numel())
    # The two codes around each magnitude, in closed form (the grid is uniform in log2); then the upper one with
    # probability (magnitude - lower) / (upper - lower): unbiased in value. Zeros give -inf, hence code 0.
    lower_code = torch.log2(magnitude).mul_((top - 1) / range_log2).add_(top).floor_().clamp_(0, top)
    lower = _code_values(lower_code, top, range_log2)
    upper = _code_values((lower_code + 1).clamp_(max=top), top, range_log2)
    up = (magnitude - lower).div_((upper - lower).clamp_(min=torch.finfo(torch.float32).tiny)).clamp_(0.0, 1.0)
    codes = lower_code.add_(counter_uniform(key, magnitude.shape, offset) < up)
    if signed:
        return torch.copysign(codes, flat).to(torch.int8).view(x.shape), scales
    # Never zero for a positive value: the second moment divides the update.
    return torch.maximum(codes, magnitude > 0).to(torch.uint8).view(x.shape), scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """Decode codes from :func:`quantize_blockwise` back to float32 values of the codes' shape."""
    signed = codes.dtype == torch.int8
    top, range_log2 = _grid(signed)
    flat = codes.reshape(-1).float()
    values = _code_values(flat.abs(), top, range_log2)
    if signed:
        values = values.copysign_(flat)
    values = _unblock(_blocks(values, block_size) * scales.unsqueeze(1), codes.numel())
    return values.view(codes.shape)


def init_state(state: dict[str, Any], shape: torch.Size, device: torch.device, kind: str, block_size: int) -> None:
    # The parameter's shape, contiguous and on its device: never zeros_like(param), which would copy the zero-stride
    # layout of a DQT placeholder.
    state["step"] = 0
    if kind in ("float32", "bfloat16"):
        dtype = torch.float32 if kind == "float32" else torch.bfloat16
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
    else:
        n_blocks = math.ceil(math.prod(shape) / block_size)
        state["exp_avg"] = torch.zeros(shape, dtype=torch.int8, device=device)
        state["exp_avg_scale"] = torch.zeros(n_blocks, dtype=torch.float32, device=device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.uint8, device=device)
        state["exp_avg_sq_scale"] = torch.zeros(n_blocks, dtype=torch.float32, device=device)


def read_moment(stored: torch.Tensor, scales: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """One stored moment as float32 values to compute with, by its storage dtype: a float32 state itself, a bfloat16
    one widened, 8-bit codes decoded with their block ``scales``."""
    if stored.dtype == torch.float32:
        return stored
    if stored.dtype == torch.bfloat16:
        return stored.float()
    return dequantize_blockwise(stored, scales, block_size)


def encode_moment(value: torch.Tensor, dtype: torch.dtype, block_size: int, signed: bool,
                  key: torch.Tensor | None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The inverse of :func:`read_moment`: float32 ``value`` as a state of ``dtype``, rounded stochastically with the
    noise stream ``key`` where narrower (``value`` being the part of the moment from flat index ``offset`` on, a
    multiple of ``block_size``). Returns ``(stored values, block scales or None)``."""
    if dtype == torch.float32:
        return value, None
    if dtype == torch.bfloat16:
        return stochastic_round_bf16(value, key, offset), None
    return quantize_blockwise(value, block_size, signed, key, offset)


def _part(state: dict[str, Any], name: str, block_size: int, part: slice | None) -> tuple[torch.Tensor, Any]:
    """A moment's stored values and block scales, whole or (``part``, a slice of flat indices starting on a block)
    the views of that part."""
    stored, scales = state[name], state.get(f"{name}_scale")
    if part is None:
        return stored, scales
    blocks = slice(part.start // block_size, -(-part.stop // block_size))
    return stored.view(-1)[part], None if scales is None else scales[blocks]


def read_moments(state: dict[str, Any], block_size: int, part: slice | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both moments as float32, whole or the ``part`` of them (flat indices, starting on a block)."""
    return (read_moment(*_part(state, "exp_avg", block_size, part), block_size),
            read_moment(*_part(state, "exp_avg_sq", block_size, part), block_size))


def write_moments(state: dict[str, Any], block_size: int, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   keys: torch.Tensor | None, part: slice | None = None) -> None:
    """Store both moments, whole or their ``part``, into the existing state tensors (their storage is reused every
    step), rounded stochastically where narrower."""
    offset = 0 if part is None else part.start
    for name, value, signed, stream in (("exp_avg", exp_avg, True, EXP_AVG), ("exp_avg_sq", exp_avg_sq, False,
                                                                               EXP_AVG_SQ)):
        target, target_scales = _part(state, name, block_size, part)
        stored, scales = encode_moment(value, target.dtype, block_size, signed,
                                       None if keys is None else keys[stream], offset)
        target.copy_(stored.view(target.shape))
        if scales is not None:
            target_scales.copy_(scales)
