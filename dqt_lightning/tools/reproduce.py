"""``python -m dqt_lightning reproduce``: the paper's four claims checked at equal tokens and data, in one command.

Trains every arm of the comparison with the same configs stacked on top of its own (model size,
data, precision, ...), the same seed, data order and number of steps, each as an ordinary ``fit`` whose
validations also log the loss with weights re-quantized to ternary. Then it writes ``results.md`` (the ``compare``
table, each claim with the numbers behind it and the rule that judged it, the commands, device and date) and
``val_loss.png`` into the output directory.

Every arm is a separate process whose output goes to ``<out>/logs/<arm>.log``; a finished arm leaves
``<out>/<arm>/DONE`` and is skipped when the command runs again, and an interrupted one continues from its newest
checkpoint (``last.ckpt``, exact resume), so a reproduction can be spread over several sessions or time-limited
device calls (``--arms`` picks some). ``--report`` rewrites the report from the finished arms alone.

``--seeds`` trains every arm once per seed (``seed_everything``: initialization and rounding noise; the data order
and the validation set stay the same), as ``<arm>/seed<S>``; the report then judges each claim on the arms' mean
losses, says how many seeds agree with that verdict, and gives each arm's spread. ``--lr-sweep`` trains every arm
at each of several peak learning rates (``<arm>/lr<LR>``, ``<arm>/lr<LR>-seed<S>``) and judges the claims on each
arm at its own best, with the whole grid in the report.

    python -m dqt_lightning reproduce --out runs/reproduce --max-steps 2000 \\
        --config configs/model/130m.yaml --config configs/data/shards.yaml
"""

from __future__ import annotations

import collections
import datetime
import importlib.resources
import json
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dqt_lightning.tools.claims import (ArmPrecision, best_learning_rates, further_findings, judge, lr_table, mean_run,
                                        precision_of, seed_table)
from dqt_lightning.tools.compare import Run, load_run, plot_losses, table
from dqt_lightning import commands
from dqt_lightning.errors import ConfigError
from dqt_lightning.files import atomic_write

# The configs directory of the checkout, or its copy inside an installed package: the same files either way.
CONFIGS = Path(str(importlib.resources.files("dqt_lightning.configs")))

# Arm name: the configs that make it, before the stack the user adds (base first, then the arm's overlays, which
# are applied after the stack so that an arm's own choice, nearest rounding say, always holds).
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fp": ("fp.yaml", ()),
    "bitnet": ("bitnet.yaml", ()),
    "dqt-ternary": ("ternary.yaml", ()),
    "dqt-8bit": ("ternary.yaml", ("bits/8.yaml",)),
    "dqt-8bit-nearest": ("ternary.yaml", ("bits/8.yaml", "ablation/nearest.yaml")),
    "dqt-ternary-nearest": ("ternary.yaml", ("ablation/nearest.yaml",)),
    # The best schedule of docs/schedules.md: 8-bit for 70% of the steps, then ternary keeping the 8-bit range.
    "dqt-8bit-to-ternary": ("ternary.yaml", ("bits/8.yaml", "schedule/8-to-ternary-range.yaml")),
    "dqt-8bit-bf16": ("ternary.yaml", ("bits/8.yaml", "precision/bf16.yaml")),
}
# On an FP8 GPU only (H100, L40S): claim 3's FP8 part. Not in the default set, since elsewhere it refuses to start.
OPTIONAL_ARMS = {"dqt-8bit-fp8": ("ternary.yaml", ("bits/8.yaml", "precision/fp8.yaml")),
                 # The lean recipes of the 7B runs, for what their leaner state costs in quality.
                 "dqt-ternary-lean": ("ternary.yaml", ("recipes/lean.yaml",)),
                 "dqt-ternary-lean-factored": ("ternary.yaml", ("recipes/lean-factored.yaml",))}


