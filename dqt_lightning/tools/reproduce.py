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
losses, says how many seeds agree with that verdict, and gives each arm's spread.

    python -m dqt_lightning reproduce --out runs/reproduce --max-steps 2000 \\
        --config configs/model/130m.yaml --config configs/data/shards.yaml
"""

from __future__ import annotations

import argparse
import datetime
import importlib.resources
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dqt_lightning.tools.compare import Run, load_run, plot, plugin_args, run_config, table
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
    "dqt-8bit": ("dqt-8bit.yaml", ()),
    "dqt-8bit-nearest": ("dqt-8bit.yaml", ("ablation/nearest.yaml",)),
    "dqt-ternary-nearest": ("ternary.yaml", ("ablation/nearest.yaml",)),
    # The best schedule of docs/schedules.md: 8-bit for 70% of the steps, then ternary keeping the 8-bit range.
    "dqt-8bit-to-ternary": ("dqt-8bit.yaml", ("schedule/8-to-ternary-range.yaml",)),
    "dqt-8bit-bf16": ("dqt-8bit.yaml", ("precision/bf16.yaml",)),
}
# On an FP8 GPU only (H100, L40S): claim 3's FP8 part. Not in the default set, since elsewhere it refuses to start.
OPTIONAL_ARMS = {"dqt-8bit-fp8": ("dqt-8bit.yaml", ("precision/fp8.yaml",))}
TOLERANCE = 0.05  # "on par" / "close": within 5% of the reference loss, the paper's own (v1) margin
BF16_TOLERANCE = 0.02  # "costs little": within 2% of the fp32 arm's loss


@dataclass(frozen=True)
class Job:
    """One training run of the reproduction: an arm at the configs' own seed (``seed`` None), or at a given one."""

    arm: str
    seed: int | None = None

    @property
    def name(self) -> str:
        """How logs and messages name it."""
        return self.arm if self.seed is None else f"{self.arm}-seed{self.seed}"

    @property
    def version(self) -> str:
        """Its run directory under ``<out>/<arm>``."""
        return "version_0" if self.seed is None else f"seed{self.seed}"

    @property
    def done(self) -> str:
        """The file under ``<out>/<arm>`` that marks it finished."""
        return "DONE" if self.seed is None else f"DONE-seed{self.seed}"


def finished_jobs(out: Path, arms: list[str]) -> list[Job]:
    """The jobs of ``arms`` that finished under ``out``, at the configs' seed and at given seeds."""
    jobs = []
    for arm in arms:
        if (out / arm / "DONE").exists():
            jobs.append(Job(arm))
        seeds = []
        for done in (out / arm).glob("DONE-seed*"):
            try:
                seeds.append(int(done.name.removeprefix("DONE-seed")))
            except ValueError:
                continue  # not a marker reproduce wrote (a copy, a backup): no seed to report
        jobs += [Job(arm, seed) for seed in sorted(seeds)]
    return jobs


def is_dqt_arm(arm: str) -> bool:
    """Whether an arm trains DQT weights (and takes the ``--dqt-config`` stack)."""
    return {**ARMS, **OPTIONAL_ARMS}[arm][0] not in ("fp.yaml", "bitnet.yaml")


def arm_command(arm: str, stack: list[str], max_steps: int, out: Path, extra: list[str],
                dqt_stack: list[str] = (), seed: int | None = None) -> list[str]:
    """The ``fit`` command line of one arm: its base config, ``stack``, ``dqt_stack`` for DQT arms, its overlays;
    with ``seed``, that ``seed_everything`` and its own run directory."""
    base, overlays = {**ARMS, **OPTIONAL_ARMS}[arm]
    job = Job(arm, seed)
    own = list(dqt_stack) if is_dqt_arm(arm) else []
    configs = [str(CONFIGS / base), *stack, *own, *(str(CONFIGS / o) for o in overlays)]
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              # One version per arm: an interrupted arm continues in the same directory, so its curve stays whole.
              "init_args": {"save_dir": str(out), "name": arm, "version": job.version, "default_hp_metric": False}}
    seeded = [] if seed is None else ["--seed_everything", str(seed)]
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


@dataclass
class Claim:
    """One of the paper's claims, and what the runs say about it."""

    text: str
    verdict: str  # supported | not supported | not tested
    evidence: str


def _gap(loss: float, reference: float) -> float:
    return (loss - reference) / reference


