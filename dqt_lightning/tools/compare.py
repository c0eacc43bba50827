"""``python -m dqt_lightning compare RUN ...``: one table and one plot for several TensorBoard runs.

A run is a ``runs/<name>/version_N`` directory as the CLI writes it: TensorBoard event files plus the resolved
``config.yaml``. Naming a directory above runs (``runs/`` or ``runs/ternary``) takes every run under it. The table
gives, per run, what a paper's results table needs: mode, bits and rounding (from the run's config), the final
validation loss and perplexity, tokens seen, median training throughput and peak memory; the PNG plots validation
loss against tokens seen, so runs with different batch sizes or device counts line up at equal data. A run whose
directory holds the ``eval.json`` that ``eval`` writes gets its perplexity and task accuracies as extra columns
(``eval ppl``, ``<task> acc``).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dqt_lightning.errors import ConfigError


@dataclass
class Run:
    """What one run logged, reduced to the numbers the table and the plot show."""

    path: Path
    mode: str
    bits: str
    rounding: str
    val_curve: list[tuple[float, float]]  # (tokens seen, validation loss), in step order
    tokens_seen: float | None
    tokens_per_sec: float | None
    peak_memory_mb: float | None
    val_loss_ternary: float | None = None  # the last val/loss_ternary (ternary_eval runs only)
    val_loss_ternary_absmean: float | None = None  # the same with BitNet's absmean scale (DQT runs with ternary_eval)

    last_step: int | None = None  # the last step anything was logged at (None: nothing was)
    max_steps: int | None = None  # trainer.max_steps of its config (None or -1: not set)
    evals: dict[str, float] = field(default_factory=dict)  # {column: value} from the run's eval.json

    @property
    def final_val_loss(self) -> float | None:
        return self.val_curve[-1][1] if self.val_curve else None

    @property
    def status(self) -> str:
        """``finished``, ``stopped at step N of M`` (killed, or stopped early), or ``failed`` when nothing was
        logged (a run refused or crashed before its first logged step)."""
        if self.last_step is None:
            return "failed: nothing logged"
        if self.max_steps is not None and 0 < self.max_steps and self.last_step < self.max_steps:
            return f"stopped at step {self.last_step} of {self.max_steps}"
        return "finished"


def find_runs(paths: list[str]) -> list[Path]:
    """Every run directory (one that holds TensorBoard event files) at or under each of ``paths``, in sorted order."""
    runs: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise ConfigError(f"compare: run directory {given} does not exist")
        found = sorted({event.parent for event in path.rglob("events.out.tfevents.*")})
        if not found:
            raise ConfigError(f"compare: no TensorBoard event files under {given}")
        runs += [run for run in found if run not in runs]
    return runs


def run_config(run_dir: Path) -> dict:
    """The ``config.yaml`` the CLI saved in a run directory, as a dict (empty when there is none)."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        return {}
    try:
        return yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"compare: {config_file} is not valid YAML ({error})") from error


def plugin_args(config: dict) -> dict:
    """The precision plugin's init args (mode, bits, ...) from a run's saved config (:func:`run_config`)."""
    plugins = (config.get("trainer") or {}).get("plugins") or {}
    if isinstance(plugins, list):  # several plugins: ours is the one with a training method
        plugins = next((p for p in plugins if str(p.get("class_path", "")).endswith("QuantPrecision")), {})
    init_args = plugins.get("init_args") or {}
    # The method and execution blocks, flattened; runs from before the two blocks have the same names at the top.
    return {**{k: v for k, v in init_args.items() if not isinstance(v, dict)},
            **(init_args.get("method") or {}), **(init_args.get("execution") or {})}


EVAL_METRICS = {"perplexity": "ppl", "acc": "acc", "word_perplexity": "word ppl"}  # what eval.json adds as columns


def eval_columns(run_dir: Path) -> dict[str, float]:
    """``{column: value}`` of the ``eval.json`` in a run directory (empty when there is none): the text perplexity as
    ``eval ppl`` and each task's accuracy as ``<task> acc`` (``, ternary`` added when evaluated with ``--ternary``)."""
    file = run_dir / "eval.json"
    if not file.is_file():
        return {}
    try:
        report = json.loads(file.read_text())
        rows = report["results"]
        suffix = ", ternary" if report.get("ternary") else ""
        columns = {}
        for row in rows:
            if row["metric"] in EVAL_METRICS and isinstance(row["value"], (int, float)):
                task = "eval" if row["metric"] == "perplexity" and row["task"] == "text" else row["task"]
                columns[f"{task} {EVAL_METRICS[row['metric']]}{suffix}"] = float(row["value"])
        return columns
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"compare: {file} is not an eval.json written by eval ({type(error).__name__}: "
                          f"{error})") from error


