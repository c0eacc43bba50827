"""AdamW with lean optimizer states: float32, bfloat16 with stochastic rounding, or 8-bit block-quantized moments.

AdamW keeps two float32 moments per parameter, 8 bytes: for DQT, whose weights take 1 byte or less, they are most of
the training state and of every resumable checkpoint. :class:`AdamW` does the same arithmetic (in float32, one tensor
at a time) but stores the moments between steps as

- ``float32``: exactly ``torch.optim.AdamW`` (8 bytes per parameter);
- ``bfloat16``: 4 bytes per parameter, written back with stochastic rounding. Nearest rounding would freeze a moment
  whose per-step change is below half a bf16 step (0.2 %): with ``beta2 = 0.999`` the second moment could never decay;
- ``int8``: about 2 bytes per parameter. Each moment is cut into blocks of ``block_size`` elements with one float32
  scale (the block's absolute maximum) and one 8-bit code per element on a logarithmic grid, so small entries keep
  the same *relative* precision as large ones (a linear grid would round most second-moment entries of a block to
  zero, and ``m / sqrt(v)`` would explode). Codes are also written with stochastic rounding, unbiased in value.

The rounding noise of parameter ``i`` at step ``t`` is drawn from a generator seeded by ``(seed, t, i)``: a resumed run
and every DDP rank draw the same noise without carrying generator state.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterable
from itertools import chain
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.grid import step_seed

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


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
    """Round float32 values to bfloat16 up or down at random, with ``E[result] = x``.

    bfloat16 is float32 without the low 16 bits of the mantissa. Adding a uniform integer from ``[0, 2**16)`` to the
    bit pattern and then dropping those bits rounds the magnitude up with probability equal to the dropped fraction.
    Sign and magnitude are separate bits, so this is unbiased for negative values too.

    Args:
        x: A float32 tensor.
        generator: Source of the noise (on ``x``'s device); the default generator if ``None``.
        noise: Integers in ``[0, 2**16)`` of ``x``'s shape to use instead of drawing them (a fused update's
            counter-based noise).

    Returns:
        A bfloat16 tensor of ``x``'s shape.
    """
    bits = x.contiguous().view(torch.int32)
    if noise is None:
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
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


def quantize_blockwise(x: torch.Tensor, block_size: int, signed: bool, generator: torch.Generator | None = None,
                       uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` as 8-bit logarithmic codes and one float32 scale (absolute maximum) per block, rounding at random.

    Args:
        x: Float32 values; a signed code for the first moment, an unsigned one for the (non-negative) second moment.
        block_size: Elements per scale, taken from ``x`` flattened.
        signed: Whether ``x`` may be negative. An unsigned code never rounds a positive value to zero: the second
            moment divides the update, so it is rounded up to the smallest level instead (a smaller, safe step).
        generator: Source of the rounding noise.
        uniform: Uniforms in ``[0, 1)`` of ``x``'s shape to round with instead of drawing them.

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
    if uniform is None:
        uniform = torch.rand(magnitude.shape, device=x.device, generator=generator)
    codes = lower_code.add_(uniform.reshape(-1) < up)
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


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) whose moments are stored in float32, bfloat16 or 8 bits.

    The arithmetic of a step is always float32; only what is kept between steps changes. With ``float32`` states it
    computes what ``torch.optim.AdamW`` (single-tensor path) computes, operation for operation. State is keyed by
    the parameter and allocated at its first step with the parameter's shape, contiguous, so a DQT layer's
    update parameter (a 4-byte placeholder between steps) gets full-size moments.

    Args:
        params: Parameters or parameter groups; a group may override ``lr``, ``betas``, ``eps``, ``weight_decay``.
        lr: Learning rate (the LR scheduler changes each group's ``lr``).
        betas: Decay rates of the first and second moments.
        eps: Added to the square root of the bias-corrected second moment.
        weight_decay: Decoupled weight decay: ``p -= lr * weight_decay * p`` each step.
        state_dtype: ``float32`` (8 bytes per parameter), ``bfloat16`` (4 bytes, stochastic rounding) or ``int8``
            (2 bytes plus 8 bytes per ``block_size`` elements, stochastic rounding).
        block_size: Elements per float32 scale of the ``int8`` states.
        seed: Seed of the rounding noise; ``None`` takes the run's ``seed_everything`` value (``PL_GLOBAL_SEED``).

    Raises:
        ConfigError: for an unknown ``state_dtype`` or a hyper-parameter out of range.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, state_dtype: str = "float32", block_size: int = 256,
                 seed: int | None = None) -> None:
        problems = []
        if state_dtype not in STATE_DTYPES:
            problems.append(f"AdamW.state_dtype must be one of {', '.join(STATE_DTYPES)}; got '{state_dtype}'")
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            problems.append(f"AdamW.lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            problems.append(f"AdamW.betas must be two values in [0, 1), got {list(betas)}")
        if eps < 0.0:
            problems.append(f"AdamW.eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            problems.append(f"AdamW.weight_decay must be >= 0, got {weight_decay}")
        if not (isinstance(block_size, int) and block_size >= 1):
            problems.append(f"AdamW.block_size must be a positive integer, got {block_size}")
        if problems:
            raise ConfigError("; ".join(problems))
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        # The seed lives in the groups so that it travels with state_dict() and a resumed run keeps its noise.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_dtype=state_dtype,
                        block_size=block_size, seed=seed)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step for every parameter with a gradient.

        Args:
            closure: Re-evaluates the model and returns the loss (Lightning passes one).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1  # position of the parameter over all groups: part of its noise seed
        for group in self.param_groups:
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("dqt_lightning.train.optim.AdamW does not support sparse gradients")
                self._step_param(param, group, index)
        return loss

    def _step_param(self, param: torch.Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[param]
        kind, block_size = group["state_dtype"], group["block_size"]
        if not state:
            _init_state(state, param.shape, param.device, kind, block_size)
        state["step"] += 1
        step, (beta1, beta2) = state["step"], group["betas"]
        grad = param.grad.float()
        exp_avg, exp_avg_sq = _read_moments(state, block_size)

        # The order of torch.optim.AdamW's single-tensor path, so float32 states give its results bit for bit.
        weights = param if param.dtype == torch.float32 else param.float()
        lr, weight_decay = group["lr"], group["weight_decay"]
        if weight_decay != 0:
            weights.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(group["eps"])
        weights.addcdiv_(exp_avg, denom, value=-step_size)
        if weights is not param:
            param.copy_(weights)
        _write_moments(state, kind, block_size, exp_avg, exp_avg_sq, self._noise(group, step, index, param.device))

    def _noise(self, group: dict[str, Any], step: int, index: int, device: torch.device) -> torch.Generator | None:
        if group["state_dtype"] == "float32":
            return None
        # Not part of the optimizer's pickled state (torch pickles defaults, state and groups only): made on demand.
        generators = self.__dict__.setdefault("_generators", {})
        if device not in generators:
            generators[device] = torch.Generator(device=device)
        return generators[device].manual_seed(step_seed(group["seed"], step, index))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping every state tensor exactly as saved, or converting it to this ``state_dtype``.

        ``torch.optim.Optimizer.load_state_dict`` casts each state tensor to its parameter's dtype: bfloat16 moments
        and 8-bit codes would silently become float32 after a resume, and float32 moments of a DQT layer whose
        placeholder parameter is bfloat16 between steps would lose their low bits. The groups (learning rates
        included) and the mapping of saved ids to parameters are left to torch; the state tensors are then copied
        over from ``state_dict`` unchanged. States saved in another format (another ``state_dtype`` or
        ``block_size``, or by ``torch.optim.AdamW``) are converted to this optimizer's, so a run can resume with
        leaner states than it started with.
        """
        configured = [(group["state_dtype"], group["block_size"], group["seed"]) for group in self.param_groups]
        saved = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        current = list(chain.from_iterable(group["params"] for group in self.param_groups))
        super().load_state_dict(state_dict)
        for saved_id, param in zip(saved, current):
            state = self.state.get(param)
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if state is not None and isinstance(value, torch.Tensor):
                    state[key] = value.to(device=param.device, copy=True)
        index = -1
        for group, (kind, block_size, seed) in zip(self.param_groups, configured):
            saved_format = (group.get("state_dtype", "float32"), group.get("block_size", block_size))
            group.update(state_dtype=kind, block_size=block_size, seed=group.get("seed", seed))
            for param in group["params"]:
                index += 1
                state = self.state.get(param)
                if not state:
                    continue
                state["step"] = int(state["step"])  # torch.optim.AdamW keeps a float tensor
                if saved_format != (kind, block_size):
                    exp_avg, exp_avg_sq = _read_moments(state, saved_format[1])
                    step = state["step"]
                    state.clear()
                    _init_state(state, exp_avg.shape, exp_avg.device, kind, block_size)
                    state["step"] = step
                    _write_moments(state, kind, block_size, exp_avg, exp_avg_sq,
                                   self._noise(group, step, index, exp_avg.device))


