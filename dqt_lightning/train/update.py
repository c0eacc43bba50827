"""The callback that applies DQT's quantized update once per optimizer step and reports what it did."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from dqt_lightning.errors import ConfigError, TrainingStopped
from dqt_lightning.train.fused import (adamw_scalars, compile_unavailable_reason, compiled_dqt_adamw_step, dqt_adamw_step,
                                 noise_keys)
from dqt_lightning.quant.layers import DQTWeight
from dqt_lightning.train.optim import AdamW, _init_state, parameter_stepper
from dqt_lightning.quant.grid import quantized_step, rescaled_step, step_seed

# What observers of the update receive: (layer name, layer, global step, (sum of |y - q|, count below half a step))
# where the fused update computed those statistics itself; ``None`` where the float step is in ``update_param``.
Observer = Callable[[str, DQTWeight, int, "tuple[torch.Tensor, torch.Tensor] | None"], None]


class ListHandle:
    """Removes ``item`` from ``items`` as a hook handle removes its hook: for callbacks registered into a list."""

    def __init__(self, items: list, item: Any) -> None:
        self.items, self.item = items, item

    def remove(self) -> None:
        if self.item in self.items:
            self.items.remove(self.item)


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

    Every :class:`~dqt_lightning.quant.layers.DQTWeight` takes part: the projections, and the embedding and output head
    when they are quantized too. Order within one optimizer step (after gradient accumulation):
    ``on_before_optimizer_step`` fills each layer's ``update_param`` with a float32 ``alpha * q`` (and widens a bf16
    gradient buffer to float32 for the step); Lightning clips all gradients, float and quantized together; the optimizer
    steps every parameter with its own hyper-parameters and the scheduled learning rate; a step post-hook then rounds
    each layer once (stochastic or nearest) with noise seeded by (run seed, global step, layer index) and frees the
    float values again. Nothing float of the weight outlives the step.

    Under DDP the quantized gradients are averaged in one collective per step and every rank draws the same noise,
    so the integer replicas stay bit-identical; every ``check_replicas_every_n_steps`` steps a checksum comparison
    proves it, and stops the run if it ever fails.

    With ``QuantPrecision(update_in_backward=True)`` the same update runs per layer inside backward instead, from a
    hook that fires as soon as the layer's gradient is complete: average it across ranks (one collective per layer,
    on a process group of its own), step the one parameter with the configured optimizer, round, free the gradient.
    Same seeds, same arithmetic, same weights as the usual path; no gradient buffer of a DQT weight outlives
    backward. A non-finite gradient then skips (or stops at) that layer only: the layers before it in backward have
    already moved.

    Under the ``absmax`` scale policy the rounding also re-derives each layer's scale from the stepped weight
    (:func:`~dqt_lightning.quant.grid.rescaled_step`).

    With ``QuantPrecision(fused_update=True)`` (AdamW only) no float weight is materialized: after clipping, each
    layer's levels, gradient and moments go through :func:`~dqt_lightning.train.fused.dqt_adamw_step`, compiled into one
    kernel, and the optimizer then steps the float parameters alone. Its rounding noise is counter-based (same
    seeds, other numbers than the usual path's generator); the moments stay in ``optimizer.state`` in the
    optimizer's own format, so checkpoints resume either way. Inside backward too, when both options are on; there
    the fused step itself leaves a layer with a non-finite gradient untouched, decided on the device, and the
    skipped layers are counted once after backward: one host sync per step instead of one per layer.

    Args:
        seed: Seed of the rounding noise; ``None`` takes the run's ``seed_everything`` value (``PL_GLOBAL_SEED``).
        log_per_layer: Also log the share of weights that changed level for each layer, not only overall (at the
            steps the logger writes, every ``log_every_n_steps``; the overall rate is logged every step).
        check_replicas_every_n_steps: Compare integer weights across DDP ranks this often (0: never).
        on_nonfinite: What a NaN or inf gradient does: ``skip`` the step (no weight moves) or ``stop`` the run.
            Either way it never reaches the integer weights or a checkpoint.
        shared_noise: Draw the same rounding noise on every rank. Turn off only to watch the replica check fire.

    Raises:
        ConfigError: for an unknown ``on_nonfinite`` or a negative check interval.
    """

    def __init__(self, seed: int | None = None, log_per_layer: bool = True, check_replicas_every_n_steps: int = 50,
                 on_nonfinite: str = "skip", shared_noise: bool = True) -> None:
        if on_nonfinite not in ("skip", "stop"):
            raise ConfigError(f"QuantizedUpdate.on_nonfinite must be skip or stop; got '{on_nonfinite}'")
        if check_replicas_every_n_steps < 0:
            raise ConfigError("QuantizedUpdate.check_replicas_every_n_steps must be >= 0, "
                              f"got {check_replicas_every_n_steps}")
        self.seed = seed
        self.log_per_layer = log_per_layer
        self.check_every = check_replicas_every_n_steps
        self.on_nonfinite = on_nonfinite
        self.shared_noise = shared_noise
        self.skipped_steps = 0
        self._names: dict[int, str] = {}
        self.n_updates = 0
        self._layers: list[tuple[str, DQTWeight]] = []
        self._handles: list[Any] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending = False
        self._flips: dict[str, torch.Tensor] = {}
        self._sizes: dict[str, int] = {}
        self._trainer: pl.Trainer | None = None
        self._in_backward = False
        self._steppers: list[Callable[[], None]] = []
        self._group = None  # the process group of the per-layer averages in backward
        self._updated_in_backward = False
        self._skipped_in_backward = False
        # Called once per layer and step (see Observer) inside backward, or by the fused update: how WeightTelemetry
        # sees the float step, or its statistics, when no optimizer post-hook would.
        self.observers: list[Observer] = []
        self._fused: Callable[..., tuple[torch.Tensor, ...]] | None = None
        self._fused_pending = False
        self._optimizer: torch.optim.Optimizer | None = None
        self._fused_finite: dict[int, torch.Tensor] = {}  # layer index: whether its fused step in backward applied
        self._step_keys: tuple[int, torch.Tensor] | None = None  # (step, every layer's noise keys at that step)

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
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [name for name, m in self._layers if id(m.update_param) not in held]
        if missing:
            raise ConfigError(
                f"the optimizer does not hold the quantized weights of {len(missing)} DQT layers "
                f"(first: {missing[0]}); "
                "pass dqt_lightning.quantized_parameters(model) to it in configure_optimizers"
            )
        plugin = trainer.precision_plugin
        self._in_backward = bool(getattr(plugin, "update_in_backward", False))
        if getattr(plugin, "fused_update", False):
            self._use_fused_update(trainer)
        if self._in_backward:
            self._hook_into_backward(trainer)
        elif self._fused is not None:
            plugin.after_clipping.append(self._after_clipping)
            self._handles = [ListHandle(plugin.after_clipping, self._after_clipping)]
        else:
            self._handles = [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]

    def _use_fused_update(self, trainer: pl.Trainer) -> None:
        field = "trainer.plugins.fused_update"
        if len(trainer.optimizers) != 1:
            raise ConfigError(f"{field} needs exactly one optimizer; got {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        if not isinstance(optimizer, (torch.optim.AdamW, AdamW)):
            raise ConfigError(f"{field} fuses AdamW (torch.optim.AdamW or dqt_lightning.train.optim.AdamW) into the "
                              f"update; the optimizer is {type(optimizer).__name__}")
        for group in optimizer.param_groups:
            for option in ("amsgrad", "maximize"):
                if group.get(option):
                    raise ConfigError(f"{field} does not do AdamW's {option}; set optimizer.init_args.{option}: false")
        self._optimizer = optimizer
        if not trainer.precision_plugin.compile_fused_update:
            self._fused = dqt_adamw_step
            return
        reason = compile_unavailable_reason(trainer.strategy.root_device)
        if reason is not None:
            raise ConfigError(f"trainer.plugins.compile_fused_update: torch.compile cannot build the fused update here "
                              f"({reason}); install one, or set it to false (the same update, run eagerly)")
        self._fused = compiled_dqt_adamw_step(trainer.strategy.root_device.type)

    def _hook_into_backward(self, trainer: pl.Trainer) -> None:
        field = "trainer.plugins.update_in_backward"
        if (accumulate := trainer.accumulate_grad_batches) != 1:
            raise ConfigError(f"{field} needs trainer.accumulate_grad_batches: 1 (got {accumulate}): an update in "
                              "backward cannot wait for the gradients of later micro-batches")
        if trainer.gradient_clip_val:
            raise ConfigError(f"{field} cannot clip gradients (trainer.gradient_clip_val: {trainer.gradient_clip_val})"
                              ": the global norm needs every gradient before the first update; set it to null")
        if len(trainer.optimizers) != 1:
            raise ConfigError(f"{field} needs exactly one optimizer; got {len(trainer.optimizers)}")
        if trainer.world_size > 1:
            # Separate from the group DDP's own bucketed all-reduces run on, so the two streams of collectives,
            # both launched from backward hooks, can never be matched against each other.
            self._group = torch.distributed.new_group()
        if self._fused is None:
            self._steppers = [parameter_stepper(trainer.optimizers[0], m.update_param) for _, m in self._layers]
        self._handles = [m.update_param.register_post_accumulate_grad_hook(
            functools.partial(self._update_in_backward, i)) for i, (_, m) in enumerate(self._layers)]

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self._in_backward:
            # Every DQT layer has been updated already and its gradient freed: what remains are the float parameters.
            self._gradients_are_finite(trainer, optimizer)
            if self._fused_finite:
                self._count_skipped_layers(trainer.global_step)
            if self._skipped_in_backward:  # one step counted, however many layers it skipped
                self._skipped_in_backward = False
                self.skipped_steps += 1
            if self._updated_in_backward:
                self._updated_in_backward = False
                self._finish_step(trainer.global_step)
            return
        if trainer.world_size > 1 and self._layers:
            self._average_gradients_across_ranks()
        if not self._gradients_are_finite(trainer, optimizer):
            return
        if self._fused is not None:
            # Stepped after clipping, by _after_clipping. Clipped in float32 as on the usual path (materialize): a
            # norm of bf16 buffers, and their scaling, would round differently.
            for _, layer in self._layers:
                layer.widen_gradient()
            self._fused_pending = bool(self._layers)
            return
        for _, layer in self._layers:
            layer.materialize()
        self._pending = bool(self._layers)

    def _count_skipped_layers(self, step: int) -> None:
        # One host sync per step for all the fused steps in backward, instead of one per layer.
        indices = list(self._fused_finite)
        finite = torch.stack([self._fused_finite[i] for i in indices])
        self._fused_finite = {}
        if bool(finite.all()):
            return
        skipped = [indices[i] for i in (~finite).nonzero().reshape(-1).tolist()]
        first = self._layers[skipped[0]][0]
        if self.on_nonfinite == "stop":
            raise TrainingStopped(f"non-finite gradient at step {step} in {first}; lower the learning rate, "
                                  "or set on_nonfinite: skip")
        for index in skipped:  # as if AdamW had not stepped them: their moments are untouched, so is their count
            self._optimizer.state[self._layers[index][1].update_param]["step"] -= 1
        self._skipped_in_backward = True
        rank_zero_warn(f"skipped the update of {len(skipped)} layers at step {step} (first: {first}): non-finite "
                       "gradient")

    def _gradients_are_finite(self, trainer: pl.Trainer, optimizer) -> bool:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return True
        # One min-and-max pass per tensor (no |g| temporary), one host sync per step: NaN makes both NaN, +inf the
        # max, -inf the min.
        extremes = torch.stack([extreme.float() for p in params for extreme in p.grad.detach().aminmax()])
        finite = torch.isfinite(extremes)
        if bool(finite.all()):
            return True
        first = self._names.get(id(params[int((~finite).nonzero()[0]) // 2]), "an unnamed parameter")
        if self.on_nonfinite == "stop":
            raise TrainingStopped(f"non-finite gradient at step {trainer.global_step}, first in {first}; "
                                  "lower the learning rate, or set on_nonfinite: skip")
        # Without gradients the optimizer moves nothing this step, so no NaN reaches any weight.
        for p in params:
            p.grad = None
        self.skipped_steps += 1
        rank_zero_warn(f"skipped step {trainer.global_step}: non-finite gradient, first in {first}")
        return False

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
    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self._pending:
            return
        step = self._trainer.global_step  # still the index of this step: Lightning counts it after the step
        for index in range(len(self._layers)):
            self._round(index, step)
        self._pending = False
        self._finish_step(step)

    @torch.no_grad()
    def _after_clipping(self, optimizer: torch.optim.Optimizer) -> None:
        # Called by QuantPrecision between clipping and the optimizer's own step, which then finds no gradient on
        # the quantized weights and steps the float parameters alone.
        if not self._fused_pending:
            return
        self._fused_pending = False
        step = self._trainer.global_step
        for index in range(len(self._layers)):
            self._fused_update(index, step)
        self._finish_step(step)

    @torch.no_grad()
    def _update_in_backward(self, index: int, param: torch.Tensor) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.training or param.grad is None:
            return
        name, layer = self._layers[index]
        if self._group is not None:
            average = param.grad.float()  # summed in float32, as the one-bucket average of the usual path
            torch.distributed.all_reduce(average, group=self._group)
            param.grad.copy_(average.div_(torch.distributed.get_world_size()))
        step = trainer.global_step
        if self._fused is not None:
            # Checked on the device inside the fused step; counted once after backward (_count_skipped_layers).
            self._fused_update(index, step, skip_nonfinite=True)  # frees the gradient too
            self._updated_in_backward = True
            return
        extremes = param.grad.aminmax()
        if not bool(torch.isfinite(torch.stack(extremes)).all()):
            if self.on_nonfinite == "stop":
                raise TrainingStopped(f"non-finite gradient at step {step} in {name}; lower the learning rate, "
                                      "or set on_nonfinite: skip")
            param.grad = None
            self._skipped_in_backward = True
            rank_zero_warn(f"skipped the update of {name} at step {step}: non-finite gradient")
            return
        layer.materialize()
        self._steppers[index]()
        for observe in self.observers:
            observe(name, layer, step, None)
        self._round(index, step)
        param.grad = None
        self._updated_in_backward = True

    def _noise_seed(self, index: int, step: int) -> int:
        seed = self.seed if self.shared_noise else self.seed + 7919 * self._trainer.global_rank
        return step_seed(seed, step, index)

    def _noise_keys(self, index: int, step: int, device: torch.device) -> torch.Tensor:
        # Every layer's keys of a step in one host-to-device copy, made at the step's first fused update.
        if self._step_keys is None or self._step_keys[0] != step:
            seeds = [self._noise_seed(i, step) for i in range(len(self._layers))]
            self._step_keys = (step, noise_keys(seeds, device))
        return self._step_keys[1][index]

    def _round(self, index: int, step: int) -> None:
        """Round layer ``index``'s stepped weight onto its grid with this step's noise, then free the float values."""
        name, layer = self._layers[index]
        q = layer.levels()
        generator = self._generator(q.device)
        generator.manual_seed(self._noise_seed(index, step))
        stepped = layer.update_param.data
        if layer.scale_policy == "absmax":
            q_new, alpha = rescaled_step(stepped, layer.grid, layer.scale.dim() > 0, layer.rounding, generator)
            layer.scale.copy_(alpha.reshape(layer.scale.shape))
        else:
            q_new = quantized_step(q, layer.scale, stepped, layer.grid, layer.rounding, generator)
        self._flips[name] = torch.count_nonzero(q_new != q)  # stays a tensor: no host sync in the hot path
        layer.set_levels(q_new)
        layer.release()

    def _fused_update(self, index: int, step: int, skip_nonfinite: bool = False) -> None:
        """Step layer ``index`` with AdamW and round it, in one pass from levels to levels; free its gradient. With
        ``skip_nonfinite`` a non-finite gradient leaves the layer as it was, decided on the device."""
        name, layer = self._layers[index]
        param = layer.update_param
        if param.grad is None:
            return  # no gradient reached this layer: AdamW would skip it too
        optimizer = self._optimizer
        # Looked up at every step: load_state_dict replaces the groups, and the LR scheduler changes their lr.
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        state = optimizer.state[param]
        ours = isinstance(optimizer, AdamW)
        kind = group["state_dtype"] if ours else "float32"
        block_size = group["block_size"] if ours else 0
        if not state:
            _init_state(state, layer.shape, layer.weight.device, kind, block_size)
            if not ours:  # torch.optim.AdamW's own format, so that the unfused path can resume from it
                state["step"] = torch.tensor(0.0)
        state["step"] += 1
        betas = group["betas"]
        decay, step_size, bias_correction2_sqrt = adamw_scalars(float(group["lr"]), group["weight_decay"], betas,
                                                                float(state["step"]))
        q = layer.levels()
        q_new, flips, moved, below, finite = self._fused(
            q, layer.scale, param.grad, state["exp_avg"], state["exp_avg_sq"], state.get("exp_avg_scale"),
            state.get("exp_avg_sq_scale"), self._noise_keys(index, step, q.device), decay, *betas,
            group["eps"], step_size, bias_correction2_sqrt, layer.grid.qmin, layer.grid.qmax,
            layer.rounding == "stochastic", block_size or 1, skip_nonfinite)
        layer.set_levels(q_new)
        param.grad = None  # spent; and the optimizer must not step the placeholder
        layer.release()
        self._flips[name] = flips
        if finite is not None:
            self._fused_finite[index] = finite
        for observe in self.observers:
            observe(name, layer, step, (moved, below))

    def _finish_step(self, step: int) -> None:
        self.n_updates += 1
        if self._trainer.world_size > 1 and self.check_every and (step + 1) % self.check_every == 0:
            self._check_replicas(step)

    def _check_replicas(self, step: int) -> None:
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

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not self._flips:
            return
        total = sum(self._sizes.values())
        flipped = torch.stack(list(self._flips.values())).sum()
        metrics = {"dqt/flip_rate": flipped.float() / total, "dqt/skipped_steps": self.skipped_steps}
        # Per-layer rates only when the logger writes this step (as Lightning's own monitors decide): logging dozens
        # of metrics every step cost as much as the rounding itself at small sizes, and loggers drop the rest anyway.
        if self.log_per_layer and (trainer._logger_connector.should_update_logs or trainer.fast_dev_run):
            metrics.update({f"dqt_layers/{n}": f.float() / self._sizes[n] for n, f in self._flips.items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._flips = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "n_updates": self.n_updates, "skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run keeps the seed it started with, so its noise continues the original sequence.
        self.seed = state_dict["seed"]
        self.n_updates = state_dict["n_updates"]
        self.skipped_steps = state_dict["skipped_steps"]
