"""Weight telemetry for DQT runs: what the integer weights are doing, cheap enough to leave on.

:class:`~dqt_lightning.train.update.QuantizedUpdate` already logs the per-layer flip rate at every step. Every
``every_n_steps`` optimizer steps :class:`WeightTelemetry` adds:

- ``telemetry/update_over_step``: the mean of ``|delta| / alpha``, the optimizer's step in grid units, before
  rounding; and ``telemetry/update_below_half_step``: the share of weights whose step is under half a grid step (the
  ones round-to-nearest would never move, and stochastic rounding moves only now and then).
- ``telemetry/share_zero`` and ``telemetry/share_saturated``: the share of weights on level 0 and on the grid's two
  edges; per layer, a TensorBoard histogram of the levels (one bucket per level) under ``telemetry_levels/``.
- ``telemetry_scale/<layer>``: each layer's scale (the mean, with a histogram, when scales are per row).

Between measured steps the callback does nothing but compare one integer per step, so its cost is the measured
steps' cost divided by ``every_n_steps`` (docs/benchmarks.md, "Telemetry overhead", measures it).
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.layers import DQTWeight
from dqt_lightning.quant.step import grid_move, update_statistics
from dqt_lightning.train.update import HookOwner, ListHandle, QuantizedUpdate


class WeightTelemetry(HookOwner):
    """Logs update size against grid step, level occupancy and scales of every DQT layer every ``every_n_steps``.

    The update ratio needs the optimizer's float step, which exists only between the optimizer step and the
    rounding onto the grid. :class:`~dqt_lightning.train.update.QuantizedUpdate` hands each layer to its observers
    right there (or, for the fused update, the statistics the fused kernel computed); this callback is one of them,
    whatever the order of the callbacks.

    Args:
        every_n_steps: Measure at optimizer steps that are multiples of this (step 0 included).
        per_layer: Also log the update ratio per layer (``telemetry_layers/``), the level histograms and the scales;
            the run-wide scalars are always logged.
        histograms: Write the per-layer level and scale histograms (TensorBoard loggers only).
    """

    def __init__(self, every_n_steps: int = 50, per_layer: bool = True, histograms: bool = True) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(f"WeightTelemetry.every_n_steps must be an integer >= 1; got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.histograms = histograms
        self._layers: list[tuple[str, DQTWeight]] = []
        self._handles: list[Any] = []
        self._trainer: pl.Trainer | None = None
        self._update_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name: (sum of ratios, count below)
        self._measured_step: int | None = None
        self.seconds = 0.0  # wall time spent measuring and logging, for the overhead benchmark

    def _measuring(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._layers = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, DQTWeight)]
        if not self._layers:
            return
        update = next((cb for cb in trainer.callbacks if isinstance(cb, QuantizedUpdate)), None)
        if update is not None:
            update.observers.append(self._observe_update)
            self._handles = [ListHandle(update.observers, self._observe_update)]

    @torch.no_grad()
    def _observe_update(self, name: str, layer: DQTWeight, step: int,
                        stats: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        # Every rank holds the same integers and the same averaged update: rank 0 speaks for all.
        if self._trainer.is_global_zero and self._measuring(step):
            started = time.perf_counter()
            if stats is None:
                self._measure(name, layer, step)
            else:
                self._measured_step = step
                self._update_stats[name] = stats
            self.seconds += time.perf_counter() - started

    def _measure(self, name: str, layer: DQTWeight, step: int) -> None:
        if not layer.materialized:
            return  # the update skipped this step (a non-finite gradient)
        self._measured_step = step
        # The same grid units the update rounds in: (stepped - alpha*q) / alpha.
        move = grid_move(layer.levels().float(), layer.scale, layer.update_param.data)
        self._update_stats[name] = update_statistics(move)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # Only the batch whose optimizer step was measured logs (with gradient accumulation, the last micro-batch).
        if self._measured_step is not None:
            self._measured_step = None
            started = time.perf_counter()
            self._log(trainer, trainer.global_step)
            self.seconds += time.perf_counter() - started

    @torch.no_grad()
    def _log(self, trainer: pl.Trainer, step: int) -> None:
        stats, self._update_stats = self._update_stats, {}
        if not trainer.is_global_zero or trainer.logger is None:
            return  # every rank holds the same integers and the same averaged update: rank 0 speaks for all
        metrics: dict[str, torch.Tensor] = {}
        sizes = {name: layer.shape.numel() for name, layer in self._layers}
        if stats:
            counted = sum(sizes[name] for name in stats)
            metrics["telemetry/update_over_step"] = sum(s for s, _ in stats.values()) / counted
            metrics["telemetry/update_below_half_step"] = sum(b for _, b in stats.values()) / counted
        experiment = getattr(trainer.logger, "experiment", None)
        write_histograms = self.histograms and self.per_layer and hasattr(experiment, "add_histogram_raw")
        zeros = saturated = torch.zeros((), dtype=torch.int64)
        for name, layer in self._layers:
            grid = layer.grid
            levels = layer.levels().reshape(-1).to(torch.int32) - grid.qmin
            counts = torch.bincount(levels, minlength=grid.qmax - grid.qmin + 1)
            zeros = zeros + counts[-grid.qmin]
            saturated = saturated + counts[0] + counts[-1]
            if self.per_layer:
                if name in stats:
                    ratio_sum, below = stats[name]
                    metrics[f"telemetry_layers/{name}.update_over_step"] = ratio_sum / sizes[name]
                    metrics[f"telemetry_layers/{name}.update_below_half_step"] = below / sizes[name]
                metrics[f"telemetry_scale/{name}"] = layer.scale.mean()
            if write_histograms:
                _level_histogram(experiment, f"telemetry_levels/{name}", counts.cpu(), grid.qmin, step)
                if layer.scale.dim():
                    experiment.add_histogram(f"telemetry_scale_rows/{name}", layer.scale.reshape(-1).cpu(), step)
        total = sum(sizes.values())
        metrics["telemetry/share_zero"] = zeros / total
        metrics["telemetry/share_saturated"] = saturated / total
        # Straight to the logger: self.log would drop values on steps that are not multiples of log_every_n_steps.
        trainer.logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps}


def _level_histogram(experiment: Any, tag: str, counts: torch.Tensor, qmin: int, step: int) -> None:
    """One TensorBoard histogram bucket per grid level (bucket edges halfway between levels)."""
    levels = torch.arange(qmin, qmin + counts.numel(), dtype=torch.float64)
    weights = counts.to(torch.float64)
    num = float(weights.sum())
    occupied = counts.nonzero().reshape(-1)
    experiment.add_histogram_raw(
        tag,
        min=float(levels[occupied[0]]) if occupied.numel() else 0.0,
        max=float(levels[occupied[-1]]) if occupied.numel() else 0.0,
        num=num,
        sum=float((levels * weights).sum()),
        sum_squares=float((levels * levels * weights).sum()),
        bucket_limits=(levels + 0.5).tolist(),
        bucket_counts=weights.tolist(),
        global_step=step,
    )
