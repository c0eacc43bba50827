"""Rounding rules and the one noise scheme every rounding in the project draws from.

**Noise.** The ``i``-th uniform of one layer at one optimizer step is a hash of ``i`` and a key derived from
``(run seed, step, layer)`` (:func:`step_seed`, :func:`noise_keys`, :func:`counter_uniform`): a pure function of its
arguments, so every DDP rank, every resumed run, the update inside backward and the fused kernel (eager or compiled)
draw the same numbers without carrying generator state. One seed gives three streams (:data:`WEIGHTS`,
:data:`EXP_AVG`, :data:`EXP_AVG_SQ`): the weight's rounding and the stochastic rounding of the two AdamW moments when
they are stored in bfloat16 or 8 bits.

**Rounding rules.** A rule is a pure function ``(y, u) -> rounded`` of float32 grid coordinates ``y`` and uniforms
``u`` in ``[0, 1)`` of ``y``'s shape (``None`` for a rule registered with ``needs_noise=False``), returning whole
numbers as a float tensor; clipping to the grid and the cast to int8 are done by the caller
(:func:`dqt_lightning.quant.step.round_to_grid`). Rules run inside the fused update's compiled kernel too, so they
must be traceable by ``torch.compile``: tensor operations only, no host syncs, no side effects on tensors. A rule is
registered with :func:`register_rounding` and chosen by name (``trainer.plugins.method.rounding``); a rule defined
outside the package is named by its dotted path (``package.module.function`` or ``package.module:function``),
imported and registered on first use (:func:`rounding_rule`). See docs/extending.md.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dqt_lightning.errors import ConfigError

_MASK32 = 0xFFFFFFFF
# The noise streams of one seed: the weights' rounding, the first moment's, the second moment's.
WEIGHTS, EXP_AVG, EXP_AVG_SQ = range(3)


def run_seed(seed: int | None = None) -> int:
    """``seed``, or the run's ``seed_everything`` value (``PL_GLOBAL_SEED``; 0 when none was set)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)


def step_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for one layer (or parameter) ``index`` at one optimizer ``step`` of a run seeded ``seed``."""
    mixed = (seed * 1_000_003 + step) * 1_000_033 + index
    return mixed % (2**63 - 1)


def _mulmod32_(x: torch.Tensor, constant: int) -> torch.Tensor:
    # x = (x * constant) mod 2**32 in place, for x < 2**32, in two 16-bit halves of the constant: no product reaches
    # 2**63, so the int64 arithmetic never overflows (undefined in the C++ a CPU compile emits). In place: eagerly,
    # every fresh full-size int64 tensor costs as much as the arithmetic on it.
    high = x * (constant >> 16)
    high.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(constant & 0xFFFF).add_(high).bitwise_and_(_MASK32)


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    # Chris Wellons' "lowbias32" integer hash, in place: every output bit depends on every input bit, with low bias.
    x.bitwise_xor_(x >> 16)
    _mulmod32_(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    _mulmod32_(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


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


def noise_keys(seed: int | Sequence[int | tuple[int, int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """The key of each noise stream (weights, first moment, second moment) of one seed such as :func:`step_seed`: an
    int64 tensor ``[3, 2]`` of 32-bit halves; ``[len(seed), 3, 2]`` for a sequence of seeds (every layer of a step
    at once). An entry of the sequence may be a pair ``(weights seed, moments seed)``: the weights' row from the
    first, the moments' rows from the second (a layer whose moments an optimizer keys by its own seed).

    On a GPU the keys travel in one copy from pinned memory that does not wait for the device: a plain host-to-device
    copy waits for every kernel queued before it, which per layer would take away the host's lead over the GPU.
    """
    def rows(entry: int | tuple[int, int]) -> list[list[int]]:
        if isinstance(entry, int):
            return _key_rows(entry)
        return _key_rows(entry[0])[:1] + _key_rows(entry[1])[1:]

    keys = torch.tensor(rows(seed) if isinstance(seed, int) else [rows(s) for s in seed], dtype=torch.int64)
    if torch.device(device).type != "cuda":
        return keys.to(device)
    return keys.pin_memory().to(device, non_blocking=True)


def counter_bits(key: torch.Tensor, shape: torch.Size | tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """32 random bits per element (in an int64 tensor of ``shape``): two rounds of a hash of the element's flat index
    and the stream's ``key`` (one row of :func:`noise_keys`), ``hash(hash(lo(i) ^ key[0]) ^ (hi(i) + key[1]))`` with
    ``lo``/``hi`` the 32-bit words of the index. A pure function of its arguments. ``offset`` is the flat index of
    the first element: a slice of a tensor, from ``offset`` on, draws exactly the numbers of that part of the whole."""
    numel = 1
    for size in shape:
        numel *= size
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=key.device).view(shape)
    if offset + numel <= 2**32:  # every index is its own low word and its high word is 0 (key[1] < 2**32)
        return _hash32_(_hash32_(index.bitwise_xor_(key[0])).bitwise_xor_(key[1]))
    mixed = _hash32_((index & _MASK32).bitwise_xor_(key[0]))
    return _hash32_(mixed.bitwise_xor_(((index >> 32) + key[1]) & _MASK32))


def counter_uniform(key: torch.Tensor, shape: torch.Size | tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """Float32 uniforms in ``[0, 1)`` on a grid of ``2**-24`` from :func:`counter_bits`."""
    return counter_bits(key, shape, offset).bitwise_right_shift_(8).float().mul_(2.0**-24)


# --- the registry of rounding rules ---------------------------------------------------------------------------------

RoundingFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class RoundingRule:
    """A registered rounding rule: its ``name``, the function ``fn(y, u)`` and whether it draws noise."""

    name: str
    fn: RoundingFn
    needs_noise: bool = True


_RULES: dict[str, RoundingRule] = {}


def register_rounding(name: str, needs_noise: bool = True) -> Callable[[RoundingFn], RoundingFn]:
    """Register ``fn(y, u) -> rounded`` as the rounding rule ``name`` (a decorator; returns ``fn`` unchanged).

    ``needs_noise=False``: the rule is deterministic and receives ``u=None``, so that it does not pay for the hash.
    Registering a name again is allowed only for the same function (a module imported twice); anything else is an
    error, so that a run never rounds with a rule other than the one it names.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"a rounding rule needs a non-empty name; got {name!r}")

    def register(fn: RoundingFn) -> RoundingFn:
        known = _RULES.get(name)
        if known is not None and _where(known.fn) != _where(fn):
            raise ValueError(f"rounding rule '{name}' is registered already (by {_where(known.fn)})")
        _RULES[name] = rule = RoundingRule(name, fn, needs_noise)
        fn.rounding_rule = rule  # type: ignore[attr-defined]  # how a dotted path finds the rule it names
        return fn

    return register


