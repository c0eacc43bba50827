"""Checkpoint files: written atomically, ternary weights optionally packed 4 per byte and restored exactly."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dqt_lightning import QuantizedUpdate, QuantPrecision
from dqt_lightning.checkpoint import AtomicCheckpointIO
from dqt_lightning.layers import dqt_layers
from tests.conftest import TokenWindows, make_model


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("killed mid-save")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(10)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="killed mid-save"):
        io.save_checkpoint({"step": 2, "w": torch.arange(10), "bad": Unpicklable()}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def _fit(tmp_path: Path, steps: int, pack: bool, ckpt_path=None) -> tuple[pl.Trainer, pl.LightningModule]:
    model = make_model()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path,
        plugins=[QuantPrecision(mode="dqt", bits=1.58, pack_ternary=pack), AtomicCheckpointIO()],
        callbacks=[QuantizedUpdate(seed=3), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    trainer.fit(model, datamodule=TokenWindows(), ckpt_path=ckpt_path)
    return trainer, model


def test_packed_ternary_checkpoints_are_smaller_and_restore_exactly(tmp_path):
    _, plain_model = _fit(tmp_path / "plain", 3, pack=False)
    trainer, model = _fit(tmp_path / "packed", 3, pack=True)
    plain = torch.load(tmp_path / "plain" / "ckpt" / "last.ckpt", weights_only=False)
    packed = torch.load(tmp_path / "packed" / "ckpt" / "last.ckpt", weights_only=False)
    key = "model.layers.0.attn.q_proj.weight"
    assert packed["state_dict"][key].dtype == torch.uint8
    assert packed["state_dict"][key].numel() * 4 == plain["state_dict"][key].numel()
    # Resuming from the packed file rebuilds the very same integer weights before training on.
    last = tmp_path / "packed" / "ckpt" / "last.ckpt"
    _, resumed = _fit(tmp_path / "packed", 3, pack=True, ckpt_path=last)
    for a, b in zip(dqt_layers(model), dqt_layers(resumed)):
        assert torch.equal(a.weight, b.weight)


def test_checkpoint_size_command_ranks_the_formats(tmp_path):
    from dqt_lightning.checkpoint import measure_checkpoint_sizes

    sizes = measure_checkpoint_sizes("tiny", 512, tmp_path)
    weights = {label: w for label, (_, w) in sizes.items()}
    assert weights["DQT ternary (packed 2-bit)"] < weights["DQT ternary (int8)"] < weights["fp (float32)"]
    assert all(full > w for full, w in sizes.values())  # the full checkpoint adds optimizer states and loop state
    assert list(tmp_path.iterdir()) == []
