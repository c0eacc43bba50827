"""Shared helpers: a tiny LLaMA, a token-window data module, and a one-call Trainer for the invariant tests."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from dqt_lightning import LanguageModel, QuantizedUpdate, QuantPrecision
from dqt_lightning.model import Config

SMALL = Config(name="test", n_layer=2, n_head=2, n_embd=32, intermediate_size=64, block_size=64)


class TokenWindows(pl.LightningDataModule):
    """Fixed pseudo-random token windows in a fixed order: the invariant tests need batches they can re-slice."""

    def __init__(self, n: int = 64, seq_len: int = 16, vocab_size: int = 128, batch_size: int = 8) -> None:
        super().__init__()
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        gen = torch.Generator().manual_seed(0)
        # A learnable pattern (next token = previous + 1, mod V) with random starts, so losses can fall.
        starts = torch.randint(0, vocab_size, (n, 1), generator=gen)
        self.windows = (starts + torch.arange(seq_len + 1)) % vocab_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.windows, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.windows[:16], batch_size=self.batch_size)


def make_model(seed: int = 0, optimizer=None, warmup_steps: int = 0, config: Config = SMALL) -> LanguageModel:
    pl.seed_everything(seed, verbose=False)
    return LanguageModel(config=config, vocab_size=128, optimizer=optimizer, warmup_steps=warmup_steps)


def fit(model: LanguageModel, mode: str = "dqt", bits: float = 1.58, rounding: str = "stochastic", steps: int = 3,
        batch_size: int = 8, accumulate: int = 1, clip: float | None = None, callbacks=(), **plugin) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
        plugins=[QuantPrecision.from_settings(mode=mode, bits=bits, rounding=rounding, **plugin)],
        callbacks=[QuantizedUpdate(seed=11), *callbacks], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=TokenWindows(batch_size=batch_size))
    return trainer


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One tokenizer and token cache for the whole session: the embedded corpus takes seconds to encode."""
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(autouse=True)
def _restore_torch_defaults():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def one_thread():
    """Torch on one thread: these tests train tiny matrices, where more threads only add contention on shared cores
    (seconds on one thread, minutes when OpenMP workers compete with other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rounding_calls(monkeypatch) -> list[int]:
    """Sizes of the tensors every call of ``quant.step.round_to_grid`` rounds, in call order, for invariant 3. It is
    the one rounding entry point of every path: the usual update, the update in backward, the fused update (eager)
    and a bit-width schedule's switch."""
    from dqt_lightning.quant import step

    calls: list[int] = []
    original = step.round_to_grid

    def counting(y, *args, **kwargs):
        calls.append(y.numel())
        return original(y, *args, **kwargs)

    monkeypatch.setattr(step, "round_to_grid", counting)
    return calls