@dataclass(frozen=True)
class Job:
    """One training run of the reproduction: an arm at the configs' own seed and learning rate (``None``), or at
    given ones."""

    arm: str
    seed: int | None = None
    lr: float | None = None

    @property
    def _suffix(self) -> str:
        parts = ([] if self.lr is None else [f"lr{self.lr:g}"]) + ([] if self.seed is None else [f"seed{self.seed}"])
        return "-".join(parts)

    @property
    def name(self) -> str:
        """How logs and messages name it."""
        return f"{self.arm}-{self._suffix}" if self._suffix else self.arm

    @property
    def version(self) -> str:
        """Its run directory under ``<out>/<arm>``."""
        return self._suffix or "version_0"

    @property
    def done(self) -> str:
        """The file under ``<out>/<arm>`` that marks it finished."""
        return f"DONE-{self._suffix}" if self._suffix else "DONE"


def _job_of_marker(arm: str, marker: str) -> Job | None:
    """The job a ``DONE`` marker reproduce wrote stands for; None for any other file (a copy, a backup)."""
    seed = lr = None
    for part in [p for p in marker.removeprefix("DONE").split("-") if p]:
        try:
            if part.startswith("seed"):
                seed = int(part.removeprefix("seed"))
            elif part.startswith("lr"):
                lr = float(part.removeprefix("lr"))
            else:
                return None
        except ValueError:
            return None
    return Job(arm, seed, lr)


def finished_jobs(out: Path, arms: list[str]) -> list[Job]:
    """The jobs of ``arms`` that finished under ``out``, at the configs' seed and learning rate and at given ones."""
    jobs = []
    for arm in arms:
        found = [job for done in (out / arm).glob("DONE*") if (job := _job_of_marker(arm, done.name)) is not None]
        jobs += sorted(found, key=lambda job: (job.lr is not None, job.lr or 0.0, job.seed is not None,
                                               job.seed or 0))
    return jobs


def is_dqt_arm(arm: str) -> bool:
    """Whether an arm trains DQT weights (and takes the ``--dqt-config`` stack)."""
    return {**ARMS, **OPTIONAL_ARMS}[arm][0] not in ("fp.yaml", "bitnet.yaml")


def arm_command(arm: str, stack: list[str], max_steps: int, out: Path, extra: list[str],
                dqt_stack: list[str] = (), seed: int | None = None, lr: float | None = None) -> list[str]:
    """The ``fit`` command line of one arm: its base config, ``stack``, ``dqt_stack`` for DQT arms, its overlays;
    with ``seed``, that ``seed_everything``, with ``lr`` that peak learning rate, and its own run directory."""
    base, overlays = {**ARMS, **OPTIONAL_ARMS}[arm]
    job = Job(arm, seed, lr)
    own = list(dqt_stack) if is_dqt_arm(arm) else []
    configs = [str(CONFIGS / base), *stack, *own, *(str(CONFIGS / o) for o in overlays)]
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              # One version per arm: an interrupted arm continues in the same directory, so its curve stays whole.
              "init_args": {"save_dir": str(out), "name": arm, "version": job.version, "default_hp_metric": False}}
    seeded = [] if seed is None else ["--seed_everything", str(seed)]
    seeded += [] if lr is None else ["--model.init_args.optimizer.init_args.lr", f"{lr:g}"]
    return [sys.executable, "-m", "dqt_lightning", "fit", *(a for c in configs for a in ("--config", c)),
            "--trainer.max_steps", str(max_steps), "--model.init_args.ternary_eval", "true",
            "--trainer.logger", json.dumps(logger), *extra, *seeded]


