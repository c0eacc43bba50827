"""Bit-width schedules: the switch onto a coarser grid is unbiased, happens at the configured step on every layer, the
update then rounds onto the new grid, the config appends to the base's callbacks, and a run resumed after a switch
continues bit-exactly on the coarse grid."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from dqt_lightning import ConfigError, Method, QuantizedUpdate, QuantPrecision
from dqt_lightning.cli import _ParseOnly
from dqt_lightning.quant.grid import Grid, TernaryGrid
from dqt_lightning.quant.layers import DQTLinear, dqt_layers
from dqt_lightning.quant.rounding import WEIGHTS, noise_keys
from dqt_lightning.train.schedule import BitWidthSchedule
from tests.conftest import TokenWindows, make_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EIGHT = Grid.from_bits(8)


def _key(seed: int) -> torch.Tensor:
    return noise_keys(seed)[WEIGHTS]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("schedule", "message"), [
    ([], "BitWidthSchedule.schedule must be a non-empty list"),
    ([[0.0, 8, 1]], r"BitWidthSchedule.schedule\[0\] must be a \[fraction, bits\] pair"),
    ([[0.0, 8], [1.0, 1.58]], r"BitWidthSchedule.schedule\[1\]: the fraction of training must be .* \[0, 1\)"),
    ([[0.0, 8], [0.5, 5.5]], r"BitWidthSchedule.schedule\[1\] bits must be 1.58"),
    ([[0.0, 8], [0.5, 4], [0.5, 2]], r"BitWidthSchedule.schedule\[2\]: fractions must increase"),
    ([[0.1, 8]], r"BitWidthSchedule.schedule\[0\] must start at fraction 0.0"),
    ([[0.0, "eight"]], r"BitWidthSchedule.schedule\[0\]: bits must be a number"),
])
def test_bad_schedules_are_one_line_errors_naming_the_field(schedule, message):
    with pytest.raises(ConfigError, match=message) as caught:
        BitWidthSchedule(schedule)
    assert "\n" not in str(caught.value)


def test_bad_rounding_and_scale_rule_are_refused():
    with pytest.raises(ConfigError, match="BitWidthSchedule.rounding"):
        BitWidthSchedule([[0.0, 8]], rounding="up")
    with pytest.raises(ConfigError, match="BitWidthSchedule.scale_rule"):
        BitWidthSchedule([[0.0, 8]], scale_rule="max")


def _eight_bit_layer(rows: int = 64, cols: int = 256, per_row: bool = False) -> DQTLinear:
    torch.manual_seed(0)
    return DQTLinear.from_linear(torch.nn.Linear(cols, rows, bias=False), EIGHT, "stochastic", per_row)


def test_stochastic_regrid_is_unbiased_inside_the_new_grid():
    layer = _eight_bit_layer()
    w = layer.dequantize()
    total = torch.zeros_like(w)
    draws = 400
    for seed in range(draws):
        copy = _eight_bit_layer()
        copy.regrid(TernaryGrid, "stochastic", _key(seed))
        assert copy.grid == TernaryGrid and copy.weight.dtype == torch.int8
        assert set(copy.weight.unique().tolist()) <= {-1, 0, 1}
        total += copy.dequantize()
    alpha = w.abs().mean()  # BitNet's absmean scale of the weight being regridded
    inside = w.abs() <= alpha
    mean = total / draws
    # Each draw is alpha * Bernoulli: the error of a mean of 400 is at most alpha * 0.5 / 20 = 0.025 alpha (1 sd).
    error = (mean - w)[inside].abs() / alpha
    assert error.mean() < 0.03 and error.max() < 0.15
    # Outside the range the weight is clipped to the edge: the mean is exactly +-alpha there.
    assert torch.allclose(mean[~inside].abs(), alpha.expand(int((~inside).sum())), rtol=1e-5)


def test_nearest_regrid_is_deterministic_and_range_rule_clips_nothing():
    a, b = _eight_bit_layer(), _eight_bit_layer()
    a.regrid(Grid.from_bits(4), "nearest")
    b.regrid(Grid.from_bits(4), "nearest")
    assert torch.equal(a.weight, b.weight) and a.weight.min() >= -8 and a.weight.max() <= 7
    layer = _eight_bit_layer()
    w, old_alpha = layer.dequantize(), layer.scale.clone()
    clipped = layer.regrid(TernaryGrid, "stochastic", _key(0), scale_rule="range")
    # Ternary levels with alpha * 127 span the 8-bit grid's range; only its extra negative level -128 lies outside.
    assert torch.allclose(layer.scale, old_alpha * 127)
    assert clipped == pytest.approx(float((w == w.min()).float().mean()) if w.min() < -127 * old_alpha else 0.0)


def test_per_row_scales_stay_per_row():
    layer = _eight_bit_layer(per_row=True)
    w = layer.dequantize()
    layer.regrid(TernaryGrid, "stochastic", _key(0))
    assert layer.scale.shape == (64, 1)
    assert torch.allclose(layer.scale, w.abs().mean(dim=1, keepdim=True))


class _Stop(pl.Callback):
    """Stops the run after ``step`` optimizer steps, as a kill would, without changing max_steps (which the LR
    schedule and the bit-width schedule both read)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class _Grids(pl.Callback):
    """Records the bits of the first DQT layer at the start of every step, and the layer grids at fit start."""

    def __init__(self) -> None:
        self.bits_per_step: dict[int, float] = {}
        self.grid_at_fit_start: set[float] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.grid_at_fit_start = {m.grid.bits for m in dqt_layers(pl_module)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.bits_per_step[trainer.global_step - 1] = next(dqt_layers(pl_module)).grid.bits


class _SameBatch(TokenWindows):
    """Every batch the same windows: a resumed run sees the same data whatever its position in the epoch."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.windows[:8].repeat(8, 1), batch_size=self.batch_size, shuffle=False)


STEPS = 10
SCHEDULE = [[0.0, 8], [0.5, 1.58]]  # the switch lands before step 5


class _TextLogger(Logger):
    """Keeps the text events a TensorBoard logger's experiment would write."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[tuple[str, str, int]] = []

    name = "text"
    version = 0

    @property
    def experiment(self):
        return self

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        self.texts.append((tag, text, global_step))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass


def _trainer(*callbacks: pl.Callback, logger: Logger | bool = False) -> pl.Trainer:
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, plugins=[QuantPrecision(Method(mode="dqt", bits=8))],
        callbacks=[QuantizedUpdate(seed=11), BitWidthSchedule(SCHEDULE, seed=5), *callbacks], logger=logger,
        enable_checkpointing=checkpointing, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )


