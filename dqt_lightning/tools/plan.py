"""The memory plan of a run: the peak it will reach, predicted from its empty model before anything is built.

``python -m dqt_lightning plan --config ...`` takes the same configs as ``fit`` and prints the plan; ``fit`` refuses a
run whose plan exceeds the machine's memory, before it builds anything. The plan counts:

- **runtime**: what the process holds before the model exists (Python, torch, Lightning, the data), measured once;
- **weights**, **optimizer states** and **gradients**, from the shapes of the model the precision plugin would build
  (integer levels packed or not, the optimizer's state format), built on the meta device: no memory, no init;
- **activations**: the tensors the forward saves for backward, counted by running the model on the meta device (one
  and two blocks, the rest by extrapolation), plus the logits; with activation checkpointing each block's input and one
  block's inside;
- **transients**: what one layer's update (or backward) holds for a moment, per element of the largest layer.

A step's peak falls at the end of its forward (for full precision and BitNet the last step's gradients are still
held: Lightning frees them after the next forward), at the end of its backward, or inside the DQT update, and the plan
is the largest of the three, with the optimizer states of a run past its first step.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dqt_lightning.errors import ConfigError
from dqt_lightning.model import SIZES, Config, LLaMA
from dqt_lightning.module import LARGE_MODEL, MMAP_THRESHOLD, check_window
from dqt_lightning.pretrained import Pretrained
from dqt_lightning.quant.layers import DQTWeight
from dqt_lightning.train.precision import Execution, Method, QuantPrecision

GIB = 2**30
# Resident memory of a fit process before its model is built: the interpreter, torch, Lightning, TensorBoard and the
# embedded corpus (the "start" phase of tools.memory.PeakMemoryByPhase, 0.47-0.56 GiB on this project's CPU machine).
RUNTIME_BYTES = int(0.55 * GIB)
# Bytes one element of a layer's update holds at its peak, on top of the persistent state, measured per path
# (docs/benchmarks.md): the unfused update (float32 alpha*q, the optimizer's temporaries, the rounding's noise and
# coordinates) and the compiled fused one (its intermediate buffers).
UNFUSED_UPDATE_BYTES = 18
FUSED_UPDATE_BYTES = 9
# Backward of a DQT or BitNet projection: its float weight, dequantized (or fake-quantized) for grad_x.
BACKWARD_BYTES = 4
# An optimizer's own temporaries, per element of the float parameter it steps (the embedding or head, the largest):
# torch's AdamW and Adafactor hold two float32 tensors of it at once; this project's AdamW steps in parts.
OPTIMIZER_STEP_BYTES = 8
# torch.compile's compiler and kernels in the process, for the fused update on a CPU.
COMPILE_BYTES = 200 * 2**20
# Candidate overlays `fit` names when a run would not fit, leanest last.
OVERLAYS = ("configs/optim/adamw-8bit.yaml", "configs/recipes/lean.yaml", "configs/recipes/lean-factored.yaml")


@dataclass
class RunSettings:
    """What a run's memory depends on, from its config."""

    config: Config
    batch_size: int = 1
    seq_len: int = 128
    method: Method = field(default_factory=Method)
    execution: Execution = field(default_factory=Execution)
    optimizer: str = "torch.optim.AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    runtime: int | None = None  # resident bytes before the model is built, where measured; else RUNTIME_BYTES


@dataclass
class MemoryPlan:
    """Predicted memory of a run, in bytes, by component, and the peak."""

    runtime: int
    weights: int
    optimizer_states: int
    gradients: int
    activations: int
    transients: int
    peak: int
    phase: str  # where the peak falls: "forward", "backward" or "update"

    def lines(self) -> list[str]:
        parts = [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self)
                 if f.name not in ("peak", "phase")]
        where = {"forward": "at the end of the forward", "backward": "in the backward", "update": "in the update"}
        return [f"{name:<18} {value / GIB:8.2f} GiB" for name, value in parts] + [
            f"{'peak':<18} {self.peak / GIB:8.2f} GiB  ({where[self.phase]})"]


def _plugin(settings: RunSettings) -> QuantPrecision:
    return QuantPrecision(settings.method, settings.execution)


