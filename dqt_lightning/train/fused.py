"""The DQT update with its optimizer rule as one elementwise pass: dequantize, AdamW, rounding, back to int8.

The usual path materializes a float32 ``alpha * q`` per layer
(:meth:`~dqt_lightning.quant.layers.DQTWeight.materialize`), lets the optimizer step it in a dozen separate passes
over memory, then rounds it back in a few more. For AdamW all of that is elementwise per weight, so it is one function
of ``(levels, scale, grad, moments)``, :func:`dqt_adamw_step`, compiled (``torch.compile``: Triton on a GPU, C++ on
a CPU) into one kernel that reads each weight's level, gradient and moments once and writes its new level and moments
once; no float weight ever exists in memory.

Nothing in it is written twice: the optimizer arithmetic is the registered rule the unfused optimizer runs
(:func:`~dqt_lightning.train.optim.adamw_update`), the step onto the grid is :func:`~dqt_lightning.quant.step.dqt_step`,
the moments are encoded by :mod:`dqt_lightning.train.moments`, and the noise is the counter-based noise of
:mod:`dqt_lightning.quant.rounding` under the same keys as the unfused path: run eagerly it gives the unfused path's
weights bit for bit, stochastic rounding included. Compiled it is the same up to float rounding: ATen's CPU ``lerp``
and ``addcmul`` (which ``torch.optim.AdamW`` runs) use fused multiply-adds and the compiled kernel does not, so the
moments differ in their last bits, and a level flips where ``y + u`` lands within that difference of an integer.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from typing import Callable

import torch

from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.grid import Grid
from dqt_lightning.quant.layers import DQTWeight
from dqt_lightning.quant.rounding import EXP_AVG, EXP_AVG_SQ, WEIGHTS
from dqt_lightning.quant.step import dqt_step, grid_move, update_statistics
from dqt_lightning.train.moments import encode_moment, init_state, read_moment
from dqt_lightning.train.optim import OPTIMIZER_RULES, AdamW, optimizer_rule


def _write(state: torch.Tensor, scales: torch.Tensor | None, block_size: int, value: torch.Tensor,
           key: torch.Tensor, signed: bool, finite: torch.Tensor | None) -> None:
    # Where ``finite`` is False the stored bytes stay as they were: decoding and re-encoding them would not be exact.
    def keep_old(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return new if finite is None else torch.where(finite, new, old)

    stored, new_scales = encode_moment(value, state.dtype, block_size, signed, key)
    state.copy_(keep_old(stored, state))
    if new_scales is not None:
        scales.copy_(keep_old(new_scales, scales))


def dqt_adamw_step(levels: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, exp_avg_scale: torch.Tensor | None, exp_avg_sq_scale: torch.Tensor | None,
                   keys: torch.Tensor, scalars: tuple[float, ...], grid: Grid, rounding: str, block_size: int,
                   skip_nonfinite: bool = False, rule: str = "adamw") -> tuple[torch.Tensor, ...]:
    """One optimizer step of one DQT layer, straight from its levels to its new levels; the moments are updated in
    place.

    ``W = alpha * q`` in float32; the registered optimizer rule ``rule`` (AdamW:
    :func:`~dqt_lightning.train.optim.adamw_update` with ``scalars`` from
    :func:`~dqt_lightning.train.optim.adamw_scalars`); then :func:`~dqt_lightning.quant.step.dqt_step`: one rounding
    with the rule ``rounding``, noise from the first row of ``keys``, clipped to ``grid``. Moments are float32,
    bfloat16 or 8-bit block codes with their scales (:mod:`dqt_lightning.train.moments`), their noise drawn from the
    second and third rows of ``keys``.

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
    g = grad.reshape(-1).float()
    finite = torch.isfinite(g).all() if skip_nonfinite else None
    exp_avg, exp_avg_sq = exp_avg.view(-1), exp_avg_sq.view(-1)
    m = read_moment(exp_avg, exp_avg_scale, block_size)
    v = read_moment(exp_avg_sq, exp_avg_sq_scale, block_size)
    weights, m, v = OPTIMIZER_RULES[rule].update(q * alpha, g, m, v, *scalars)
    _write(exp_avg, exp_avg_scale, block_size, m, keys[EXP_AVG], True, finite)
    _write(exp_avg_sq, exp_avg_sq_scale, block_size, v, keys[EXP_AVG_SQ], False, finite)
    new_levels = dqt_step(flat_levels, alpha, weights, grid, rounding, keys[WEIGHTS])
    moved_sum, below = update_statistics(grid_move(q, alpha, weights))
    if finite is not None:
        new_levels = torch.where(finite, new_levels, flat_levels)
        moved_sum = torch.where(finite, moved_sum, 0.0)
    return new_levels.view(shape), (new_levels != flat_levels).sum(), moved_sum, below, finite


