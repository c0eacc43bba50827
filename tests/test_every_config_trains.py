"""Every training config and every overlay under configs/ trains a few steps, shrunk to a tiny model on CPU.

Data overlays are the exception: they need a user's files, a network or a `prepare` run first, and have their own
end-to-end tests in test_text.py and test_shards.py. The fp8 overlay trains only on a GPU with FP8 tensor cores;
anywhere else (CPU included) the test asserts that it stops with its one-line ConfigError instead.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule

from dqt_lightning.cli import DQTLightningCLI
from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.fp8 import fp8_unsupported_reason

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
OVERLAYS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "data")
FP8_OVERLAY = "precision/fp8.yaml"
# Checked on the device the Trainer's "auto" accelerator picks for these runs.
FP8_REFUSED_BECAUSE = fp8_unsupported_reason(torch.device("cuda:0" if torch.cuda.is_available() else "cpu"))
SHRINK = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
          "--trainer.accumulate_grad_batches", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false",
          "--trainer.logger", "false", "--model.init_args.config.n_layer", "1", "--model.init_args.config.n_head", "2",
          "--model.init_args.config.n_embd", "32", "--model.init_args.config.intermediate_size", "64",
          "--model.init_args.warmup_steps", "1", "--data.init_args.vocab_size", "512",
          "--data.init_args.seq_len", "16", "--data.init_args.batch_size", "2"]


def _fit(configs: list[str], data_cache: str) -> DQTLightningCLI:
    args = [a for c in configs for a in ("--config", str(CONFIGS / c))]
    cli = DQTLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          run=False, args=[*args, *SHRINK, "--data.init_args.cache_dir", data_cache])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


@pytest.mark.parametrize("configs", [[b] for b in BASES] + [["ternary.yaml", o] for o in OVERLAYS]
                         + [["bitnet.yaml", o] for o in OVERLAYS if o.startswith("bits/")],
                         ids=lambda c: "+".join(c))
def test_config_trains_a_few_steps(configs, data_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if FP8_OVERLAY in configs and FP8_REFUSED_BECAUSE is not None:
        with pytest.raises(ConfigError) as error:
            _fit(configs, data_cache)
        assert str(error.value) == (f"trainer.plugins.precision: fp8 needs an NVIDIA GPU of compute capability 8.9+ "
                                    f"and torchao; {FP8_REFUSED_BECAUSE}; use bf16-mixed")
        return
    cli = _fit(configs, data_cache)
    assert cli.trainer.global_step == 3
    assert math.isfinite(float(cli.trainer.callback_metrics["val/loss"]))
