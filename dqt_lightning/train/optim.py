"""AdamW with lean optimizer states: float32, bfloat16 with stochastic rounding, or 8-bit block-quantized moments.

AdamW keeps two float32 moments per parameter, 8 bytes: for DQT, whose weights take 1 byte or less, they are most of
the training state and of every resumable checkpoint. :class:`AdamW` does the same arithmetic (in float32, one tensor
at a time) but stores the moments between steps as ``float32`` (exactly ``torch.optim.AdamW``, 8 bytes per
parameter), ``bfloat16`` (4 bytes, stochastic rounding) or ``int8`` (about 2 bytes, 8-bit logarithmic block codes
with stochastic rounding); the formats are :mod:`dqt_lightning.train.moments`.

The rounding noise of parameter ``i`` at its step ``t`` is the counter-based noise of
:mod:`dqt_lightning.quant.rounding`, keyed by ``(seed, t, i)``: a resumed run and every DDP rank draw the same noise
without carrying generator state, and the fused DQT update (:mod:`dqt_lightning.train.fused`) draws the very same
numbers for the moments of a quantized weight.

The arithmetic of a step is an **optimizer rule**: a pure function registered with :func:`register_optimizer_rule`
(``adamw``, :func:`adamw_update`, is the built-in one). :class:`AdamW` runs the rule it names on one parameter at a
time; the fused update runs the same function inside its kernel. See docs/extending.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable

import torch

from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.layers import elements_per_pass
from dqt_lightning.quant.rounding import noise_keys, run_seed, step_seed
from dqt_lightning.train.moments import STATE_DTYPES, init_state, read_moments, write_moments


# --- optimizer rules ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerRule:
    """A registered optimizer rule: the arithmetic of one step of one parameter, which both :class:`AdamW` (the
    unfused path, any state dtype) and the fused DQT update run.

    Attributes:
        name: The rule's name (``AdamW.rule`` of the optimizer class that runs it).
        update: ``update(weights, grad, exp_avg, exp_avg_sq, *scalars) -> (weights, exp_avg, exp_avg_sq)``: pure,
            float32, out of place (the inputs are read only: the fused update keeps the old moments of a layer whose
            gradient turns out non-finite), traceable by ``torch.compile``.
        scalars: ``scalars(group, step) -> tuple of floats``: the step's hyper-parameters from the parameter group
            and the step count (1 at the first step), computed in Python; passed to ``update`` after the tensors.
        optimizers: Other optimizer classes whose step this rule computes (``torch.optim.AdamW`` for ``adamw``): the
            fused update accepts them, with their groups and float32 states.
        unsupported: Group options the rule does not do; the fused update refuses a group that sets one.
    """

    name: str
    update: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    scalars: Callable[[dict[str, Any], float], tuple[float, ...]]
    optimizers: tuple[type, ...] = ()
    unsupported: tuple[str, ...] = ()


OPTIMIZER_RULES: dict[str, OptimizerRule] = {}
# Elements per pass of AdamW's eager step over a large parameter on a CPU (quant.layers.elements_per_pass).
CHUNK = 1 << 16


def register_optimizer_rule(name: str, scalars: Callable[[dict[str, Any], float], tuple[float, ...]],
                            optimizers: Sequence[type] = (), unsupported: Sequence[str] = ()) -> Callable:
    """Register ``update`` (the decorated function, returned unchanged) as the optimizer rule ``name``; see
    :class:`OptimizerRule` for the arguments."""
    def register(update: Callable) -> Callable:
        OPTIMIZER_RULES[name] = OptimizerRule(name, update, scalars, tuple(optimizers), tuple(unsupported))
        return update

    return register


def optimizer_rule(optimizer: torch.optim.Optimizer) -> OptimizerRule | None:
    """The rule ``optimizer`` steps with: the one its class names (``rule``, for :class:`AdamW` and its subclasses),
    or the one registered for its class; ``None`` if there is none."""
    name = getattr(optimizer, "rule", None)
    if isinstance(name, str):
        return OPTIMIZER_RULES.get(name)
    return next((r for r in OPTIMIZER_RULES.values() if isinstance(optimizer, r.optimizers)), None)


def adamw_scalars(group: dict[str, Any], step: float) -> tuple[float, ...]:
    """AdamW's scalars at ``step``, computed in Python as ``torch.optim.AdamW`` computes them: ``(decay, beta1,
    beta2, eps, step_size, bias_correction2_sqrt)`` = ``(1 - lr * weight_decay, beta1, beta2, eps,
    lr / (1 - beta1**step), sqrt(1 - beta2**step))``."""
    lr, (beta1, beta2) = float(group["lr"]), group["betas"]
    return (1 - lr * group["weight_decay"], beta1, beta2, group["eps"], lr / (1 - beta1**step),
            (1 - beta2**step) ** 0.5)


@register_optimizer_rule("adamw", adamw_scalars, optimizers=(torch.optim.AdamW,), unsupported=("amsgrad", "maximize"))
def adamw_update(weights: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 decay: float, beta1: float, beta2: float, eps: float, step_size: float,
                 bias_correction2_sqrt: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step in float32: decoupled weight decay, lerp of the first moment, mul + addcmul of the second,
    ``sqrt / bias correction + eps``, then the weight update, in the order of ``torch.optim.AdamW``'s single-tensor
    path, which gives its float32 results bit for bit on a CPU. The last operation is written out as
    ``weights - (exp_avg * step_size) / denom``, the order of ATen's CPU ``addcdiv`` (same bits): compiled,
    ``addcdiv``'s ``value=`` turns the step size, which changes every step, into a constant of the graph.

    Returns:
        ``(weights, exp_avg, exp_avg_sq)`` after the step, new tensors.
    """
    exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = torch.addcmul(exp_avg_sq * beta2, grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
    return weights * decay - (exp_avg * step_size) / denom, exp_avg, exp_avg_sq


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) whose moments are stored in float32, bfloat16 or 8 bits.

    The arithmetic of a step is always float32 (:func:`adamw_update`); only what is kept between steps changes. With
    ``float32`` states it computes what ``torch.optim.AdamW`` (single-tensor path) computes, operation for operation.
    State is keyed by the parameter and allocated at its first step with the parameter's shape, contiguous, so a DQT
    layer's update parameter (a 4-byte placeholder between steps) gets full-size moments. A subclass that sets
    ``rule`` to another registered optimizer rule runs that rule with the same states (docs/extending.md).

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

    rule = "adamw"  # the registered optimizer rule a step runs

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, state_dtype: str = "float32", block_size: int = 256,
                 seed: int | None = None) -> None:
        name = type(self).__name__
        problems = []
        if state_dtype not in STATE_DTYPES:
            problems.append(f"{name}.state_dtype must be one of {', '.join(STATE_DTYPES)}; got '{state_dtype}'")
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            problems.append(f"{name}.lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            problems.append(f"{name}.betas must be two values in [0, 1), got {list(betas)}")
        if eps < 0.0:
            problems.append(f"{name}.eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            problems.append(f"{name}.weight_decay must be >= 0, got {weight_decay}")
        if not (isinstance(block_size, int) and block_size >= 1):
            problems.append(f"{name}.block_size must be a positive integer, got {block_size}")
        if self.rule not in OPTIMIZER_RULES:
            problems.append(f"{name}.rule '{self.rule}' is not a registered optimizer rule "
                            f"({', '.join(OPTIMIZER_RULES)})")
        if problems:
            raise ConfigError("; ".join(problems))
        # The seed lives in the groups so that it travels with state_dict() and a resumed run keeps its noise.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_dtype=state_dtype,
                        block_size=block_size, seed=run_seed(seed))
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of the optimizer rule for every parameter with a gradient.

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
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._step_param(param, group, index)
        return loss

    def _step_param(self, param: torch.Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[param]
        kind, block_size = group["state_dtype"], group["block_size"]
        if not state:
            init_state(state, param.shape, param.device, kind, block_size)
        state["step"] += 1
        rule = OPTIMIZER_RULES[self.rule]
        scalars = rule.scalars(group, state["step"])
        keys = moment_keys(group, state["step"], index, param.device)
        elements = elements_per_pass(param.device, CHUNK)
        if not param.is_contiguous() or param.numel() <= elements:
            self._step_part(param, param.grad, state, rule, scalars, keys, block_size, None)
            return
        # A large parameter in parts (elements_per_pass; whole blocks of the 8-bit states): the same arithmetic, the
        # same noise (drawn by flat index), in temporaries of one part's size, where one pass over a 131M-element
        # embedding held gigabytes of them at once.
        flat, grad = param.view(-1), param.grad.reshape(-1)
        chunk = -(-elements // block_size) * block_size
        for start in range(0, flat.numel(), chunk):
            part = slice(start, min(start + chunk, flat.numel()))
            self._step_part(flat[part], grad[part], state, rule, scalars, keys, block_size, part)

    @staticmethod
    def _step_part(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], rule: OptimizerRule,
                   scalars: tuple[float, ...], keys: torch.Tensor | None, block_size: int, part: slice | None) -> None:
        exp_avg, exp_avg_sq = read_moments(state, block_size, part)
        weights = param if param.dtype == torch.float32 else param.float()
        weights, exp_avg, exp_avg_sq = rule.update(weights, grad.float(), exp_avg.view(param.shape),
                                                   exp_avg_sq.view(param.shape), *scalars)
        param.copy_(weights)
        write_moments(state, block_size, exp_avg, exp_avg_sq, keys, part)

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
                    exp_avg, exp_avg_sq = read_moments(state, saved_format[1])
                    step = state["step"]
                    state.clear()
                    init_state(state, exp_avg.shape, exp_avg.device, kind, block_size)
                    state["step"] = step
                    write_moments(state, block_size, exp_avg, exp_avg_sq,
                                   moment_keys(group, step, index, exp_avg.device))


def moment_keys(group: dict[str, Any], step: int, index: int, device: torch.device) -> torch.Tensor | None:
    """The noise keys of the moments of parameter ``index`` (its position over all groups) at its ``step``:
    :func:`~dqt_lightning.quant.rounding.noise_keys` of ``(group seed, step, index)``; ``None`` for float32
    states, which round nothing."""
    if group.get("state_dtype", "float32") == "float32":
        return None
    return noise_keys(step_seed(group["seed"], step, index), device)


def next_moment_seeds(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[int | None]:
    """For each of ``params``, the seed :func:`moment_keys` derives at the optimizer's next step of it (``None``
    where the optimizer rounds no moments): so that the fused update rounds a quantized weight's moments with the
    noise the unfused optimizer would draw."""
    if not isinstance(optimizer, AdamW):
        return [None] * len(params)
    where = {id(p): (group, i) for i, (group, p) in
             enumerate((g, p) for g in optimizer.param_groups for p in g["params"])}
    seeds: list[int | None] = []
    for param in params:
        group, index = where[id(param)]
        step = int(optimizer.state.get(param, {}).get("step", 0)) + 1
        seeds.append(None if group["state_dtype"] == "float32" else step_seed(group["seed"], step, index))
    return seeds


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