@dataclass(frozen=True)
class ArmPrecision:
    """A run's numeric precision: the plugin's ``precision``, and torch's float32 matmul precision, since an "fp32"
    arm whose matmuls ran on TF32 (``high``, on a GPU) is not full float32 and the report must say so."""

    plugin: str = "32-true"
    float32_matmuls: str = "highest"


def precision_of(run_dir: Path) -> ArmPrecision:
    """An arm's precision, from the ``config.yaml`` its run saved."""
    config = run_config(run_dir)
    return ArmPrecision(str(plugin_args(config).get("precision", "32-true")),
                        str(config.get("float32_matmul_precision", "highest")))


def judge(runs: dict[str, Run], precisions: dict[str, ArmPrecision],
          unigram_entropy: float | None = None) -> list[Claim]:
    """Each of the paper's claims against the finished arms, by the rules stated in its evidence.

    Args:
        runs: The finished arms.
        precisions: Each arm's precision (:func:`precision_of`).
        unigram_entropy: Of the training tokens: the loss of a model that learned token frequencies alone, the bar
            a converged model must clear.
    """
    loss = {arm: run.final_val_loss for arm, run in runs.items() if run.final_val_loss is not None}
    ternary = {arm: run.val_loss_ternary for arm, run in runs.items() if run.val_loss_ternary is not None}
    claims = []

    text = "Ternary-only DQT converges."
    curve = runs["dqt-ternary"].val_curve if "dqt-ternary" in runs else []
    if len(curve) >= 2 and unigram_entropy is not None:
        first, last = curve[0][1], curve[-1][1]
        # Converged: far below what token frequencies alone give, and no longer rising at the end.
        ok = math.isfinite(last) and last < unigram_entropy - 0.5 and last <= curve[-2][1] + 0.01
        vs = (f"; BitNet b1.58 reached {loss['bitnet']:.4f} ({_gap(last, loss['bitnet']):+.1%})"
              if "bitnet" in loss else "")
        claims.append(Claim(text, "supported" if ok else "not supported",
                            f"validation loss {first:.4f} at the first validation, {last:.4f} at the end, against "
                            f"{unigram_entropy:.4f} for token frequencies alone (rule: at least 0.5 nats below it, "
                            f"and not rising at the last validation){vs}"))
    else:
        claims.append(Claim(text, "not tested", "needs arm dqt-ternary with two validations, and the unigram "
                                                "entropy of its training tokens"))

    def versus_bitnet(text: str, arm: str, value: dict[str, float], what: str) -> Claim:
        if arm not in value or "bitnet" not in loss:
            return Claim(text, "not tested", f"needs arms {arm} and bitnet")
        gap = _gap(value[arm], loss["bitnet"])
        return Claim(text, "supported" if gap <= TOLERANCE else "not supported",
                     f"{what} {value[arm]:.4f} against BitNet b1.58's {loss['bitnet']:.4f}: {gap:+.1%} (rule: at most "
                     f"{TOLERANCE:.0%} above)")

    claims.append(versus_bitnet("8-bit DQT is on par with BitNet b1.58.", "dqt-8bit", loss, "8-bit DQT"))

    text = "FP32 -> BF16 (and FP8) costs little."
    fp32 = precisions.get("dqt-8bit")
    if "dqt-8bit" in loss and "dqt-8bit-bf16" in loss and fp32 is not None and fp32.plugin == "32-true":
        parts, ok = [], True
        for arm, label in (("dqt-8bit-bf16", "bf16-mixed"), ("dqt-8bit-fp8", "fp8")):
            if arm in loss:
                gap = _gap(loss[arm], loss["dqt-8bit"])
                ok &= gap <= BF16_TOLERANCE
                parts.append(f"{label} {loss[arm]:.4f} ({gap:+.1%})")
        fp8 = "" if "dqt-8bit-fp8" in loss else "; FP8 not run (arm dqt-8bit-fp8 needs an FP8 GPU)"
        matmuls = "" if fp32.float32_matmuls == "highest" else \
            f" (float32 matmul precision {fp32.float32_matmuls})"
        claims.append(Claim(text, "supported" if ok else "not supported",
                            f"8-bit DQT in fp32{matmuls} {loss['dqt-8bit']:.4f}, "
                            + ", ".join(parts)
                            + f" (rule: at most {BF16_TOLERANCE:.0%} above fp32){fp8}"))
    else:
        claims.append(Claim(text, "not tested", "needs arms dqt-8bit (at precision 32-true) and dqt-8bit-bf16"))

    claim = versus_bitnet("An 8-bit DQT model runs with ternary weights and stays close to BitNet b1.58.",
                          "dqt-8bit", ternary, "8-bit DQT evaluated with ternary weights (least-squares scale)")
    absmean = runs["dqt-8bit"].val_loss_ternary_absmean if "dqt-8bit" in runs else None
    if absmean is not None and "bitnet" in loss:
        claim = replace(claim, evidence=f"{claim.evidence}; with BitNet's absmean scale {absmean:.4f} "
                                        f"({_gap(absmean, loss['bitnet']):+.1%})")
    claims.append(claim)
    return claims


