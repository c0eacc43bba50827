"""A training sampler that can pick up an epoch where a checkpoint left it, so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s seeded per-epoch shuffle and per-rank split, plus a start offset within one epoch.

    Subclassing ``DistributedSampler`` also tells Lightning to keep this sampler under DDP instead of wrapping it.
    The order depends only on (seed, epoch, rank, world size), never on how many batches were drawn before.

    Args:
        dataset: The training windows.
        num_replicas: Data-parallel world size.
        rank: This process's global rank.
        seed: Seed of every epoch's shuffle.
        batch_size: Windows per batch, to turn a count of batches into a count of windows to skip.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start epoch ``epoch`` after its first ``batches_done`` batches (once; later epochs start at 0)."""
        self._resume = (epoch, batches_done)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1] * self.batch_size :]
            self._resume = None
        # __len__ still reports the whole epoch: Lightning counts the skipped batches as already done.
        return iter(indices)


def training_position(trainer: pl.Trainer | None) -> dict[str, Any]:
    """Where training is in its data, for a data module's ``state_dict``: the epoch and the batches it consumed.

    ``processed`` (not ``completed``) is the count that includes a batch whose ``on_train_batch_end`` is saving
    this very checkpoint; Lightning marks that batch completed again when it restarts.
    """
    if trainer is None or trainer.state.fn != "fit":
        return {}
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return {"epoch": trainer.current_epoch, "batches_done": progress.processed}


class ResumablePosition:
    """Mixin for a ``LightningDataModule``: every checkpoint saves the training position (:func:`training_position`),
    and a resumed run finds it in ``self._resume`` when it builds its train loader."""

    _resume: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The data position, saved in every checkpoint so that a resumed run continues with the next batch."""
        return training_position(self.trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = state_dict or None
