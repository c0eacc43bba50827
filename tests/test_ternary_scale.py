"""The scale of ternary inference: least squares is exact on a model that is already ternary and never worse than
BitNet's absmean anywhere; absmean stays as a named option; validation reports both for a DQT model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dqt_lightning.quant.grid import TernaryGrid, absmean_quantize
from dqt_lightning.quant.layers import DQTWeight
from dqt_lightning.quant.ternary import TernaryWeights, ternary_levels
from dqt_lightning.train.precision import Method, QuantPrecision
from tests.conftest import make_model

TOKENS = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(2))


def _ternary_dqt_model(per_row: bool) -> nn.Module:
    model = make_model(seed=5).model
    QuantPrecision(Method(mode="dqt", bits=1.58, per_row_scale=per_row)).convert_module(model)
    # Scales that are not the absmean of the levels, as training with absmax or per-row scales leaves them.
    for layer in model.modules():
        if isinstance(layer, DQTWeight):
            layer.scale.mul_(torch.rand(layer.scale.shape, generator=torch.Generator().manual_seed(0)) + 0.5)
    return model


@pytest.mark.parametrize("per_row", [False, True])
def test_ternary_inference_of_a_ternary_dqt_model_is_the_identity(per_row):
    model = _ternary_dqt_model(per_row)
    with torch.no_grad():
        logits = model(TOKENS)
        with TernaryWeights(model):
            ternary = model(TOKENS)
        with TernaryWeights(model, scale="absmean"):
            absmean = model(TOKENS)
    assert torch.equal(ternary, logits)
    # BitNet's absmean scale is alpha times the share of non-zero levels: another model.
    assert not torch.allclose(absmean, logits, atol=1e-3)


@pytest.mark.parametrize("per_row", [False, True])
def test_least_squares_scale_never_has_a_larger_error_than_absmean(per_row):
    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        w = torch.randn(48, 64, generator=generator) * (0.01 + trial / 10)
        if trial % 2:
            w = w ** 3  # heavy tails, where the two rules differ most
        q, alpha = ternary_levels(w, per_row=per_row)
        q_ref, alpha_ref = absmean_quantize(w, TernaryGrid)
        if not per_row:
            assert torch.equal(q, q_ref)  # the same levels, BitNet's; only the scale differs
        error = (w - alpha * q.float()).square().sum()
        error_absmean = (w - alpha_ref * q_ref.float()).square().sum()
        assert error <= error_absmean * (1 + 1e-6), trial


def test_absmean_option_is_bitnets_quantizer():
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    q, alpha = ternary_levels(w, scale="absmean")
    q_ref, alpha_ref = absmean_quantize(w, TernaryGrid)
    assert torch.equal(q, q_ref) and torch.equal(alpha, alpha_ref)
    with pytest.raises(ValueError, match="least_squares, absmean"):
        TernaryWeights(nn.Sequential(), scale="median")


def test_a_ternary_dqt_checkpoint_validates_to_the_same_loss_with_ternary_eval():
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from dqt_lightning import LanguageModel, QuantizedUpdate
    from dqt_lightning.model import Config

    torch.manual_seed(0)
    tokens = torch.randint(0, 128, (16, 17))
    model = LanguageModel(Config(n_layer=2, n_head=2, n_embd=32, intermediate_size=64), vocab_size=128,
                          warmup_steps=0, ternary_eval=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         plugins=[QuantPrecision(Method(mode="dqt", bits=1.58))], callbacks=[QuantizedUpdate()])
    trainer.fit(model, DataLoader(tokens, batch_size=4), DataLoader(tokens, batch_size=4))
    metrics = trainer.validate(model, DataLoader(tokens, batch_size=4), verbose=False)[0]
    assert abs(metrics["val/loss_ternary"] - metrics["val/loss"]) <= 1e-4
    assert abs(metrics["val/loss_ternary_absmean"] - metrics["val/loss"]) > 1e-3
