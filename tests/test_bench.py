"""Tests for the recipe benchmark: real short runs, fp-relative throughput and per-component memory."""

from __future__ import annotations

import pytest
import torch

from dqt_lightning.bench import Row, main, run_benchmark, table

RECIPES = ("fp", "ste", "dqt-1.58", "dqt-8")
SMALL = dict(size="tiny", vocab_size=512, batch_size=2, seq_len=16, steps=2, warmup=1, precision="32-true")


@pytest.fixture(scope="module")
def rows() -> dict[str, Row]:
    # One short real Lightning run per recipe, shared by the tests below.
    return {row.recipe: row for row in run_benchmark(RECIPES, **SMALL)}


def test_every_recipe_runs_and_fp_is_the_baseline(rows: dict[str, Row]) -> None:
    assert list(rows) == list(RECIPES)
    assert all(row.tokens_per_s > 0 and row.skipped is None for row in rows.values())
    assert all(row.measured_steps == SMALL["steps"] for row in rows.values())  # the warm-up step is not timed
    assert rows["fp"].ratio == 1.0
    for row in rows.values():
        assert row.ratio == pytest.approx(row.tokens_per_s / rows["fp"].tokens_per_s)


def test_dqt_stores_smaller_weights_with_the_same_optimizer_states(rows: dict[str, Row]) -> None:
    fp = rows["fp"]
    assert rows["ste"].weights_mib == pytest.approx(fp.weights_mib, rel=1e-3)  # STE keeps a float32 master
    for recipe in ("dqt-1.58", "dqt-8"):
        dqt = rows[recipe]
        assert dqt.weights_mib < fp.weights_mib
        # Same AdamW over the same number of elements: its moments are full float32 in every mode.
        assert dqt.states_mib == pytest.approx(fp.states_mib, rel=0.01)
        assert dqt.grads_mib == pytest.approx(fp.grads_mib, rel=0.01)


def test_dqt_weight_savings_are_the_projections(rows: dict[str, Row]) -> None:
    # tiny: 4 blocks of 4*128*128 + 3*128*384 projection weights, 4 bytes each in fp against 1 byte in DQT.
    n_proj = 4 * (4 * 128 * 128 + 3 * 128 * 384)
    saved = (rows["fp"].weights_mib - rows["dqt-1.58"].weights_mib) * 2**20
    assert saved == pytest.approx(3 * n_proj, rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU reporting: no allocator peak there")
def test_cpu_peak_and_activations_are_not_invented(rows: dict[str, Row]) -> None:
    assert all(row.peak_gib is None and row.activations_mib is None for row in rows.values())
    lines = table(list(rows.values())).splitlines()
    assert len(lines) == len(RECIPES) + 2  # header, separator, one line per recipe
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[3] == "n/a" and cells[7] == "n/a"


def test_skipped_recipe_prints_a_reason() -> None:
    lines = table([Row("torchao BitNet", skipped="ImportError: no torchao")]).splitlines()
    assert "skipped: ImportError: no torchao" in lines[2]


def test_cli_prints_and_writes_the_table(tmp_path, capsys) -> None:
    out = tmp_path / "bench.md"
    argv = ["--recipes", "fp", "dqt-1.58", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--seq-len", "8",
            "--vocab-size", "256", "--out", str(out)]
    report = main(argv)
    printed = capsys.readouterr().out
    assert report in printed and out.read_text() == report + "\n"
    table_lines = [line for line in report.splitlines() if line.startswith("|")]
    assert len(table_lines) == 4 and table_lines[2].startswith("| fp |")
    assert "× fp (same precision)" in table_lines[0]
    assert f"torch {torch.__version__}" in report
    assert "python -m dqt_lightning.bench --recipes fp dqt-1.58 --steps 1" in report
    if not torch.cuda.is_available():
        assert "n/a" in table_lines[2]


def test_cli_rejects_unknown_recipes() -> None:
    with pytest.raises(SystemExit):
        main(["--recipes", "int4"])


def test_repeated_rounds_report_the_median_range_and_paired_ratio() -> None:
    small = dict(SMALL, steps=1, warmup=0)
    rows = {row.recipe: row for row in run_benchmark(("fp", "dqt-1.58"), repeats=2, **small)}
    for row in rows.values():
        low, high = row.tokens_per_s_range
        assert 0 < low <= row.tokens_per_s <= high
        assert row.measured_steps == 1
    assert rows["fp"].ratio == 1.0 and rows["dqt-1.58"].ratio > 0
    line = table([rows["dqt-1.58"]]).splitlines()[2]
    assert f"({rows['dqt-1.58'].tokens_per_s_range[0]:,.0f}-" in line
