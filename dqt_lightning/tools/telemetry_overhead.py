"""What weight telemetry costs a training run: ``python -m dqt_lightning.tools.telemetry_overhead``."""

from __future__ import annotations

import tempfile
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from dqt_lightning.model import Config
from dqt_lightning.module import LanguageModel
from dqt_lightning.tools.bench import StepTimer
from dqt_lightning.train.precision import Method, QuantPrecision
from dqt_lightning.train.telemetry import WeightTelemetry
from dqt_lightning.train.update import QuantizedUpdate


def measure_overhead(every_n_steps: tuple[int, ...] = (50, 10, 1), steps: int = 100, repeats: int = 2,
                     warmup: int = 5) -> dict[str, list[float]]:
    """Training tokens/s of the tiny 8-bit DQT model without and with telemetry, interleaved in one process.

    Each setting trains ``warmup + steps`` steps on random tokens (batch 16 x 128, as ``configs/ternary.yaml``)
    with a TensorBoard logger, so histograms are really written; the settings take turns ``repeats`` times, so a
    load change on a shared machine hits all of them alike.

    Returns:
        ``{"off": [tokens/s per repeat], "every 50": [...], "every 50, own share": [the callback's own wall time
        as a share of the same steps' training time, per repeat], ...}``.
    """
    batch, seq_len, vocab = 16, 128, 4096
    settings: list[int | None] = [None, *every_n_steps]
    results: dict[str, list[float]] = {"off": []}
    for n in every_n_steps:
        results[f"every {n}"], results[f"every {n}, own share"] = [], []
    config = Config(name="tiny", n_layer=4, n_head=4, n_embd=128, intermediate_size=384, block_size=2048)
    with tempfile.TemporaryDirectory() as log_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            for n in settings:
                torch.manual_seed(0)
                model = LanguageModel(config, vocab_size=vocab, warmup_steps=0)
                tokens = torch.randint(0, vocab, ((warmup + steps) * batch, seq_len + 1))
                timer = StepTimer(warmup)
                extra = [] if n is None else [WeightTelemetry(every_n_steps=n), _ResetAt(warmup)]
                trainer = pl.Trainer(
                    accelerator="cpu", devices=1, max_steps=warmup + steps,
                    plugins=[QuantPrecision(Method(mode="dqt", bits=8))], callbacks=[QuantizedUpdate(), *extra, timer],
                    logger=TensorBoardLogger(log_dir, name="overhead"), enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    log_every_n_steps=10,
                )
                trainer.fit(model, train_dataloaders=DataLoader(tokens, batch_size=batch))
                key = "off" if n is None else f"every {n}"
                results[key].append(batch * seq_len * timer.steps / timer.seconds)
                if extra:  # the callback's own time, as a share of the training time: less noisy than tokens/s
                    results[f"{key}, own share"].append(extra[0].seconds / (timer.seconds + 1e-12))
    return results


class _ResetAt(pl.Callback):
    """Zeroes the telemetry's own clock when the benchmark's timer starts, so both cover the same steps."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == self.batch_idx:
            for callback in trainer.callbacks:
                if isinstance(callback, WeightTelemetry):
                    callback.seconds = 0.0


if __name__ == "__main__":
    for setting, values in measure_overhead().items():
        shown = [f"{v:.2%}" if "share" in setting else f"{v:,.0f} tokens/s" for v in values]
        print(f"{setting}: " + ", ".join(shown))
