"""Checkpoint files: written atomically, ternary weights optionally packed 4 per byte and restored exactly."""

import math
from dataclasses import replace
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from dqt_lightning import Execution, LanguageModel, Method, QuantizedUpdate, QuantPrecision
from dqt_lightning.tools.checkpoint_sizes import FORMATS, measure_checkpoint_sizes
from dqt_lightning.train.checkpoint import GRIDS_KEY, AtomicCheckpointIO
from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.layers import dqt_layers
from dqt_lightning.train.optim import AdamW
from dqt_lightning.train.schedule import BitWidthSchedule
from dqt_lightning.data.sampling import ResumableSampler, training_position
from tests.conftest import SMALL, TokenWindows, make_model

# Torch on one thread (conftest.one_thread): these models are tiny, and on shared cores two OpenMP threads make
# each small op wait for a descheduled partner (runs several times slower).
pytestmark = pytest.mark.usefixtures("one_thread")


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


def _fit(tmp_path: Path, steps: int, pack: bool, ckpt_path=None, data=None, seed=0, callbacks=(), optimizer=None,
         **plugin) -> tuple[pl.Trainer, pl.LightningModule]:
    model = make_model(seed, optimizer=optimizer)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path,
        plugins=[QuantPrecision.from_settings(mode="dqt", bits=1.58, pack_ternary=pack, **plugin),
                 AtomicCheckpointIO()],
        callbacks=[QuantizedUpdate(seed=3), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), *callbacks],
    )
    trainer.fit(model, datamodule=data or TokenWindows(), ckpt_path=ckpt_path)
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
    sizes = measure_checkpoint_sizes("tiny", 512, tmp_path)
    assert list(sizes) == list(FORMATS)
    weights = {label: w for label, (_, w) in sizes.items()}
    full = {label: f for label, (f, _) in sizes.items()}
    packed, embedded = "DQT ternary (packed 2-bit)", "DQT ternary packed + quantized embeddings/head"
    assert weights[embedded] < weights[packed] < weights["DQT ternary (int8)"] < weights["fp (float32)"]
    assert all(f > w for f, w in sizes.values())  # the full checkpoint adds optimizer states and loop state
    # 8-bit AdamW moments (~2 bytes per parameter instead of 8) shrink the resumable checkpoint, not the weights.
    lean = "DQT ternary packed + int8 AdamW states"
    assert weights[lean] == pytest.approx(weights[packed], abs=2000) and full[lean] < full[packed] / 2
    assert list(tmp_path.iterdir()) == []


def _layer_weights(model) -> list[torch.Tensor]:
    return [layer.weight for layer in dqt_layers(model)]


def test_quantized_embeddings_checkpoint_is_packed_and_validates_to_the_same_loss(tmp_path):
    data = TokenWindows()
    trainer, model = _fit(tmp_path, 3, pack=True, data=data, quantize_embeddings=True)
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=False)["state_dict"]
    table = model.model.embed_tokens.weight
    assert state["model.embed_tokens.weight"].dtype == torch.uint8
    assert state["model.embed_tokens.weight"].numel() * 4 == table.numel()
    assert state["model.lm_head.weight"].dtype == torch.uint8
    assert not [k for k, t in state.items() if t.is_floating_point() and t.shape == table.shape]

    def validate(module, **kwargs) -> float:
        checker = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             plugins=[QuantPrecision(Method(mode="dqt", quantize_embeddings=True),
                                                     Execution(pack_ternary=True))])
        return checker.validate(module, datamodule=data, verbose=False, **kwargs)[0]["val/loss"]

    trained = validate(model)
    loaded = validate(make_model(seed=5), ckpt_path=last)  # different random init: all it knows is the file
    assert loaded == trained


