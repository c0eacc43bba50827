"""One DQT step, the only place it is written: grid coordinates, one rounding, clip.

The optimizer moved the dequantized weight ``alpha * q`` to ``stepped``; the step writes that move onto the grid:
``y = q + (stepped - alpha*q) / alpha`` (``= q - delta/alpha`` in grid units), ``q_new = clip(round(y), qmin, qmax)``
with the configured rounding rule (:mod:`dqt_lightning.quant.rounding`; ``stochastic`` is ``floor(y + u)``). Every
path calls these functions: the usual update (:meth:`~dqt_lightning.quant.layers.DQTWeight.round_step`), the update
inside backward, the fused kernel (:func:`~dqt_lightning.train.fused.dqt_adamw_step`, eager or compiled), the
telemetry's update-size statistic, and a bit-width schedule's switch
(:meth:`~dqt_lightning.quant.layers.DQTWeight.regrid`).
:func:`round_to_grid` is the one rounding entry point.
"""

from __future__ import annotations

import torch

from dqt_lightning.quant.grid import Grid
from dqt_lightning.quant.rounding import counter_uniform, rounding_rule


def grid_move(levels: torch.Tensor, alpha: torch.Tensor, stepped: torch.Tensor) -> torch.Tensor:
    """The optimizer's move in grid units, ``(stepped - alpha*q) / alpha``, from float ``levels`` (``q``).

    Taken against the very same ``alpha * q`` product the optimizer started from, so a weight the optimizer did not
    move gives exactly 0. Computed in one fresh buffer as ``(-(alpha*q) + stepped) / alpha``: the same IEEE
    operations as the textbook expression (``a - b == -b + a`` bit for bit).
    """
    return (levels * alpha).neg_().add_(stepped.float()).div_(alpha)


def grid_coordinates(q: torch.Tensor, alpha: torch.Tensor, stepped: torch.Tensor) -> torch.Tensor:
    """``y = q + (stepped - alpha*q) / alpha`` in float32: exactly ``q`` where the optimizer did not move the
    weight, so an idle weight never flips by float noise."""
    levels = q.float()
    return grid_move(levels, alpha, stepped).add_(levels)


def round_to_grid(y: torch.Tensor, grid: Grid, rounding: str, key: torch.Tensor | None,
                  offset: int = 0) -> torch.Tensor:
    """Round float grid coordinates ``y`` with the rule registered as ``rounding``, clip to ``grid``, as int8.

    ``key`` is the weights' noise stream of this layer and step (a row of
    :func:`~dqt_lightning.quant.rounding.noise_keys`); rules registered with ``needs_noise=False`` never read it.
    ``offset`` is the flat index of ``y``'s first element in its layer, where ``y`` is a part of it.
    """
    rule = rounding_rule(rounding)
    if rule.needs_noise and key is None:
        raise ValueError(f"the rounding rule '{rule.name}' draws noise: pass the layer's noise key")
    u = counter_uniform(key, y.shape, offset) if rule.needs_noise else None
    return rule.fn(y.float(), u).clamp(grid.qmin, grid.qmax).to(torch.int8)


def dqt_step(q: torch.Tensor, alpha: torch.Tensor, stepped: torch.Tensor, grid: Grid, rounding: str,
             key: torch.Tensor | None, offset: int = 0) -> torch.Tensor:
    """The DQT update with a fixed scale: int8 levels ``clip(round(grid_coordinates(q, alpha, stepped)))``, of a
    whole layer or of its part from flat index ``offset`` on."""
    return round_to_grid(grid_coordinates(q, alpha, stepped), grid, rounding, key, offset)


def rescaled_step(stepped: torch.Tensor, grid: Grid, per_row: bool, rounding: str,
                  key: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The DQT update under the ``absmax`` scale policy (torchao's int8 quantized training): the scale follows the
    weight. From the stepped weight ``W'``, ``alpha' = max|W'| / Qp`` (per row, or per tensor), then
    ``q' = round(W' / alpha')`` with one rounding. Nothing is clipped except the asymmetric grid's unused lowest
    level, and stochastic rounding keeps ``E[alpha' q'] = W'``.

    Returns:
        ``(q' as int8, alpha' as float32)``, ``alpha'`` shaped ``[rows, 1]`` or a scalar.
    """
    w = stepped.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
    alpha = amax.clamp_(min=1e-8) / grid.positive_levels
    return round_to_grid(w / alpha, grid, rounding, key), alpha


def update_statistics(move: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the telemetry logs of a step in grid units (:func:`grid_move`): ``(sum of |move|, count below half a
    grid step)``, as tensors (no host sync)."""
    moved = move.abs()
    return moved.sum(), (moved < 0.5).sum()
