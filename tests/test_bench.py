"""Tests for the recipe benchmark: real short runs, fp-relative throughput and per-component memory."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import pytest
import torch
from torch import nn

from dqt_lightning import cli
from dqt_lightning.tools import bench
from dqt_lightning.tools.bench import TORCHAO, Row, _torchao, optimizer_for, run_benchmark, table
from dqt_lightning.tools.bench_report import plot
from dqt_lightning.model import SIZES, Config
from dqt_lightning.module import LanguageModel
from dqt_lightning.train.optim import default_adamw
from dqt_lightning.train.precision import is_projection
from dqt_lightning.commands import run as run_tool

RECIPES = ("fp", "ste", "dqt-1.58", "dqt-8", "dqt-1.58-lean", "dqt-1.58-lean-qemb", "torchao-int8", "torchao-bitnet")
SMALL = dict(size="tiny", vocab_size=512, batch_size=2, seq_len=16, steps=2, warmup=1, precision="32-true")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a busy machine torch's spinning OpenMP workers can stretch these few steps from seconds to minutes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows() -> dict[str, Row]:
    # One short real Lightning run per recipe, shared by the tests below; keyed by recipe name, not table label.
    return dict(zip(RECIPES, run_benchmark(RECIPES, **SMALL)))


def _projections(model: LanguageModel) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.model.named_modules() if isinstance(m, nn.Linear) and is_projection(name)}


def test_every_recipe_runs_and_fp_is_the_baseline(rows: dict[str, Row]) -> None:
    assert [row.recipe for row in rows.values()] == [TORCHAO.get(name, name) for name in RECIPES]
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


def test_the_lean_recipe_packs_weights_frees_dqt_gradients_and_keeps_8bit_states(rows: dict[str, Row]) -> None:
    n_proj = 4 * (4 * 128 * 128 + 3 * 128 * 384)
    dqt, lean, fp = rows["dqt-1.58"], rows["dqt-1.58-lean"], rows["fp"]
    assert (dqt.weights_mib - lean.weights_mib) * 2**20 == pytest.approx(0.75 * n_proj, rel=1e-3)  # 1 -> 1/4 byte
    assert (fp.grads_mib - lean.grads_mib) * 2**20 == pytest.approx(4 * n_proj, rel=1e-3)  # no DQT gradient left
    assert lean.states_mib / fp.states_mib == pytest.approx(2.03 / 8, rel=0.02)  # 8-bit moments + block scales


def test_quantized_embeddings_take_the_embedding_and_head_off_float32_too(rows: dict[str, Row]) -> None:
    lean, qemb = rows["dqt-1.58-lean"], rows["dqt-1.58-lean-qemb"]
    table_bytes = 2 * SMALL["vocab_size"] * 128  # elements of the tiny model's embedding and head
    # 4 bytes each as float32, a quarter byte each as packed ternary levels
    assert (lean.weights_mib - qemb.weights_mib) * 2**20 == pytest.approx(3.75 * table_bytes, rel=1e-2)
    # their float32 gradients go too (freed in backward, as every DQT gradient): what is left is the norm gains'
    assert (lean.grads_mib - qemb.grads_mib) * 2**20 == pytest.approx(4 * table_bytes, rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU reporting: no allocator peak there")
def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_cpu_peak_and_activations_are_not_invented_in_a_shared_process(rows: dict[str, Row]) -> None:
    assert all(row.peak_gib is None and row.activations_mib is None for row in rows.values())
    lines = table(list(rows.values())).splitlines()
    assert len(lines) == len(RECIPES) + 2  # header, separator, one line per recipe
    header = _cells(lines[0])
    for line in lines[2:]:
        cells = _cells(line)
        assert cells[header.index("peak GiB")] == "n/a" and cells[header.index("activations MiB")] == "n/a"
        assert "runtime MiB" not in header and cells[header.index("s/step")] != "n/a"


def test_torchao_rows_count_their_real_weight_storage(rows: dict[str, Row]) -> None:
    # torchao is a dependency: its rows must run, not be skipped. int8 QT stores each projection as int8 data plus one
    # float32 scale per output row; BitNet keeps a float32 master. Gradients and AdamW moments are float32 in both.
    model = LanguageModel(Config.from_name("tiny"), vocab_size=SMALL["vocab_size"])
    projections = _projections(model).values()
    n_proj = sum(m.weight.numel() for m in projections)
    n_rows = sum(m.weight.shape[0] for m in projections)
    n_all = sum(p.numel() for p in model.parameters())
    int8, bitnet, fp = rows["torchao-int8"], rows["torchao-bitnet"], rows["fp"]
    assert int8.weights_mib * 2**20 == (n_all - n_proj) * 4 + n_proj + 4 * n_rows
    assert bitnet.weights_mib == fp.weights_mib
    for row in (int8, bitnet):
        assert row.tokens_per_s > 0 and row.measured_steps == SMALL["steps"]
        assert row.grads_mib == fp.grads_mib and row.states_mib == fp.states_mib


def test_torchao_rows_run_under_bf16_mixed_as_torchao_trains_a_bf16_model() -> None:
    # torchao's backward runs outside autocast: with float32 weights both rows failed here ("expected m1 and m2 to
    # have the same dtype"). As torchao means them to, they train a bf16 model: half of fp's weight bytes outside the
    # projections, and bf16 moments.
    rows = dict(zip(["fp", *TORCHAO], run_benchmark(["fp", *TORCHAO], **{**SMALL, "precision": "bf16-mixed",
                                                                          "steps": 1})))
    assert [row.skipped for row in rows.values()] == [None] * 3
    assert all(row.tokens_per_s > 0 for row in rows.values())
    fp, bitnet = rows["fp"], rows["torchao-bitnet"]
    # (AdamW's step counters stay float32 scalars.)
    assert bitnet.weights_mib == pytest.approx(fp.weights_mib / 2)
    assert bitnet.states_mib == pytest.approx(fp.states_mib / 2, rel=1e-3)


@pytest.mark.parametrize("recipe", list(TORCHAO))
def test_torchao_converts_exactly_the_projections(recipe: str) -> None:
    # The same layers QuantPrecision converts for ste and dqt: embeddings, lm_head and norm gains stay float.
    model = LanguageModel(Config.from_name("tiny"), vocab_size=64)
    projections = set(_projections(model))
    _torchao(recipe, model, "32-true")
    converted = {name for name, m in model.model.named_modules()
                 if isinstance(getattr(m, "weight", None), torch.Tensor) and type(m.weight) not in (nn.Parameter,
                                                                                                   torch.Tensor)}
    assert converted == projections and len(projections) == 7 * Config.from_name("tiny").n_layer


def test_torchao_recipes_use_our_adamw_and_int8_only_drops_weight_decay() -> None:
    params = [nn.Parameter(torch.zeros(2, 2))]
    ours = default_adamw()(params).defaults  # LanguageModel's default optimizer
    assert optimizer_for("torchao-bitnet") is None and optimizer_for("dqt-1.58") is None  # LanguageModel's default
    int8 = optimizer_for("torchao-int8")(params)
    assert type(int8) is torch.optim.AdamW
    assert int8.defaults == {**ours, "weight_decay": 0.0}


def test_on_a_gpu_the_float32_adamw_is_the_fused_one(monkeypatch) -> None:
    # The published peers' baseline is fused AdamW; torch's CUDA default (foreach) would be a slower fp row to compare against.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    params = [nn.Parameter(torch.zeros(2, 2))]  # CPU tensors: torch has a fused AdamW there too
    for recipe in ("fp", "ste", "dqt-1.58", "dqt-8-fused", "torchao-bitnet"):
        assert optimizer_for(recipe)(params).defaults["fused"] is True, recipe
    assert not optimizer_for("torchao-int8")(params).defaults["fused"]
    assert type(optimizer_for("dqt-1.58-lean")(params)) is not torch.optim.AdamW  # 8-bit moments: our AdamW


def test_torchao_import_prints_nothing() -> None:
    # A fresh process, since torchao logs its unloadable CUDA kernels only on its first import.
    code = ("from dqt_lightning.tools.bench import _torchao; from dqt_lightning.module import LanguageModel; "
            "from dqt_lightning.model import Config; "
            "_torchao('torchao-int8', LanguageModel(Config.from_name('tiny'), vocab_size=64), '32-true')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Failed to load" not in result.stderr and "register_constant" not in result.stderr
    assert result.stdout == ""


def test_plot_writes_a_png_that_reads_back(rows: dict[str, Row], tmp_path: Path) -> None:
    out = tmp_path / "charts" / "bench.png"
    plot([*rows.values(), Row("torchao BitNet", skipped="ImportError: none")], out, "tiny")
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert not list(out.parent.glob(".*.tmp"))  # written atomically: no temp file left


def test_skipped_recipe_prints_a_reason() -> None:
    lines = table([Row("torchao BitNet", skipped="ImportError: no torchao")]).splitlines()
    assert "skipped: ImportError: no torchao" in lines[2]


def test_cli_prints_and_writes_the_table_and_chart(tmp_path, capsys) -> None:
    out, chart = tmp_path / "bench.md", tmp_path / "bench.png"
    argv = ["--recipes", "fp", "dqt-1.58", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--seq-len", "8",
            "--vocab-size", "256", "--out", str(out), "--plot", str(chart)]
    assert run_tool(["bench", *argv]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    report = out.read_text().removesuffix("\n")
    assert report in printed and f"chart: {chart}" in printed
    assert "PARTIAL" not in report
    progress = [line for line in captured.err.splitlines() if line.startswith("bench: ")]
    assert len(progress) == 2 and progress[1].startswith("bench: round 1, 2 of 2: dqt-1.58: ")
    assert chart.read_bytes()[:8] == PNG_SIGNATURE
    table_lines = [line for line in report.splitlines() if line.startswith("|")]
    assert len(table_lines) == 4 and table_lines[2].startswith("| fp |")
    assert "× fp (same precision)" in table_lines[0]
    assert f"torch {torch.__version__}, torchao " in report
    assert "python -m dqt_lightning bench --recipes fp dqt-1.58 --steps 1" in report
    if not torch.cuda.is_available():  # each recipe in a process of its own: its peak, by component, and the plan's
        header = _cells(table_lines[0])
        for line in table_lines[2:]:
            cells = _cells(line)
            columns = ("runtime MiB", "weights MiB", "grads MiB", "optimizer states MiB", "activations MiB",
                       "rest MiB")
            parts = [float(cells[header.index(c)].replace(",", "")) for c in columns]
            peak, phase = cells[header.index("peak GiB")].split(" ", 1)
            held = parts if phase in ("(forward)", "(backward)") else parts[:4] + parts[5:]
            assert float(peak) == pytest.approx(sum(held) / 1024, abs=0.006)
            assert 0.3 < parts[0] / 1024 < float(cells[header.index("plan GiB")]) < 2


def test_a_run_stopped_midway_leaves_the_recipes_it_measured(tmp_path, monkeypatch, capsys) -> None:
    # A device call's time limit stops the process from outside; here the second recipe is interrupted instead.
    run_recipe = bench.run_recipe

    def interrupted_after_fp(recipe: str, **kwargs) -> Row:
        if recipe != "fp":
            raise KeyboardInterrupt
        return run_recipe(recipe, **kwargs)

    monkeypatch.setattr(bench, "run_recipe", interrupted_after_fp)
    out = tmp_path / "bench.md"
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    with pytest.raises(KeyboardInterrupt):
        run_tool(["bench", "--recipes", "fp", "dqt-1.58", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                  "--seq-len", "8", "--vocab-size", "256", "--out", str(out), "--isolate", "false"])
    report = out.read_text()
    table_lines = [line for line in report.splitlines() if line.startswith("|")]
    assert len(table_lines) == 3 and table_lines[2].startswith("| fp | ") and "| 1.00 |" in table_lines[2]
    assert "PARTIAL: 1 of 2 recipes measured so far" in report
    assert "bench: round 1, 1 of 2: fp: " in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["bench.md"]  # no temporary file left beside it
    assert lightning_log.level == level  # quieted for the table only, not for whoever called bench in-process


def test_every_compiled_recipe_runs_compiled(monkeypatch) -> None:
    # With a recompile limit of one the second model's forward would fall back to eager without the reset per recipe.
    # (dynamo's config patch, not monkeypatch: undoing a config module's attribute deletes it.)
    # Dynamo's graphs and recompile limit are what this is about, so the graphs go to the aot_eager backend: AOTAutograd
    # still traces each forward and its backward, but no C++ is generated and compiled for them (inductor took 90-230
    # s of a cold cache here; without the reset per recipe the count below is 1 either way).
    compiled = []
    compile_module = nn.Module.compile

    def counting(module, *args, **kwargs):
        compile_module(module, *args, **{**kwargs, "backend": "aot_eager"})
        compiled.append(module)

    monkeypatch.setattr(nn.Module, "compile", counting)
    # One layer of the tiny shape: the graphs and the recompile limit are the same for any depth, the tracing shorter.
    monkeypatch.setitem(SIZES, "tiny", replace(SIZES["tiny"], n_layer=1))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=1):
        run_benchmark(["fp", "ste"], **{**SMALL, "steps": 1, "warmup": 0}, compile=True)
    assert len(compiled) == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs >= 2  # one forward graph per recipe


def test_bench_is_a_tool_of_the_main_cli(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "usage: python -m dqt_lightning" in help_text and " bench [--size SIZE]" in help_text
    assert "--plot PLOT" in help_text and "into this PNG" in help_text


def test_plot_must_be_a_png_path(capsys) -> None:
    assert run_tool(["bench", "--recipes", "fp", "--plot", "chart.svg"]) == 2
    assert "--plot writes a PNG" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--seq-len", "0"), ("--steps", "0"),
                                        ("--vocab-size", "-1"), ("--warmup", "-1")])
def test_counts_out_of_range_are_one_line_naming_the_flag(capsys, flag, value) -> None:
    assert run_tool(["bench", "--recipes", "fp", flag, value]) == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {flag} must be >= {0 if flag == '--warmup' else 1}; "
                                                    f"got {value}")


def test_cli_rejects_unknown_recipes(capsys) -> None:
    assert run_tool(["bench", "--recipes", "int4"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown recipe int4; ")


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