class StopAfter(pl.Callback):
    """Stops a run after ``step`` optimizer steps; unlike a smaller max_steps it leaves the LR schedule alone."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


class ResumableWindows(TokenWindows):
    """``TokenWindows`` shuffled by the project's resumable sampler, with the data position in every checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self._resume = None

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableSampler(self.windows, num_replicas=1, rank=0, seed=0, batch_size=self.batch_size)
        if self._resume:
            sampler.resume_at(self._resume["epoch"], self._resume["batches_done"])
        return DataLoader(self.windows, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def state_dict(self) -> dict:
        return training_position(self.trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = state_dict or None


@pytest.mark.parametrize("state_dtype", ["float32", "int8"])
def test_quantized_embeddings_resume_exactly(tmp_path, state_dtype):
    # The int8 AdamW states make this the smallest resumable format of docs/checkpoints.md.
    setup = dict(pack=True, quantize_embeddings=True,
                 optimizer=partial(AdamW, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01, state_dtype=state_dtype))
    _, straight = _fit(tmp_path / "straight", 6, data=ResumableWindows(), **setup)
    # As a killed run would: resume from the checkpoint written after step 3, mid-epoch (8 batches per epoch).
    every_3 = ModelCheckpoint(dirpath=tmp_path / "every-3", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    _fit(tmp_path / "stopped", 6, data=ResumableWindows(), callbacks=[every_3, StopAfter(3)], **setup)
    step_3 = tmp_path / "every-3" / "step=3.ckpt"
    assert torch.load(step_3, weights_only=False)["global_step"] == 3
    _, resumed = _fit(tmp_path / "resumed", 6, data=ResumableWindows(), ckpt_path=step_3, **setup)
    assert len(_layer_weights(resumed)) == 16
    for a, b in zip(_layer_weights(straight), _layer_weights(resumed)):
        assert torch.equal(a, b)


def _trained_checkpoint(tmp_path: Path, steps: int = 2, callbacks=(), **plugin) -> Path:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                         plugins=[QuantPrecision.from_settings(**plugin)],
                         callbacks=[QuantizedUpdate(seed=3), ModelCheckpoint(dirpath=tmp_path, save_last=True),
                                    *callbacks])
    trainer.fit(make_model(0), datamodule=TokenWindows())
    return tmp_path / "last.ckpt"


def _validate(ckpt: Path, callbacks=(), model=None, **plugin) -> tuple[float, pl.LightningModule]:
    model = model or make_model(seed=5)  # another init: only the file can make it match
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, plugins=[QuantPrecision.from_settings(**plugin)],
                         callbacks=list(callbacks))
    return trainer.validate(model, datamodule=TokenWindows(), ckpt_path=ckpt, verbose=False)[0]["val/loss"], model


def test_a_checkpoint_on_another_grid_is_refused_naming_both_grids(tmp_path):
    # Both are int8 tensors of one shape, so torch would load 8-bit levels into ternary layers without a word.
    ckpt = _trained_checkpoint(tmp_path, mode="dqt", bits=8)
    with pytest.raises(ConfigError, match=r"ckpt_path .*last.ckpt holds model.layers.0.attn.q_proj on levels "
                                          r"\[-128, 127\], this config's DQT grid has ternary levels"):
        _validate(ckpt, mode="dqt", bits=1.58)
    with pytest.raises(ConfigError, match=r"levels \[-128, 127\], .* has levels \[-127, 127\]"):
        _validate(ckpt, mode="dqt", bits=8, symmetric=True)
    loss, _ = _validate(ckpt, mode="dqt", bits=8)  # the config it was trained with
    assert math.isfinite(loss)


@pytest.mark.parametrize("saved,loading,held", [
    (dict(mode="fp"), dict(mode="dqt"), "as float, this config makes it DQT integer levels"),
    (dict(mode="dqt"), dict(mode="fp"), "as DQT integer levels, this config makes it float weights"),
    (dict(mode="dqt"), dict(mode="dqt", quantize_embeddings=True), "embed_tokens.weight as float"),
    (dict(mode="dqt"), dict(mode="dqt", per_row_scale=True), "scale of shape \\[\\].*per_row_scale differs"),
], ids=["fp-into-dqt", "dqt-into-fp", "float-embeddings-into-quantized", "per-tensor-into-per-row-scales"])
def test_a_checkpoint_of_another_mode_is_refused_in_one_line(tmp_path, saved, loading, held):
    ckpt = _trained_checkpoint(tmp_path, **saved)
    with pytest.raises(ConfigError, match=held) as refused:
        _validate(ckpt, **loading)
    assert "\n" not in str(refused.value) and "config.yaml in its run directory" in str(refused.value)


def test_a_checkpoint_of_another_size_names_the_tensor_and_the_shapes(tmp_path):
    ckpt = _trained_checkpoint(tmp_path, mode="dqt")
    wider = LanguageModel(config=replace(SMALL, n_embd=64), vocab_size=128)
    with pytest.raises(ConfigError, match=r"embed_tokens.weight of shape \[128, 32\], this config makes \[128, 64\]"):
        _validate(ckpt, model=wider, mode="dqt")


def test_a_float_checkpoint_loads_into_bitnet_master_weights(tmp_path):
    # fp and ste both keep float weights: continuing an fp run with BitNet's STE is a conversion users make.
    ckpt = _trained_checkpoint(tmp_path, mode="fp")
    loss, _ = _validate(ckpt, mode="ste")
    assert math.isfinite(loss)


def test_a_schedule_checkpoint_loads_on_the_grid_it_ended_on(tmp_path):
    # 8 bits, then ternary from the second of two steps: the saved levels are ternary, the config says 8 bits.
    schedule = [[0.0, 8], [0.5, 1.58]]
    ckpt = _trained_checkpoint(tmp_path, callbacks=[BitWidthSchedule(schedule)], mode="dqt", bits=8)
    assert all(grid == [-1, 1] for grid in torch.load(ckpt, weights_only=False)[GRIDS_KEY].values())
    _, model = _validate(ckpt, callbacks=[BitWidthSchedule(schedule)], mode="dqt", bits=8)
    assert all(layer.grid.is_ternary for layer in dqt_layers(model))
    with pytest.raises(ConfigError, match="ternary levels .* has levels \\[-128, 127\\]"):
        _validate(ckpt, mode="dqt", bits=8)  # the same config without its schedule


def test_a_checkpoint_from_before_the_grids_were_saved_still_loads(tmp_path):
    ckpt = _trained_checkpoint(tmp_path, mode="dqt", bits=8)
    old = torch.load(ckpt, weights_only=False)
    del old[GRIDS_KEY]
    torch.save(old, tmp_path / "old.ckpt")
    assert _validate(tmp_path / "old.ckpt", mode="dqt", bits=8)[0] == _validate(ckpt, mode="dqt", bits=8)[0]
