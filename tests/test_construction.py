"""A model is built empty and gets its weights layer by layer, each projection quantized as soon as it is drawn: the
same weights as building it in float32 first, without ever holding more than one layer's float weight."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from dqt_lightning import Method, QuantPrecision
from dqt_lightning.errors import ConfigError
from dqt_lightning.model import LLaMA, Config
from dqt_lightning.quant.bitnet import BitLinear
from dqt_lightning.quant.layers import DQTWeight
from dqt_lightning.train.precision import Execution, is_projection
from tests.conftest import SMALL, fit, make_model

LAYOUTS = ("llama", "subln", "bitlinear")
TEST_CONFIG = replace(SMALL, vocab_size=128)  # what make_model builds


def _eager(config: Config, seed: int) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA(config)


def _empty(config: Config, seed: int) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA.empty(config)


def test_an_empty_model_holds_no_memory_and_draws_nothing():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    model = LLaMA.empty(_layout("subln"))
    assert model.is_empty and all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert torch.equal(model.rng_state, before)
    # The global stream moved on: a second model gets other weights.
    assert not torch.equal(torch.get_rng_state(), before)


def _layout(layout: str) -> Config:
    return Config(vocab_size=64, n_layer=2, n_head=2, n_embd=32, intermediate_size=48, norm_layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float_weights_are_those_of_the_eager_build(layout):
    config = _layout(layout)
    eager, built = _eager(config, 3), _empty(config, 3)
    built.materialize()
    assert not built.is_empty
    assert eager.state_dict().keys() == built.state_dict().keys()
    for key, value in eager.state_dict().items():
        assert torch.equal(value, built.state_dict()[key]), key
    assert torch.equal(eager.rope_cos, built.rope_cos) and torch.equal(eager.rope_sin, built.rope_sin)


def test_weights_built_on_a_gpu_draw_from_a_generator_of_that_device(monkeypatch):
    # Lightning's configure_model runs under `with root_device`, and a CUDA tensor refuses a CPU generator. No GPU
    # here: a stand-in records the device each generator is asked for (and draws on the CPU in its place).
    asked, real = [], torch.Generator

    def generator(device="cpu"):
        asked.append(torch.device(device).type)
        return real()

    model = _empty(_layout("llama"), 3)
    monkeypatch.setattr(torch, "Generator", generator)
    with torch.device("meta"):  # as Lightning's device context: factory calls without a device make meta tensors
        first = model._init_generator(torch.device("cuda", 0))
    assert asked == ["cpu", "cuda"]
    # Seeded from the state the empty model kept: the same seed gives the same weights on that device.
    again = model._init_generator(torch.device("cuda"))
    assert torch.equal(torch.rand(8, generator=first), torch.rand(8, generator=again))
    assert model._init_generator(torch.device("cpu")).get_state().equal(model.rng_state)
    assert model._init_generator(torch.device("meta")).get_state().equal(model.rng_state)


@pytest.mark.parametrize("method", [Method(bits=1.58), Method(bits=8), Method(bits=4, per_row_scale=True),
                                    Method(bits=1.58, quantize_embeddings=True), Method(mode="ste")],
                         ids=["ternary", "8bit", "4bit-per-row", "ternary-embeddings", "ste"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_weights_are_those_of_converting_the_eager_build(method, layout):
    config = _layout(layout)
    eager = QuantPrecision(method).convert_module(_eager(config, 5))
    built = QuantPrecision(method).convert_module(_empty(config, 5))
    assert eager.state_dict().keys() == built.state_dict().keys()
    for key, value in eager.state_dict().items():
        assert torch.equal(value, built.state_dict()[key]), key


def test_packed_layers_are_packed_as_they_are_built():
    plugin = QuantPrecision(Method(bits=1.58), Execution(pack_in_memory=True))
    unpacked = QuantPrecision(Method(bits=1.58)).convert_module(_empty(_layout("subln"), 1))
    built = _empty(_layout("subln"), 1)
    seen, converted_floats = [], []

    def convert(name: str, layer: nn.Module) -> nn.Module | None:
        # Every projection built before this one is packed integers already, and its float weight is gone from
        # memory (nothing refers to it); none after it exists yet.
        done = [m for n, m in built.named_modules() if is_projection(n) and isinstance(m, (nn.Linear, DQTWeight))]
        seen.append(sum(isinstance(m, DQTWeight) and m.packed for m in done))
        floats = [m for m in done if isinstance(m, nn.Linear) and not m.weight.is_meta]
        assert floats == ([layer] if is_projection(name) else [])
        gc.collect()
        assert all(ref() is None for ref in converted_floats)
        replacement = plugin.convert_layer(name, layer)
        if replacement is not None:
            converted_floats.append(weakref.ref(layer.weight))
        return replacement

    built.materialize(convert)
    assert seen == [0] + list(range(14)) + [14]  # the embedding first, then each projection, then the head
    layers = [(a, b) for a, b in zip(unpacked.modules(), built.modules()) if isinstance(a, DQTWeight)]
    assert len(layers) == 14 and all(b.packed and torch.equal(a.weight, b.levels()) for a, b in layers)


class InitialLevels(pl.Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        self.levels = [m.weight.clone() for m in pl_module.model.modules() if isinstance(m, DQTWeight)]


def test_a_fit_starts_from_the_weights_converting_the_eager_build_gives():
    initial = InitialLevels()
    fit(make_model(seed=4), steps=1, callbacks=[initial])
    eager = QuantPrecision(Method(bits=1.58)).convert_module(_eager(TEST_CONFIG, 4))
    expected = [m.weight for m in eager.modules() if isinstance(m, DQTWeight)]
    assert len(initial.levels) == len(expected) == 14
    assert all(torch.equal(a, b) for a, b in zip(initial.levels, expected))


def test_a_model_built_for_a_checkpoint_draws_nothing_and_must_get_one(monkeypatch):
    calls = []  # random inits of real (not meta) tensors

    def counted(name, original):
        def init(tensor, *args, **kwargs):
            calls.extend([name] if not tensor.is_meta else [])
            return original(tensor, *args, **kwargs)
        return init

    for name in ("normal_", "kaiming_uniform_"):
        monkeypatch.setattr(nn.init, name, counted(name, getattr(nn.init, name)))
    monkeypatch.setattr(torch.Tensor, "normal_", counted("Tensor.normal_", torch.Tensor.normal_))
    model = make_model()
    model.weights_from_checkpoint = True
    with pytest.raises(ConfigError, match="none was loaded"):
        fit(model, steps=1)
    assert calls == []
    assert all(isinstance(m, DQTWeight) for n, m in model.model.named_modules() if is_projection(n)
               and isinstance(m, (nn.Linear, DQTWeight)))


def test_without_a_trainer_configure_model_builds_the_float_model():
    model = make_model(seed=6)
    model.configure_model()
    eager = _eager(TEST_CONFIG, 6)
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), model.model.state_dict().values()))
    assert not any(isinstance(m, (DQTWeight, BitLinear)) for m in model.modules())