def default_adamw(state_dtype: str = "float32", **overrides: Any) -> Callable[[Iterable[Any]], torch.optim.Optimizer]:
    """The project's default optimizer as a factory of parameter groups: AdamW with lr 1e-3, betas (0.9, 0.95) and
    weight decay 0.01 (each overridable). ``float32`` moments are ``torch.optim.AdamW`` itself; ``bfloat16`` and
    ``int8`` ones are :class:`AdamW` with the same hyper-parameters."""
    hyper = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.01, **overrides}
    if state_dtype == "float32":
        return lambda params: torch.optim.AdamW(params, **hyper)
    return lambda params: AdamW(params, **hyper, state_dtype=state_dtype)


def parameter_stepper(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Callable[[], None]:
    """A function that steps ``param`` alone, with ``optimizer``'s rule, its group's current hyper-parameters (the
    scheduled learning rate included) and its state in ``optimizer.state``.

    This is what applying a DQT update inside backward needs: one layer stepped as soon as its gradient is complete,
    while the LR scheduler, checkpoints and every other parameter keep seeing the one configured optimizer. The
    group and the state dict are looked up at every call, because ``load_state_dict`` replaces both.

    Raises:
        ConfigError: if ``param`` is not one of ``optimizer``'s parameters.
    """
    position = [(g, i) for g, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])
                if p is param]
    if not position:
        raise ConfigError("the optimizer does not hold this parameter; pass dqt_lightning.quantized_parameters(model) "
                          "to it in configure_optimizers")
    group_index, _ = position[0]
    if isinstance(optimizer, AdamW):
        index = sum(len(g["params"]) for g in optimizer.param_groups[:group_index]) + position[0][1]
        # The same seed index as a full step, so the stochastic rounding of lean states draws the same noise.
        return lambda: optimizer._step_param(param, optimizer.param_groups[group_index], index)
    # Any other torch optimizer: a one-parameter instance of the same class that borrows the group and the state.
    accepted = inspect.signature(type(optimizer)).parameters
    single = type(optimizer)([param], **{k: v for k, v in optimizer.defaults.items() if k in accepted})

    def step() -> None:
        single.state = optimizer.state
        single.param_groups[0].update((k, v) for k, v in optimizer.param_groups[group_index].items() if k != "params")
        single.step()

    return step


