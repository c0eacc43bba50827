"""The resumable sampler hands out exactly DistributedSampler's order (without building it as a list)."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from dqt_lightning.data.sampling import ResumableSampler


@pytest.mark.parametrize("n,replicas", [(1000, 1), (1001, 2), (200_003, 3)])
def test_the_order_is_distributed_samplers(n, replicas):
    windows = range(n)
    for epoch in (0, 1, 7):
        for rank in range(replicas):
            ours = ResumableSampler(windows, replicas, rank, seed=5, batch_size=8)
            reference = DistributedSampler(windows, replicas, rank, shuffle=True, seed=5, drop_last=True)
            ours.set_epoch(epoch)
            reference.set_epoch(epoch)
            assert list(ours) == list(reference)


def test_a_resumed_epoch_starts_after_the_batches_done():
    windows = range(1000)
    full = ResumableSampler(windows, 2, 1, seed=9, batch_size=8)
    full.set_epoch(3)
    resumed = ResumableSampler(windows, 2, 1, seed=9, batch_size=8)
    resumed.resume_at(epoch=3, batches_done=5)
    resumed.set_epoch(3)
    assert list(resumed) == list(full)[5 * 8:]
    assert list(resumed) == list(full)  # only once: the next pass is the whole epoch again
