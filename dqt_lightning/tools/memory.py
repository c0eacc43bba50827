"""Bytes of persistent training state per quantized parameter: weight, gradient and optimizer states, by mode.

DQT's claim is memory: its weights live only as int8 levels plus a scale, with no float master copy. This module
measures what a real Lightning run actually keeps allocated at its update, when every gradient is complete, for the
seven projections of every block (the only layers a mode changes), by reading tensor storage sizes rather than
trusting shapes. It also measures the peak resident memory of a run by phase (:class:`PeakMemoryByPhase`) and checks
that training moved every trained tensor (:class:`TrainedTensorsMove`).

Run ``python -m dqt_lightning.tools.memory`` for the Markdown table of fp / BitNet STE / DQT ternary / DQT 8-bit, and of
DQT ternary with bf16 or 8-bit AdamW states.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.utils.data import DataLoader

from dqt_lightning.quant.layers import DQTWeight
from dqt_lightning.model import Config
from dqt_lightning.module import LanguageModel
from dqt_lightning.train.optim import default_adamw
from dqt_lightning.train.precision import PROJECTIONS, QuantPrecision, is_projection
from dqt_lightning.train.update import QuantizedUpdate

COMMAND = "python -m dqt_lightning.tools.memory"
VOCAB, SEQ_LEN, BATCH = 512, 32, 4  # windows of SEQ_LEN + 1 tokens; tiny, since only byte counts matter


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes really allocated for a tensor's storage, whatever its shape claims.

    A zero-stride expanded view of one float32 counts as 4 bytes, not ``numel * 4``; a view counts its whole base.

    Args:
        t: Any tensor.

    Returns:
        The size of the tensor's untyped storage in bytes.
    """
    return t.untyped_storage().nbytes()


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    # Sum each storage once: two views of one buffer (or a tensor listed twice) occupy memory only once. Empty
    # storages are skipped because they all share data_ptr 0 and would wrongly dedupe against each other anyway.
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            continue
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


@dataclass
class StateBytes:
    """Persistent training state of the quantized projections, in bytes.

    Attributes:
        weights: Storage of the weights as kept between steps (for DQT: int8 levels, scale and the update
            parameter's one-float placeholder).
        grads: Storage of the gradients of the parameters the optimizer holds for these weights.
        optimizer_states: Storage of every tensor in the optimizer's state for those parameters (step counters too).
        n_params: Number of weight elements of the quantized projections.
    """

    weights: int
    grads: int
    optimizer_states: int
    n_params: int

    @property
    def total(self) -> int:
        """Weights, gradients and optimizer states together."""
        return self.weights + self.grads + self.optimizer_states

    def per_param(self) -> dict[str, float]:
        """Bytes per quantized parameter of each component (``weights``, ``grads``, ``optimizer_states``, ``total``)."""
        n = max(self.n_params, 1)  # a model without projections reports zeros rather than dividing by zero
        return {"weights": self.weights / n, "grads": self.grads / n, "optimizer_states": self.optimizer_states / n,
                "total": self.total / n}


def projection_layers(module: nn.Module) -> Iterator[nn.Module]:
    # The layers QuantPrecision converts (or, in fp mode, would): a Linear or its DQT/BitNet replacement.
    for name, child in module.named_modules():
        if isinstance(child, (nn.Linear, DQTWeight)) and is_projection(name):
            yield child


