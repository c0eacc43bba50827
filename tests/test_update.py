"""The invariants a single process can show: integer-only persistence, one rounding per weight per step, accumulation
equals a larger batch, clipping over both kinds of parameters, the configured optimizer and schedule (SR unbiasedness
is in test_quant.py, replicas in test_ddp.py, resume in test_resume.py)."""

import lightning.pytorch as pl
import pytest
import torch

from dqt_lightning import Method, QuantizedUpdate, QuantPrecision
from dqt_lightning.errors import TrainingStopped
from dqt_lightning.quant.layers import DQTLinear, dqt_layers
from tests.conftest import TokenWindows, fit, make_model


class GradRecorder(pl.Callback):
    """Copies every gradient the optimizer holds when the step begins, before clipping."""

    def __init__(self):
        self.grads, self.lrs = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        self.grads.append({id(p): p.grad.clone() for g in optimizer.param_groups for p in g["params"]
                           if p.grad is not None})


def _float_tensors_like(layer: DQTLinear, module: torch.nn.Module):
    tensors = [*module.state_dict().values(), *module.parameters(), *module.buffers(), layer.update_param.data]
    return [t for t in tensors if t.is_floating_point() and t.shape == layer.weight.shape
            and t.untyped_storage().nbytes() > 4]


def test_invariant_1_weights_persist_only_as_integers():
    model = make_model()
    fit(model, steps=4, bits=8)
    layers = list(dqt_layers(model))
    assert len(layers) == 2 * 7
    for layer in layers:
        assert layer.weight.dtype == torch.int8
        assert _float_tensors_like(layer, model) == []


@pytest.mark.parametrize("plugin,accumulate", [
    ({}, 2),
    ({"fused_update": True, "compile_fused_update": False}, 2),
    ({"update_in_backward": True}, 1),
    ({"update_in_backward": True, "fused_update": True, "compile_fused_update": False}, 1),
    ({"scale_policy": "absmax"}, 2),
], ids=["usual", "fused", "in-backward", "fused-in-backward", "absmax"])
def test_invariant_3_one_rounding_per_weight_per_step(rounding_calls, plugin, accumulate, one_thread):
    # Every path rounds through quant.step.round_to_grid, once per layer and optimizer step, over all its weights.
    calls = rounding_calls
    model = make_model()
    trainer = fit(model, steps=3, accumulate=accumulate, batch_size=8 // accumulate, **plugin)
    update = next(c for c in trainer.callbacks if type(c).__name__ == "QuantizedUpdate")
    n_weights = sum(layer.weight.numel() for layer in dqt_layers(model))
    assert trainer.global_step == 3 and update.n_updates == 3
    assert len(calls) == 3 * 14 and sum(calls) == 3 * n_weights


def test_invariant_5_accumulation_equals_a_larger_batch():
    big, small = GradRecorder(), GradRecorder()
    a, b = make_model(), make_model()
    fit(a, steps=1, batch_size=8, callbacks=[big])
    fit(b, steps=1, batch_size=4, accumulate=2, callbacks=[small])
    grads_a, grads_b = list(big.grads[0].values()), list(small.grads[0].values())
    assert len(grads_a) == len(grads_b) > 14
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-7)
    # Same gradients and the same rounding noise: the integer weights agree except where float summation order puts
    # y + u within ~1e-7 of an integer (expected count here ~0.01).
    mismatches = sum(int((la.weight != lb.weight).sum()) for la, lb in zip(dqt_layers(a), dqt_layers(b)))
    assert mismatches <= 2


class ClippedGrads(torch.optim.SGD):
    """SGD that records the gradients it is handed, i.e. after Lightning has clipped them: the run's optimizer the
    float parameters', and the one-parameter instances that step each quantized weight their own, all in ``seen``."""

    seen: dict = {}

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        ClippedGrads.seen.update({id(p): p.grad.clone() for g in self.param_groups for p in g["params"]
                                  if p.grad is not None})
        super().step()
        return loss