def _where(fn: Callable) -> str:
    # Where a function is defined: the same after the module that defines it is imported again.
    line = getattr(getattr(fn, "__code__", None), "co_firstlineno", "?")
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))} (line {line})"


def rounding_names() -> tuple[str, ...]:
    """The names of the registered rules, built-ins first."""
    return tuple(_RULES)


def rounding_rule(name: str, field: str = "rounding") -> RoundingRule:
    """The rule registered as ``name``, or the function a dotted path ``package.module.function`` (or
    ``package.module:function``) names, imported and registered on first use: under the name its decorator gave it,
    else under the path itself (``needs_noise`` from a ``needs_noise`` attribute of the function, default true). The
    path is then a registered name of the rule too, so that a run can keep naming the rule as its config does.

    Raises:
        ConfigError: one line naming ``field`` and the known rules, for a name that is neither.
    """
    if isinstance(name, str) and name in _RULES:
        return _RULES[name]
    known = ", ".join(_RULES)
    if not isinstance(name, str) or not any(sep in name for sep in ".:"):
        raise ConfigError(f"{field} must be a registered rounding rule ({known}) or the dotted path of one "
                          f"(package.module.function); got {name!r}")
    module_name, _, attribute = name.rpartition(":") if ":" in name else name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{field}: cannot load the rounding rule '{name}' ({error}); known rules: {known}") from error
    rule = getattr(fn, "rounding_rule", None)
    if not isinstance(rule, RoundingRule):
        if not callable(fn):
            raise ConfigError(f"{field}: '{name}' is not a function (y, u) -> rounded; known rules: {known}")
        register_rounding(name, needs_noise=bool(getattr(fn, "needs_noise", True)))(fn)
        rule = _RULES[name]
    _RULES.setdefault(name, rule)
    return rule


@register_rounding("stochastic")
def stochastic(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``floor(y + u)``: up with probability equal to the fractional part, so ``E[result] = y`` (unbiased)."""
    return (y + u).floor_()


@register_rounding("nearest", needs_noise=False)
def nearest(y: torch.Tensor, u: None) -> torch.Tensor:
    """``round(y)`` (half to even): deterministic; loses every update below half a grid step (the ablation)."""
    return torch.round(y)
