"""Throughput and memory of every training recipe, measured with a real Lightning ``Trainer`` in one process.

For one model size, batch and sequence length, each recipe (fp, BitNet STE, DQT at several bit widths, and
torchao's quantized training when it is installed) trains a few steps on random tokens; the table reports tokens/s,
the ratio to the fp recipe, and the memory of weights, gradients and optimizer states of all parameters;
``--plot`` draws both as a PNG.

Run ``python -m dqt_lightning bench --help`` (or ``python -m dqt_lightning.tools.bench --help``) for the options.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import logging
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn

from dqt_lightning import commands
from dqt_lightning.errors import ConfigError
from dqt_lightning.files import atomic_write
from dqt_lightning.quant.layers import dqt_layers
from dqt_lightning.tools.bench_report import TORCHAO, Row, fmt, table
from dqt_lightning.tools.bench_report import plot as plot_chart
from dqt_lightning.tools.memory import (PeakMemoryByPhase, StateAtUpdate, fit_on_tokens, resident_bytes,
                                        unique_storage_bytes)
from dqt_lightning.tools.plan import RunSettings, machine_memory, plan
from dqt_lightning.train.update import QuantizedUpdate
from dqt_lightning.model import SIZES, Config
from dqt_lightning.module import LanguageModel
# _torchao stays importable from here, where the tests of the torchao recipes find it.
from dqt_lightning.tools.recipes import _torchao  # noqa: F401
from dqt_lightning.tools.recipes import (OPTIONS, RECIPES, TORCHAO_IMPORT_LOGGERS, optimizer_for, optimizer_settings,
                                         quiet_loggers, recipe_plugin)
from dqt_lightning.train.precision import QuantPrecision

MIB, GIB = 2**20, 2**30
PROG = "python -m dqt_lightning bench"


class StepTimer(pl.Callback):
    """Sums the wall time of every training step after the first ``warmup`` ones (compilation, allocator growth)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seconds, self.steps, self._start = warmup, 0.0, 0, 0.0

    def _now(self) -> float:
        # CUDA kernels run asynchronously: without a sync the clock would stop before the step's work is done.
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self._start = self._now()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if batch_idx >= self.warmup:  # runs after the optimizer step and the DQT rounding of this batch
            self.seconds += self._now() - self._start
            self.steps += 1


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    # torchao's quantized weights are tensor subclasses whose real storage lives in their inner tensors.
    if hasattr(type(t), "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [leaf for name in names for leaf in _leaves(getattr(t, name))]
    return [t]


def _flat_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return unique_storage_bytes(leaf for t in tensors for leaf in _leaves(t))


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    """Bytes of weights, gradients and optimizer states of every parameter, each storage counted once.

    A DQT layer (a projection, or a quantized embedding or head) keeps its weight in buffers outside ``parameters()``:
    its int8 levels, scale and ``update_param`` count as weights, and the optimizer's state and gradient of
    ``update_param`` as the rest. torchao's weights are tensor subclasses, counted by their inner tensors.

    Args:
        module: The trained LightningModule.
        optimizer: Its optimizer.

    Returns:
        Weights, gradients and optimizer states, in bytes.
    """
    dqt = list(dqt_layers(module))
    params = list(module.parameters())
    stored = [t for layer in dqt for t in (layer.weight, layer.scale, layer.update_param.data)]
    held = [layer.update_param for layer in dqt] + params
    weights = _flat_bytes([*stored, *(p.data for p in params)])
    grads = _flat_bytes(p.grad for p in held if p.grad is not None)
    states = _flat_bytes(v for p in held for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))
    return weights, grads, states