def test_invariant_7_clipping_covers_quantized_and_float_together():
    pre = GradRecorder()
    model = make_model(optimizer=lambda params: ClippedGrads(params, lr=0.1))
    ClippedGrads.seen = {}
    fit(model, steps=1, clip=0.05, callbacks=[pre])
    post = ClippedGrads.seen
    quantized = {id(layer.update_param) for layer in dqt_layers(model)}
    assert quantized <= set(post)
    norm_pre = torch.linalg.vector_norm(torch.stack([g.norm() for g in pre.grads[0].values()]))
    norm_post = torch.linalg.vector_norm(torch.stack([g.norm() for g in post.values()]))
    assert norm_pre > 0.05 and norm_post == pytest.approx(0.05, rel=1e-3)
    # One global factor for every gradient, quantized and float alike.
    factor = 0.05 / norm_pre
    for key, grad in pre.grads[0].items():
        assert torch.allclose(post[key], grad * factor, rtol=1e-3, atol=1e-9)


def test_invariant_8_configured_optimizer_and_schedule_drive_the_quantized_update():
    """SGD with weight decay and a warm-up schedule: each integer weight must move to round(y) with
    y = q - lr_t * (grad + wd * alpha q) / alpha, lr_t the scheduled rate of that step."""
    lr, wd = 0.5, 0.1
    recorder = GradRecorder()
    model = make_model(optimizer=lambda params: torch.optim.SGD(params, lr=lr, weight_decay=wd), warmup_steps=4)
    layers = list(dqt_layers(model.model))  # unconverted yet: conversion happens in fit, so record after
    assert layers == []
    snapshots = []

    class Snapshot(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            snapshots.append([(layer.weight.clone(), layer.scale.clone()) for layer in dqt_layers(pl_module)])

    trainer = fit(model, bits=8, rounding="nearest", steps=2, callbacks=[recorder, Snapshot()])
    layers = list(dqt_layers(model))
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx([lr * 1 / 4, lr * 2 / 4])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr * 3 / 4)
    # Step 1 (the second step) is checked against its starting integers and gradients.
    for layer, (q, alpha) in zip(layers, snapshots[1]):
        grad = recorder.grads[1][id(layer.update_param)]
        w = q.float() * alpha
        y = q.float() + (-(lr / 2) * (grad + wd * w)) / alpha
        expected = torch.round(y).clamp(-128, 127)
        assert torch.equal(layer.weight.float(), expected)


@pytest.mark.parametrize("warmup, warns", [(2, False), (3, False), (4, True)])
def test_a_warm_up_longer_than_the_run_is_warned_about(warmup, warns, recwarn):
    fit(make_model(warmup_steps=warmup), steps=3)
    messages = [str(w.message) for w in recwarn if "model.warmup_steps" in str(w.message)]
    assert messages == ([f"model.warmup_steps ({warmup}) is more than this run's 3 optimizer steps: the learning "
                         "rate never leaves its linear warm-up nor reaches its peak"] if warns else [])


def test_float_parameters_and_quantized_layers_share_one_optimizer():
    model = make_model()
    trainer = fit(model, steps=1)
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(layer.update_param) for layer in dqt_layers(model)} <= held
    assert {id(p) for p in model.parameters()} <= held


def test_missing_quantized_parameters_in_the_optimizer_is_an_error():
    from dqt_lightning.errors import ConfigError

    model = make_model()
    model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match="quantized_parameters"):
        fit(model, steps=1)