def _findings(runs: dict[str, Run]) -> list[str]:
    """What the ablation arms add beyond the claims: nearest rounding, and the bit-width schedule."""
    loss = {arm: run.final_val_loss for arm, run in runs.items() if run.final_val_loss is not None}
    lines = []
    for bits in ("8bit", "ternary"):
        sr, nearest = loss.get(f"dqt-{bits}"), loss.get(f"dqt-{bits}-nearest")
        if sr is not None and nearest is not None:
            lines.append(f"- DQT {bits} with round-to-nearest: {nearest:.4f} against {sr:.4f} with stochastic "
                         f"rounding ({_gap(nearest, sr):+.1%}).")
    schedule = loss.get("dqt-8bit-to-ternary")
    if schedule is not None:
        against = [f"{name} {value:.4f}" for name, value in (
            ("BitNet b1.58", loss.get("bitnet")), ("DQT ternary from the start", loss.get("dqt-ternary")),
            ("post-hoc ternary 8-bit DQT", runs["dqt-8bit"].val_loss_ternary if "dqt-8bit" in runs else None))
            if value is not None]
        lines.append(f"- Bit-width schedule 8 -> ternary at 70% (ends ternary, no float weight ever stored): "
                     f"{schedule:.4f}; " + ", ".join(against) + ".")
    return lines


def mean_run(runs: list[Run]) -> Run:
    """One arm's runs at several seeds as one: validation curves averaged point by point (every seed validates at the
    same steps, so at the same tokens), the ternary loss averaged; a single run as it is."""
    if len(runs) == 1:
        return runs[0]
    points = min(len(run.val_curve) for run in runs)
    curve = [(runs[0].val_curve[i][0], statistics.fmean(run.val_curve[i][1] for run in runs)) for i in range(points)]
    def mean_of_all(values: list[float | None]) -> float | None:
        return statistics.fmean(values) if all(v is not None for v in values) else None

    return replace(runs[0], path=runs[0].path.parent / f"mean of {len(runs)} seeds", val_curve=curve,
                   val_loss_ternary=mean_of_all([run.val_loss_ternary for run in runs]),
                   val_loss_ternary_absmean=mean_of_all([run.val_loss_ternary_absmean for run in runs]))


def by_arm(runs: dict[Job, Run]) -> dict[str, list[Run]]:
    """The runs of each arm, in the order given."""
    grouped: dict[str, list[Run]] = {}
    for job, run in runs.items():
        grouped.setdefault(job.arm, []).append(run)
    return grouped


def arm_means(runs: dict[Job, Run]) -> dict[str, Run]:
    """Each arm as one run: its mean over seeds where it has several (:func:`mean_run`)."""
    return {arm: mean_run(arm_runs) for arm, arm_runs in by_arm(runs).items()}


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def seed_table(grouped: dict[str, list[Run]]) -> str:
    """Each arm's final losses across its seeds: mean ± sample standard deviation, and the range."""
    lines = ["| arm | seeds | final val loss, mean ± sd | range | val loss, ternary, mean ± sd |",
             "|---|---:|---:|---:|---:|"]
    for arm, runs in grouped.items():
        losses = [run.final_val_loss for run in runs if run.final_val_loss is not None]
        ternary = [run.val_loss_ternary for run in runs if run.val_loss_ternary is not None]
        span = f"{min(losses):.4f} - {max(losses):.4f}" if losses else "-"
        lines.append(f"| {arm} | {len(runs)} | {_spread(losses)} | {span} | {_spread(ternary)} |")
    return "\n".join(lines)


