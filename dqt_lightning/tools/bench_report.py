"""The report of ``bench``: one row per recipe, the Markdown table and the two-panel PNG (throughput, memory by
component)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dqt_lightning.files import atomic_write

# torchao's recipes, by their command-line name: the label their rows carry.
TORCHAO = {"torchao-int8": "torchao int8 QT", "torchao-bitnet": "torchao BitNet"}


@dataclass
class Row:
    """One recipe's measurements; ``None`` means not measurable here (printed as n/a).

    Attributes:
        recipe: Label of the recipe.
        tokens_per_s: Training tokens per second over the measured steps.
        ratio: ``tokens_per_s`` relative to the fp recipe's under the same precision.
        peak_gib: Allocator peak during the run on CUDA; on a CPU the peak resident memory of the recipe's own
            process, construction included (where it ran in one: ``bench``'s default there).
        weights_mib: Weights of all parameters, at the update.
        grads_mib: Their gradients, at the update (when every one is complete).
        states_mib: Their optimizer states.
        activations_mib: CUDA: ``peak - (weights + grads + states)``; CPU: how much resident memory grew during the
            forward pass.
        skipped: Why the recipe did not run, if it did not.
        measured_steps: Steps the throughput was timed over (the warm-up excluded).
        tokens_per_s_range: Lowest and highest tokens/s over repeated runs (``None`` for a single run).
        seconds_per_step: Mean wall time of a timed step.
        update_share: Share of that time spent in the update: from the end of backward to the end of the step, and
            the DQT update that runs inside backward.
        predicted_gib: The memory plan's peak for the recipe (:mod:`dqt_lightning.tools.plan`).
        runtime_mib: CPU: the process before the model was built (Python, torch, Lightning, the data).
        rest_mib: CPU: the peak less the runtime, weights, gradients, states and, where the peak falls in the forward
            or backward, activations: the transient float values of the update and of backward, and what malloc
            keeps.
        peak_phase: CPU: the phase of a step the peak falls in (``forward``, ``backward``, ``update``, or ``build``).
    """

    recipe: str
    tokens_per_s: float | None = None
    ratio: float | None = None
    peak_gib: float | None = None
    weights_mib: float | None = None
    grads_mib: float | None = None
    states_mib: float | None = None
    activations_mib: float | None = None
    skipped: str | None = None
    measured_steps: int = 0
    tokens_per_s_range: tuple[float, float] | None = None
    seconds_per_step: float | None = None
    update_share: float | None = None
    predicted_gib: float | None = None
    runtime_mib: float | None = None
    rest_mib: float | None = None
    peak_phase: str | None = None


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or n/a where it could not be measured."""
    return "n/a" if value is None else format(value, spec)


def table(rows: Sequence[Row]) -> str:
    """The Markdown table of ``rows``: a header, a separator and one line per row. Rows measured in processes of
    their own (on a CPU) add the runtime and the rest to the memory columns, summing to the peak."""
    resident = any(r.runtime_mib is not None for r in rows)
    header = ("| recipe | tokens/s | × fp (same precision) | s/step | update share | peak GiB | plan GiB "
              + ("| runtime MiB " if resident else "") + "| weights MiB | grads MiB | optimizer states MiB "
              "| activations MiB |" + (" rest MiB |" if resident else ""))
    columns = header.count("|") - 1
    lines = [header, "|---" + "|---:" * (columns - 1) + "|"]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.recipe} | skipped: {r.skipped} |" + "  |" * (columns - 2))
            continue
        speed = fmt(r.tokens_per_s, ',.0f')
        if r.tokens_per_s_range:
            speed += f" ({r.tokens_per_s_range[0]:,.0f}-{r.tokens_per_s_range[1]:,.0f})"
        peak = fmt(r.peak_gib, '.2f') + (f" ({r.peak_phase})" if r.peak_phase else "")
        cells = [r.recipe, speed, fmt(r.ratio, '.2f'), fmt(r.seconds_per_step, '.3g'), fmt(r.update_share, '.0%'),
                 peak, fmt(r.predicted_gib, '.2f')]
        cells += [fmt(r.runtime_mib, ',.0f')] if resident else []
        cells += [fmt(r.weights_mib, ',.2f'), fmt(r.grads_mib, ',.2f'), fmt(r.states_mib, ',.2f'),
                  fmt(r.activations_mib, ',.1f')]
        cells += [fmt(r.rest_mib, ',.0f')] if resident else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Memory columns of a row, bottom to top in the stacked bars, with their legend labels and colours (none of them
# the throughput panel's, so that a colour means one thing in the figure).
MEMORY_PARTS = (("weights_mib", "weights", "#1b9e77"), ("grads_mib", "gradients", "#e7298a"),
                ("states_mib", "optimizer states", "#7570b3"),
                ("activations_mib", "activations / other (peak - the rest)", "#bbbbbb"))
RECIPE_COLORS = {"fp": "#888888", "torchao": "#e6ab02", "ours": "#4c72b0"}


def plot(rows: Sequence[Row], output: Path, title: str) -> None:
    """Write a PNG of two panels: tokens/s per recipe, each bar labelled with its ratio to fp (whiskers: the range
    over repeated rounds), and memory by component per recipe, stacked, with the total on top. A skipped recipe keeps
    its place, marked.

    Activations (peak minus weights, gradients and optimizer states) exist only where the allocator reports a peak
    (CUDA); on CPU the stack holds the three measured components and the panel says so.

    Args:
        rows: Rows from :func:`run_benchmark`.
        output: Where to write the PNG (atomically: a reader never sees half a file).
        title: The figure's title (model, batch, precision, device).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training machine
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    fig, (speed_ax, memory_ax) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=120)
    speeds = [r.tokens_per_s or 0.0 for r in rows]
    low = [s - r.tokens_per_s_range[0] if r.tokens_per_s_range else 0.0 for s, r in zip(speeds, rows)]
    high = [r.tokens_per_s_range[1] - s if r.tokens_per_s_range else 0.0 for s, r in zip(speeds, rows)]
    colors = [RECIPE_COLORS["fp" if r.recipe == "fp" else "torchao" if r.recipe in TORCHAO.values() else "ours"]
              for r in rows]
    whiskers = any(low + high)
    speed_ax.bar(x, speeds, color=colors, yerr=[low, high] if whiskers else None, capsize=3)
    for i, row in enumerate(rows):
        # Above the whisker, so that the two never overlap.
        text = "skipped" if row.skipped else "" if row.ratio is None else f"{row.ratio:.2f}×"
        speed_ax.annotate(text, (i, speeds[i] + high[i]), xytext=(0, 3), textcoords="offset points", ha="center",
                          va="bottom", fontsize=9, fontweight="bold")
    speed_ax.set_ylabel("training tokens/s")
    # With rounds, the label is the median of the per-round ratios (as in the table), not the ratio of the medians.
    speed_ax.set_title("Throughput; label: tokens/s relative to fp" if not whiskers else
                       "Throughput, median of rounds (whiskers: range); label: median per-round ratio to fp",
                       fontsize=10)
    speed_ax.set_ylim(0, max([s + h for s, h in zip(speeds, high)] + [1.0]) * 1.12)

    bottom = [0.0] * len(rows)
    for field, label, color in MEMORY_PARTS:
        values = [max(getattr(r, field) or 0.0, 0.0) for r in rows]
        if any(values):
            memory_ax.bar(x, values, bottom=bottom, label=label, color=color)
            bottom = [b + v for b, v in zip(bottom, values)]
    for i, row in enumerate(rows):
        text = "skipped" if row.skipped else f"{bottom[i]:.1f}"
        memory_ax.annotate(text, (i, bottom[i]), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                           fontsize=9)
    memory_ax.set_ylabel("MiB")
    no_peak = all(r.activations_mib is None for r in rows)
    memory_ax.set_title("Memory by component, between steps" + (" (no allocator peak on CPU: activations n/a)"
                                                                if no_peak else "; whole stack: allocator peak"),
                        fontsize=10)
    memory_ax.set_ylim(0, max(bottom + [1.0]) * 1.3)  # headroom for the legend above the bars
    if any(bottom):
        memory_ax.legend(fontsize=8, loc="upper center", ncol=2)
    for ax in (speed_ax, memory_ax):
        ax.set_xticks(x, [r.recipe for r in rows], rotation=30, ha="right")
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(output, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