def quantized_state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> StateBytes:
    """Measure the persistent training state of the seven projections of every block, in whichever mode.

    Args:
        module: The model (or LightningModule holding it) after conversion by ``QuantPrecision``.
        optimizer: The optimizer that trains it.

    Returns:
        Storage bytes of weights, gradients and optimizer states, and the number of weight elements.

    Raises:
        TypeError: if ``module`` has no projection to measure.
    """
    weights: list[torch.Tensor] = []
    held: list[torch.Tensor] = []  # the parameters the optimizer steps for these weights
    n_params = 0
    for layer in projection_layers(module):
        n_params += layer.shape.numel() if isinstance(layer, DQTWeight) else layer.weight.numel()
        if isinstance(layer, DQTWeight):
            # The update parameter's data is part of what DQT keeps: ~4 bytes between steps, a full float32 copy
            # only inside the step. Measuring it here catches a placeholder that was never released.
            weights += [layer.weight, layer.scale, layer.update_param.data]
            held.append(layer.update_param)
        else:
            weights.append(layer.weight)
            held.append(layer.weight)
    if not n_params:
        raise TypeError(f"no projection ({', '.join(PROJECTIONS)}) found to measure")
    grads = [p.grad for p in held if p.grad is not None]
    states = [v for p in held for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return StateBytes(unique_storage_bytes(weights), unique_storage_bytes(grads), unique_storage_bytes(states),
                      n_params)


class StateAtUpdate(pl.Callback):
    """Measures the training state where a step holds the most of it: every gradient complete and the optimizer's
    states of the steps before, just before the update (``on_before_optimizer_step``, so before clipping). The
    update frees each quantized weight's gradient as soon as that weight has moved, so after ``fit`` they are gone.

    Args:
        measure: ``measure(lightning_module, optimizer)``, called at every step; the last result is kept in ``last``.
    """

    def __init__(self, measure: Callable[[nn.Module, torch.optim.Optimizer], Any]) -> None:
        self.measure, self.last = measure, None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.last = self.measure(pl_module, optimizer)


def resident_bytes() -> int:
    """This process's resident memory now (Linux), from ``/proc/self/statm``."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """The high-water mark of this process's resident memory (Linux ``VmHWM``): since it started, or since the last
    :func:`reset_peak_resident`."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_peak_resident() -> None:
    """Set the high-water mark back to the resident memory of now (``/proc/self/clear_refs``, Linux 4.0+). The kernel's
    own peak of the process (``ru_maxrss``, what ``/usr/bin/time`` prints) is reset with it."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")


PHASES = ("start", "build", "forward", "backward", "update", "between steps")


class PeakMemoryByPhase(pl.Callback):
    """The peak resident memory of each phase of a run, measured exactly (Linux): what the process held before the
    trainer set up (``start``: the runtime, the data), the model's construction and the optimizer's (``build``), then
    for every step its ``forward``, ``backward`` (with the DQT update when it runs inside backward), ``update`` (after
    backward: clipping, the quantized update, the optimizer's step) and what comes ``between steps`` (logging,
    validation, checkpoints). Each phase ends by reading the high-water mark and resetting it
    (:func:`reset_peak_resident`), so the process's own peak no longer covers the whole run: read ``peak`` instead,
    the largest of the phases. Where resident memory stood when each phase began is kept in ``at_start``.
    """

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose  # print the report at the end of fit
        self.peaks: dict[str, int] = {}
        self.at_start: dict[str, int] = {}
        self.seconds: dict[str, float] = {}  # wall time spent in each phase, all steps together
        self._phase = "start"
        self._since = time.perf_counter()

    @property
    def peak(self) -> int:
        """The peak of the whole run so far, in bytes."""
        return max([*self.peaks.values(), peak_resident_bytes()])

    def _enter(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._since
        self._since = now
        self.peaks[self._phase] = max(self.peaks.get(self._phase, 0), peak_resident_bytes())
        reset_peak_resident()
        now = resident_bytes()
        self.at_start[phase] = max(self.at_start.get(phase, 0), now)
        self._phase = phase

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._enter("build")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._enter("forward")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._enter("backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._enter("update")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._enter("between steps")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._enter("between steps")
        if stage == "fit" and self.verbose:
            print(self.report(), flush=True)

    def report(self) -> str:
        """One line: the peak of each phase, and resident memory when it began, in GiB."""
        parts = [f"{phase} {self.peaks[phase] / 2**30:.2f} (from {self.at_start.get(phase, 0) / 2**30:.2f}, "
                 f"{self.seconds.get(phase, 0):.0f} s)" for phase in PHASES if phase in self.peaks]
        return f"peak resident memory by phase, GiB: {'; '.join(parts)}; whole run {self.peak / 2**30:.2f}"


class TrainedTensorsMove(pl.Callback):
    """Checks that training moved every trained tensor: each DQT layer's levels (and scale, when it is trained) and
    every float parameter, projections, embedding, head and norm gains alike. Published memory figures have come from
    runs in which some of them never moved (an embedding left out of a per-layer update).

    At the start of fit it keeps a fingerprint of each tensor (a hash of its bytes, not a copy: a 7B model's copy
    would double its memory); at the end it compares, prints one line and keeps the names that did not change in
    ``unchanged``. It also keeps every step's training loss in ``losses``.
    """

    def __init__(self) -> None:
        self.unchanged: list[str] = []
        self.losses: list[float] = []
        self._before: dict[str, str] = {}

    @staticmethod
    def _tensors(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        tensors = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        for name, layer in pl_module.named_modules():
            if isinstance(layer, DQTWeight):
                tensors[f"{name}.weight"] = layer.weight
        return tensors

    @staticmethod
    def _fingerprint(tensor: torch.Tensor) -> str:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before = {name: self._fingerprint(t) for name, t in self._tensors(pl_module).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        after = {name: self._fingerprint(t) for name, t in self._tensors(pl_module).items()}
        self.unchanged = [name for name, value in after.items() if self._before.get(name) == value]
        moved = len(after) - len(self.unchanged)
        losses = ", ".join(f"{loss:.4f}" for loss in self.losses)
        verdict = "all moved" if not self.unchanged else f"unchanged: {', '.join(self.unchanged)}"
        print(f"trained tensors moved: {moved} of {len(after)} ({verdict}); training loss by step: {losses}",
              flush=True)


def fit_on_tokens(model: LanguageModel, tokens: torch.Tensor, batch_size: int, plugins: list,
                  callbacks: Sequence[pl.Callback] = (), accelerator: str = "cpu") -> pl.Trainer:
    """Train ``model`` once through ``tokens`` (windows of seq_len + 1) with a quiet real ``Trainer``: no logger,
    checkpoints or validation. The measurement tools (memory, checkpoint sizes, the benchmark) share it.

    Returns:
        The trainer, whose optimizer state and gradients are still in place.
    """
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_steps=len(tokens) // batch_size, plugins=plugins,
        callbacks=[QuantizedUpdate(), *callbacks], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PossibleUserWarning)  # "few dataloader workers": the data is in memory
        # Lightning 2.6 still builds pytree LeafSpecs, which newer torch flags; harmless, and not ours.
        warnings.filterwarnings("ignore", r".*LeafSpec.*deprecated", FutureWarning)
        trainer.fit(model, train_dataloaders=DataLoader(tokens, batch_size=batch_size))
    return trainer


def measure(mode: str, bits: float = 1.58, steps: int = 2, state_dtype: str = "float32", **plugin) -> StateBytes:
    """Train the tiny model ``steps`` optimizer steps on CPU in ``mode`` and measure its state at the update.

    Random tokens are enough: the byte counts do not depend on what the model learns.

    Args:
        mode: ``fp``, ``ste`` or ``dqt`` (see :class:`~dqt_lightning.train.precision.QuantPrecision`).
        bits: Weight bits for ``ste`` and ``dqt``; 1.58 is ternary.
        steps: Optimizer steps to run first, so that gradients and optimizer states exist.
        state_dtype: AdamW's moments: ``float32`` (``torch.optim.AdamW``), or ``bfloat16`` / ``int8``
            (:class:`dqt_lightning.train.optim.AdamW`), with the same hyper-parameters.
        **plugin: Further :class:`~dqt_lightning.train.precision.QuantPrecision` options (``grad_dtype``,
            ``update_in_backward``, ...).

    Returns:
        The state of the quantized projections at the last step's update, when every gradient is complete
        (:class:`StateAtUpdate`).
    """
    threads = torch.get_num_threads()
    # One thread: the tiny matmuls gain nothing from more, and when other processes share the cores, spinning
    # OpenMP workers made this 0.2 s measurement take over 10 s.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # deterministic, without disturbing the caller's global RNG
            torch.manual_seed(0)
            tokens = torch.randint(0, VOCAB, (BATCH * steps, SEQ_LEN + 1))
            model = LanguageModel(Config(), vocab_size=VOCAB, optimizer=default_adamw(state_dtype), warmup_steps=0)
            plugins = [QuantPrecision.from_settings(mode=mode, bits=bits, **plugin)]
            probe = StateAtUpdate(quantized_state_bytes)
            fit_on_tokens(model, tokens, BATCH, plugins=plugins, callbacks=[probe])
    finally:
        torch.set_num_threads(threads)
    return probe.last


ROWS = (  # label, mode, bits, AdamW state dtype, further plugin options
    ("fp (FP32 AdamW)", "fp", 32.0, "float32", {}),
    ("BitNet b1.58 STE (FP32 master, AdamW)", "ste", 1.58, "float32", {}),
    ("DQT ternary", "dqt", 1.58, "float32", {}),
    ("DQT 8-bit", "dqt", 8.0, "float32", {}),
    ("DQT ternary, AdamW bf16 states", "dqt", 1.58, "bfloat16", {}),
    ("DQT ternary, AdamW 8-bit states", "dqt", 1.58, "int8", {}),
    ("DQT ternary, bf16 grads, AdamW 8-bit states", "dqt", 1.58, "int8", {"grad_dtype": "bfloat16"}),
    ("DQT ternary, update in backward, AdamW 8-bit states", "dqt", 1.58, "int8", {"update_in_backward": True}),
    ("DQT ternary packed, bf16 grads, AdamW 8-bit states", "dqt", 1.58, "int8",
     {"grad_dtype": "bfloat16", "pack_in_memory": True}),
    ("DQT ternary packed, update in backward, AdamW 8-bit states", "dqt", 1.58, "int8",
     {"update_in_backward": True, "pack_in_memory": True}),
)


def table(results: dict[str, StateBytes]) -> str:
    """Markdown table of bytes per quantized parameter, one row per ``results`` entry (label -> state)."""
    lines = ["| mode | weight | grad | optimizer states | total |", "|---|---:|---:|---:|---:|"]
    for label, state in results.items():
        b = state.per_param()
        lines.append(f"| {label} | {b['weights']:.2f} | {b['grads']:.2f} | {b['optimizer_states']:.2f} "
                     f"| {b['total']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    """Print the bytes-per-parameter table for every row of ``ROWS``, with where and when it was measured."""
    # Lightning's "GPU available / TPU available" banners are noise in a table meant for pasting.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    started = time.perf_counter()
    results = {label: measure(mode, bits, state_dtype=dtype, **plugin) for label, mode, bits, dtype, plugin in ROWS}
    elapsed = time.perf_counter() - started
    print(f"Bytes per quantized parameter (the 7 projections of every block) at the update, tiny model "
          f"({Config().n_layer} layers, d={Config().n_embd}), AdamW.\n")
    print(table(results))
    print(f"\nMeasured on CPU ({platform.machine()}, {platform.system()}), torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}, in {elapsed:.1f} s.")
    print(f"Produced by: `{COMMAND}`")


if __name__ == "__main__":
    main()