def _fit(trainer: pl.Trainer, ckpt_path: str | None = None):
    model = make_model(optimizer=lambda p: torch.optim.AdamW(p, lr=0.05))  # large steps: levels move every step
    trainer.fit(model, datamodule=_SameBatch(), ckpt_path=ckpt_path)
    return model


def _levels(model) -> dict[str, torch.Tensor]:
    return {name: m.weight.clone() for name, m in model.named_modules() if isinstance(m, DQTLinear)}


def test_switch_happens_at_the_step_and_the_update_rounds_onto_the_new_grid(rounding_calls):
    grids, logger = _Grids(), _TextLogger()
    trainer = _trainer(grids, logger=logger)
    model = _fit(trainer)
    # Every rounding goes through the one entry point: one per layer and step, plus one per layer at the switch.
    assert len(rounding_calls) == 14 * STEPS + 14
    assert [(tag, step) for tag, _, step in logger.texts] == [("dqt/bit_width_schedule", 5)]
    assert "step 5: 8 -> 1.58 bits" in logger.texts[0][1]
    assert grids.bits_per_step == {s: (8.0 if s < 5 else 1.58) for s in range(STEPS)}
    schedule = next(c for c in trainer.callbacks if isinstance(c, BitWidthSchedule))
    assert [(s["step"], s["to_bits"]) for s in schedule.switches] == [(5, 1.58)]
    update = next(c for c in trainer.callbacks if isinstance(c, QuantizedUpdate))
    assert update.n_updates == STEPS
    for layer in dqt_layers(model):
        assert layer.grid == TernaryGrid and set(layer.weight.unique().tolist()) <= {-1, 0, 1}
    assert float(trainer.callback_metrics["dqt/bits"]) == pytest.approx(1.58)


