"""The DQT update with AdamW as one elementwise pass: dequantize, AdamW, stochastic rounding, back to int8.

The usual path (:class:`~dqt_lightning.train.update.QuantizedUpdate` around any optimizer) materializes a float32
``alpha * q`` per layer, lets the optimizer step it in a dozen separate passes over memory, then rounds it back in a
few more. For AdamW, the one optimizer this project trains with, all of that is elementwise per weight, so it can be
written as one function of ``(levels, scale, grad, moments)`` and compiled (``torch.compile``: Triton on a GPU, C++
on a CPU) into one kernel that reads each weight's level, gradient and moments once and writes its new level and
moments once; no float weight ever exists in memory.

The rounding noise cannot come from a ``torch.Generator`` inside a compiled kernel and still be the same on every
DDP rank and after a resume, so it is counter-based: the ``i``-th uniform of a layer at a step is a hash of ``i`` and
a key derived from ``(run seed, step, layer)`` (:func:`counter_uniform`). Any rank, any resumed run and the eager and
compiled forms of :func:`dqt_adamw_step` draw the same numbers.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from typing import Callable, Sequence

import torch

from dqt_lightning.train.optim import quantize_blockwise, read_moment, stochastic_round_bf16

_MASK32 = 0xFFFFFFFF
# The noise streams of one layer at one step: its weights, its first moment, its second moment.
WEIGHTS, EXP_AVG, EXP_AVG_SQ = range(3)


def _mulmod32(x: torch.Tensor, constant: int) -> torch.Tensor:
    # (x * constant) mod 2**32 for x < 2**32, in two 16-bit halves of the constant: no product reaches 2**63, so the
    # int64 arithmetic never overflows (undefined in the C++ a CPU compile emits).
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # Chris Wellons' "lowbias32" integer hash: every output bit depends on every input bit, with low bias.
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _splitmix64(x: int) -> int:
    # A strong 64-bit mix in Python, so that keys of neighbouring (step, layer) share no structure.
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _key_rows(seed: int) -> list[list[int]]:
    rows = []
    for stream in range(3):
        mixed = _splitmix64(seed * 3 + stream)
        rows.append([mixed & _MASK32, mixed >> 32])
    return rows


def noise_keys(seed: int | Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The key of each noise stream (weights, first moment, second moment) of one layer at one step, from a seed such
    as :func:`~dqt_lightning.quant.grid.step_seed`: an int64 tensor ``[3, 2]`` of 32-bit halves; ``[len(seed), 3, 2]`` for
    a sequence of seeds (every layer of a step at once).

    On a GPU the keys travel in one copy from pinned memory that does not wait for the device: a plain host-to-device
    copy waits for every kernel queued before it, which per layer would take away the host's lead over the GPU.
    """
    rows = _key_rows(seed) if isinstance(seed, int) else [_key_rows(s) for s in seed]
    keys = torch.tensor(rows, dtype=torch.int64)
    if torch.device(device).type != "cuda":
        return keys.to(device)
    return keys.pin_memory().to(device, non_blocking=True)


