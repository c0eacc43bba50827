"""The precision plugin: turns the model's projections into DQT, BitNet or plain layers and owns numeric precision."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from dqt_lightning.errors import ConfigError
from dqt_lightning.model import LLaMA
from dqt_lightning.quant.fp8 import convert_fp_linears, require_fp8
from dqt_lightning.quant.grid import Grid
from dqt_lightning.quant.layers import GRAD_DTYPES, BitEmbedding, BitLinear, DQTEmbedding, DQTLinear, DQTWeight
from dqt_lightning.quant.rounding import rounding_rule

log = logging.getLogger(__name__)

MODES = ("fp", "ste", "dqt")
PRECISIONS = ("32-true", "bf16-mixed", "fp8")
SCALE_POLICIES = ("fixed", "absmax")
# The seven projections of a LLaMA block; embeddings, lm_head and norm gains stay float by default (as BitNet and
# torchao).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Quantized too with quantize_embeddings (names as in model.py and Hugging Face's LlamaForCausalLM).
EMBEDDING, HEAD = "embed_tokens", "lm_head"


def is_projection(qualified_name: str) -> bool:
    """Whether a module's qualified name is one of the seven projections: by its own name or, in the `bitlinear`
    norm layout, by the name of the (RMSNorm, Linear) pair that holds it (``...q_proj.1``)."""
    return any(part in PROJECTIONS for part in qualified_name.split(".")[-2:])


def _choice(field: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"trainer.plugins.{field} must be one of {', '.join(choices)}; got '{value}'")
    return value


@dataclass
class Method:
    """What is trained: the weights' format and the rule that moves them (the ``method:`` block of a config).

    Args:
        mode: ``fp`` leaves ``nn.Linear`` alone; ``ste`` swaps in BitNet b1.58 layers (float master weight, STE);
            ``dqt`` swaps in integer-only layers updated by :class:`~dqt_lightning.train.update.QuantizedUpdate`.
        bits: 1.58 (ternary) or an integer 2..8; ignored for ``fp``.
        rounding: The rounding rule of the DQT update: ``stochastic`` (DQT) or ``nearest`` (the ablation that loses
            sub-step updates), or any rule registered with :func:`~dqt_lightning.quant.rounding.register_rounding`,
            by name or by dotted path (``package.module.function``, imported on first use; docs/extending.md).
        symmetric: Use the symmetric grid [-(2^(n-1)-1), 2^(n-1)-1] instead of the official asymmetric one.
        per_row_scale: One DQT scale per output row instead of one per tensor.
        scale_policy: ``fixed``: the absmean scale of initialisation stays for the whole run (the paper's default);
            ``absmax``: every update re-derives the scale from the stepped weight, ``max|W'| / Qp`` per row with
            ``per_row_scale`` or per tensor (torchao's int8 quantized training), and rounds onto that grid.
        quantize_embeddings: Also quantize the token embedding and the output head (``embed_tokens``, ``lm_head``),
            as the official DQT code does; off by default, as in BitNet and torchao. ``dqt``: a
            :class:`~dqt_lightning.quant.layers.DQTEmbedding` and a :class:`~dqt_lightning.quant.layers.DQTLinear`
            head (8-bit activations); ``ste``: their BitNet counterparts (float masters behind an STE).
        ste_warmup_steps: ``ste`` only: quantize gradually over the first this many optimizer steps, the forward
            seeing ``w + lambda * (q(w) - w)`` for weights and activations alike with lambda rising linearly from 0
            to 1 (Hugging Face's recipe for turning a pretrained float model ternary); 0: lambda is 1 throughout.
    """

    mode: str = "dqt"
    bits: float = 1.58
    rounding: str = "stochastic"
    symmetric: bool = False
    per_row_scale: bool = False
    scale_policy: str = "fixed"
    quantize_embeddings: bool = False
    ste_warmup_steps: int = 0

    def grid(self) -> Grid | None:
        """The weight grid these settings define (None for ``fp``), once every setting is checked.

        Raises:
            ConfigError: naming the setting: an unknown mode, rounding or scale policy, bits outside 1.58 / 2..8,
                quantized embeddings or absmax scales with nothing quantized to apply them to.
        """
        _choice("method.mode", self.mode, MODES)
        rounding_rule(self.rounding, field="trainer.plugins.method.rounding")  # a dotted path is imported here
        _choice("method.scale_policy", self.scale_policy, SCALE_POLICIES)
        if self.quantize_embeddings and self.mode == "fp":
            raise ConfigError("trainer.plugins.method.quantize_embeddings needs mode dqt or ste; mode fp quantizes "
                              "nothing")
        if self.ste_warmup_steps and self.mode != "ste":
            raise ConfigError(f"trainer.plugins.method.ste_warmup_steps applies to BitNet STE (mode: ste); got mode "
                              f"{self.mode}")
        if self.ste_warmup_steps < 0:
            raise ConfigError(f"trainer.plugins.method.ste_warmup_steps must be >= 0; got {self.ste_warmup_steps}")
        if self.scale_policy != "fixed" and self.mode != "dqt":
            raise ConfigError(f"trainer.plugins.method.scale_policy applies to DQT weights only (mode: dqt); got mode "
                              f"{self.mode}")
        if self.mode == "fp":
            return None
        return Grid.from_bits(self.bits, self.symmetric, field="trainer.plugins.method.bits")


@dataclass
class Execution:
    """How the method runs: numeric precision, storage and kernels (the ``execution:`` block of a config). None of
    these changes what is trained, only its speed and memory, except where said (``int8_matmul`` rounds once
    instead of at every product, ``bfloat16`` gradients lose precision).

    Args:
        precision: ``32-true``, ``bf16-mixed`` (autocast in forward; weights, grads and states stay float32) or
            ``fp8``: ``bf16-mixed`` plus FP8 matmuls in the projections (see :mod:`dqt_lightning.quant.fp8`), on NVIDIA
            GPUs of compute capability 8.9+ only; never yet run on a GPU in this project.
        grad_dtype: ``float32`` or ``bfloat16``: the gradient buffer of DQT weights. The optimizer step itself stays
            float32 (the gradient is widened inside the step), so bf16 costs gradient precision, not update precision.
        int8_matmul: Run the forward matmul of every DQT linear layer on integers (``torch._int_mm``): the int8
            activation levels times the int8 weight levels, summed exactly, scaled once. INT8 tensor cores on a GPU,
            VNNI/AMX on a CPU. Not bit-identical to the float forward (it rounds once instead of at every product);
            the backward is the same.
        fused_update: Step the DQT weights with the optimizer's registered rule (AdamW) and round them in one pass
            per layer, from int8 levels to int8 levels, with no float weight in memory
            (:mod:`dqt_lightning.train.fused`); the optimizer (``torch.optim.AdamW`` or
            :class:`~dqt_lightning.train.optim.AdamW`, any state dtype) then steps the float parameters alone. Same
            arithmetic and noise as the usual path. Fixed scales only. Works with ``update_in_backward``.
        compile_fused_update: Compile the fused update with ``torch.compile`` (one kernel per layer: Triton on a GPU,
            C++ on a CPU; the first step compiles, tens of seconds). ``false`` runs the same function eagerly, for
            debugging or where nothing can compile: slower than the usual path.
        update_in_backward: Apply each DQT layer's update inside backward, as soon as its gradient is complete, and
            free that gradient at once: no gradient buffer of a DQT weight outlives backward (the stretch goal of the
            memory table). Same optimizer, learning rate and rounding as the usual path, with the same results, but
            gradient accumulation and clipping cannot work (both need every gradient before any update) and are
            refused.
        pack_ternary: Store ternary DQT weights in checkpoints 4 per byte instead of one int8 each.
        pack_in_memory: Keep ternary DQT weights packed 4 per byte in memory too (0.25 bytes per weight instead of
            1); every forward and backward unpacks a layer's levels transiently, so it costs time where nothing fuses
            the unpacking into the matmul. Checkpoints are then packed as well.
        activation_checkpointing: Keep only each block's input for backward and compute the block again there
            (``torch.utils.checkpoint``, non-reentrant): the activations of one block instead of every block's, for
            one more forward per step. Any mode.
    """

    precision: str = "32-true"
    grad_dtype: str = "float32"
    int8_matmul: bool = False
    fused_update: bool = False
    compile_fused_update: bool = True
    update_in_backward: bool = False
    pack_ternary: bool = False
    pack_in_memory: bool = False
    activation_checkpointing: bool = False

    def check(self, method: Method, grid: Grid | None) -> None:
        """Refuse, naming the setting, what these settings cannot do for ``method`` (whose ``grid`` is ``grid``).

        Raises:
            ConfigError: for an unknown precision or grad_dtype, a DQT-only setting (bf16 gradients, int8 matmul,
                fused update, update in backward) without DQT weights, a fused update with re-derived scales,
                packing without ternary DQT weights, or two choices of the forward matmul.
        """
        _choice("execution.precision", self.precision, PRECISIONS)
        _choice("execution.grad_dtype", self.grad_dtype, tuple(GRAD_DTYPES))
        if self.grad_dtype != "float32" and method.mode != "dqt":
            raise ConfigError(f"trainer.plugins.execution.grad_dtype: {self.grad_dtype} applies to DQT weights only "
                              f"(mode: dqt); mode {method.mode} keeps float32 gradients")
        for field in ("update_in_backward", "int8_matmul", "fused_update"):
            if getattr(self, field) and method.mode != "dqt":
                raise ConfigError(f"trainer.plugins.execution.{field} applies to DQT weights only (mode: dqt); "
                                  f"got mode {method.mode}")
        if self.fused_update and method.scale_policy != "fixed":
            raise ConfigError(f"trainer.plugins.execution.fused_update keeps each layer's scale fixed; scale_policy "
                              f"{method.scale_policy} re-derives it from the whole stepped weight first; use the "
                              "unfused one")
        if self.pack_in_memory and not (method.mode == "dqt" and grid.is_ternary):
            got = f"mode {method.mode}" + (f", bits {method.bits}" if method.mode != "fp" else "")
            raise ConfigError(f"trainer.plugins.execution.pack_in_memory packs ternary DQT weights (mode: dqt, bits: "
                              f"1.58); got {got}")
        if self.int8_matmul and self.precision == "fp8":
            raise ConfigError("trainer.plugins.execution.int8_matmul and precision: fp8 both pick the forward matmul; "
                              "choose one")

    def check_trainer(self, accumulate: int, clip: float | None) -> None:
        """Refuse what an update inside backward cannot do with the trainer's settings: it runs before the gradients
        of later micro-batches, or the global norm, exist."""
        if not self.update_in_backward:
            return
        field = "trainer.plugins.execution.update_in_backward"
        if accumulate != 1:
            raise ConfigError(f"{field} needs trainer.accumulate_grad_batches: 1 (got {accumulate}): an update in "
                              "backward cannot wait for the gradients of later micro-batches")
        if clip:
            raise ConfigError(f"{field} cannot clip gradients (trainer.gradient_clip_val: {clip}): the global norm "
                              "needs every gradient before the first update; set it to null")


class QuantPrecision(Precision):
    """Converts a model for one training method, in place, and runs its forward in the chosen numeric precision.

    A config reads as the method and how it runs::

        plugins:
          class_path: dqt_lightning.QuantPrecision
          init_args:
            method: {mode: dqt, bits: 1.58, rounding: stochastic}
            execution: {precision: bf16-mixed, fused_update: true}

    Args:
        method: What is trained (:class:`Method`); DQT ternary with stochastic rounding by default.
        execution: How it runs (:class:`Execution`); float32, the usual update path by default.

    Raises:
        ConfigError: naming the setting, for any value :meth:`Method.grid` or :meth:`Execution.check` refuses.
    """

    def __init__(self, method: Method | None = None, execution: Execution | None = None) -> None:
        super().__init__()
        self.method = method = method if method is not None else Method()
        self.execution = execution = execution if execution is not None else Execution()
        self.grid = method.grid()
        execution.check(method, self.grid)
        self.grad_dtype = GRAD_DTYPES[execution.grad_dtype]
        self.precision = execution.precision  # type: ignore[assignment] - Lightning's own: trainer.precision reads it
        # The QuantizedUpdate callback of the running fit, which registers itself here (see optimizer_step).
        self.quantized_update: Any = None
        self._device_type = "cpu"

    @classmethod
    def from_settings(cls, **settings: Any) -> QuantPrecision:
        """A plugin from flat settings, each given to the group that has it: ``from_settings(mode="dqt", bits=8,
        fused_update=True)``, for code that sweeps settings by name (benchmarks, tests)."""
        groups: dict[type, dict[str, Any]] = {Method: {}, Execution: {}}
        for name, value in settings.items():
            group = next((g for g in groups if name in {f.name for f in fields(g)}), None)
            if group is None:
                raise TypeError(f"QuantPrecision has no setting '{name}'")
            groups[group][name] = value
        return cls(Method(**groups[Method]), Execution(**groups[Execution]))

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        # Under DDPStrategy the return value is ignored, so every swap happens in place. Converting twice is a no-op:
        # the LightningModule converts layer by layer as it builds the model (convert_layer), and Lightning calls this
        # again in strategy setup.
        models = [m for m in module.modules() if isinstance(m, LLaMA)]
        if self.method.quantize_embeddings and any(m.config.tie_word_embeddings for m in models):
            raise ConfigError("trainer.plugins.method.quantize_embeddings quantizes the embedding and the head apart; "
                              "this model ties them (model.config.tie_word_embeddings: true)")
        for model in models:
            if model.is_empty:
                model.materialize(self.convert_layer)  # built layer by layer, quantized as each is drawn
            model.checkpoint_blocks = self.execution.activation_checkpointing
        if self.method.mode == "fp":
            return module
        for name, parent in list(module.named_modules()):
            for child_name, child in list(parent.named_children()):
                converted = self.convert_layer(f"{name}.{child_name}", child)
                if converted is not None:
                    setattr(parent, child_name, converted)
        already = sum(isinstance(m, (DQTWeight, BitLinear)) for m in module.modules())
        if already == 0:
            raise TypeError(f"mode {self.method.mode} found no projection ({', '.join(PROJECTIONS)}) to quantize in "
                            "the model")
        _keep_integers_out_of_ddp_sync(module)
        return module

    def convert_layer(self, qualified_name: str, child: nn.Module, quantize: bool = True) -> nn.Module | None:
        """The replacement of one float layer for this method (a DQT or BitNet layer, packed and with the integer
        matmul where configured), or ``None`` when it stays as it is (or is converted already).

        Args:
            qualified_name: The layer's name in the model, which says whether it is a projection, the embedding or
                the head.
            child: The float ``nn.Linear`` or ``nn.Embedding``.
            quantize: Set the integer levels from the float weight; ``False`` leaves them zero, for a checkpoint to
                fill (the float weight is not read).
        """
        if self.method.mode == "fp":
            return None
        converted = self._convert(child, qualified_name, quantize)
        if converted is not None:
            log.debug("converted %s to %s", qualified_name, self.method.mode)
        if isinstance(converted, DQTWeight) and self.execution.pack_in_memory:
            converted.pack_storage()  # here, layer by layer: the int8 levels of the whole model never exist at once
        if isinstance(converted, DQTLinear) and self.execution.int8_matmul:
            converted.int8_matmul = True
        return converted

    def _convert(self, child: nn.Module, qualified_name: str, quantize: bool) -> nn.Module | None:
        """The quantized replacement of ``child``, or ``None`` when it stays as it is (or is converted already)."""
        own_name = qualified_name.rsplit(".", 1)[-1]
        if type(child) is nn.Embedding and self.method.quantize_embeddings and own_name == EMBEDDING:
            if self.method.mode == "ste":
                return BitEmbedding.from_embedding(child, self.grid)
            return DQTEmbedding.from_embedding(child, self.grid, self.method.rounding, self.method.per_row_scale,
                                               self.grad_dtype, self.method.scale_policy, quantize)
        is_head = self.method.quantize_embeddings and own_name == HEAD
        if type(child) is not nn.Linear or not (is_projection(qualified_name) or is_head):
            return None
        if child.bias is not None:
            raise TypeError("quantized projections are bias-free, as in LLaMA; got a Linear with a bias")
        if self.method.mode == "ste":
            return BitLinear.from_linear(child, self.grid)
        return DQTLinear.from_linear(child, self.grid, self.method.rounding, self.method.per_row_scale,
                                     self.grad_dtype, self.method.scale_policy, quantize)

    @override
    def connect(self, model: nn.Module, optimizers: list, lr_schedulers: list) -> tuple[nn.Module, list, list]:
        # Autocast needs the device type; connect() is the first hook that sees the model on its device.
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        self._device_type = device.type
        if self.precision == "fp8":
            self._use_fp8_matmuls(model, device)
        return super().connect(model, optimizers, lr_schedulers)

    def _use_fp8_matmuls(self, model: nn.Module, device: torch.device) -> None:
        require_fp8(device)
        if self.method.mode == "fp":
            # Here rather than in convert_module: checkpoints load into plain nn.Linear, and only a supported
            # device gets the swap. Float8Linear keeps each weight parameter, so the optimizer built already holds it.
            convert_fp_linears(model, is_projection)
            return
        for name, layer in model.named_modules():
            if isinstance(layer, (DQTLinear, BitLinear)) and is_projection(name):
                layer.fp8 = True

    @override
    def optimizer_step(self, optimizer, model, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """The optimizer step, wrapped with the DQT update when a
        :class:`~dqt_lightning.train.update.QuantizedUpdate` runs: Precision's own closure (training step and backward,
        ``on_before_optimizer_step``, clipping), then the update of every DQT layer, one at a time, then the
        optimizer's arithmetic on the float parameters."""
        update = self.quantized_update
        if update is None:
            return super().optimizer_step(optimizer, model, closure, **kwargs)

        def closure_then_quantized_update() -> Any:
            result = self._wrap_closure(model, optimizer, closure)
            update.after_clipping(optimizer)
            return result

        return optimizer.step(closure=closure_then_quantized_update, **kwargs)

    @override
    def state_dict(self) -> dict[str, Any]:
        """What Lightning saves into every checkpoint: how its weights were trained (``method``: what a model needs to
        be rebuilt, by ``export`` and ``generate`` from the checkpoint alone) and how fast (``execution``), both plain
        values so that ``torch.load(weights_only=True)`` reads them. Each layer's grid is saved beside them by the
        LightningModule (a bit-width schedule moves grids while the configured bits stay)."""
        grid = self.grid
        return {
            "method": {"mode": self.method.mode, "bits": grid.bits if grid else None,
                       "symmetric": bool(grid and grid.qmin == -grid.qmax), "rounding": self.method.rounding,
                       "per_row_scale": self.method.per_row_scale, "scale_policy": self.method.scale_policy,
                       "quantize_embeddings": self.method.quantize_embeddings,
                       "ste_warmup_steps": self.method.ste_warmup_steps},
            "execution": {name: getattr(self.execution, name) for name in ("precision", "grad_dtype", "pack_ternary",
                          "pack_in_memory", "int8_matmul", "fused_update", "update_in_backward",
                          "activation_checkpointing")},
        }

    @override
    def forward_context(self):
        if self.execution.precision in ("bf16-mixed", "fp8"):
            return torch.autocast(self._device_type, dtype=torch.bfloat16)
        return nullcontext()


def _keep_integers_out_of_ddp_sync(module: nn.Module) -> None:
    # DDP re-broadcasts every buffer from rank 0 before each forward. For DQT weights that is a byte per weight of
    # traffic each step, and it would silently paper over a divergence that QuantizedUpdate's replica check exists
    # to catch. Replicas stay equal by construction instead: same averaged gradient, same rounding noise.
    names = [f"{name}.{buffer}" for name, m in module.named_modules() if isinstance(m, DQTWeight)
             for buffer in ("weight", "scale")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
