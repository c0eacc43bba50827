"""Ternary inference: any mode's weights re-quantized to {-1, 0, 1} inside the context, untouched outside it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dqt_lightning.cli import main
from dqt_lightning.quant.layers import BitLinear, DQTWeight
from dqt_lightning.train.precision import QuantPrecision
from dqt_lightning.quant.ternary import TernaryWeights
from tests.conftest import make_model
from tests.trained import TINY, config_args, trained_runs  # noqa: F401 - trained_runs is a fixture

# Torch on one thread (conftest.one_thread): these models are tiny, and on shared cores two OpenMP threads make
# each small op wait for a descheduled partner (runs several times slower).
pytestmark = pytest.mark.usefixtures("one_thread")


def _converted(mode: str, bits: float = 8, **plugin) -> nn.Module:
    model = make_model(seed=3)
    if mode != "fp":
        QuantPrecision.from_settings(mode=mode, bits=bits, **plugin).convert_module(model)
    return model.model


def _loss(model: nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    return float(nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)))


TOKENS = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("per_row", [False, True])
def test_dqt_8bit_weights_become_ternary_inside_and_come_back_after(per_row):
    model = _converted("dqt", 8, per_row_scale=per_row)
    before = {n: (m.weight.clone(), m.scale.clone()) for n, m in model.named_modules() if isinstance(m, DQTWeight)}
    assert any(int(w.abs().max()) > 1 for w, _ in before.values())  # really 8-bit to start with
    loss = _loss(model, TOKENS)
    with TernaryWeights(model):
        inside = {n: m for n, m in model.named_modules() if isinstance(m, DQTWeight)}
        assert inside.keys() == before.keys()
        for name, layer in inside.items():
            assert set(layer.weight.unique().tolist()) <= {-1, 0, 1}, name
            assert layer.scale.dim() == (2 if per_row else 0)  # least squares per row where the model has rows
        ternary_loss = _loss(model, TOKENS)
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, DQTWeight)):
        assert torch.equal(layer.weight, before[name][0]) and torch.equal(layer.scale, before[name][1])
    assert _loss(model, TOKENS) == loss
    assert ternary_loss != loss


def test_full_precision_projections_run_as_ternary_bitnet_layers_sharing_their_weights():
    model = _converted("fp")
    projections = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n.endswith("_proj")}
    assert projections
    with TernaryWeights(model):
        swapped = {n: m for n, m in model.named_modules() if n in projections}
        for name, layer in swapped.items():
            assert isinstance(layer, BitLinear) and layer.grid.is_ternary, name
            assert layer.weight is projections[name].weight  # no copy of an fp model's weights
        assert type(model.lm_head) is nn.Linear  # the float head stays as it is
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in projections)


def test_bitnet_layers_switch_to_the_ternary_grid_only_inside():
    model = _converted("ste", 4)
    with TernaryWeights(model):
        grids = [m.grid for m in model.modules() if isinstance(m, BitLinear)]
        assert grids and all(g.is_ternary for g in grids)
    assert all(m.grid.qmax == 7 for m in model.modules() if isinstance(m, BitLinear))


def test_validate_a_dqt_8bit_checkpoint_reports_both_losses(tmp_path, trained_runs, capsys, monkeypatch):
    ckpt = trained_runs.checkpoint("dqt-8bit")  # the session's dqt-8bit run (tests/trained.py)
    monkeypatch.chdir(tmp_path)  # validate's own run directory lands here
    capsys.readouterr()
    main(["validate", *config_args("dqt-8bit"), *TINY, "--data.init_args.cache_dir", trained_runs.data_cache,
          "--ckpt_path", str(ckpt), "--model.init_args.ternary_eval", "true"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[validate]")]
    own = next(line for line in lines if "final validation loss" in line)
    ternary = next(line for line in lines if "re-quantized to ternary" in line)
    own_loss, ternary_loss = (float(line.split("nats/token")[0].split()[-1]) for line in (own, ternary))
    assert 0 < own_loss < 8 and 0 < ternary_loss < 8 and own_loss != ternary_loss