def _meta_model(config: Config, plugin: QuantPrecision) -> LLaMA:
    """The model as ``plugin`` builds it, on the meta device: every layer in its trained form, no memory."""
    with torch.device("meta"):
        model = LLaMA(config)
        if plugin.method.mode != "fp":
            for name, parent in list(model.named_modules()):
                for child_name, child in list(parent.named_children()):
                    converted = plugin.convert_layer(f"{name}.{child_name}".lstrip("."), child, quantize=False)
                    if converted is not None:
                        setattr(parent, child_name, converted)
    return model


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _trained(model: nn.Module) -> list[tuple[torch.Size, bool]]:
    """(shape, whether it is a DQT weight) of everything the optimizer steps."""
    dqt = [(layer.shape, True) for layer in model.modules() if isinstance(layer, DQTWeight)]
    return dqt + [(p.shape, False) for p in model.parameters() if p.requires_grad]


def _resolve(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def state_bytes(shape: torch.Size, optimizer: str, args: dict[str, Any]) -> int:
    """Bytes of optimizer state one parameter of ``shape`` keeps between steps."""
    from dqt_lightning.train.optim import AdamW  # noqa: PLC0415 - the optimizers module imports this one's siblings

    n = shape.numel()
    cls = _resolve(optimizer)
    if cls is not None and issubclass(cls, AdamW):
        kind, block = args.get("state_dtype", "float32"), int(args.get("block_size", 256))
        if kind == "int8":
            return 2 * n + 2 * 4 * math.ceil(n / block)  # codes, and one float32 scale per block, for two moments
        return n * (4 if kind == "bfloat16" else 8)
    if cls is not None and issubclass(cls, torch.optim.Adafactor):
        return 4 * (shape[0] + shape[-1]) if len(shape) > 1 else 4 * n  # one value per row and per column
    if cls is not None and issubclass(cls, torch.optim.SGD):
        return 4 * n if args.get("momentum", 0) else 0
    return 8 * n  # Adam, AdamW and anything else: two float32 moments


def activation_bytes(settings: RunSettings, plugin: QuantPrecision) -> tuple[int, int]:
    """(what one block's forward saves for backward, what the rest saves), in bytes, counted on the meta device."""
    one, two = (_saved_bytes(replace(settings.config, n_layer=n), plugin, settings) for n in (1, 2))
    return two - one, 2 * one - two


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash attention on a CPU or GPU, the one torch picks there for a causal mask)
    saves for backward: query, key, value, output and the log-sum-exp per query. On the meta device torch runs the
    unfused formula instead, which saves the score matrices, and would count memory no real run holds."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, g, g


