"""A bit-width schedule's learning-rate re-warm: after a switch the rate climbs back to a fraction of the peak, then
decays by a cosine to where the schedule ends; before the switch nothing changes; a resumed run keeps the rates."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from dqt_lightning import LanguageModel, Method, QuantizedUpdate, QuantPrecision
from dqt_lightning.errors import ConfigError
from dqt_lightning.train.schedule import BitWidthSchedule, rewarmed
from tests.conftest import SMALL


def test_the_rewarmed_factor_climbs_after_the_switch_then_decays_to_the_schedules_end():
    def cosine(step: int) -> float:  # 100 steps, no warm-up, floor 0.1
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / 100, 1.0)))

    factor = rewarmed(cosine, [70], steps=10, to=0.5, total=100)
    assert [factor(s) for s in range(70)] == [cosine(s) for s in range(70)]
    climb = [factor(s) for s in range(70, 80)]
    assert climb == sorted(climb) and climb[-1] == pytest.approx(0.5)
    assert climb[0] == pytest.approx(cosine(70) + (0.5 - cosine(70)) / 10)
    decay = [factor(s) for s in range(79, 101)]
    assert decay == sorted(decay, reverse=True) and decay[0] == pytest.approx(0.5) and decay[-1] == pytest.approx(0.1)
    assert decay[1] < decay[0]


class Rates(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


class StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step >= self.step


def _fit(tmp_path, rewarm: int, ckpt_path=None, stop: int | None = None) -> list[float]:
    """20 steps (warm-up 2, cosine), 8-bit until the switch to ternary at step 14, re-warmed over ``rewarm`` steps."""
    pl.seed_everything(0, verbose=False)
    model = LanguageModel(SMALL, vocab_size=128, warmup_steps=2)
    rates = Rates()
    extra = [ModelCheckpoint(dirpath=tmp_path, save_last=True), StopAt(stop)] if stop else []
    schedule = BitWidthSchedule([[0.0, 8], [0.7, 1.58]], rewarm_steps=rewarm, rewarm_to=0.5)
    trainer = pl.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_checkpointing=bool(stop),
                         enable_progress_bar=False, enable_model_summary=False,
                         plugins=[QuantPrecision(Method(mode="dqt", bits=8))],
                         callbacks=[QuantizedUpdate(), schedule, rates, *extra])
    trainer.fit(model, DataLoader(torch.randint(0, 128, (64, 17)), batch_size=2), ckpt_path=ckpt_path)
    return rates.seen


def test_a_run_rewarms_after_its_switch_and_a_resumed_run_keeps_the_rates(tmp_path):
    plain, warm = _fit(tmp_path, 0), _fit(tmp_path, 3)
    peak = 1e-3  # the default AdamW's
    assert warm[:14] == plain[:14]  # before the switch at step 14, the schedule's own rates
    assert plain[14] < warm[14] < warm[15] < warm[16] == pytest.approx(0.5 * peak)
    assert warm[16] > warm[17] > warm[18] > warm[19] > plain[19]
    _fit(tmp_path / "first", 3, stop=15)  # stopped after 15 steps, one into the re-warm
    resumed = _fit(tmp_path / "resumed", 3, ckpt_path=tmp_path / "first" / "last.ckpt")
    assert resumed == warm[15:]


def test_rewarm_needs_the_models_own_schedule_and_sane_values():
    with pytest.raises(ConfigError, match="rewarm_steps must be >= 0 and rewarm_to in"):
        BitWidthSchedule([[0.0, 8], [0.5, 1.58]], rewarm_steps=-1)
    with pytest.raises(ConfigError, match="rewarm_to in"):
        BitWidthSchedule([[0.0, 8], [0.5, 1.58]], rewarm_steps=5, rewarm_to=1.5)