@pytest.mark.parametrize("stop_at", [3, 7], ids=["resume-before-switch", "resume-after-switch"])
def test_resume_across_a_switch_is_bit_exact(tmp_path, stop_at):
    straight = _levels(_fit(_trainer()))

    first = _trainer(_Stop(stop_at))
    _fit(first)
    assert first.global_step == stop_at
    path = str(tmp_path / "stopped.ckpt")
    first.save_checkpoint(path)

    grids = _Grids()
    resumed_trainer = _trainer(grids)
    resumed = _levels(_fit(resumed_trainer, ckpt_path=path))
    # A run resumed after the switch starts on the coarse grid, before its first step.
    assert grids.grid_at_fit_start == ({1.58} if stop_at >= 5 else {8.0})
    assert resumed_trainer.global_step == STEPS
    for name, levels in straight.items():
        assert torch.equal(levels, resumed[name]), name


@pytest.mark.parametrize("overlay", sorted(p.name for p in (CONFIGS / "schedule").glob("*.yaml")))
def test_schedule_overlays_keep_the_base_callbacks(overlay):
    cli = _ParseOnly(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     run=False, args=["--config", str(CONFIGS / "ternary.yaml"),
                                      "--config", str(CONFIGS / "bits/8.yaml"),
                                      "--config", str(CONFIGS / "schedule" / overlay)])
    classes = [c.class_path for c in cli.config.trainer.callbacks]
    assert classes == ["dqt_lightning.QuantizedUpdate", "lightning.pytorch.callbacks.ModelCheckpoint",
                       "dqt_lightning.train.schedule.BitWidthSchedule"]
    schedule = cli.config.trainer.callbacks[2].init_args.schedule
    assert schedule[0] == [0.0, 8.0] and schedule[-1][1] == 1.58
    BitWidthSchedule(schedule)  # valid as written


def test_schedule_must_start_at_the_plugins_bits():
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2,
                         plugins=[QuantPrecision(Method(mode="dqt", bits=4))],
                         callbacks=[QuantizedUpdate(seed=1), BitWidthSchedule(SCHEDULE)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match=r"BitWidthSchedule.schedule\[0\] starts at 8 bits .* start at 4"):
        trainer.fit(make_model(), datamodule=TokenWindows())


def test_schedule_refuses_a_model_without_dqt_weights():
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2,
                         plugins=[QuantPrecision(Method(mode="ste", bits=8))],
                         callbacks=[BitWidthSchedule(SCHEDULE)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="BitWidthSchedule needs DQT weights"):
        trainer.fit(make_model(), datamodule=TokenWindows())


def test_checkpoint_callback_is_unaffected(tmp_path):
    # ModelCheckpoint saves the schedule's state with the int levels; loading it back restores the current entry.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=STEPS, save_last=True)
    trainer = _trainer(checkpoint)
    _fit(trainer)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith("BitWidthSchedule"))
    assert state["current"] == 1 and state["bits"] == 1.58 and state["switches"][0]["step"] == 5


def test_compare_shows_where_a_schedule_ended_and_the_ternary_loss(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from dqt_lightning.tools.compare import load_run, table

    run_dir = tmp_path / "runs" / "ternary+8+8-to-ternary" / "version_0"
    run_dir.mkdir(parents=True)
    plugin = "{mode: dqt, bits: 8.0, rounding: stochastic}"
    (run_dir / "config.yaml").write_text(f"trainer:\n  plugins:\n    init_args: {plugin}\n")
    writer = SummaryWriter(str(run_dir))
    for step, bits in ((0, 8.0), (5, 1.5800000429153442)):
        writer.add_scalar("dqt/bits", bits, step)
    writer.add_scalar("val/loss", 4.25, 5)
    writer.add_scalar("val/loss_ternary", 4.5, 5)
    writer.close()
    run = load_run(run_dir)
    assert run.bits == "8→1.58" and run.val_loss_ternary == 4.5
    lines = table([run]).splitlines()
    assert "| final val loss | val loss, ternary |" in lines[0]
    assert "| dqt | 8→1.58 | stochastic | 4.2500 | 4.5000 |" in lines[2]
