"""The callback that schedules DQT's quantized update once per optimizer step, seeds it, and reports what it did."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from dqt_lightning.errors import ConfigError, TrainingStopped
from dqt_lightning.quant.layers import DQTWeight
from dqt_lightning.quant.rounding import WEIGHTS, noise_keys, run_seed, step_seed
from dqt_lightning.train.fused import FusedUpdate
from dqt_lightning.train.optim import next_moment_seeds, parameter_stepper

# What observers of the update receive: (layer name, layer, global step, (sum of |y - q|, count below half a step))
# where the fused update computed those statistics itself; ``None`` where the stepped float view is in
# ``update_param`` (between the optimizer's step and the rounding).
Observer = Callable[[str, DQTWeight, int, "tuple[torch.Tensor, torch.Tensor] | None"], None]


def finite_gradients(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """One boolean per gradient: no NaN and no inf in it. One min-and-max pass each, no ``|g|`` temporary."""
    extremes = torch.stack([extreme.float() for grad in grads for extreme in grad.detach().aminmax()])
    return torch.isfinite(extremes).view(-1, 2).all(dim=1)


def apply_nonfinite_policy(finite: torch.Tensor, names: Sequence[str], step: int, policy: str, scope: str) -> list[int]:
    """The one non-finite policy of every update path: ``finite`` holds one boolean per gradient (or layer) named in
    ``names``. All finite: returns ``[]``. Otherwise ``stop`` raises :class:`TrainingStopped`; ``skip`` warns once
    and returns the indices of the non-finite entries, for the caller to skip ``scope`` (what the message says is
    skipped). One host sync."""
    if bool(finite.all()):
        return []
    bad = (~finite).nonzero().reshape(-1).tolist()
    where = names[bad[0]] + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
    if policy == "stop":
        raise TrainingStopped(f"non-finite gradient at step {step} in {where}; lower the learning rate, or set "
                              "on_nonfinite: skip")
    rank_zero_warn(f"skipped the update of {scope} at step {step}: non-finite gradient in {where}")
    return bad


class ListHandle:
    """Removes ``item`` from ``items`` as a hook handle removes its hook: for callbacks registered into a list."""

    def __init__(self, items: list, item: Any) -> None:
        self.items, self.item = items, item

    def remove(self) -> None:
        if self.item in self.items:
            self.items.remove(self.item)


class _AttributeHandle:
    """Resets ``owner.name`` to ``None`` on removal, if it still holds ``value``."""

    def __init__(self, owner: Any, name: str, value: Any) -> None:
        self.owner, self.name, self.value = owner, name, value
        setattr(owner, name, value)

    def remove(self) -> None:
        if getattr(self.owner, self.name, None) is self.value:
            setattr(self.owner, self.name, None)


class HookOwner(Callback):
    """A callback that registers hooks (on optimizers, parameters or another callback) into ``_handles`` and removes
    them all at teardown, so a trainer that fits again starts without them."""

    _handles: list[Any]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class QuantizedUpdate(HookOwner):
    """Runs the configured optimizer on ``alpha * q`` of every DQT layer and rounds the result back onto the grid.

    Every :class:`~dqt_lightning.quant.layers.DQTWeight` takes part: the projections, and the embedding and output
    head when they are quantized too. The layers own the arithmetic (:meth:`DQTWeight.materialize
    <dqt_lightning.quant.layers.DQTWeight.materialize>`, :meth:`DQTWeight.round_step
    <dqt_lightning.quant.layers.DQTWeight.round_step>`, :mod:`dqt_lightning.quant.step`); this callback schedules it,
    seeds its noise by (run seed, global step, layer index), hands the float step to observers (telemetry), applies
    the non-finite policy and checks DDP replicas. Order within one optimizer step (after gradient accumulation):

    - ``on_before_optimizer_step``: under DDP, average the quantized gradients in one collective; skip or stop on a
      non-finite gradient; widen bf16 gradients to float32 when they are about to be clipped;
    - Lightning clips all gradients, float and quantized together;
    - then (from :meth:`QuantPrecision.optimizer_step <dqt_lightning.train.precision.QuantPrecision.optimizer_step>`)
      one layer at a time: materialize its float32 ``alpha * q``, step that one parameter with the configured
      optimizer (its hyper-parameters, state and scheduled learning rate), round it once, free its float values and
      gradient; so at most one layer's float weight ever exists. This needs an optimizer whose step of a parameter
      reads only that parameter's gradient and state, as every elementwise or factored rule does (SGD, Adam, AdamW,
      Adafactor, Lion). The optimizer then steps the float parameters, finding no gradient on the quantized ones.

    Under DDP every rank draws the same noise, so the integer replicas stay bit-identical; every
    ``check_replicas_every_n_steps`` steps a checksum comparison proves it, or stops the run.

    With ``Execution(update_in_backward=True)`` the same update runs per layer inside backward, from a hook that fires
    as soon as the layer's gradient is complete (averaged across ranks first, on a process group of its own): the
    same weights as the usual path. A non-finite gradient then skips (or stops at) that layer only.

    With ``Execution(fused_update=True)`` no float weight is materialized: each layer's levels, gradient and moments
    go through the optimizer's registered rule fused with the rounding
    (:class:`~dqt_lightning.train.fused.FusedUpdate`), after clipping or inside backward, where a layer with a
    non-finite gradient is left untouched, decided on the device (skips are counted once per step, after backward).

    Args:
        seed: Seed of the rounding noise; ``None`` takes the run's ``seed_everything`` value (``PL_GLOBAL_SEED``).
        log_per_layer: Also log the share of weights that changed level for each layer, not only overall (at the
            steps the logger writes, every ``log_every_n_steps``; the overall rate is logged every step).
        check_replicas_every_n_steps: Compare integer weights across DDP ranks this often (0: never).
        on_nonfinite: What a NaN or inf gradient does: ``skip`` the step (no weight moves) or ``stop`` the run.
            Either way it never reaches the integer weights or a checkpoint.
        shared_noise: Draw the same rounding noise on every rank. Turn off only to watch the replica check fire.
        max_skipped_in_a_row: Stop the run after this many optimizer steps in a row skipped for non-finite gradients
            (0: never): such a run has stopped learning. Whatever it is, a run that skipped more steps than it took
            ends with an error, never as a success.

    Raises:
        ConfigError: for an unknown ``on_nonfinite`` or a negative check interval.
    """

    def __init__(self, seed: int | None = None, log_per_layer: bool = True, check_replicas_every_n_steps: int = 50,
                 on_nonfinite: str = "skip", shared_noise: bool = True, max_skipped_in_a_row: int = 10) -> None:
        if on_nonfinite not in ("skip", "stop"):
            raise ConfigError(f"QuantizedUpdate.on_nonfinite must be skip or stop; got '{on_nonfinite}'")
        if max_skipped_in_a_row < 0:
            raise ConfigError(f"QuantizedUpdate.max_skipped_in_a_row must be >= 0 (0: never stop); got "
                              f"{max_skipped_in_a_row}")
        if check_replicas_every_n_steps < 0:
            raise ConfigError("QuantizedUpdate.check_replicas_every_n_steps must be >= 0, "
                              f"got {check_replicas_every_n_steps}")
        self.seed = seed
        self.log_per_layer = log_per_layer
        self.check_every = check_replicas_every_n_steps
        self.on_nonfinite = on_nonfinite
        self.shared_noise = shared_noise
        self.max_skipped_in_a_row = max_skipped_in_a_row
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        self.n_updates = 0
        self._checked_at: int | None = None  # the last step whose replicas were compared
        self._names: dict[int, str] = {}
        self._layers: list[tuple[str, DQTWeight]] = []
        self._handles: list[Any] = []
        self._pending = False  # whether this step's DQT update still has to run, after clipping
        self._flips: dict[str, torch.Tensor] = {}
        self._sizes: dict[str, int] = {}
        self._trainer: pl.Trainer | None = None
        self._in_backward = False
        self._steppers: list[Callable[[], None]] = []
        self._group = None  # the process group of the per-layer averages in backward
        self._updated_in_backward = self._skipped_in_backward = False
        # Called once per layer and step (see Observer), between its optimizer step and its rounding: how
        # WeightTelemetry sees the float step, or the statistics of it that the fused update computed.
        self.observers: list[Observer] = []
        self._fused: FusedUpdate | None = None
        self._fused_finite: dict[int, torch.Tensor] = {}  # layer index: whether its fused step in backward applied
        self._step_keys: tuple[int, torch.Tensor] | None = None  # (step, every layer's noise keys at that step)
        # Host time in this step's DQT update (on a GPU: launching it), and over the whole run.
        self._update_seconds = self.update_seconds_total = 0.0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._step_keys = None
        self._layers = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, DQTWeight)]
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        self._names.update({id(m.update_param): f"{name}.weight" for name, m in self._layers})
        if not self._layers:
            return
        self._sizes = {name: m.shape.numel() for name, m in self._layers}
        self.seed = run_seed(self.seed)
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [name for name, m in self._layers if id(m.update_param) not in held]
        if missing:
            raise ConfigError(
                f"the optimizer does not hold the quantized weights of {len(missing)} DQT layers "
                f"(first: {missing[0]}); "
                "pass dqt_lightning.quantized_parameters(model) to it in configure_optimizers"
            )
        plugin = trainer.precision_plugin
        if not hasattr(plugin, "quantized_update"):
            raise ConfigError("dqt_lightning.QuantizedUpdate needs trainer.plugins: dqt_lightning.QuantPrecision, "
                              f"whose optimizer step applies the update; the precision plugin is "
                              f"{type(plugin).__name__}")
        self._handles = [_AttributeHandle(plugin, "quantized_update", self)]
        execution = plugin.execution
        self._in_backward = bool(execution.update_in_backward)
        if execution.fused_update:
            if len(trainer.optimizers) != 1:
                raise ConfigError(f"{FusedUpdate.field} needs exactly one optimizer; got {len(trainer.optimizers)}")
            self._fused = FusedUpdate(trainer.optimizers[0], trainer.strategy.root_device,
                                      execution.compile_fused_update)
        if self._fused is None:
            self._steppers = [parameter_stepper(trainer.optimizers[0], m.update_param) for _, m in self._layers]
        if self._in_backward:
            self._hook_into_backward(trainer)

    def _hook_into_backward(self, trainer: pl.Trainer) -> None:
        trainer.precision_plugin.execution.check_trainer(trainer.accumulate_grad_batches, trainer.gradient_clip_val)
        if len(trainer.optimizers) != 1:
            raise ConfigError("trainer.plugins.execution.update_in_backward needs exactly one optimizer; got "
                              f"{len(trainer.optimizers)}")
        if trainer.world_size > 1:
            # Separate from the group DDP's own bucketed all-reduces run on, so the two streams of collectives,
            # both launched from backward hooks, can never be matched against each other.
            self._group = torch.distributed.new_group()
        self._handles += [m.update_param.register_post_accumulate_grad_hook(
            functools.partial(self._update_in_backward, i)) for i, (_, m) in enumerate(self._layers)]

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        step = trainer.global_step  # still the index of this step: Lightning counts it after the step
        if self._in_backward:
            # Every DQT layer has been updated already and its gradient freed: what remains are the float parameters.
            self._gradients_are_finite(optimizer, step)
            if self._fused_finite:
                self._count_skipped_layers(step)
            if self._skipped_in_backward:  # one step counted, however many layers it skipped
                self._skipped_in_backward = False
                self._count_skipped_step(step)
            if self._updated_in_backward:
                self._updated_in_backward = False
                self._finish_step(step)
            return
        if trainer.world_size > 1 and self._layers:
            self._average_gradients_across_ranks()
        if not self._gradients_are_finite(optimizer, step) or not self._layers:
            return
        if trainer.gradient_clip_val:
            # Clipped in float32: a norm of bf16 buffers, and their scaling, would round differently. Unclipped, each
            # layer's gradient is widened only at its own step, so no float32 copy of every gradient exists at once.
            for _, layer in self._layers:
                layer.widen_gradient()
        self._pending = True

    def _gradients_are_finite(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return True
        names = [self._names.get(id(p), "an unnamed parameter") for p in params]
        if not apply_nonfinite_policy(finite_gradients([p.grad for p in params]), names, step, self.on_nonfinite,
                                      "every parameter"):
            return True
        for p in params:  # without gradients the optimizer moves nothing this step, so no NaN reaches any weight
            p.grad = None
        self._count_skipped_step(step)
        return False

    def _count_skipped_step(self, step: int) -> None:
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        if self.max_skipped_in_a_row and self.skipped_in_a_row >= self.max_skipped_in_a_row:
            raise TrainingStopped(f"{self.skipped_in_a_row} optimizer steps in a row skipped for non-finite gradients "
                                  f"(the last at step {step}): the run is not learning; lower the learning rate, or "
                                  "raise QuantizedUpdate.max_skipped_in_a_row")

    def _count_skipped_layers(self, step: int) -> None:
        # One host sync per step for all the fused steps in backward, instead of one per layer.
        indices = list(self._fused_finite)
        finite = torch.stack([self._fused_finite[i] for i in indices])
        self._fused_finite = {}
        names = [self._names[id(self._layers[i][1].update_param)] for i in indices]
        skipped = apply_nonfinite_policy(finite, names, step, self.on_nonfinite, "those layers")
        for position in skipped:
            self._fused.undo(self._layers[indices[position]][1])
        self._skipped_in_backward = self._skipped_in_backward or bool(skipped)

    @torch.no_grad()
    def _average_gradients_across_ranks(self) -> None:
        # DDP all-reduces registered parameters only; the quantized weights' gradients live outside it. One flat
        # bucket, one collective per step, before clipping, so every rank rounds the same averaged update.
        params = [layer.update_param for _, layer in self._layers]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        # Summed in float32 even when the buffers are bf16: the average is rounded once, not at every addition.
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
            offset += p.grad.numel()

    @torch.no_grad()
    def after_clipping(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by :class:`~dqt_lightning.train.precision.QuantPrecision` between clipping and the optimizer's own
        step (which then steps the float parameters alone): every DQT layer's update, one layer at a time."""
        if not self._pending:
            return
        self._pending = False
        step = self._trainer.global_step
        for index in range(len(self._layers)):
            if self._fused is not None:
                self._fused_step(index, step)
            else:
                self._step_and_round(index, step)
        self._finish_step(step)

    @torch.no_grad()
    def _update_in_backward(self, index: int, param: torch.Tensor) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.training or param.grad is None:
            return
        if self._group is not None:
            average = param.grad.float()  # summed in float32, as the one-bucket average of the usual path
            torch.distributed.all_reduce(average, group=self._group)
            param.grad.copy_(average.div_(torch.distributed.get_world_size()))
        step = trainer.global_step
        if self._fused is not None:
            # Checked on the device inside the fused step; counted once after backward (_count_skipped_layers).
            self._fused_step(index, step, skip_nonfinite=True)  # frees the gradient too
            self._updated_in_backward = True
            return
        if apply_nonfinite_policy(finite_gradients([param.grad]), [self._names[id(param)]], step, self.on_nonfinite,
                                  "that layer"):
            param.grad = None
            self._skipped_in_backward = True
            return
        self._step_and_round(index, step)
        self._updated_in_backward = True

    def _step_and_round(self, index: int, step: int) -> None:
        """One layer's unfused update: ``alpha * q``, the optimizer's step of it, the observers, one rounding."""
        param = self._layers[index][1].update_param
        if param.grad is None:  # no gradient this step (the optimizer would skip it too)
            return
        started = time.perf_counter()
        self._layers[index][1].materialize()
        self._steppers[index]()
        self._round(index, step)
        param.grad = None  # spent; and the optimizer's own step must not find it on the placeholder
        self._update_seconds += time.perf_counter() - started
        self.update_seconds_total += time.perf_counter() - started

    def _keys(self, index: int, step: int, device: torch.device) -> torch.Tensor:
        """Layer ``index``'s noise keys at ``step``: the weights' stream from (run seed, step, layer index), the
        moments' from the optimizer's own seeds where it rounds them (so the fused update draws what the unfused
        optimizer would). Every layer's keys of a step in one host-to-device copy, made at the step's first use."""
        if self._step_keys is None or self._step_keys[0] != step:
            seed = self.seed if self.shared_noise else self.seed + 7919 * self._trainer.global_rank
            seeds: list[Any] = [step_seed(seed, step, i) for i in range(len(self._layers))]
            if self._fused is not None:
                moments = next_moment_seeds(self._fused.optimizer, [m.update_param for _, m in self._layers])
                seeds = [s if m is None else (s, m) for s, m in zip(seeds, moments)]
            self._step_keys = (step, noise_keys(seeds, device))
        return self._step_keys[1][index]

    def _round(self, index: int, step: int) -> None:
        name, layer = self._layers[index]
        for observe in self.observers:
            observe(name, layer, step, None)
        self._flips[name] = layer.round_step(self._keys(index, step, layer.weight.device)[WEIGHTS])

    def _fused_step(self, index: int, step: int, skip_nonfinite: bool = False) -> None:
        name, layer = self._layers[index]
        started = time.perf_counter()
        result = self._fused.step(layer, self._keys(index, step, layer.weight.device), skip_nonfinite)
        self._update_seconds += time.perf_counter() - started
        self.update_seconds_total += time.perf_counter() - started
        if result is None:
            return
        self._flips[name], stats, finite = result
        if finite is not None:
            self._fused_finite[index] = finite
        for observe in self.observers:
            observe(name, layer, step, stats)

    def _finish_step(self, step: int) -> None:
        self.n_updates += 1
        self.skipped_in_a_row = 0
        if self._trainer.world_size > 1 and self.check_every and (step + 1) % self.check_every == 0:
            self._check_replicas(step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every DDP run compares its replicas at least once, however short: at the end, unless its last step did.
        last = trainer.global_step - 1
        if trainer.world_size > 1 and self.check_every and self._layers and last >= 0 and self._checked_at != last:
            self._check_replicas(last)
        if self.skipped_steps > self.n_updates:
            raise TrainingStopped(f"{self.skipped_steps} of {self.skipped_steps + self.n_updates} optimizer steps were "
                                  "skipped for non-finite gradients: the run did not learn; lower the learning rate")

    def _check_replicas(self, step: int) -> None:
        self._checked_at = step
        # Two int64 sums per layer (plain and position-weighted) catch any flipped level; MAX and MIN across ranks
        # agree only if every rank holds the same integers. Summed over the stored bytes, packed or not: the same
        # levels are the same bytes.
        sums = []
        for _, layer in self._layers:
            q = layer.weight.reshape(-1).to(torch.int64)
            position = torch.arange(1, q.numel() + 1, device=q.device) % 65521
            sums.append(torch.stack([q.sum(), (q * position).sum()]))
        high = torch.stack(sums)
        low = high.clone()
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        differ = (high != low).any(dim=1)
        if bool(differ.any()):
            first = self._layers[int(differ.nonzero()[0])][0]
            raise TrainingStopped(f"integer weights differ across DDP ranks after step {step}, first in {first} "
                                  f"({int(differ.sum())} of {len(self._layers)} layers)")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not self._flips:
            return
        total = sum(self._sizes.values())
        flipped = torch.stack(list(self._flips.values())).sum()
        metrics = {"dqt/flip_rate": flipped.float() / total, "dqt/skipped_steps": self.skipped_steps,
                   "dqt/update_seconds": self._update_seconds}
        self._update_seconds = 0.0
        # Per-layer rates only when the logger writes this step (as Lightning's own monitors decide): logging dozens
        # of metrics every step cost as much as the rounding itself at small sizes, and loggers drop the rest anyway.
        if self.log_per_layer and (_logger_writes(trainer) or trainer.fast_dev_run):
            metrics.update({f"dqt_layers/{n}": f.float() / self._sizes[n] for n, f in self._flips.items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._flips = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "n_updates": self.n_updates, "skipped_steps": self.skipped_steps,
                "skipped_in_a_row": self.skipped_in_a_row}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run keeps the seed it started with, so its noise continues the original sequence.
        self.seed = state_dict.get("seed", self.seed)
        self.n_updates = state_dict.get("n_updates", 0)
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self.skipped_in_a_row = state_dict.get("skipped_in_a_row", 0)


def _logger_writes(trainer: pl.Trainer) -> bool:
    """Lightning's rule for the steps the logger writes (every ``log_every_n_steps``-th, and the last), publicly."""
    every = trainer.log_every_n_steps
    return every > 0 and (trainer.global_step % every == 0 or trainer.should_stop)