def run_recipe(recipe: str, size: str, vocab_size: int, batch_size: int, seq_len: int, steps: int, warmup: int,
               precision: str, compile: bool = False, probe: PeakMemoryByPhase | None = None) -> Row:
    """Train ``warmup + steps`` steps of one recipe and measure its throughput and memory.

    Args:
        recipe: ``fp``, ``ste``, ``ste-<bits>``, ``dqt-<bits>`` with optional ``-<option>`` suffixes from
            ``OPTIONS``, ``torchao-int8`` or ``torchao-bitnet``.
        size: Model size preset (``tiny``, ``130m``, ...).
        vocab_size: Vocabulary size.
        batch_size: Windows per step.
        seq_len: Tokens per window (inputs; each window holds one more for the targets).
        steps: Measured steps.
        warmup: Unmeasured steps first.
        precision: ``32-true`` or ``bf16-mixed``.
        compile: Wrap the LLaMA forward with ``torch.compile``.
        probe: Measures the peak resident memory of each phase of the run (in a process of the recipe's own, on a
            CPU: see :func:`run_recipe_isolated`); its results fill the row's resident-memory columns.

    Returns:
        The row, with ``ratio`` unset.
    """
    torchao = recipe.startswith("torchao")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.random.fork_rng(devices=[]):  # every recipe starts from the same weights and data
        torch.manual_seed(0)
        model = LanguageModel(Config.from_name(size), vocab_size=vocab_size, optimizer=optimizer_for(recipe),
                              warmup_steps=0)
        tokens = torch.randint(0, vocab_size, ((warmup + steps) * batch_size, seq_len + 1))
    if torchao:
        _torchao(recipe, model, precision)
    if compile:
        # Every recipe's model is new, and dynamo counts each one's compile against the same forward: past its
        # recompile limit (8) later recipes would silently run eagerly. Each recipe compiles as in a fresh process.
        torch.compiler.reset()
        model.model.compile()  # lazy: compiles on the first forward, after QuantPrecision has swapped the layers
    timer = StepTimer(warmup)
    plugin = recipe_plugin(recipe, precision)
    # Planned from what this process holds before the model is built (in a process of its own: its runtime).
    predicted = None if torchao else predicted_peak(recipe, plugin, size, vocab_size, batch_size, seq_len, cuda,
                                                    resident_bytes() if probe is not None else None)
    accounted = StateAtUpdate(state_bytes)  # at the last update, when every gradient is complete
    update = UpdateTime(warmup)
    callbacks = [timer, accounted, update, *([probe] if probe is not None else [])]
    fit_on_tokens(model, tokens, batch_size, plugins=[plugin], callbacks=callbacks, accelerator="auto")
    peak = torch.cuda.max_memory_allocated() if cuda else probe.peak if probe is not None else None
    weights, grads, states = accounted.last
    row = Row(recipe=TORCHAO.get(recipe, recipe), tokens_per_s=batch_size * seq_len * timer.steps / timer.seconds,
              peak_gib=peak / GIB if peak is not None else None, weights_mib=weights / MIB, grads_mib=grads / MIB,
              states_mib=states / MIB, measured_steps=timer.steps, seconds_per_step=timer.seconds / timer.steps,
              update_share=update.seconds / timer.seconds if timer.seconds else None)
    if predicted is not None:
        row.predicted_gib = predicted / GIB
    if cuda and peak is not None:  # also holds the input batch, rope tables and the optimizer's temporaries
        row.activations_mib = (peak - weights - grads - states) / MIB
    elif probe is not None:
        forward = probe.peaks.get("forward", 0) - probe.at_start.get("forward", 0)
        row.peak_phase = max(probe.peaks, key=probe.peaks.__getitem__)
        row.runtime_mib = probe.peaks.get("start", 0) / MIB
        row.activations_mib = forward / MIB
        # The activations are in the peak only where it falls while they are held.
        held = forward if row.peak_phase in ("forward", "backward") else 0
        row.rest_mib = (peak - probe.peaks.get("start", 0) - weights - grads - states - held) / MIB
    del model, tokens
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


