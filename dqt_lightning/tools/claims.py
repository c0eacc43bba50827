"""The paper's claims judged on finished runs: each claim's rule, the numbers behind its verdict, and the tables of
arms across seeds and learning rates (used by ``reproduce``)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from dqt_lightning.tools.compare import Run, plugin_args, run_config

TOLERANCE = 0.05  # "on par" / "close": within 5% of the reference loss, the paper's own (v1) margin
BF16_TOLERANCE = 0.02  # "costs little": within 2% of the fp32 arm's loss


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


def further_findings(runs: dict[str, Run]) -> list[str]:
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


def best_learning_rates(grid: dict[tuple[str, float], Run]) -> dict[str, float]:
    """Each arm's learning rate of lowest final validation loss in a sweep (``{(arm, lr): mean run}``); a rate whose
    runs ended without a validation loss (or at NaN) never wins."""
    best: dict[str, float] = {}
    for (arm, lr), run in grid.items():
        loss = run.final_val_loss
        if loss is None or math.isnan(loss):
            continue
        if arm not in best or loss < grid[(arm, best[arm])].final_val_loss:
            best[arm] = lr
    return best


def lr_table(grid: dict[tuple[str, float], Run], best: dict[str, float],
             seeds: dict[tuple[str, float], int] | None = None) -> str:
    """The sweep as a table: one row per arm, one column per learning rate, the final validation loss (mean over
    seeds) in each cell, the arm's best in bold; each cell's number of seeds where the cells have different ones."""
    rates = sorted({lr for _, lr in grid})
    uneven = len(set((seeds or {}).values())) > 1
    lines = ["| arm | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---:|" * len(rates)]
    for arm in dict.fromkeys(arm for arm, _ in grid):
        cells = []
        for lr in rates:
            loss = grid[(arm, lr)].final_val_loss if (arm, lr) in grid else None
            text = "-" if loss is None else f"{loss:.4f}"
            text = f"**{text}**" if best.get(arm) == lr else text
            cells.append(f"{text} ({seeds[(arm, lr)]})" if uneven and (arm, lr) in seeds else text)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