def run_arm(job: Job, command: list[str], out: Path) -> Path:
    """Train one arm at one seed (unless it finished before) and return its run directory."""
    done = out / job.arm / job.done
    if done.exists():
        return out / done.read_text().strip()
    log = out / "logs" / f"{job.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    last = out / job.arm / job.version / "checkpoints" / "last.ckpt"
    if last.exists():  # interrupted (a device call's time limit, a kill): continue from its newest checkpoint
        command = [*command, "--ckpt_path", str(last)]
        # LightningCLI refuses to overwrite the run's config.yaml; keep the earlier attempt's beside it.
        config = last.parent.parent / "config.yaml"
        if config.exists():
            attempt = next(k for k in range(1, 10_000) if not config.with_name(f"config.attempt-{k}.yaml").exists())
            config.rename(config.with_name(f"config.attempt-{attempt}.yaml"))
    print(f"[reproduce] {job.name}: {shlex.join(command[1:])}", flush=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    marker = "[fit] run directory: "
    run_dir = next((line.split(marker, 1)[1].strip() for line in text.splitlines() if marker in line), None)
    if result.returncode != 0 or run_dir is None:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise ConfigError(f"reproduce: arm {job.name} failed (exit {result.returncode}): {last[0]} (log: {log})")
    # Relative to the output directory, so the finished runs still count after it moves (off a GPU machine, say).
    atomic_write(done, lambda f: f.write(f"{Path(run_dir).resolve().relative_to(out)}\n".encode()))
    return Path(run_dir).resolve()


def _unigram_entropy(logs: Path) -> float | None:
    """The unigram entropy of the training tokens, as the arms' logs report it (the same data for every arm)."""
    marker = "unigram entropy of the training tokens "
    for log in sorted(logs.glob("*.log")):
        for line in log.read_text().splitlines():
            if marker in line:
                return float(line.split(marker, 1)[1].split()[0])
    return None


def by_arm(runs: dict[Job, Run]) -> dict[str, list[Run]]:
    """The runs of each arm, in the order given."""
    grouped: dict[str, list[Run]] = {}
    for job, run in runs.items():
        grouped.setdefault(job.arm, []).append(run)
    return grouped


def lr_means(runs: dict[Job, Run]) -> dict[tuple[str, float], Run]:
    """Each (arm, learning rate) of a sweep as one run: its mean over seeds (:func:`mean_run`)."""
    grouped: dict[tuple[str, float], list[Run]] = {}
    for job, run in runs.items():
        if job.lr is not None:
            grouped.setdefault((job.arm, job.lr), []).append(run)
    return {key: mean_run(group) for key, group in grouped.items()}


def on_shared_seeds(runs: dict[Job, Run]) -> dict[Job, Run]:
    """A sweep's runs of each arm at the seeds that every one of its learning rates has (all of an arm's runs where
    its rates share no seed): a sweep extended at some rates only compares an arm's rates on the same seeds, not one
    seed's luck against a mean of three."""
    seeds: dict[str, dict[float, set[int | None]]] = {}
    for job in runs:
        if job.lr is not None:
            seeds.setdefault(job.arm, {}).setdefault(job.lr, set()).add(job.seed)
    shared = {arm: set.intersection(*by_lr.values()) for arm, by_lr in seeds.items()}
    return {job: run for job, run in runs.items() if job.seed in shared.get(job.arm, ()) or not shared.get(job.arm)}


def at_best_learning_rates(runs: dict[Job, Run]) -> tuple[dict[Job, Run], dict[tuple[str, float], Run],
                                                           dict[str, float]]:
    """A sweep's runs at each arm's best learning rate, with the sweep's grid (:func:`lr_means`) and the best rates
    (:func:`~dqt_lightning.tools.claims.best_learning_rates`, on the seeds all of the arm's rates have)."""
    grid = lr_means(runs)
    best = best_learning_rates(lr_means(on_shared_seeds(runs)))
    return {job: run for job, run in runs.items() if job.lr == best.get(job.arm)}, grid, best


def arm_means(runs: dict[Job, Run]) -> dict[str, Run]:
    """Each arm as one run: its mean over seeds where it has several (:func:`mean_run`)."""
    return {arm: mean_run(arm_runs) for arm, arm_runs in by_arm(runs).items()}


def results_markdown(runs: dict[Job, Run], invocations: list[str], max_steps: int, png: Path,
           precisions: dict[str, ArmPrecision], unigram_entropy: float | None = None) -> str:
    """The Markdown report: table, claims, findings, the command and the arms' configs, device and date.

    With several seeds per arm, each claim is judged on the arms' mean losses (:func:`mean_run`), and judged again
    at each seed alone: the "seeds agreeing" column counts the seeds whose own verdict is the mean's.
    """
    # On a CPU, the kernels torch dispatches to (AVX2, AVX512, ...) are named: they round sums differently, and under
    # stochastic rounding the same seed then takes another path, so a run matches another to the digit only on them.
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"CPU ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()} kernels)")
    swept = any(job.lr is not None for job in runs)
    all_runs = runs
    if swept:  # every arm at its own best learning rate: the runs at the others only enter the grid
        runs, grid, best = at_best_learning_rates(runs)
    grouped, means = by_arm(runs), arm_means(runs)
    seeds = sorted({job.seed for job in runs}, key=lambda seed: -1 if seed is None else seed)
    several = any(len(arm_runs) > 1 for arm_runs in grouped.values())
    arm_seeds = {frozenset(job.seed for job in runs if job.arm == arm) for arm in grouped}
    each = "every arm at each" if len(arm_seeds) == 1 else "not every arm at each (its seeds: below)"
    same = ("the same data order and number of steps; seeds " + ", ".join(str(s) for s in seeds if s is not None)
            + f" (initialization and rounding noise), {each}" if several
            else "the same seed, data order and number of steps")
    lines = [f"# Reproduction: the paper's claims at {max_steps} steps per arm", "",
             f"Device: {device}; torch {torch.__version__}; Python {platform.python_version()}; "
             f"{datetime.date.today().isoformat()}. Every arm: {same}.", "",
             "## Results", "", table(list(runs.values())), ""]
    if swept:
        counts = collections.Counter((job.arm, job.lr) for job in all_runs if job.lr is not None)
        lines += ["Each arm at its own best learning rate (lowest final validation loss, mean over the seeds that all "
                  "of its rates have), as quantization papers compare arms; the whole sweep (mean over seeds; in "
                  "brackets, a cell's seeds where cells differ):", "",
                  lr_table(grid, best, counts), ""]
    if several:
        lines += ["Across seeds:", "", seed_table(grouped), ""]
    lines += [f"![validation loss against tokens]({png.name})", "", "## The paper's claims", ""]
    claims = judge(means, precisions, unigram_entropy)
    if several:
        per_seed = [judge({job.arm: run for job, run in runs.items() if job.seed == seed}, precisions,
                          unigram_entropy) for seed in seeds]
        lines += ["Judged on each arm's mean over its seeds; \"seeds agreeing\": at how many seeds alone the verdict "
                  "is the same.", "", "| claim | verdict | seeds agreeing | evidence (means) |", "|---|---|---:|---|"]
        lines += [f"| {c.text} | {c.verdict} | {sum(p[i].verdict == c.verdict for p in per_seed)} of {len(seeds)} | "
                  f"{c.evidence} |" for i, c in enumerate(claims)]
    else:
        lines += ["| claim | verdict | evidence |", "|---|---|---|"]
        lines += [f"| {c.text} | {c.verdict} | {c.evidence} |" for c in claims]
    findings = further_findings(means)
    if findings:
        lines += ["", "## Beyond the claims", "", *findings]
    lines += ["", "## How it was run", "", "```bash", *invocations, "```", "",
              "Each arm is `fit` with its base config, then the `--config` stack (and for DQT arms the `--dqt-config` "
              "stack, if the command above has one), then the arm's overlays, and "
              "`--model.init_args.ternary_eval true` (the ternary column):", "", "| arm | configs |", "|---|---|"]
    for arm in grouped:
        base, overlays = {**ARMS, **OPTIONAL_ARMS}[arm]
        stacks = ["the stack", "the DQT stack"] if is_dqt_arm(arm) else ["the stack"]
        configs = [f"`configs/{base}`", *stacks, *(f"`configs/{o}`" for o in overlays)]
        lines.append(f"| {arm} | {', '.join(configs)} |")
    return "\n".join(lines) + "\n"