def _init_state(state: dict[str, Any], shape: torch.Size, device: torch.device, kind: str, block_size: int) -> None:
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
    """One stored moment as float32 values to compute with, by its storage dtype: a float32 state itself (updated in
    place), a bfloat16 one widened, 8-bit codes decoded with their block ``scales``."""
    if stored.dtype == torch.float32:
        return stored
    if stored.dtype == torch.bfloat16:
        return stored.float()
    return dequantize_blockwise(stored, scales, block_size)


def _read_moments(state: dict[str, Any], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (read_moment(state["exp_avg"], state.get("exp_avg_scale"), block_size),
            read_moment(state["exp_avg_sq"], state.get("exp_avg_sq_scale"), block_size))


def _write_moments(state: dict[str, Any], kind: str, block_size: int, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, generator: torch.Generator | None) -> None:
    # Into the existing state tensors (their storage is reused every step), rounded stochastically where narrower.
    for key, value, signed in (("exp_avg", exp_avg, True), ("exp_avg_sq", exp_avg_sq, False)):
        if kind == "float32":
            if state[key] is not value:
                state[key].copy_(value)
        elif kind == "bfloat16":
            state[key].copy_(stochastic_round_bf16(value, generator))
        else:
            codes, scales = quantize_blockwise(value, block_size, signed, generator)
            state[key].copy_(codes)
            state[f"{key}_scale"].copy_(scales)