def report(runs: dict[Job, Run], invocations: list[str], max_steps: int, png: Path,
           precisions: dict[str, ArmPrecision], unigram_entropy: float | None = None) -> str:
    """The Markdown report: table, claims, findings, the command and the arms' configs, device and date.

    With several seeds per arm, each claim is judged on the arms' mean losses (:func:`mean_run`), and judged again
    at each seed alone: the "seeds agreeing" column counts the seeds whose own verdict is the mean's.
    """
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    grouped, means = by_arm(runs), arm_means(runs)
    seeds = sorted({job.seed for job in runs}, key=lambda seed: -1 if seed is None else seed)
    several = any(len(arm_runs) > 1 for arm_runs in grouped.values())
    same = ("the same data order and number of steps; seeds " + ", ".join(str(s) for s in seeds if s is not None)
            + " (initialization and rounding noise), every arm at each" if several
            else "the same seed, data order and number of steps")
    lines = [f"# Reproduction: the paper's claims at {max_steps} steps per arm", "",
             f"Device: {device}; torch {torch.__version__}; Python {platform.python_version()}; "
             f"{datetime.date.today().isoformat()}. Every arm: {same}.", "",
             "## Results", "", table(list(runs.values())), ""]
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
    findings = _findings(means)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dqt_lightning reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/reproduce", help="where runs, logs and the report go (%(default)s)")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="a config stacked on every arm (model size, data, ...); repeatable")
    parser.add_argument("--dqt-config", action="append", default=[], metavar="YAML",
                        help="a config stacked on the DQT arms only, after --config: e.g. "
                             "configs/kernels/fused-update.yaml, the same update in less time; repeatable")
    parser.add_argument("--max-steps", type=int, default=1000, help="optimizer steps per arm (%(default)s)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), metavar="ARM",
                        help=f"arms to train (default: all of {', '.join(ARMS)}; also {', '.join(OPTIONAL_ARMS)})")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help="train every arm once per seed (seed_everything; the data order stays the same) and "
                             "judge the claims on the mean; default: the configs' own seed, once")
    parser.add_argument("--report", action="store_true", help="only write the report from the finished arms")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more fit arguments for every arm")
    args = parser.parse_args(argv)
    known = {**ARMS, **OPTIONAL_ARMS}
    unknown = [arm for arm in args.arms if arm not in known]
    if unknown:
        parser.error(f"unknown arm {unknown[0]}; choose from {', '.join(known)}")
    for option, paths in (("--config", args.config), ("--dqt-config", args.dqt_config)):
        missing = [c for c in paths if not Path(c).is_file()]
        if missing:
            parser.error(f"{option} {missing[0]}: no such file")
    if args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    out = Path(args.out).resolve()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    stack = [str(Path(c).resolve()) for c in args.config]
    dqt_stack = [str(Path(c).resolve()) for c in args.dqt_config]
    if args.seeds and len(set(args.seeds)) < len(args.seeds):
        parser.error(f"--seeds lists a seed twice: {' '.join(map(str, args.seeds))}")
    # Seed by seed, so that a run cut short (a device call's limit) has whole comparisons at its first seeds.
    jobs = [Job(arm, seed) for seed in (args.seeds or [None]) for arm in args.arms]
    commands = {job: arm_command(job.arm, stack, args.max_steps, out, extra, dqt_stack, job.seed) for job in jobs}
    if not args.report:  # every training invocation, for the report's "How it was run"
        out.mkdir(parents=True, exist_ok=True)
        given = list(sys.argv[1:] if argv is None else argv)
        with open(out / "commands.txt", "a") as f:
            f.write(shlex.join(["python", "-m", "dqt_lightning", "reproduce", *given]) + "\n")
    try:
        if args.report:
            run_dirs = {job: out / (out / job.arm / job.done).read_text().strip()
                        for job in finished_jobs(out, list(known))}
        else:
            run_dirs = {job: run_arm(job, command, out) for job, command in commands.items()}
        if not run_dirs:
            raise ConfigError(f"reproduce: no finished arm under {out}")
        runs = {job: load_run(path) for job, path in run_dirs.items()}
        precisions = {job.arm: precision_of(path) for job, path in run_dirs.items()}
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    for job, run in runs.items():
        run.path = Path(job.arm) / run.path.name  # shown as <arm>/version_N (<arm>/seedS) in the table and the plot
    png = out / "val_loss.png"
    # One line per arm: its mean over seeds where it has several.
    plot(list(arm_means(runs).values()), png)
    recorded = out / "commands.txt"
    invocations = recorded.read_text().splitlines() if recorded.exists() else []
    text = report(runs, invocations, args.max_steps, png, precisions, _unigram_entropy(out / "logs"))
    atomic_write(out / "results.md", lambda f: f.write(text.encode()))
    print(text)
    print(f"[reproduce] report: {out / 'results.md'}; plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