class UpdateTime(pl.Callback):
    """Wall time of the update in the timed steps: from ``on_before_optimizer_step`` to the batch's end (clipping,
    the DQT update, the optimizer's step), and the DQT update that runs inside backward."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seconds, self._start, self._inside = warmup, 0.0, 0.0, 0.0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    @staticmethod
    def _inside_backward(trainer: pl.Trainer) -> float:
        update = next((c for c in trainer.callbacks if isinstance(c, QuantizedUpdate)), None)
        return update.update_seconds_total if update is not None and update._in_backward else 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._inside = self._inside_backward(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._start = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self.seconds += self._now() - self._start + self._inside_backward(trainer) - self._inside


def predicted_peak(recipe: str, plugin: QuantPrecision, size: str, vocab_size: int, batch_size: int, seq_len: int,
                   cuda: bool, runtime: int | None) -> int:
    """The memory plan's peak for a recipe (:mod:`dqt_lightning.tools.plan`), in bytes."""
    class_path, args = optimizer_settings(recipe)
    settings = RunSettings(replace(SIZES[size], vocab_size=vocab_size), batch_size, seq_len, plugin.method,
                           plugin.execution, class_path, args, "cuda" if cuda else "cpu", runtime)
    return plan(settings).peak


CHILD_MARK = "bench-row: "


def run_recipe_isolated(recipe: str, **kwargs) -> Row:
    """:func:`run_recipe` in a fresh Python process of its own, with its resident memory measured phase by phase
    (:class:`~dqt_lightning.tools.memory.PeakMemoryByPhase`): on a CPU the peak of a process is the only memory
    measure there is, and a recipe's must neither inherit another's allocations nor miss its model's construction.
    A process that dies (the kernel's OOM killer) becomes a skipped row saying so."""
    if not recipe.startswith("torchao"):  # one the plan says cannot fit would only wake the OOM killer
        predicted = predicted_peak(recipe, recipe_plugin(recipe, kwargs["precision"]), kwargs["size"],
                                   kwargs["vocab_size"], kwargs["batch_size"], kwargs["seq_len"], False, None)
        if predicted > machine_memory():
            return Row(recipe, skipped=f"the memory plan needs {predicted / GIB:.1f} GiB, this machine has "
                                       f"{machine_memory() / GIB:.1f}", predicted_gib=predicted / GIB)
    arguments = json.dumps({"recipe": recipe, "threads": torch.get_num_threads(), **kwargs})
    code = "import sys; from dqt_lightning.tools.bench import _run_child; _run_child(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, arguments], capture_output=True, text=True, check=False)
    rows = [line[len(CHILD_MARK):] for line in done.stdout.splitlines() if line.startswith(CHILD_MARK)]
    if done.returncode != 0 or not rows:
        killed = done.returncode == -signal.SIGKILL
        reason = ("killed (SIGKILL: out of memory?)" if killed else
                  next((ln for ln in reversed(done.stderr.splitlines()) if ln.strip()), f"exit {done.returncode}"))
        return Row(TORCHAO.get(recipe, recipe), skipped=f"its process ended: {reason}")
    return Row(**json.loads(rows[-1]))


def _run_child(arguments: str) -> None:
    args = json.loads(arguments)
    torch.set_num_threads(args.pop("threads"))
    with quiet_loggers(["lightning.pytorch", *TORCHAO_IMPORT_LOGGERS], logging.WARNING):
        row = run_recipe(**args, probe=PeakMemoryByPhase(verbose=False))
    print(CHILD_MARK + json.dumps(asdict(row)), flush=True)


def _run_soft(recipe: str, isolate: bool = False, **kwargs) -> Row:
    if isolate:
        return run_recipe_isolated(recipe, **kwargs)
    try:
        return run_recipe(recipe, **kwargs)
    except Exception as error:  # noqa: BLE001 - only the optional torchao recipes may fail softly
        if not recipe.startswith("torchao"):
            raise
        return Row(TORCHAO.get(recipe, recipe), skipped=f"{type(error).__name__}: {error}".splitlines()[0])


def _fill_ratios(rows: Sequence[Row]) -> None:
    fp = next((r.tokens_per_s for r in rows if r.recipe == "fp"), None)
    for row in rows:
        if fp and row.tokens_per_s is not None:
            row.ratio = row.tokens_per_s / fp


