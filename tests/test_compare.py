"""`compare` reads real CLI runs: the table has each run's mode, bits and numbers, and the PNG is written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from dqt_lightning.cli import main
from dqt_lightning.tools.compare import find_runs, load_run
from dqt_lightning.commands import run as run_tool
from tests.trained import STEPS, trained_runs  # noqa: F401 - trained_runs is a fixture

# Torch on one thread (conftest.one_thread): these models are tiny, and on shared cores two OpenMP threads make
# each small op wait for a descheduled partner (runs several times slower).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, trained_runs) -> Path:
    """runs/ holding the session's fp, bitnet and 8-bit DQT runs (copies: compare reads a directory of runs)."""
    root = tmp_path_factory.mktemp("compare")
    for name in ("fp", "bitnet", "dqt-8bit"):
        trained_runs.copy(name, root)
    return root / "runs"


def test_every_run_is_found_and_read(three_runs):
    runs = [load_run(path) for path in find_runs([str(three_runs)])]
    assert [(r.path.parent.name, r.mode, r.bits) for r in runs] == [
        ("bitnet", "ste", "1.58"), ("fp", "fp", "32"), ("ternary+8", "dqt", "8")]
    for run in runs:
        # Two validations during fit (steps 3 and 6) plus the CLI's final one.
        assert len(run.val_curve) >= 2
        assert run.tokens_seen == STEPS * 4 * 32
        tokens = [t for t, _ in run.val_curve]
        assert tokens == sorted(tokens) and tokens[-1] == run.tokens_seen
        assert run.tokens_per_sec > 0 and run.peak_memory_mb > 0
        assert 0 < run.final_val_loss < math.log(512) + 0.5


def test_compare_prints_the_table_and_writes_a_png(three_runs, tmp_path, capsys):
    png = tmp_path / "plots" / "val.png"
    assert run_tool(["compare", str(three_runs / "fp"), str(three_runs / "ternary+8"), str(three_runs / "bitnet"),
                    "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "version_" in line]
    assert len(rows) == 3
    losses = [float(row.split("|")[5]) for row in rows]
    assert losses == sorted(losses)  # best first
    assert any("| dqt | 8 | stochastic |" in row for row in rows)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 640


def test_a_missing_run_directory_is_one_line(tmp_path, capsys):
    assert run_tool(["compare", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: compare: run directory {tmp_path / 'nope'} does not exist"
    (tmp_path / "empty").mkdir()
    assert run_tool(["compare", str(tmp_path / "empty")]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err


def test_the_cli_dispatches_compare(three_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["compare", str(three_runs), "--plot", str(tmp_path / "all.png")])
    assert done.value.code == 0
    assert capsys.readouterr().out.count("version_0 |") == 3 and (tmp_path / "all.png").is_file()
