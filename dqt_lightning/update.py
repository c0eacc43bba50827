"""The callback that applies DQT's quantized update once per optimizer step and reports what it did."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dqt_lightning.errors import ConfigError
from dqt_lightning.layers import DQTLinear
from dqt_lightning.quant import quantized_step, step_seed


class QuantizedUpdate(Callback):
    """Runs the configured optimizer on ``alpha * q`` of every DQT layer and rounds the result back onto the grid.

    Order within one optimizer step (after gradient accumulation): ``on_before_optimizer_step`` fills each layer's
    ``update_param`` with ``alpha * q``; Lightning clips all gradients, float and quantized together; the optimizer
    steps every parameter with its own hyper-parameters and the scheduled learning rate; a step post-hook then rounds
    each layer once (stochastic or nearest) with noise seeded by (run seed, global step, layer index) and frees the
    float values again. Nothing float of the weight outlives the step.

    Args:
        seed: Seed of the rounding noise; ``None`` takes the run's ``seed_everything`` value (``PL_GLOBAL_SEED``).
        log_per_layer: Also log the share of weights that changed level for each layer, not only overall.
    """

    def __init__(self, seed: int | None = None, log_per_layer: bool = True) -> None:
        self.seed = seed
        self.log_per_layer = log_per_layer
        self.n_updates = 0
        self._layers: list[tuple[str, DQTLinear]] = []
        self._handles: list[Any] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending = False
        self._flips: dict[str, torch.Tensor] = {}
        self._trainer: pl.Trainer | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._layers = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, DQTLinear)]
        if not self._layers:
            return
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [name for name, m in self._layers if id(m.update_param) not in held]
        if missing:
            raise ConfigError(
                f"the optimizer does not hold the quantized weights of {len(missing)} DQT layers (first: {missing[0]}); "
                "pass dqt_lightning.quantized_parameters(model) to it in configure_optimizers"
            )
        self._handles = [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if trainer.world_size > 1:
            self._average_gradients_across_ranks()
        for _, layer in self._layers:
            layer.materialize()
        self._pending = bool(self._layers)

    @torch.no_grad()
    def _average_gradients_across_ranks(self) -> None:
        # DDP all-reduces registered parameters only; the quantized weights' gradients live outside it. One flat
        # bucket, one collective per step, before clipping, so every rank rounds the same averaged update.
        params = [layer.update_param for _, layer in self._layers]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
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
        for index, (name, layer) in enumerate(self._layers):
            generator = self._generator(layer.weight.device)
            generator.manual_seed(step_seed(self.seed, step, index))
            q_new = quantized_step(layer.weight, layer.scale, layer.update_param.data, layer.grid, layer.rounding,
                                   generator)
            self._flips[name] = (q_new != layer.weight).sum()
            layer.weight.copy_(q_new)
            layer.release()
        self.n_updates += 1
        self._pending = False

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not self._flips:
            return
        total = sum(m.weight.numel() for _, m in self._layers)
        metrics = {"dqt/flip_rate": sum(self._flips.values()).float() / total}
        if self.log_per_layer:
            sizes = dict((name, m.weight.numel()) for name, m in self._layers)
            metrics.update({f"dqt_layers/{n}": f.float() / sizes[n] for n, f in self._flips.items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._flips = {}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "n_updates": self.n_updates}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run keeps the seed it started with, so its noise continues the original sequence.
        self.seed = state_dict["seed"]
        self.n_updates = state_dict["n_updates"]
