"""``reproduce --lr-sweep``: every arm at each learning rate, the claims judged on each arm at its own best, the
whole grid in the report."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from dqt_lightning.tools.claims import best_learning_rates, lr_table
from dqt_lightning.tools.compare import Run
from dqt_lightning.tools.reproduce import Job, arm_command, finished_jobs, results_markdown
from dqt_lightning.commands import run as run_tool


def _run(loss: float) -> Run:
    return Run(path=Path("x"), mode="dqt", bits="8", rounding="stochastic", val_curve=[(0.0, 8.0), (1.0, loss)],
               tokens_seen=1.0, tokens_per_sec=None, peak_memory_mb=None)


# Planted: BitNet is best at 1e-3, 8-bit DQT at 2e-3 (+1.3% against BitNet's best, on par), but at 1e-3 it would
# be +12.5% and the claim would fail: a single shared rate would judge DQT at a rate that is not its own.
PLANTED = {Job("bitnet", 1, 1e-3): _run(4.00), Job("bitnet", 1, 2e-3): _run(4.20),
           Job("dqt-8bit", 1, 1e-3): _run(4.50), Job("dqt-8bit", 1, 2e-3): _run(4.05),
           Job("bitnet", 2, 1e-3): _run(4.00), Job("bitnet", 2, 2e-3): _run(4.30),
           Job("dqt-8bit", 2, 1e-3): _run(4.50), Job("dqt-8bit", 2, 2e-3): _run(4.07),
           Job("dqt-ternary", 1, 1e-3): _run(float("nan")), Job("dqt-ternary", 1, 2e-3): _run(4.6)}


def test_the_best_learning_rate_is_each_arms_lowest_loss_and_nan_never_wins():
    grid = {("bitnet", 1e-3): _run(4.0), ("bitnet", 2e-3): _run(4.2), ("dqt-8bit", 1e-3): _run(4.5),
            ("dqt-8bit", 2e-3): _run(4.05), ("dqt-ternary", 1e-3): _run(float("nan")),
            ("dqt-ternary", 2e-3): _run(4.6)}
    assert best_learning_rates(grid) == {"bitnet": 1e-3, "dqt-8bit": 2e-3, "dqt-ternary": 2e-3}
    assert "(" not in lr_table(grid, best_learning_rates(grid), {key: 2 for key in grid})  # even: no seed counts


def test_claims_are_judged_at_each_arms_best_rate_and_the_grid_is_reported(tmp_path):
    text = results_markdown(PLANTED, [], 4, tmp_path / "v.png", {})
    # 8-bit DQT at its best (mean of 4.05 and 4.07) against BitNet at its best (4.00): +1.5%, on par.
    assert "| 8-bit DQT is on par with BitNet b1.58. | supported | 2 of 2 | 8-bit DQT 4.0600 against BitNet b1.58's " \
           "4.0000: +1.5%" in text
    assert "| arm | lr 0.001 | lr 0.002 |" in text
    # The ternary arm ran at one seed, the others at two: each cell says how many.
    assert "| bitnet | **4.0000** (2) | 4.2500 (2) |" in text and "| dqt-8bit | 4.5000 (2) | **4.0600** (2) |" in text
    assert "| dqt-ternary | nan (1) | **4.6000** (1) |" in text
    assert "seeds 1, 2 (initialization and rounding noise), not every arm at each" in text
    assert f"Device: CPU ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()} kernels)" in text
    # The results table holds each arm's runs at its best rate only.
    assert "| dqt-8bit | 2 | 4.0600 ± 0.0141 |" in text


def test_sweep_jobs_have_their_own_directories_commands_and_markers(tmp_path):
    job = Job("dqt-8bit", 3, 2e-3)
    assert (job.name, job.version, job.done) == ("dqt-8bit-lr0.002-seed3", "lr0.002-seed3", "DONE-lr0.002-seed3")
    assert Job("fp", None, 5e-4).version == "lr0.0005" and Job("fp").version == "version_0"
    command = arm_command("dqt-8bit", [], 10, tmp_path, [], seed=3, lr=2e-3)
    assert command[-4:] == ["--seed_everything", "3", "--model.init_args.optimizer.init_args.lr", "0.002"]
    for marker in ("DONE", "DONE-seed3", "DONE-lr0.002-seed3", "DONE-lr0.001", "DONE-backup", "DONE-lrx"):
        (tmp_path / "dqt-8bit").mkdir(exist_ok=True)
        (tmp_path / "dqt-8bit" / marker).write_text("x")
    assert finished_jobs(tmp_path, ["dqt-8bit"]) == [Job("dqt-8bit"), Job("dqt-8bit", 3), Job("dqt-8bit", None, 1e-3),
                                                     Job("dqt-8bit", 3, 2e-3)]


@pytest.mark.parametrize("rates", [["1e-3", "1e-3"], ["0", "1e-3"]])
def test_bad_sweeps_are_one_line(rates, tmp_path, capsys):
    assert run_tool(["reproduce", "--out", str(tmp_path), "--lr-sweep", *rates]) == 2
    assert "--lr-sweep takes distinct learning rates > 0" in capsys.readouterr().err


def test_a_sweep_extended_at_one_rate_picks_the_best_on_the_seeds_every_rate_has(tmp_path):
    # At seed 1 the rate 1e-3 wins (3.00 against 3.10); seeds 2 and 3 ran at 1e-3 only and were worse. A mean over
    # whatever seeds a rate has would pick 2e-3 (3.10 against 3.40): one seed's luck against three.
    runs = {Job("fp", 1, 1e-3): _run(3.00), Job("fp", 2, 1e-3): _run(3.60), Job("fp", 3, 1e-3): _run(3.60),
            Job("fp", 1, 2e-3): _run(3.10)}
    text = results_markdown(runs, [], 4, tmp_path / "v.png", {})
    assert "| fp | **3.4000** (3) | 3.1000 (1) |" in text
    assert "not every arm at each" not in text  # one arm: its three runs at its best rate
    # Claims use every seed at the best rate.
    assert "| fp | 3 | 3.4000 ± 0.3464 |" in text
