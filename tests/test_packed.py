"""Ternary DQT weights kept packed four per byte in memory (``pack_in_memory``): a quarter of the bytes, the same
training, and checkpoints that move freely between packed and int8 storage."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dqt_lightning import QuantPrecision
from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.layers import DQTLinear, dqt_layers
from dqt_lightning.tools.memory import measure
from dqt_lightning.quant.grid import TernaryGrid
from tests.test_checkpoint import ResumableWindows, StopAfter, _fit

pytestmark = pytest.mark.usefixtures("one_thread")


def _levels(model) -> list[torch.Tensor]:
    return [layer.levels().clone() for layer in dqt_layers(model)]


@pytest.mark.parametrize("plugin", [{}, {"update_in_backward": True}, {"quantize_embeddings": True}],
                         ids=["usual", "in-backward", "embeddings-and-head"])
def test_packed_storage_trains_exactly_as_int8_storage(tmp_path, plugin):
    _, plain = _fit(tmp_path / "plain", 4, pack=False, **plugin)
    _, packed = _fit(tmp_path / "packed", 4, pack=False, pack_in_memory=True, **plugin)
    layers = list(dqt_layers(packed))
    assert layers and all(layer.packed and layer.weight.dtype == torch.uint8 for layer in layers)
    assert all(layer.weight.numel() * 4 == layer.shape.numel() for layer in layers)
    for a, b in zip(_levels(plain), _levels(packed)):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, torch.zeros_like(a)) for a in _levels(packed))


def _every_3(directory) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=directory / "every-3", filename="{step}", every_n_train_steps=3, save_top_k=-1)


def test_packed_checkpoints_resume_exactly_into_either_storage(tmp_path):
    _, straight = _fit(tmp_path / "straight", 6, pack=False, data=ResumableWindows(),
                                      pack_in_memory=True)
    _fit(tmp_path / "stopped", 6, pack=False, data=ResumableWindows(), callbacks=[_every_3(tmp_path), StopAfter(3)],
         pack_in_memory=True)
    last = tmp_path / "every-3" / "step=3.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 3 and saved["state_dict"]["model.layers.0.attn.q_proj.weight"].dtype == torch.uint8
    for storage in ({"pack_in_memory": True}, {}):  # the packed file resumes into packed and into int8 layers
        _, resumed = _fit(tmp_path / f"resumed-{bool(storage)}", 6, pack=False, data=ResumableWindows(),
                          ckpt_path=last, **storage)
        for a, b in zip(_levels(straight), _levels(resumed)):
            assert torch.equal(a, b)
    # And an int8 checkpoint resumes into packed layers.
    _fit(tmp_path / "int8", 6, pack=False, data=ResumableWindows(), callbacks=[_every_3(tmp_path / "int8"),
                                                                                StopAfter(3)])
    _, from_int8 = _fit(tmp_path / "from-int8", 6, pack=False, data=ResumableWindows(),
                        ckpt_path=tmp_path / "int8" / "every-3" / "step=3.ckpt", pack_in_memory=True)
    assert all(layer.packed for layer in dqt_layers(from_int8))
    for a, b in zip(_levels(straight), _levels(from_int8)):
        assert torch.equal(a, b)


def test_packed_weights_take_a_quarter_byte():
    packed = measure("dqt", state_dtype="int8", update_in_backward=True, pack_in_memory=True).per_param()
    assert 0.25 < packed["weights"] < 0.27  # plus one float scale and one placeholder number per layer
    assert packed["grads"] == 0.0
    assert packed["total"] < 2.35  # the stretch goal of the memory table: 2.25 bytes


def test_a_packed_layer_computes_what_its_int8_twin_computes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 12, bias=False)
    int8 = DQTLinear.from_linear(linear, TernaryGrid, "stochastic")
    packed = DQTLinear.from_linear(linear, TernaryGrid, "stochastic")
    packed.pack_storage()
    packed.pack_storage()  # idempotent
    x = torch.randn(3, 5, 24, requires_grad=True)
    y_int8 = int8(x)
    y_int8.sum().backward()
    grad_x, grad_w = x.grad.clone(), int8.update_param.grad.clone()
    x.grad = None
    y_packed = packed(x)
    y_packed.sum().backward()
    assert torch.equal(y_int8, y_packed)
    assert torch.equal(grad_x, x.grad) and torch.equal(grad_w, packed.update_param.grad)
    assert "packed 2-bit" in repr(packed)


def test_ternary_evaluation_of_packed_weights_is_that_of_their_int8_twin(tmp_path):
    from dqt_lightning.quant.ternary import TernaryWeights

    _, plain = _fit(tmp_path / "plain", 3, pack=False)
    _, packed = _fit(tmp_path / "packed", 3, pack=False, pack_in_memory=True)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (plain, packed):
        with torch.no_grad(), TernaryWeights(model.model):
            logits = model.model(tokens[:, :-1])
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
    assert torch.equal(losses[0], losses[1])
    assert all(layer.packed for layer in dqt_layers(packed))  # back to packed storage after the evaluation


@pytest.mark.parametrize("plugin", [{"bits": 8}, {"mode": "ste"}, {"mode": "fp"}])
def test_only_ternary_dqt_weights_pack(plugin):
    with pytest.raises(ConfigError, match="trainer.plugins.execution.pack_in_memory"):
        QuantPrecision.from_settings(pack_in_memory=True, **plugin)
