"""Callbacks the subprocess tests load by class path into the runs they start."""

from pathlib import Path

import lightning.pytorch as pl
import torch

from dqt_lightning.quant.layers import DQTLinear


class SaveReplica(pl.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {name: (m.weight.clone() if isinstance(m, DQTLinear) else m.weight.detach().clone())
                   for name, m in pl_module.named_modules() if name.endswith("_proj")}
        torch.save({"weights": weights, "step": trainer.global_step},
                   Path(self.directory) / f"rank{trainer.global_rank}.pt")


class SlowDown(pl.Callback):
    """Sleeps after each batch so a test can kill the run mid-way; the arithmetic is unchanged."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(self.seconds)