def run_benchmark(recipes: Sequence[str] = RECIPES, repeats: int = 1,
                  on_row: Callable[[int, list[Row]], None] | None = None, **kwargs) -> list[Row]:
    """Run every recipe in turn, ``repeats`` rounds, and fill in each one's ratio to the fp row.

    Rounds are interleaved (every recipe once, then again), so that a slow spell of a shared machine hits all recipes
    alike. With several rounds a row reports the median tokens/s, the range, and the median of its per-round ratios
    to fp (a paired comparison); the memory columns are the same in every round.

    Args:
        recipes: Recipe names (see :func:`run_recipe`).
        repeats: Rounds.
        on_row: Called after each recipe with the round's index and its rows so far (ratios filled in where fp has
            run), so that a run stopped from outside still leaves what it measured.
        **kwargs: The other arguments of :func:`run_recipe`.

    Returns:
        One row per recipe, in order; a torchao recipe that fails becomes a row with ``skipped`` set.
    """
    rounds: list[list[Row]] = []
    for index in range(repeats):
        rows: list[Row] = []
        rounds.append(rows)
        for recipe in recipes:
            rows.append(_run_soft(recipe, **kwargs))
            _fill_ratios(rows)
            if on_row is not None:
                on_row(index, rows)
    if repeats == 1:
        return rounds[0]
    merged = []
    for runs in zip(*rounds):
        if runs[0].skipped:
            merged.append(runs[0])
            continue
        speeds = [r.tokens_per_s for r in runs]
        row = replace(runs[0], tokens_per_s=statistics.median(speeds), tokens_per_s_range=(min(speeds), max(speeds)))
        if runs[0].ratio is not None:
            row.ratio = statistics.median(r.ratio for r in runs)
        merged.append(row)
    return merged