@contextlib.contextmanager
def _fused_attention():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: _FusedAttention.apply(q, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _saved_bytes(config: Config, plugin: QuantPrecision, settings: RunSettings) -> int:
    model = _meta_model(config, plugin)
    persistent = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}
    alive = []  # keeps every saved tensor referenced, so no storage address is reused while counting

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        alive.append(t)
        if key not in persistent:
            saved[key] = t.untyped_storage().nbytes()
        return t

    tokens = torch.zeros(settings.batch_size, settings.seq_len + 1, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _fused_attention():
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    return sum(saved.values())


def plan(settings: RunSettings) -> MemoryPlan:
    """The predicted peak of a run of ``settings``, by component (see the module's docstring).

    Raises:
        ConfigError: for model sizes no model can have, or a sequence longer than the model's block size, in the
            words the run itself would refuse them with.
    """
    config = settings.config
    problems = [f"model.config.{problem}" for problem in config.problems()]
    if problems:
        raise ConfigError("; ".join(problems))
    check_window(settings.seq_len, config.block_size)
    plugin = _plugin(settings)
    execution = plugin.execution
    model = _meta_model(config, plugin)
    dqt = settings.method.mode == "dqt"
    # Weights: every parameter and buffer as built (levels, packed or not, scales), and each DQT layer's placeholder.
    weights = _bytes([*model.parameters(), *model.buffers()]) + 4 * sum(isinstance(m, DQTWeight)
                                                                        for m in model.modules())
    trained = _trained(model)
    states = sum(state_bytes(shape, settings.optimizer, settings.optimizer_args) for shape, _ in trained)
    grad_size = 2 if execution.grad_dtype == "bfloat16" else 4
    float_grads = sum(4 * shape.numel() for shape, is_dqt in trained if not is_dqt)
    dqt_sizes = [shape.numel() for shape, is_dqt in trained if is_dqt]
    dqt_grads = 0 if execution.update_in_backward else grad_size * sum(dqt_sizes)
    largest = max(dqt_sizes or [shape.numel() for shape, _ in trained])
    from dqt_lightning.train.optim import AdamW  # noqa: PLC0415 - beside the other optimizers' lookup

    chunked = issubclass(_resolve(settings.optimizer) or object, AdamW)
    float_step = 0 if chunked else OPTIMIZER_STEP_BYTES * max(
        [shape.numel() for shape, is_dqt in trained if not is_dqt] or [0])

    per_block, outside = activation_bytes(settings, plugin)
    logits = 4 * settings.batch_size * settings.seq_len * config.vocab_size
    if execution.activation_checkpointing:
        block_inputs = 4 * settings.batch_size * settings.seq_len * config.n_embd * config.n_layer
        activations = outside + block_inputs + per_block + 2 * logits
    else:
        activations = outside + config.n_layer * per_block + 2 * logits

    update_bytes = FUSED_UPDATE_BYTES if execution.fused_update else UNFUSED_UPDATE_BYTES
    runtime = 0 if settings.device != "cpu" else RUNTIME_BYTES if settings.runtime is None else settings.runtime
    if execution.fused_update and settings.device == "cpu":
        runtime += COMPILE_BYTES
    persistent = runtime + weights + states
    layer_step = update_bytes * largest if dqt else 0  # one DQT layer's update, unfused or fused
    backward_transient = BACKWARD_BYTES * largest if settings.method.mode != "fp" else 0
    # The float gradients are still held when the next forward ends (Lightning sets them to None only after it); DQT
    # frees its own at its update. The float parameters are stepped last, DQT's gradients freed by then.
    # A large model's hidden states (batch x seq x width, float32) below the mmap threshold it fixes
    # (module.return_freed_memory_to_the_os) come from glibc's heap, which keeps what backward frees: the activations
    # stay resident through the update (the 130m model at batch 1 x 256, not the 1b).
    heap_kept = activations if (settings.device == "cpu" and sum(shape.numel() for shape, _ in trained) >= LARGE_MODEL
                                and 4 * settings.batch_size * settings.seq_len * config.n_embd < MMAP_THRESHOLD) else 0
    phases = {"forward": persistent + float_grads + activations,
              "update": persistent + float_grads + heap_kept + max(dqt_grads + layer_step, float_step)}
    if dqt and execution.update_in_backward:
        # The first layers stepped inside backward meet nearly all of the activations and one layer's gradient.
        phases["backward"] = persistent + float_grads + activations + (grad_size + update_bytes) * largest
    else:
        phases["backward"] = persistent + float_grads + dqt_grads + backward_transient
    phase = max(phases, key=phases.__getitem__)
    transients = {"forward": 0, "update": phases["update"] - persistent - float_grads - dqt_grads,
                  "backward": phases["backward"] - persistent - float_grads - dqt_grads}[phase]
    if phase == "backward" and dqt and execution.update_in_backward:
        transients -= activations
    return MemoryPlan(runtime, weights, states, float_grads + dqt_grads, activations, transients, phases[phase], phase)


def machine_memory() -> int:
    """The memory this process may use: the machine's total, or its cgroup's limit where lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.is_file():
        value = limit.read_text().strip()
        if value.isdigit():
            total = min(total, int(value))
    return total


def settings_from_config(config: Any) -> RunSettings:
    """:class:`RunSettings` of a parsed ``fit`` config (LightningCLI's namespace, or the same as a dict)."""
    config = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    model_args = (config.get("model") or {}).get("init_args") or {}
    data_args = (config.get("data") or {}).get("init_args") or {}
    sizes = dict(model_args.get("config") or {})
    vocab = data_args.get("vocab_size") or model_args.get("vocab_size") or sizes.get("vocab_size")
    known = {f.name for f in fields(Config)}
    model_config = Config(**{k: v for k, v in sizes.items() if k in known and v is not None})
    if vocab:
        model_config = replace(model_config, vocab_size=int(vocab))
    if model_args.get("init_from"):  # a pretrained model's sizes are its checkpoint's
        model_config = Pretrained(model_args["init_from"]).config(model_config)
    trainer = config.get("trainer") or {}
    plugins = trainer.get("plugins")
    plugins = plugins if isinstance(plugins, list) else [plugins]
    ours = next((p for p in plugins if isinstance(p, dict) and str(p.get("class_path", "")).endswith("QuantPrecision")),
                None)
    init = (ours or {}).get("init_args") or {}
    method = Method(**{k: v for k, v in (init.get("method") or {}).items() if v is not None}) if ours else \
        Method(mode="fp")
    execution = Execution(**{k: v for k, v in (init.get("execution") or {}).items() if v is not None})
    optimizer = model_args.get("optimizer") or {}
    accelerator = trainer.get("accelerator") or "auto"
    device = "cuda" if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()) \
        else "cpu"
    return RunSettings(model_config, int(data_args.get("batch_size") or 1), int(data_args.get("seq_len") or 128),
                       method, execution, optimizer.get("class_path", "torch.optim.AdamW"),
                       dict(optimizer.get("init_args") or {}), device)


def size_settings(settings: RunSettings, size: str) -> RunSettings:
    """``settings`` with the model sizes of the preset ``size`` (its vocabulary kept)."""
    if size not in SIZES:
        raise ConfigError(f"--size {size} is not a model size; choose from {', '.join(SIZES)}")
    return replace(settings, config=replace(SIZES[size], vocab_size=settings.config.vocab_size,
                                            block_size=settings.config.block_size,
                                            norm_layout=settings.config.norm_layout))


def _merged(base: Any, overlay: Any) -> Any:
    """``overlay`` on top of ``base`` as a later --config file lays it: mappings merge key by key, the rest replaces."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        return {**base, **{key: _merged(base.get(key), value) for key, value in overlay.items()}}
    return overlay


def configs_dir() -> Path:
    """The shipped configs (``configs/`` of a checkout, ``dqt_lightning.configs`` of an install)."""
    import dqt_lightning.configs  # noqa: PLC0415 - a package of YAML files

    return Path(dqt_lightning.configs.__file__).parent


def overlays_that_fit(config: dict[str, Any], limit: int) -> list[tuple[str, int]]:
    """The memory overlays (``OVERLAYS``) that bring a config's plan under ``limit`` bytes, with their peaks."""
    fitting = []
    for overlay in OVERLAYS:
        laid = _merged(config, yaml.safe_load((configs_dir() / overlay.removeprefix("configs/")).read_text()))
        try:
            peak = plan(settings_from_config(laid)).peak
        except (ConfigError, TypeError, ValueError):
            continue  # an overlay this run's method cannot take (packing a float model, say)
        if peak <= limit:
            fitting.append((overlay, peak))
    return fitting


def check_memory(config: Any) -> None:
    """Refuse, in one line, a run whose plan exceeds the memory it has (the machine's, or the GPU's), naming the
    overlays that would fit."""
    config = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    settings = settings_from_config(config)
    predicted = plan(settings)
    if settings.device == "cuda":
        limit, where = torch.cuda.get_device_properties(0).total_memory, "the GPU has"
    else:
        limit, where = machine_memory(), "this machine has"
    if predicted.peak <= limit:
        return
    fitting = overlays_that_fit(config, limit)
    options = " or ".join(f"--config {name} ({peak / GIB:.1f} GiB)" for name, peak in fitting)
    hint = f"it fits with {options}" if fitting else "none of " + ", ".join(OVERLAYS) + " makes it fit" + (
        "" if settings.method.mode == "dqt" else " (the lean recipes train DQT ternary weights: start from "
        "configs/ternary.yaml)")
    raise ConfigError(f"this run needs about {predicted.peak / GIB:.1f} GiB at its peak and {where} "
                      f"{limit / GIB:.1f} GiB (python -m dqt_lightning plan, with the same arguments, shows why); "
                      f"{hint}; or add --check_memory false to try anyway")


def print_plan(config: Any, size: str | None = None) -> None:
    """The plan of a parsed config, as ``python -m dqt_lightning plan`` prints it."""
    settings = settings_from_config(config)
    if size is not None:
        settings = size_settings(settings, size)
    predicted = plan(settings)
    c = settings.config
    optimizer = " ".join([settings.optimizer.rsplit(".", 1)[-1], *[str(settings.optimizer_args[k]) for k in
                                                                   ("state_dtype",) if k in settings.optimizer_args]])
    print(f"Memory plan: {c.name} (d {c.n_embd}, {c.n_layer} layers, FFN {c.intermediate_size}, vocab "
          f"{c.vocab_size}), batch {settings.batch_size} x {settings.seq_len}, mode {settings.method.mode}, "
          f"{optimizer}, on {settings.device}; from the second step on:")
    print("\n".join(predicted.lines()))
    limit = machine_memory() if settings.device == "cpu" else torch.cuda.get_device_properties(0).total_memory
    print(f"{'available':<18} {limit / GIB:8.2f} GiB  ({'fits' if predicted.peak <= limit else 'does not fit'})")