def counter_bits(key: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """32 random bits per element (in an int64 tensor of ``shape``): two rounds of a hash of the element's flat index
    and the stream's ``key`` (one row of :func:`noise_keys`). A pure function of its arguments."""
    numel = 1
    for size in shape:
        numel *= size
    index = torch.arange(numel, dtype=torch.int64, device=key.device).view(shape)
    mixed = _hash32((index & _MASK32) ^ key[0])
    return _hash32(mixed ^ (((index >> 32) + key[1]) & _MASK32))


def counter_uniform(key: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Float32 uniforms in ``[0, 1)`` on a grid of ``2**-24`` from :func:`counter_bits`."""
    return (counter_bits(key, shape) >> 8).float() * 2.0**-24


def _write(state: torch.Tensor, scales: torch.Tensor | None, block_size: int, value: torch.Tensor,
           key: torch.Tensor, signed: bool, finite: torch.Tensor | None) -> None:
    # Where ``finite`` is False the stored bytes stay as they were: decoding and re-encoding them would not be exact.
    def keep_old(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return new if finite is None else torch.where(finite, new, old)

    if state.dtype == torch.float32:
        state.copy_(keep_old(value, state))
    elif state.dtype == torch.bfloat16:
        noise = (counter_bits(key, value.shape) >> 16).to(torch.int32)
        state.copy_(keep_old(stochastic_round_bf16(value, noise=noise), state))
    else:
        codes, new_scales = quantize_blockwise(value, block_size, signed, uniform=counter_uniform(key, value.shape))
        state.copy_(keep_old(codes, state))
        scales.copy_(keep_old(new_scales, scales))


def adamw_scalars(lr: float, weight_decay: float, betas: tuple[float, float],
                  step: float) -> tuple[float, float, float]:
    """The scalars of AdamW's step ``step`` that :func:`dqt_adamw_step` takes, computed in Python as
    ``torch.optim.AdamW`` computes them: ``(decay, step_size, bias_correction2_sqrt)`` =
    ``(1 - lr * weight_decay, lr / (1 - beta1**step), sqrt(1 - beta2**step))``."""
    beta1, beta2 = betas
    return 1 - lr * weight_decay, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


def dqt_adamw_step(levels: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, exp_avg_scale: torch.Tensor | None, exp_avg_sq_scale: torch.Tensor | None,
                   keys: torch.Tensor, decay: float, beta1: float, beta2: float, eps: float, step_size: float,
                   bias_correction2_sqrt: float, qmin: int, qmax: int, stochastic: bool, block_size: int,
                   skip_nonfinite: bool = False) -> tuple[torch.Tensor, ...]:
    """One AdamW step of one DQT layer, straight from its levels to its new levels; the moments are updated in place.

    The arithmetic is that of the usual path, operation for operation: ``W = alpha * q`` in float32;
    ``torch.optim.AdamW``'s single-tensor step on it (``decay = 1 - lr * weight_decay``, ``step_size = lr /
    (1 - beta1**t)``, ``bias_correction2_sqrt = sqrt(1 - beta2**t)``); then
    :func:`~dqt_lightning.quant.grid.quantized_step`'s ``y = q + (W' - alpha*q) / alpha`` and one rounding,
    ``floor(y + u)`` with ``u`` from :func:`counter_uniform` (or ``round(y)``), clipped to ``[qmin, qmax]``. Run
    eagerly with ``nearest`` rounding and float32 moments it gives the usual path's results bit for bit.

    Moments are float32, bfloat16 (written back with stochastic rounding) or 8-bit block codes with their scales
    (:mod:`dqt_lightning.train.optim`), their noise drawn from the second and third rows of ``keys``.

    With ``skip_nonfinite`` a gradient holding NaN or inf leaves levels and moments exactly as they were, decided
    on the device: no host sync, which inside backward would stall the launch of every later layer's kernels.

    Returns:
        ``(new int8 levels, number of levels that changed, sum of |y - q|, number with |y - q| < 0.5, finite)``: the
        middle two are the update-to-grid-step statistics the telemetry logs, at the price of two reductions in the
        same pass; ``finite`` is a boolean tensor (whether the step was applied) with ``skip_nonfinite``, else None.
    """
    # Everything on the flat layout, so that the 8-bit moments' blocks are plain views of it: compiled, they are
    # indexed without the division and modulo that would stop the C++ loops from vectorizing. Same values.
    shape = levels.shape
    flat_levels = levels.reshape(-1)
    alpha = scale.expand(shape).reshape(-1) if scale.dim() else scale
    q = flat_levels.float()
    start = q * alpha
    g = grad.reshape(-1).float()
    finite = torch.isfinite(g).all() if skip_nonfinite else None
    exp_avg, exp_avg_sq = exp_avg.view(-1), exp_avg_sq.view(-1)
    m = read_moment(exp_avg, exp_avg_scale, block_size)
    v = read_moment(exp_avg_sq, exp_avg_sq_scale, block_size)
    # torch.optim.AdamW (single tensor): decay, lerp, mul + addcmul, sqrt / bias correction + eps, addcdiv. The last
    # is written out, in the order of ATen's CPU kernel (same bits): compiled by torch 2.11, addcdiv's ``value=`` or a
    # negated step size turns the step size, which changes every step, into a constant of the graph: one compile per
    # step.
    weights = start * decay
    m = torch.lerp(m, g, 1 - beta1)
    v = torch.addcmul(v * beta2, g, g, value=1 - beta2)
    denom = v.sqrt() / bias_correction2_sqrt + eps
    weights = weights - (m * step_size) / denom
    _write(exp_avg, exp_avg_scale, block_size, m, keys[EXP_AVG], True, finite)
    _write(exp_avg_sq, exp_avg_sq_scale, block_size, v, keys[EXP_AVG_SQ], False, finite)
    # quantized_step, in the order that makes y == q exactly when the weight did not move.
    y = (weights - start) / alpha + q
    rounded = torch.floor(counter_uniform(keys[WEIGHTS], y.shape) + y) if stochastic else torch.round(y)
    new_levels = rounded.clamp(qmin, qmax).to(torch.int8)
    moved = (y - q).abs()
    moved_sum, below = moved.sum(), (moved < 0.5).sum()
    if finite is not None:
        new_levels = torch.where(finite, new_levels, flat_levels)
        moved_sum = torch.where(finite, moved_sum, 0.0)
    return new_levels.view(shape), (new_levels != flat_levels).sum(), moved_sum, below, finite


# Inductor's CPU defaults inline an elementwise producer into each of its consumers. The 8-bit moments have three
# (the per-block maximum, the codes, the weight update), so the dequantization, the hashes and AdamW ran three times
# over: 40 ms for a 768x2048 layer. Materializing any intermediate read more than once, or costing more than five
# operations, brings it to 12 ms and costs the float32 and bfloat16 moments nothing (docs/benchmarks.md). On a GPU
# recomputing is cheaper than memory traffic, so Triton keeps its defaults.
_CPU_OPTIONS = {"realize_reads_threshold": 1, "realize_opcount_threshold": 5}
# One graph per layer shape, grid and moment format: a bit-width schedule passes through several grids.
_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled(device_type: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    return torch.compile(dqt_adamw_step, dynamic=True, options=_CPU_OPTIONS if device_type == "cpu" else None)


def compiled_dqt_adamw_step(device_type: str = "cpu") -> Callable[..., tuple[torch.Tensor, ...]]:
    """:func:`dqt_adamw_step` compiled (once per process and device type) into one graph per layer shape.

    Shapes and integers (grid bounds, block size) are static: with a symbolic block size the compiled C++ indexes the
    8-bit moments through a division and modulo per element and does not vectorize (2-3x slower); a model has only a
    few layer shapes. Floats (learning rate, bias corrections) are graph inputs: a scheduled learning rate never
    recompiles.
    """
    compiled = _compiled(device_type)

    def step(*args: object) -> tuple[torch.Tensor, ...]:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                torch._dynamo.mark_static(arg)
        with torch._dynamo.config.patch(specialize_int=True, recompile_limit=_RECOMPILE_LIMIT):
            return compiled(*args)

    return step


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why :func:`compiled_dqt_adamw_step` could not compile on ``device`` (``None`` if it can): the compiler emits
    Triton for a GPU and C++ for a CPU, and needs Triton or a C++ compiler for that."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return None if any(c and shutil.which(c) for c in compilers) else "no C++ compiler (g++, c++, clang++) on PATH"