def bench(size: str = "tiny", vocab_size: int = 4096, batch_size: int = 8, seq_len: int = 128, steps: int = 10,
          warmup: int = 3, precision: Literal["32-true", "bf16-mixed"] | None = None,
          recipes: list[str] | None = None, compile: bool = False, repeats: int = 1, threads: int | None = None,
          isolate: bool | None = None, out: Path | None = None, plot: Path | None = None) -> int:
    """Throughput and memory by component of every training recipe, side by side.

    Prints the report, and writes it and the chart when asked. Returns 0, or 2 when an output file cannot be written
    (the report is printed first).

    Args:
        size: model size: a name in dqt_lightning.model.SIZES (tiny, 130m, 320m, 1b, 7b)
        vocab_size: vocabulary size
        batch_size: sequences per step
        seq_len: tokens per sequence
        steps: measured steps
        warmup: unmeasured steps first
        precision: default: bf16-mixed on CUDA, 32-true on CPU
        recipes: default: fp, ste, the DQT recipes (and torchao's two when torchao is installed); a recipe is fp,
            ste[-BITS], dqt-BITS[-OPTION...] or a torchao recipe
        compile: wrap the LLaMA forward with torch.compile
        repeats: rounds of all recipes, interleaved; rows then give median tokens/s (range) and the median per-round
            ratio to fp
        threads: CPU threads for torch (default: torch's own choice)
        isolate: run each recipe in a fresh process of its own and report its peak resident memory, construction
            included, phase by phase (default: on a CPU, where that is the only peak there is; on a GPU all recipes
            share one process and each reports its allocator peak)
        out: also write the report to this Markdown file
        plot: also draw tokens/s and memory by component per recipe into this PNG
    """
    args = SimpleNamespace(**locals())
    if size not in SIZES:
        raise ConfigError(f"--size {size} is not a model size; choose from {', '.join(SIZES)}")
    counts = {"--steps": steps, "--repeats": repeats, "--threads": threads or 1, "--batch-size": batch_size,
              "--seq-len": seq_len, "--vocab-size": vocab_size}
    for flag, value in counts.items():
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1; got {value}")
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0; got {warmup}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot writes a PNG, so its path must end in .png; got {plot}")
    if threads:
        torch.set_num_threads(threads)
    has_torchao = importlib.util.find_spec("torchao") is not None
    recipes = recipes or [*RECIPES, *(TORCHAO if has_torchao else ())]
    unknown = [r for r in recipes if r not in TORCHAO and (r.partition("-")[0] not in ("fp", "ste", "dqt")
                                                          or r.count("-") > 1 and not r.startswith("dqt-")
                                                          or not set(r.split("-")[2:]) <= set(OPTIONS))]
    if unknown:
        raise ConfigError(f"unknown recipe {unknown[0]}; use fp, ste[-BITS], dqt-BITS[-{'|'.join(OPTIONS)}...], "
                          f"{' or '.join(TORCHAO)}")
    cuda = torch.cuda.is_available()
    isolate = not cuda if isolate is None else isolate
    precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})"
    versions = f"torch {torch.__version__}"
    if has_torchao:
        versions += f", torchao {importlib.metadata.version('torchao')}"

    def render(rows: Sequence[Row], note: str = "") -> str:
        return "\n".join([
            f"Model {args.size}, vocab {args.vocab_size}, batch {args.batch_size} x {args.seq_len} tokens, "
            f"{precision}, {args.steps} measured steps after {args.warmup} warm-up, AdamW{' (fused)' if cuda else ''}"
            f"{', torch.compile' if args.compile else ''}"
            f"{f', median of {args.repeats} interleaved rounds (range)' if args.repeats > 1 else ''}, "
            f"CPU threads: {torch.get_num_threads()}."
            " Weights, grads and optimizer states cover all parameters, at the update.", "", table(rows), "",
            f"Device: {device}; {versions}; {datetime.date.today().isoformat()}."
            + (" Peak: the allocator's." if cuda else
               " Peak: resident memory of each recipe's own process, construction included; runtime: before the "
               "model was built; activations: the forward's growth; rest: the peak less the other columns (the "
               "update's and backward's transients)." if isolate else
               " No allocator peak on CPU (recipes share one process: --isolate), so peak and activations are n/a.")
            + ("" if has_torchao else " torchao not installed: its recipes are omitted.") + note,
            f"Command: `{shlex.join([*PROG.split(), *commands.invocation])}`",
        ])

    started = time.perf_counter()

    def progress(index: int, rows: list[Row]) -> None:
        # One line per recipe as it finishes, and with --out the first round's table so far, rewritten each time: a
        # run stopped from outside (a device call's time limit) keeps what it measured.
        row = rows[-1]
        result = f"skipped ({row.skipped})" if row.skipped else f"{fmt(row.tokens_per_s, ',.0f')} tokens/s" + (
            f", peak {row.peak_gib:.2f} GiB" if row.peak_gib is not None else "")
        sys.stderr.write(f"bench: round {index + 1}, {len(rows)} of {len(recipes)}: {row.recipe}: {result} "
                         f"[{time.perf_counter() - started:.0f} s]\n")
        if args.out and index == 0 and len(rows) < len(recipes):
            note = f" PARTIAL: {len(rows)} of {len(recipes)} recipes measured so far; the run had not finished."
            with contextlib.suppress(OSError):  # reported once, when the final report cannot be written either
                atomic_write(args.out, lambda f: f.write((render(rows, note) + "\n").encode()))

    # Lightning's "GPU available / TPU available" banners are noise in a table meant for pasting.
    with quiet_loggers(["lightning.pytorch"], logging.WARNING):
        rows = run_benchmark(recipes, size=args.size, vocab_size=args.vocab_size, batch_size=args.batch_size,
                             seq_len=args.seq_len, steps=args.steps, warmup=args.warmup, precision=precision,
                             compile=args.compile, repeats=args.repeats, on_row=progress, isolate=isolate)
    report = render(rows)
    print(report)
    try:
        if args.out:
            atomic_write(args.out, lambda f: f.write((report + "\n").encode()))
        if args.plot:
            title = (f"Model {args.size}, batch {args.batch_size} x {args.seq_len} tokens, {precision}, "
                     f"{device}, {versions}")
            plot_chart(rows, args.plot, title)
            print(f"\nchart: {args.plot}")
    except OSError as error:
        sys.stderr.write(f"error: cannot write {error.filename or args.plot}: {error.strerror or error}\n")
        return 2
    return 0
