"""End to end through LightningCLI on the embedded corpus: every mode trains, checkpoints hold integers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule

from dqt_lightning.cli import DQTLightningCLI
from tests.trained import STEPS, TINY, config_args, trained_runs  # noqa: F401 - trained_runs is a fixture

# Torch on one thread (conftest.one_thread): these models are tiny, and on shared cores two OpenMP threads make
# each small op wait for a descheduled partner (runs several times slower).
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
# 20 steps: every mode's validation loss falls by 0.91-0.92 nats by then (0.94-0.95 after 40, where this stood).
FAST = ["--trainer.max_steps", "20", "--trainer.val_check_interval", "20", "--trainer.limit_val_batches", "4",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.vocab_size", "512", "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "8",
        "--model.init_args.warmup_steps", "5"]


def cli_for(configs: list[str], data_cache: str, *extra: str) -> DQTLightningCLI:
    args = [a for c in configs for a in ("--config", str(REPO / "configs" / c))]
    return DQTLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=[*args, *FAST, "--data.init_args.cache_dir", data_cache, *extra],
    )


@pytest.mark.parametrize("configs", [["fp.yaml"], ["bitnet.yaml"], ["ternary.yaml"], ["ternary.yaml", "bits/8.yaml"],
                                     ["ternary.yaml", "bits/8.yaml", "ablation/nearest.yaml"]],
                         ids=lambda c: "+".join(c))
def test_each_mode_trains_and_the_loss_falls(configs, data_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_for(configs, data_cache)
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = float(cli.trainer.callback_metrics["val/loss"])
    assert before == pytest.approx(math.log(512), abs=0.3)  # an untrained model is near uniform
    assert after < before - 0.7
    events = list(Path(cli.trainer.log_dir).glob("events.out.tfevents.*"))
    assert events and Path(cli.trainer.log_dir).resolve().is_relative_to(tmp_path.resolve() / "runs")


def test_checkpoint_holds_integer_weights_and_resumes(data_cache, tmp_path, monkeypatch, trained_runs):
    monkeypatch.chdir(tmp_path)
    path = trained_runs.checkpoint("ternary")  # the session's ternary run (tests/trained.py): one layer, six steps
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    state = ckpt["state_dict"]
    projections = [k for k in state if k.endswith("_proj.weight")]
    assert len(projections) == 7
    shapes = {state[k].shape for k in projections}
    for key in projections:
        assert state[key].dtype == torch.int8 and state[key].abs().max() <= 1
    assert not [k for k, t in state.items() if t.is_floating_point() and t.shape in shapes and "_proj" in k]
    assert ckpt["callbacks"]["QuantizedUpdate"]["n_updates"] == STEPS

    resumed = DQTLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                              run=False, args=[*config_args("ternary"), *TINY, "--trainer.max_steps", str(STEPS + 3),
                                               "--data.init_args.cache_dir", data_cache])
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=path)
    assert resumed.trainer.global_step == STEPS + 3
    update = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "QuantizedUpdate")
    assert update.n_updates == STEPS + 3
    # The optimizer moments of the quantized weights are in the checkpoint, next to the float ones.
    n_states = len(ckpt["optimizer_states"][0]["state"])
    assert n_states == sum(1 for _ in resumed.model.parameters()) + 7


def test_bf16_mixed_overlay_trains(data_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_for(["ternary.yaml", "precision/bf16.yaml"], data_cache, "--trainer.max_steps", "5")
    assert cli.trainer.precision_plugin.precision == "bf16-mixed"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