def load_run(run_dir: Path) -> Run:
    """Read one run's scalars and configuration."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point, not a sample
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)] if tag in tags else []

    tokens = series("train/tokens_seen")
    val = series("val/loss")
    # Validation is logged at the step of the last training batch; map each step to the tokens seen by then.
    curve = [(_tokens_at(tokens, step) if tokens else float(step), loss) for step, loss in val]
    throughput = [v for _, v in series("train/tokens_per_sec")]
    memory = [v for _, v in series("train/peak_memory_mb")]
    config = run_config(run_dir)
    args = plugin_args(config)
    logged = [e.step for tag in tags for e in events.Scalars(tag)]
    mode = str(args.get("mode", "?"))
    bits = "32" if mode == "fp" else _bits(args.get("bits", 1.58))
    final_bits = series("dqt/bits")  # a bit-width schedule logs the grid it is on: show where the run ended
    if final_bits and _bits(round(final_bits[-1][1], 2)) != bits:
        bits = f"{bits}→{_bits(round(final_bits[-1][1], 2))}"
    ternary, ternary_absmean = series("val/loss_ternary"), series("val/loss_ternary_absmean")
    return Run(
        path=run_dir,
        mode=mode,
        bits=bits,
        rounding=str(args.get("rounding", "-")) if mode == "dqt" else "-",
        val_curve=curve,
        tokens_seen=tokens[-1][1] if tokens else None,
        # Median, not mean: the first steps include warm-up work (allocation, tokenizer threads) and skew a mean.
        tokens_per_sec=statistics.median(throughput) if throughput else None,
        peak_memory_mb=max(memory) if memory else None,
        val_loss_ternary=ternary[-1][1] if ternary else None,
        val_loss_ternary_absmean=ternary_absmean[-1][1] if ternary_absmean else None,
        last_step=max(logged) if logged else None,
        max_steps=(config.get("trainer") or {}).get("max_steps"),
        evals=eval_columns(run_dir),
    )


def _bits(value: object) -> str:
    # The resolved config stores bits as a float: show 8.0 as 8 and 1.58 as it is.
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def _tokens_at(tokens: list[tuple[int, float]], step: int) -> float:
    earlier = [value for s, value in tokens if s <= step]
    return earlier[-1] if earlier else tokens[0][1]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def table(runs: list[Run]) -> str:
    """A Markdown table of the runs, finished ones first and the best final validation loss first among them, each
    with its :attr:`Run.status`; with a ``val loss, ternary`` column (the loss with weights re-quantized to ternary)
    when any run logged one, and a column per ``eval`` result (:func:`eval_columns`) when any run has an eval.json."""
    with_ternary = any(run.val_loss_ternary is not None for run in runs)
    evals = list(dict.fromkeys(column for run in runs for column in run.evals))
    lines = ["| run | mode | bits | rounding | final val loss |" + (" val loss, ternary |" if with_ternary else "")
             + " val ppl |" + "".join(f" {column} |" for column in evals)
             + " tokens seen | tokens/s | peak memory (MB) | status |",
             "|---|---|---:|---|---:|" + ("---:|" if with_ternary else "") + "---:|" + "---:|" * len(evals)
             + "---:|---:|---:|---|"]
    # Finished runs first, best final validation loss first among them.
    ranked = sorted(runs, key=lambda r: (r.status != "finished", r.final_val_loss is None, r.final_val_loss or 0.0))
    for run in ranked:
        loss = run.final_val_loss
        lines.append(
            f"| {run.path} | {run.mode} | {run.bits} | {run.rounding} | {_fmt(loss, '.4f')} | "
            + (f"{_fmt(run.val_loss_ternary, '.4f')} | " if with_ternary else "") +
            f"{_fmt(math.exp(loss) if loss is not None else None, '.2f')} | "
            + "".join(f"{_fmt(run.evals.get(column), '.2f' if 'ppl' in column else '.3f')} | " for column in evals)
            + f"{_fmt(run.tokens_seen, ',.0f')} | "
            f"{_fmt(run.tokens_per_sec, ',.0f')} | {_fmt(run.peak_memory_mb, ',.0f')} | {run.status} |"
        )
    return "\n".join(lines)


def plot_losses(runs: list[Run], output: Path) -> None:
    """Validation loss against tokens seen, one line per run, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training machine
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for run in runs:
        if run.val_curve:
            x, y = zip(*run.val_curve)
            ax.plot(x, y, marker="o", markersize=3, label=f"{run.path.parent.name}/{run.path.name} ({run.mode})")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss against training tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)


def compare(runs: list[str], plot: str = "compare.png") -> int:
    """One table and one plot of validation loss against tokens for finished runs.

    Args:
        runs: run directories (runs/<name>/version_N) or directories above them
        plot: where to write the PNG of validation loss against tokens
    """
    found = [load_run(path) for path in find_runs(runs)]
    print(table(found))
    plot_losses(found, Path(plot))
    print(f"\nplot of validation loss against tokens seen: {plot}")
    return 0
