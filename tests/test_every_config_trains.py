"""Every training config and every overlay under configs/ trains a few steps, shrunk to a tiny model on CPU.

One run per code path: a config that differs from another only in a value its run does not branch on (the bits of a
multi-bit grid, a model size the shrinking overrides, a float32 matmul precision a CPU ignores) is parsed and
instantiated, and shown to be its twin but for that value, instead of training the same path again.

Data overlays are the exception: they need a user's files, a network or a `prepare` run first, and have their own
end-to-end tests in test_text.py and test_shards.py. The fp8 overlay trains only on a GPU with FP8 tensor cores;
anywhere else (CPU included) the test asserts that it stops with its one-line ConfigError instead.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule

from dqt_lightning.cli import DQTLightningCLI
from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.fp8 import fp8_unsupported_reason

# Torch on one thread (conftest.one_thread): these models are tiny, and on shared cores two OpenMP threads make
# each small op wait for a descheduled partner (runs several times slower).
pytestmark = pytest.mark.usefixtures("one_thread")

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


CONFIG_SETS = ([[b] for b in BASES] + [["ternary.yaml", o] for o in OVERLAYS]
               + [["bitnet.yaml", o] for o in OVERLAYS if o.startswith("bits/")])
# config set: (the config set whose run takes the same code path, the only keys in which they differ once shrunk)
BITS = {"trainer.plugins.init_args.method.bits"}
SIZE = {"model.init_args.config.name"}  # the sizes themselves are overridden by SHRINK
SAME_PATH = {
    **{f"ternary.yaml+bits/{n}.yaml": ("ternary.yaml+bits/8.yaml", BITS) for n in (2, 3, 4)},
    **{f"bitnet.yaml+bits/{n}.yaml": ("bitnet.yaml+bits/4.yaml", BITS) for n in (2, 3, 8)},
    "ternary.yaml+model/tiny.yaml": ("ternary.yaml", set()),
    "ternary.yaml+model/320m.yaml": ("ternary.yaml", SIZE),
    "ternary.yaml+model/1b.yaml": ("ternary.yaml", SIZE),
    "ternary.yaml+model/cpu-study.yaml": ("ternary.yaml", SIZE),  # its one other key, the vocabulary, SHRINK sets
    # the paper's recipe: another learning rate (and steps, batches, warm-up, which SHRINK overrides)
    "ternary.yaml+model/130m.yaml": ("ternary.yaml", SIZE | {"model.init_args.optimizer.init_args.lr"}),
    "ternary.yaml+precision/fp32.yaml": ("ternary.yaml", set()),
    # TF32 matmuls exist on NVIDIA GPUs only; on a CPU float32 matmuls are float32 whatever the setting
    "ternary.yaml+precision/tf32.yaml": ("ternary.yaml", {"float32_matmul_precision"}),
    # at 3 steps both switch once, at step 2, from 8 bits onto the ternary grid by the absmean rule
    "ternary.yaml+schedule/8-to-ternary.yaml": ("ternary.yaml+schedule/8-4-2-ternary.yaml",
                                                {"trainer.callbacks"}),
}


def _cli(configs: list[str], data_cache: str) -> DQTLightningCLI:
    args = [a for c in configs for a in ("--config", str(CONFIGS / c))]
    return DQTLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           run=False, args=[*args, *SHRINK, "--data.init_args.cache_dir", data_cache])


def _fit(configs: list[str], data_cache: str) -> DQTLightningCLI:
    cli = _cli(configs, data_cache)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def _flat(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "callbacks":
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _ParseOnly(DQTLightningCLI):
    def instantiate_classes(self) -> None:
        pass


@functools.cache
def _parsed(name: str, data_cache: str) -> dict[str, object]:
    args = [a for c in name.split("+") for a in ("--config", str(CONFIGS / c))]
    cli = _ParseOnly(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     run=False, args=[*args, *SHRINK, "--data.init_args.cache_dir", data_cache])
    return _flat(cli.config.as_dict())


def _differences(cli: DQTLightningCLI, twin: str, data_cache: str) -> set[str]:
    left, right = _flat(cli.config.as_dict()), _parsed(twin, data_cache)
    return {key for key in left.keys() | right.keys() if left.get(key) != right.get(key)} - {"config"}


def test_every_config_set_is_trained_or_has_a_trained_twin():
    names = {"+".join(c) for c in CONFIG_SETS}
    assert set(SAME_PATH) <= names
    assert {twin for twin, _ in SAME_PATH.values()} <= names - set(SAME_PATH)  # each twin really trains


@pytest.mark.parametrize("configs", CONFIG_SETS, ids=lambda c: "+".join(c))
def test_config_trains_a_few_steps(configs, data_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "+".join(configs)
    if FP8_OVERLAY in configs and FP8_REFUSED_BECAUSE is not None:
        with pytest.raises(ConfigError) as error:
            _fit(configs, data_cache)
        assert str(error.value) == ("trainer.plugins.execution.precision: fp8 needs an NVIDIA GPU of compute "
                                    f"capability 8.9+ and torchao; {FP8_REFUSED_BECAUSE}; use bf16-mixed")
        return
    if name in SAME_PATH:
        twin, differs_in = SAME_PATH[name]
        cli = _cli(configs, data_cache)
        assert type(cli.trainer.precision_plugin).__name__ == "QuantPrecision"
        assert cli.model.config.vocab_size == cli.datamodule.vocab_size
        assert _differences(cli, twin, data_cache) == differs_in
        return
    cli = _fit(configs, data_cache)
    assert cli.trainer.global_step == 3
    assert math.isfinite(float(cli.trainer.callback_metrics["val/loss"]))