class PoisonGradient(pl.Callback):
    """Puts a NaN into one quantized gradient at one step, as a diverging loss would."""

    def __init__(self, step: int):
        self.step, self.before, self.after = step, None, None

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            layer = next(dqt_layers(pl_module))
            layer.update_param.grad[0, 0] = float("nan")
            self.before = [layer.weight.clone() for layer in dqt_layers(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = [layer.weight.clone() for layer in dqt_layers(pl_module)]


def test_a_nonfinite_gradient_skips_the_step_and_never_reaches_the_weights():
    poison = PoisonGradient(step=1)
    model = make_model()
    with pytest.warns(UserWarning, match=r"skipped the update of every parameter at step 1: non-finite gradient in "
                                         r"model\.layers\.0\.attn\.q_proj\.weight$"):
        trainer = fit(model, steps=3, callbacks=[poison])
    update = next(c for c in trainer.callbacks if type(c).__name__ == "QuantizedUpdate")
    assert update.skipped_steps == 1 and trainer.global_step == 3
    assert all(torch.equal(a, b) for a, b in zip(poison.before, poison.after))  # nothing moved at the bad step
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nonfinite_gradient_can_stop_the_run_naming_step_and_layer():
    model = make_model()
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         plugins=[QuantPrecision(Method(mode="dqt"))],
                         callbacks=[QuantizedUpdate(on_nonfinite="stop"), PoisonGradient(step=1)])
    stopped = r"non-finite gradient at step 1 in model\.layers\.0\.attn\.q_proj\.weight; lower the learning rate, "
    with pytest.raises(TrainingStopped, match=stopped + r"or set on_nonfinite: skip$"):
        trainer.fit(model, datamodule=TokenWindows())


def test_the_update_needs_the_quant_precision_plugin(one_thread):
    from dqt_lightning.errors import ConfigError

    model = make_model()
    QuantPrecision(Method(mode="dqt")).convert_module(model)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[QuantizedUpdate()])
    with pytest.raises(ConfigError, match=r"QuantizedUpdate needs trainer.plugins: dqt_lightning.QuantPrecision"):
        trainer.fit(model, datamodule=TokenWindows())


def test_integer_buffers_are_kept_out_of_ddp_broadcasts():
    model = make_model()
    fit(model, steps=1)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    expected = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, DQTLinear)
                for b in ("weight", "scale")}
    assert len(expected) == 28 and expected <= ignored
    assert not any(name in ignored for name, _ in model.named_parameters())  # float weights still sync as usual


def test_flip_rates_reach_the_logger_overall_every_step_and_per_layer_when_it_writes(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    model = make_model()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=6, plugins=[QuantPrecision(Method(mode="dqt"))],
        callbacks=[QuantizedUpdate(seed=11)], logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=2,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=TokenWindows())
    with open(tmp_path / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("dqt/flip_rate")]
    layers = {f"dqt_layers/{name}": module.weight.numel() for name, module in model.named_modules()
              if isinstance(module, DQTLinear)}
    assert [int(row["step"]) for row in rows] == [1, 3, 5]  # the steps the logger writes, as with any metric
    for row in rows:
        # Every per-layer rate is there, and together they make up the overall rate.
        per_layer = sum(float(row[key]) * size for key, size in layers.items()) / sum(layers.values())
        assert per_layer == pytest.approx(float(row["dqt/flip_rate"]), rel=1e-5)
        assert float(row["dqt/flip_rate"]) > 0


def test_absmax_scale_policy_follows_the_weights_every_step(one_thread):
    class Scales(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            layer = next(dqt_layers(pl_module))
            self.seen.append(layer.scale.clone())
            stepped_range = layer.weight.abs().amax(dim=1)
            assert int(stepped_range.min()) == 127  # every row's largest weight sits on the grid's edge

    scales = Scales()
    model = make_model()
    fit(model, bits=8, steps=4, per_row_scale=True, scale_policy="absmax", callbacks=[scales])
    assert len(scales.seen) == 4
    assert all(not torch.equal(a, b) for a, b in zip(scales.seen, scales.seen[1:]))
    assert all(layer.weight.dtype == torch.int8 for layer in dqt_layers(model))


def test_scale_policy_is_checked():
    from dqt_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.plugins.method.scale_policy must be one of fixed, absmax"):
        QuantPrecision(Method(scale_policy="rescale"))
    with pytest.raises(ConfigError, match="scale_policy applies to DQT weights only"):
        QuantPrecision(Method(mode="ste", scale_policy="absmax"))
