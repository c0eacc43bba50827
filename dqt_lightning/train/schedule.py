"""Bit-width schedules: change the grid DQT weights live on while training goes on.

DQT weights are integers on a grid, so the grid itself can be coarsened mid-run: 8 bits for most of the run, then
ternary (in one step or through 4 and 2 bits), with training continuing under stochastic rounding on the coarser
grid. At a switch every DQT layer is moved with :meth:`~dqt_lightning.quant.layers.DQTWeight.regrid`: a new absmean
scale and one (by default stochastic) rounding of ``alpha * q`` onto the new levels. No full-precision weight is ever
stored: the float ``alpha * q`` exists only inside that call, as it does inside every DQT update.

The update callback reads ``layer.grid`` at every step, so once a layer's grid has changed the update rounds onto the
new grid. A switch happens at a step boundary (before the first micro-batch of the step), with noise seeded from
(run seed, step, layer index) as the update's is, so every DDP rank makes the same switch; the current entry is part
of the callback's checkpoint state, so a run resumed after a switch continues on the coarse grid.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import LambdaLR
from typing_extensions import override

from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.grid import Grid
from dqt_lightning.quant.layers import DQTWeight
from dqt_lightning.quant.rounding import WEIGHTS, noise_keys, rounding_rule, run_seed, step_seed

# Added to the run seed for the switch's noise, so that it is independent of the update's noise at the same step.
_SWITCH_SEED_OFFSET = 104_729
SCALE_RULES = ("absmean", "range")


def _parse_schedule(schedule: Any) -> list[tuple[float, float]]:
    """Check ``schedule`` (a list of ``[fraction of training, bits]`` pairs) and return it as tuples."""
    field = "BitWidthSchedule.schedule"
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ConfigError(f"{field} must be a non-empty list of [fraction, bits] pairs, e.g. [[0.0, 8], [0.7, 1.58]]")
    entries: list[tuple[float, float]] = []
    for i, entry in enumerate(schedule):
        where = f"{field}[{i}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ConfigError(f"{where} must be a [fraction, bits] pair; got {entry!r}")
        fraction, bits = entry
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ConfigError(f"{where}: the fraction of training must be a number in [0, 1); got {fraction!r}")
        if isinstance(bits, bool) or not isinstance(bits, (int, float)):
            raise ConfigError(f"{where}: bits must be a number (1.58 or 2..8); got {bits!r}")
        Grid.from_bits(float(bits), field=f"{where} bits")
        if entries and fraction <= entries[-1][0]:
            raise ConfigError(f"{where}: fractions must increase; {fraction} follows {entries[-1][0]}")
        entries.append((float(fraction), float(bits)))
    if entries[0][0] != 0.0:
        raise ConfigError(f"{field}[0] must start at fraction 0.0 (the bits training starts with); "
                          f"got {entries[0][0]}")
    return entries


def rewarmed(factor: Callable[[int], float], switches: list[int], steps: int, to: float,
             total: int) -> Callable[[int], float]:
    """``factor`` (the learning-rate multiplier of each step) re-warmed after each switch: from ``factor`` at the
    switch linearly up to ``to`` over ``steps`` steps, then a cosine down to ``factor(total)``, the schedule's end."""
    floor = factor(total)

    def multiplier(step: int) -> float:
        start = max((s for s in switches if s <= step), default=None)
        if start is None:
            return factor(step)
        if step < start + steps:
            return factor(start) + (to - factor(start)) * (step - start + 1) / steps
        top = start + steps - 1  # the last step of the climb, at ``to`` exactly
        progress = min((step - top) / max(total - top, 1), 1.0)
        return floor + (to - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def _same_bits(a: float, b: float) -> bool:
    return math.isclose(a, b, abs_tol=1e-6)


class BitWidthSchedule(Callback):
    """Coarsens (or refines) the grid of every DQT weight at given fractions of training.

    Args:
        schedule: ``[fraction of training, bits]`` pairs with increasing fractions, the first at 0.0 with the bits
            the run starts with (``trainer.plugins.method.bits``). A fraction counts optimizer steps out of
            ``trainer.max_steps`` (or the estimated stepping batches when that is unset); e.g.
            ``[[0.0, 8], [0.7, 1.58]]`` trains 8-bit for 70% of the steps, then ternary.
        rounding: How ``alpha * q`` is rounded onto the new grid at a switch: ``stochastic`` (unbiased inside the
            grid), ``nearest``, or any registered rounding rule (by name or dotted path). Training after the switch
            rounds as ``trainer.plugins.method.rounding`` says.
        scale_rule: The new scale at a switch: ``absmean`` (BitNet's quantizer on the current weight,
            ``mean|W| / Qp'``) or ``range`` (the old grid's range kept, ``alpha * Qp / Qp'``: nothing is clipped).
        seed: Seed of the switch's rounding noise; default: the run seed (``seed_everything``), as the update's.
        rewarm_steps: After each switch, warm the learning rate up again over this many steps (0: no re-warm), from
            where the schedule had it to ``rewarm_to`` of the peak, then decay it by a cosine to where the schedule
            ends: a late switch otherwise leaves too little learning rate to recover. Needs the model's own
            warm-up + cosine schedule (a ``LambdaLR``).
        rewarm_to: The fraction of the peak learning rate the re-warm reaches.

    Raises:
        ConfigError: for a malformed schedule, an unknown rounding, a first entry whose bits differ from the
            plugin's, or a run without DQT layers.
    """

    def __init__(self, schedule: list[list[float]], rounding: str = "stochastic", scale_rule: str = "absmean",
                 seed: int | None = None, rewarm_steps: int = 0, rewarm_to: float = 0.5) -> None:
        self.schedule = _parse_schedule(schedule)
        rounding_rule(rounding, field="BitWidthSchedule.rounding")  # a dotted path is imported and registered here
        self.rounding = rounding
        if scale_rule not in SCALE_RULES:
            raise ConfigError(f"BitWidthSchedule.scale_rule must be one of {', '.join(SCALE_RULES)}; "
                              f"got '{scale_rule}'")
        self.scale_rule = scale_rule
        if rewarm_steps < 0 or not 0.0 < rewarm_to <= 1.0:
            raise ConfigError(f"BitWidthSchedule: rewarm_steps must be >= 0 and rewarm_to in (0, 1]; got "
                              f"{rewarm_steps} and {rewarm_to}")
        self.rewarm_steps, self.rewarm_to = rewarm_steps, rewarm_to
        self.seed = seed
        self.current = 0  # index into schedule of the grid the weights are on now
        self.switch_steps: list[int] = []
        self.switches: list[dict[str, float]] = []  # what each switch did, for the log and the checkpoint
        self._layers: list[DQTWeight] = []
        self._symmetric = False

    @property
    def bits(self) -> float:
        """The bits of the grid the weights are on now."""
        return self.schedule[self.current][1]

    def _grid(self, index: int) -> Grid:
        return Grid.from_bits(self.schedule[index][1], symmetric=self._symmetric)

    @staticmethod
    def _is_symmetric(start: Grid) -> bool:
        return not start.is_ternary and start.qmin == -start.qmax

    def grids(self, start: Grid) -> list[Grid]:
        """Every grid the schedule can put the weights on, when they start on ``start`` (symmetric or not)."""
        return [Grid.from_bits(bits, symmetric=self._is_symmetric(start)) for _, bits in self.schedule]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after a checkpoint's callback state was loaded, before the first (or the resumed) step.
        self._layers = [m for m in pl_module.modules() if isinstance(m, DQTWeight)]
        if not self._layers:
            raise ConfigError("BitWidthSchedule needs DQT weights (trainer.plugins.method.mode: dqt); this model has "
                              "none")
        plugin_grid: Grid | None = getattr(trainer.precision_plugin, "grid", None)
        start = plugin_grid or self._layers[0].grid
        if not _same_bits(start.bits, self.schedule[0][1]):
            raise ConfigError(f"BitWidthSchedule.schedule[0] starts at {self.schedule[0][1]:g} bits but the weights "
                              f"start at {start.bits:g} (trainer.plugins.method.bits)")
        self._symmetric = self._is_symmetric(start)
        self.seed = run_seed(self.seed)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError("BitWidthSchedule needs a finite run: set trainer.max_steps or trainer.max_epochs")
        self.switch_steps = [round(fraction * int(total)) for fraction, _ in self.schedule]
        if self.rewarm_steps:
            self._rewarm_learning_rate(trainer, int(total))
        # A resumed run's weights (int levels and scales) come from the checkpoint already on the current grid;
        # only the layers' grid attribute, which the update reads, has to be told.
        grid = self._grid(self.current)
        for layer in self._layers:
            layer.grid = grid

    def _rewarm_learning_rate(self, trainer: pl.Trainer, total: int) -> None:
        # The learning rate is a pure function of the step, so wrapping the scheduler's factor here (again on a
        # resume, before any step) keeps a resumed run's rates those of an uninterrupted one.
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        if len(schedulers) != 1 or not isinstance(schedulers[0], LambdaLR):
            raise ConfigError("BitWidthSchedule.rewarm_steps re-warms the model's own warm-up + cosine schedule (one "
                              "LambdaLR); this run's schedulers are "
                              f"{', '.join(type(s).__name__ for s in schedulers) or 'none'}")
        scheduler = schedulers[0]
        scheduler.lr_lambdas = [rewarmed(factor, self.switch_steps[1:], self.rewarm_steps, self.rewarm_to, total)
                                for factor in scheduler.lr_lambdas]
        for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        # global_step is the index of the step this batch belongs to: a switch lands before its first micro-batch,
        # when no gradient of the step has been accumulated yet.
        step = trainer.global_step
        target = self.current
        while target + 1 < len(self.schedule) and step >= self.switch_steps[target + 1]:
            target += 1
        if target != self.current:
            self._switch(trainer, target, step)

    def _switch(self, trainer: pl.Trainer, target: int, step: int) -> None:
        old_bits, grid = self.bits, self._grid(target)
        # The switch's noise, one key per layer from (run seed + offset, step, layer index): the same on every rank.
        seeds = [step_seed(self.seed + _SWITCH_SEED_OFFSET, step, index) for index in range(len(self._layers))]
        keys = noise_keys(seeds, self._layers[0].weight.device)
        clipped = 0.0
        total = 0
        for index, layer in enumerate(self._layers):
            n = layer.shape.numel()
            key = keys[index, WEIGHTS].to(layer.weight.device)
            clipped += layer.regrid(grid, self.rounding, key, self.scale_rule) * n
            total += n
        self.current = target
        record = {"step": step, "from_bits": old_bits, "to_bits": grid.bits, "clipped_share": clipped / total}
        self.switches.append(record)
        message = (f"bit-width schedule: step {step}: {old_bits:g} -> {grid.bits:g} bits "
                   f"(levels [{grid.qmin}, {grid.qmax}], {self.scale_rule} scale, {self.rounding} rounding, "
                   f"{100 * record['clipped_share']:.2f}% of weights clipped to the new range)")
        rank_zero_info(message)
        experiment = getattr(trainer.logger, "experiment", None) if trainer.is_global_zero else None
        if hasattr(experiment, "add_text"):  # TensorBoard: the switch shows up under Text, at its step
            experiment.add_text("dqt/bit_width_schedule", message, global_step=step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        pl_module.log("dqt/bits", self.bits, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "bits": self.bits, "seed": self.seed, "switches": self.switches,
                "schedule": [list(entry) for entry in self.schedule]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [tuple(entry) for entry in state_dict["schedule"]]
        if saved[: state_dict["current"] + 1] != self.schedule[: state_dict["current"] + 1]:
            raise ConfigError(f"BitWidthSchedule.schedule differs from the checkpoint's ({saved}) in the switches "
                              "already made; resume with the schedule the run started with")
        self.current = state_dict["current"]
        self.seed = state_dict["seed"]
        self.switches = list(state_dict["switches"])
