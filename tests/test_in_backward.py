"""The update applied inside backward (``Execution(update_in_backward=True)``): the same weights as the usual
path bit for bit, stochastic rounding included (same keys, same counter-based noise), with no DQT gradient buffer
ever reaching the optimizer step; and the configurations it must refuse."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from dqt_lightning.train import optim
from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.layers import dqt_layers
from tests.conftest import fit, make_model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class _GradientsAtTheStep(pl.Callback):
    """Records, at every optimizer step, whether any DQT layer still holds a gradient."""

    def __init__(self) -> None:
        self.held: list[bool] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = _state(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.held.append(any(layer.update_param.grad is not None for layer in dqt_layers(pl_module)))


@pytest.mark.parametrize("bits,optimizer,plugin", [
    (1.58, None, {}),
    (8, partial(optim.AdamW, lr=2e-3, state_dtype="int8"), {}),
    (4, partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.1), {"grad_dtype": "bfloat16", "per_row_scale": True}),
    (8, None, {"scale_policy": "absmax", "quantize_embeddings": True}),
], ids=["ternary", "8bit-int8-states", "4bit-bf16-grads-per-row", "8bit-absmax-embeddings"])
def test_update_in_backward_gives_the_same_weights_as_the_usual_path(bits, optimizer, plugin, one_thread):
    usual = make_model(optimizer=optimizer, warmup_steps=2)
    fit(usual, bits=bits, steps=5, rounding="stochastic", **plugin)
    in_backward = make_model(optimizer=optimizer, warmup_steps=2)
    probe = _GradientsAtTheStep()
    trainer = fit(in_backward, bits=bits, steps=5, rounding="stochastic", update_in_backward=True, callbacks=[probe],
                  **plugin)
    expected, got = _state(usual), _state(in_backward)
    assert expected.keys() == got.keys()
    moved = [k for k in expected if not torch.equal(expected[k], probe.initial[k])]
    assert any(k.endswith("_proj.weight") for k in moved)  # the comparison is not between two untrained models
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert probe.held == [False] * 5  # no DQT gradient is left when the optimizer steps
    assert all(layer.update_param.grad is None for layer in dqt_layers(in_backward))
    # Their optimizer states live in the one configured optimizer, so checkpoints carry them.
    state = trainer.optimizers[0].state
    assert all(len(state[layer.update_param]) > 0 for layer in dqt_layers(in_backward))


def test_update_in_backward_counts_steps_and_flips(one_thread):
    model = make_model()
    trainer = fit(model, steps=3, update_in_backward=True)
    update = next(cb for cb in trainer.callbacks if type(cb).__name__ == "QuantizedUpdate")
    assert update.n_updates == 3


@pytest.mark.parametrize("fit_args,message", [
    ({"accumulate": 2}, "accumulate_grad_batches: 1"),
    ({"clip": 1.0}, "gradient_clip_val"),
])
def test_update_in_backward_refuses_what_needs_every_gradient_first(fit_args, message, one_thread):
    with pytest.raises(ConfigError, match=message) as caught:
        fit(make_model(), steps=1, update_in_backward=True, **fit_args)
    assert "trainer.plugins.execution.update_in_backward" in str(caught.value)


def test_update_in_backward_is_for_dqt_only():
    from dqt_lightning import Execution, Method, QuantPrecision

    with pytest.raises(ConfigError, match="update_in_backward.*mode: dqt"):
        QuantPrecision(Method(mode="ste"), Execution(update_in_backward=True))


@pytest.mark.parametrize("plugin", [{}, {"fused_update": True, "compile_fused_update": False}], ids=["usual", "fused"])
def test_a_nonfinite_gradient_in_backward_skips_that_layer_only(plugin, one_thread):
    # The fused update decides on the device (no host sync per layer) and counts after backward: the same outcome.
    from dqt_lightning import Method, QuantPrecision

    model = make_model()
    QuantPrecision(Method(mode="dqt")).convert_module(model)  # fit converts again: a no-op
    layers = list(dqt_layers(model))
    first = layers[0]

    def poison(grad):
        return torch.full_like(grad, float("nan"))

    first.update_param.register_hook(poison)
    before = {id(m): m.weight.clone() for m in layers}
    scope = "those layers" if plugin else "that layer"
    with pytest.warns(UserWarning, match=rf"skipped the update of {scope} at step 0: non-finite gradient in "
                                         r"model\.layers\.0\.attn\.q_proj\.weight$"):
        trainer = fit(model, steps=1, update_in_backward=True, **plugin)
    assert torch.equal(first.weight, before[id(first)])
    update = next(cb for cb in trainer.callbacks if type(cb).__name__ == "QuantizedUpdate")
    assert update.skipped_steps == 1
    assert any(not torch.equal(m.weight, before[id(m)]) for m in layers[1:])
    # As if AdamW had never stepped that layer: no state, or state at step 0 with zero moments.
    state = trainer.optimizers[0].state[first.update_param]
    assert not state or (float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any())
    assert all(float(trainer.optimizers[0].state[m.update_param]["step"]) == 1 for m in layers[1:])


def test_a_nonfinite_gradient_stops_a_fused_run_in_backward_when_asked(one_thread):
    from dqt_lightning import Execution, Method, QuantizedUpdate, QuantPrecision
    from dqt_lightning.errors import TrainingStopped
    from tests.conftest import TokenWindows

    model = make_model()
    QuantPrecision(Method(mode="dqt")).convert_module(model)
    layers = list(dqt_layers(model))
    layers[3].update_param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         plugins=[QuantPrecision(execution=Execution(update_in_backward=True, fused_update=True,
                                                                     compile_fused_update=False))],
                         callbacks=[QuantizedUpdate(seed=1, on_nonfinite="stop")])
    with pytest.raises(TrainingStopped, match=r"non-finite gradient at step 0 in model\.layers\.0\."):
        trainer.fit(model, datamodule=TokenWindows())