def reproduce(out: str = "runs/reproduce", config: list[str] | None = None, dqt_config: list[str] | None = None,
              max_steps: int = 1000, arms: list[str] | None = None, seeds: list[int] | None = None,
              lr_sweep: list[float] | None = None, report: bool = False,
              fit_args: list[str] | None = None) -> int:
    """Train the paper's comparison (full precision, BitNet, DQT at several widths, ablations) and judge its claims.

    Args:
        out: where runs, logs and the report go
        config: configs stacked on every arm (model size, data, ...), in order
        dqt_config: configs stacked on the DQT arms only, after --config: e.g. configs/kernels/fused-update.yaml, the
            same update in less time
        max_steps: optimizer steps per arm
        arms: arms to train (default: every arm of ARMS; OPTIONAL_ARMS only when named)
        seeds: train every arm once per seed (seed_everything; the data order stays the same) and judge the claims on
            the mean; default: the configs' own seed, once
        lr_sweep: train every arm at each of these peak learning rates and judge the claims on each arm's best (the
            report shows the whole grid); default: the configs' own rate
        report: only write the report from the finished arms
        fit_args: after --: more fit arguments for every arm
    """
    known = {**ARMS, **OPTIONAL_ARMS}
    arms = arms or list(ARMS)
    unknown = [arm for arm in arms if arm not in known]
    if unknown:
        raise ConfigError(f"unknown arm {unknown[0]}; choose from {', '.join(known)}")
    for option, paths in (("--config", config or []), ("--dqt-config", dqt_config or [])):
        missing = [c for c in paths if not Path(c).is_file()]
        if missing:
            raise ConfigError(f"{option} {missing[0]}: no such file")
    if max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
    if seeds and len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds lists a seed twice: {' '.join(map(str, seeds))}")
    if lr_sweep and (len(set(lr_sweep)) < len(lr_sweep) or min(lr_sweep) <= 0):
        raise ConfigError(f"--lr-sweep takes distinct learning rates > 0; got {' '.join(f'{lr:g}' for lr in lr_sweep)}")
    root = Path(out).resolve()
    extra = fit_args or []
    stack = [str(Path(c).resolve()) for c in config or []]
    dqt_stack = [str(Path(c).resolve()) for c in dqt_config or []]
    # Seed by seed, so that a run cut short (a device call's limit) has whole comparisons at its first seeds.
    jobs = [Job(arm, seed, lr) for seed in (seeds or [None]) for lr in (lr_sweep or [None])
            for arm in arms]
    arm_commands = {job: arm_command(job.arm, stack, max_steps, root, extra, dqt_stack, job.seed, job.lr)
                    for job in jobs}
    if not report:  # every training invocation, for the report's "How it was run"
        root.mkdir(parents=True, exist_ok=True)
        given = commands.invocation
        with open(root / "commands.txt", "a") as f:
            f.write(shlex.join(["python", "-m", "dqt_lightning", "reproduce", *given]) + "\n")
    if report:
        run_dirs = {job: root / (root / job.arm / job.done).read_text().strip()
                    for job in finished_jobs(root, list(known))}
    else:
        run_dirs = {job: run_arm(job, command, root) for job, command in arm_commands.items()}
    if not run_dirs:
        raise ConfigError(f"reproduce: no finished arm under {root}")
    runs = {job: load_run(path) for job, path in run_dirs.items()}
    precisions = {job.arm: precision_of(path) for job, path in run_dirs.items()}
    for job, run in runs.items():
        run.path = Path(job.arm) / run.path.name  # shown as <arm>/version_N (<arm>/seedS) in the table and the plot
    png = root / "val_loss.png"
    # One line per arm: its mean over seeds where it has several, at its best learning rate in a sweep.
    best_runs = at_best_learning_rates(runs)[0] if any(job.lr is not None for job in runs) else runs
    plot_losses(list(arm_means(best_runs).values()), png)
    recorded = root / "commands.txt"
    invocations = recorded.read_text().splitlines() if recorded.exists() else []
    text = results_markdown(runs, invocations, max_steps, png, precisions, _unigram_entropy(root / "logs"))
    atomic_write(root / "results.md", lambda f: f.write(text.encode()))
    print(text)
    print(f"[reproduce] report: {root / 'results.md'}; plot: {png}")
    return 0