class FusedUpdate:
    """Steps DQT layers with the optimizer's registered rule fused into the rounding, one layer at a time, using the
    optimizer's own parameter groups (the scheduled learning rate included) and its state in its own format, so
    that checkpoints resume either way.

    Args:
        optimizer: The run's one optimizer; its rule is looked up (:func:`~dqt_lightning.train.optim.optimizer_rule`).
        device: Where the layers live (what to compile for).
        compile: Compile :func:`dqt_adamw_step` (one kernel per layer shape) or run it eagerly.

    Raises:
        ConfigError: one line naming ``trainer.plugins.execution.fused_update`` (or ``compile_fused_update``) for an
            optimizer without a registered rule, an option the rule does not do, or a machine that cannot compile.
    """

    field = "trainer.plugins.execution.fused_update"

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, compile: bool) -> None:
        rule = optimizer_rule(optimizer)
        if rule is None:
            known = "; ".join(f"{r.name}: {', '.join(c.__module__ + '.' + c.__qualname__ for c in r.optimizers)}"
                              for r in OPTIMIZER_RULES.values())
            raise ConfigError(f"{self.field} fuses a registered optimizer rule into the update ({known}; or "
                              f"dqt_lightning.train.optim.AdamW with any rule); the optimizer is "
                              f"{type(optimizer).__name__}")
        for group in optimizer.param_groups:
            for option in rule.unsupported:
                if group.get(option):
                    raise ConfigError(f"{self.field} does not do {type(optimizer).__name__}'s {option}; set "
                                      f"optimizer.init_args.{option}: false")
        self.optimizer, self.rule = optimizer, rule
        if not compile:
            self.step_fn: Callable[..., tuple[torch.Tensor, ...]] = dqt_adamw_step
            return
        reason = compile_unavailable_reason(device)
        if reason is not None:
            raise ConfigError(f"trainer.plugins.execution.compile_fused_update: torch.compile cannot build the fused "
                              f"update here ({reason}); install one, or set it to false (the same update, run eagerly)")
        self.step_fn = compiled_dqt_adamw_step(device.type)

    def step(self, layer: DQTWeight, keys: torch.Tensor, skip_nonfinite: bool = False
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None] | None:
        """Step ``layer`` and round it in one pass from levels to levels, with its noise ``keys`` (weights and
        moments streams); free its gradient. With ``skip_nonfinite`` a non-finite gradient leaves the layer as it
        was, decided on the device.

        Returns:
            ``(flips, (sum of |y - q|, count below half a step), finite or None)``; ``None`` when the layer has no
            gradient (the optimizer would skip it too).
        """
        param = layer.update_param
        if param.grad is None:
            return None
        optimizer = self.optimizer
        # Looked up at every step: load_state_dict replaces the groups, and the LR scheduler changes their lr.
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        state = optimizer.state[param]
        ours = isinstance(optimizer, AdamW)
        block_size = group["block_size"] if ours else 0
        if not state:
            init_state(state, layer.shape, layer.weight.device, group["state_dtype"] if ours else "float32", block_size)
            if not ours:  # torch.optim.AdamW's own format, so that the unfused path can resume from it
                state["step"] = torch.tensor(0.0)
        state["step"] += 1
        q_new, flips, moved, below, finite = self.step_fn(
            layer.levels(), layer.scale, param.grad, state["exp_avg"], state["exp_avg_sq"], state.get("exp_avg_scale"),
            state.get("exp_avg_sq_scale"), keys, self.rule.scalars(group, float(state["step"])), layer.grid,
            layer.rounding, block_size or 1, skip_nonfinite, self.rule.name)
        layer.set_levels(q_new)
        param.grad = None  # spent; and the optimizer must not step the placeholder
        layer.release()
        return flips, (moved, below), finite

    def undo(self, layer: DQTWeight) -> None:
        """After a step that ``finite`` says was not applied: as if the optimizer had not stepped the layer (its
        moments are untouched already, so is now its step count)."""
        self.optimizer.state[layer.update_param]["step"] -= 1


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
