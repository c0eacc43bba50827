"""Tests for the lean-state AdamW: float32 equals torch's, bf16 and 8-bit states are unbiased, compact, resumable."""

from __future__ import annotations

import copy
import functools
import importlib
import io
import math
from dataclasses import replace

import pytest
import torch

from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.layers import quantized_parameters
from dqt_lightning.tools.memory import quantized_state_bytes
from dqt_lightning.model import LLaMA
from dqt_lightning.quant.rounding import noise_keys
from dqt_lightning.train.moments import (
    SIGNED_RANGE_LOG2,
    SIGNED_TOP,
    UNSIGNED_RANGE_LOG2,
    UNSIGNED_TOP,
    dequantize_blockwise,
    quantize_blockwise,
    stochastic_round_bf16,
)
from dqt_lightning.train import optim
from dqt_lightning.train.optim import OPTIMIZER_RULES, AdamW, adamw_update, optimizer_rule
from tests.conftest import SMALL, TokenWindows, fit, make_model
from tests.test_cli import parse

KINDS = ("float32", "bfloat16", "int8")
SIGNED_SPACING = 2 ** (SIGNED_RANGE_LOG2 / (SIGNED_TOP - 1)) - 1  # relative gap between neighbouring levels, ~9 %
UNSIGNED_SPACING = 2 ** (UNSIGNED_RANGE_LOG2 / (UNSIGNED_TOP - 1)) - 1


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    # A matrix whose size is no multiple of the block size (a partial last block) and a vector.
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(37, 53, generator=gen)), torch.nn.Parameter(torch.randn(53, generator=gen))]


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": [params[0]]}, {"params": [params[1]], "weight_decay": 0.0}]


def _train(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, first_step: int = 0,
           scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    # Gradients depend on the step index only, so a resumed run sees the ones an uninterrupted run would.
    for step in range(first_step, first_step + steps):
        gen = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * (1 + step % 3)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def test_float32_states_match_torch_adamw_bit_for_bit() -> None:
    ours, theirs = _params(), _params()
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours_opt = AdamW(_groups(ours), state_dtype="float32", **settings)
    theirs_opt = torch.optim.AdamW(_groups(theirs), **settings)
    # A warm-up schedule changes group["lr"] every step: both must read it.
    ours_sched = torch.optim.lr_scheduler.LambdaLR(ours_opt, lambda s: (s + 1) / 4)
    theirs_sched = torch.optim.lr_scheduler.LambdaLR(theirs_opt, lambda s: (s + 1) / 4)
    _train(ours_opt, ours, 8, scheduler=ours_sched)
    _train(theirs_opt, theirs, 8, scheduler=theirs_sched)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(ours_opt.state[a]["exp_avg"], theirs_opt.state[b]["exp_avg"])
        assert torch.equal(ours_opt.state[a]["exp_avg_sq"], theirs_opt.state[b]["exp_avg_sq"])
        assert ours_opt.state[a]["step"] == 8


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_lean_states_stay_close_to_float32_adamw(kind: str) -> None:
    reference, lean = _params(), _params()
    settings = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    _train(torch.optim.AdamW(_groups(reference), **settings), reference, 10)
    _train(AdamW(_groups(lean), state_dtype=kind, **settings), lean, 10)
    # Ten steps move each weight by up to 10 lr; the rounding of the states may change that by a small share.
    drift = (lean[0] - reference[0]).abs().detach() / 1e-2
    assert drift.mean() < (0.02 if kind == "bfloat16" else 0.2)
    assert 0 < drift.max() < 2.0


def _key(seed: int) -> torch.Tensor:
    return noise_keys(seed)[1]


def test_bf16_stochastic_rounding_is_unbiased() -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(64, generator=gen) + 1.0) * torch.tensor([1.0, -1.0]).repeat(32)  # |x| in [1, 2): bf16 step 2**-7
    draws = 4000
    rounded = stochastic_round_bf16(x.expand(draws, -1).contiguous(), _key(0)).float()
    lower = x.abs().to(torch.bfloat16).float()  # may be above or below |x|: the two neighbours are within one step
    assert ((rounded.abs() - x.abs()).abs() < 2**-7).all()
    assert set(rounded[:, 0].unique().tolist()) <= {rounded[:, 0].min().item(), rounded[:, 0].max().item()}
    # One draw errs by at most 2**-7; the mean of 4000 by ~2**-8 / sqrt(4000) ~ 6e-5. Nearest rounding would be off
    # by up to 2**-8 ~ 4e-3 on some of these values.
    assert (rounded.mean(0) - x).abs().max() < 4e-4
    assert (lower - x.abs()).abs().max() > 1e-3  # the test values do fall between bf16 levels


def test_bf16_second_moment_decays_where_nearest_rounding_would_freeze() -> None:
    # With beta2 = 0.999 each step changes v by 0.1 %, less than half a bf16 step (0.2 %): round-to-nearest would
    # keep v at its first value for ever. Stochastic rounding follows float32 in expectation.
    results = {}
    for kind in ("float32", "bfloat16"):
        p = torch.nn.Parameter(torch.zeros(1024))
        optimizer = AdamW([p], lr=0.0, betas=(0.9, 0.999), weight_decay=0.0, state_dtype=kind, seed=3)
        p.grad = torch.ones(1024)
        optimizer.step()
        p.grad = torch.zeros(1024)
        for _ in range(400):
            optimizer.step()
        results[kind] = optimizer.state[p]["exp_avg_sq"].float()
    first = 1e-3
    assert results["float32"][0].item() == pytest.approx(first * 0.999**400, rel=1e-4)  # 0.67 of the first value
    assert results["bfloat16"].mean().item() == pytest.approx(first * 0.999**400, rel=0.01)
    assert results["bfloat16"].max().item() < 0.8 * first


def _moments(n_blocks: int = 64, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    # Moments as in a weight matrix: Gaussian entries whose scale varies 100x between blocks and 10x within one.
    gen = torch.Generator().manual_seed(0)
    row_scale = torch.logspace(-4, -2, n_blocks).unsqueeze(1)
    within = torch.logspace(0, 1, block)[torch.randperm(block, generator=gen)]
    m = torch.randn(n_blocks, block, generator=gen) * row_scale * within
    v = (torch.randn(n_blocks, block, generator=gen) * row_scale * within) ** 2 + 0.1 * m**2
    return m, v


@pytest.mark.parametrize("signed", [True, False])
def test_int8_codes_reconstruct_moments_within_one_level(signed: bool) -> None:
    m, v = _moments()
    x = m if signed else v
    codes, scales = quantize_blockwise(x, 256, signed, _key(1))
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == x.shape
    assert scales.shape == (x.numel() // 256,) and scales.dtype == torch.float32
    y = dequantize_blockwise(codes, scales, 256)
    spacing, range_log2 = (SIGNED_SPACING, SIGNED_RANGE_LOG2) if signed else (UNSIGNED_SPACING, UNSIGNED_RANGE_LOG2)
    in_range = x.abs() >= scales.repeat_interleave(256).view(x.shape) * 2**-range_log2
    relative = ((y - x).abs() / x.abs())[in_range]
    assert in_range.float().mean() > 0.99
    assert relative.max() <= spacing * 1.001  # one of the two neighbouring levels
    assert relative.median() < spacing / 2
    assert torch.equal(torch.sign(y), torch.sign(x))  # no sign flips; no positive second moment decoded as zero
    if not signed:
        # What the update divides by: sqrt(v), with half the relative error.
        assert ((y.sqrt() - x.sqrt()).abs() / x.sqrt()).max() <= 0.046


@pytest.mark.parametrize("signed", [True, False])
def test_int8_codes_are_unbiased(signed: bool) -> None:
    m, v = _moments(n_blocks=2)
    x = m if signed else v
    draws = torch.stack([dequantize_blockwise(*quantize_blockwise(x, 256, signed, _key(seed)), 256)
                         for seed in range(400)])
    spacing = SIGNED_SPACING if signed else UNSIGNED_SPACING
    # One draw errs by at most one level gap; 400 draws average that to ~gap/2/20. Nearest rounding, biased by up to
    # half a gap (4.5 %), fails this.
    relative_bias = ((draws.mean(0) - x).abs() / x.abs()).max()
    assert relative_bias < spacing / 8


def test_int8_zero_block_and_partial_block_round_trip() -> None:
    x = torch.cat([torch.zeros(256), torch.tensor([3.0, -1.5, 0.0])])  # an all-zero block and a 3-element block
    codes, scales = quantize_blockwise(x, 256, True, _key(0))
    assert scales.tolist() == [0.0, 3.0]
    y = dequantize_blockwise(codes, scales, 256)
    assert torch.equal(y[:256], torch.zeros(256)) and y[256].item() == 3.0 and y[258].item() == 0.0
    assert y[257].item() == pytest.approx(-1.5, rel=SIGNED_SPACING)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_state_dict_is_bit_exact(kind: str) -> None:
    """Six steps straight equal three steps, a save through torch.save, a fresh optimizer, a load and three more."""
    settings = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=kind, block_size=64, seed=5)
    straight = _params()
    straight_opt = AdamW(_groups(straight), **settings)
    _train(straight_opt, straight, 6)

    first = _params()
    first_opt = AdamW(_groups(first), **settings)
    _train(first_opt, first, 3)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed_opt = AdamW(_groups(resumed), **{**settings, "seed": 99})  # the checkpoint's seed must win
    resumed_opt.load_state_dict(saved["optimizer"])
    for before, after in zip(first, resumed):
        for key, value in first_opt.state[before].items():
            loaded = resumed_opt.state[after][key]
            if isinstance(value, torch.Tensor):
                assert loaded.dtype == value.dtype and torch.equal(loaded, value), key
            else:
                assert loaded == value
    _train(resumed_opt, resumed, 3, first_step=3)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
        for key, value in straight_opt.state[a].items():
            loaded = resumed_opt.state[b][key]
            assert torch.equal(loaded, value) if isinstance(value, torch.Tensor) else loaded == value


def test_torch_base_class_would_cast_lean_states_to_float32() -> None:
    # Why AdamW.load_state_dict exists: without it a bf16 resume would silently continue with float32 moments.
    params = _params()
    optimizer = AdamW(_groups(params), state_dtype="bfloat16")
    _train(optimizer, params, 1)
    plain = AdamW(_groups(_params()), state_dtype="bfloat16")
    torch.optim.Optimizer.load_state_dict(plain, optimizer.state_dict())
    assert next(iter(plain.state.values()))["exp_avg"].dtype == torch.float32
    ours = AdamW(_groups(_params()), state_dtype="bfloat16")
    ours.load_state_dict(optimizer.state_dict())
    assert next(iter(ours.state.values()))["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_states_keep_their_dtype_when_the_parameter_is_a_placeholder(kind: str) -> None:
    # A DQT update parameter between steps: a zero-stride view of one number, bf16 with bf16 gradient buffers. It is
    # float32 and full-size only inside the step, so a resume loads states while it is a bf16 placeholder.
    def placeholder() -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.zeros((), dtype=torch.bfloat16).expand(16, 32))

    param = placeholder()
    optimizer = AdamW([param], state_dtype=kind, block_size=64)
    param.data = torch.randn(16, 32)
    param.grad = torch.randn(16, 32)
    optimizer.step()
    param.data, param.grad = placeholder().data, None
    saved = {key: value.clone() for key, value in optimizer.state[param].items() if isinstance(value, torch.Tensor)}

    resumed = placeholder()
    resumed_optimizer = AdamW([resumed], state_dtype=kind, block_size=64)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    state = resumed_optimizer.state[resumed]
    for key, value in saved.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
        assert state[key].shape == (16, 32) or key.endswith("_scale")


def test_loading_other_states_converts_them_to_the_configured_dtype() -> None:
    # A run started with torch.optim.AdamW (float32 moments) resumes with 8-bit states, and back.
    settings = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    params = _params()
    torch_optimizer = torch.optim.AdamW(_groups(params), **settings)
    _train(torch_optimizer, params, 3)
    float_moments = {key: torch_optimizer.state[params[0]][key] for key in ("exp_avg", "exp_avg_sq")}

    lean_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lean = AdamW(_groups(lean_params), state_dtype="int8", block_size=64, **settings)
    lean.load_state_dict(torch_optimizer.state_dict())
    state = lean.state[lean_params[0]]
    assert state["step"] == 3 and isinstance(state["step"], int)
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_sq"].dtype == torch.uint8
    assert all(group["state_dtype"] == "int8" for group in lean.param_groups)
    for key, spacing in (("exp_avg", SIGNED_SPACING), ("exp_avg_sq", UNSIGNED_SPACING)):
        decoded = dequantize_blockwise(state[key], state[f"{key}_scale"], 64)
        within_one_level = (decoded - float_moments[key]).abs() <= spacing * float_moments[key].abs() * 1.001
        assert within_one_level.float().mean() > 0.99
    _train(lean, lean_params, 2, first_step=3)

    back = AdamW(_groups([torch.nn.Parameter(p.detach().clone()) for p in lean_params]), **settings)
    back.load_state_dict(lean.state_dict())
    restored = next(iter(back.state.values()))
    lean_state = lean.state[lean_params[0]]
    assert restored["exp_avg"].dtype == torch.float32
    decoded = dequantize_blockwise(lean_state["exp_avg"], lean_state["exp_avg_scale"], 64)
    assert torch.equal(restored["exp_avg"], decoded)


def test_noise_depends_on_the_seed_only() -> None:
    runs = []
    for seed in (1, 1, 2):
        params = _params()
        _train(AdamW(_groups(params), state_dtype="int8", seed=seed), params, 3)
        runs.append(params[0].detach())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(("kind", "bytes_per_param"), [("float32", 8.0), ("bfloat16", 4.0), ("int8", 2 + 8 / 256)])
def test_dqt_training_keeps_lean_states_of_the_logical_shape(kind: str, bytes_per_param: float) -> None:
    """The full Lightning path: DQT update parameters are placeholders between steps, their states full-size."""
    model = make_model(optimizer=functools.partial(AdamW, lr=3e-3, state_dtype=kind))
    trainer = fit(model, mode="dqt", steps=3)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, AdamW)
    for param in quantized_parameters(model.model):
        assert param.data.stride() == (0, 0)  # released: still a 4-byte placeholder
        state = optimizer.state[param]
        assert state["step"] == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == param.shape and state[key].is_contiguous()
    measured = quantized_state_bytes(model, optimizer).per_param()
    assert measured["optimizer_states"] == bytes_per_param  # SMALL's projections are whole blocks of 256


def test_lean_states_train_a_small_model_about_as_well_as_float32() -> None:
    # A plain loop (the Lightning path is covered above) on the learnable +1 pattern: 30 steps, same data and init.
    windows = TokenWindows(n=64, seq_len=16, vocab_size=128).windows
    losses = {}
    for kind in KINDS:
        torch.manual_seed(0)
        model = LLaMA(replace(SMALL, vocab_size=128))
        optimizer = AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), state_dtype=kind, block_size=64, seed=0)
        for step in range(30):
            batch = windows[(step % 8) * 8:(step % 8) * 8 + 8]
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[kind] = loss.item()
    assert losses["float32"] < 0.6 * math.log(128)  # it is learning the pattern (2.58 after 30 steps)
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.1
    assert abs(losses["int8"] - losses["float32"]) < 0.1


@pytest.mark.parametrize(("setting", "field"), [
    ({"state_dtype": "fp8"}, "AdamW.state_dtype"),
    ({"lr": -1.0}, "AdamW.lr"),
    ({"betas": (0.9, 1.0)}, "AdamW.betas"),
    ({"eps": -1e-8}, "AdamW.eps"),
    ({"weight_decay": -0.1}, "AdamW.weight_decay"),
    ({"block_size": 0}, "AdamW.block_size"),
])
def test_bad_settings_are_one_line_config_errors(setting: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as error:
        AdamW(_params(), **setting)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("overlay", "kind"), [("optim/adamw-bf16.yaml", "bfloat16"),
                                               ("optim/adamw-8bit.yaml", "int8")])
def test_overlays_keep_the_base_recipe(overlay: str, kind: str) -> None:
    base = parse("ternary.yaml")["model"]["init_args"]["optimizer"]["init_args"]
    optimizer = parse("ternary.yaml", overlay)["model"]["init_args"]["optimizer"]
    module, _, name = optimizer["class_path"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is AdamW  # jsonargparse may shorten it to dqt_lightning.AdamW
    assert optimizer["init_args"]["state_dtype"] == kind
    for key in ("lr", "betas", "weight_decay"):
        assert optimizer["init_args"][key] == base[key]
    # After a model overlay (which names torch.optim.AdamW itself) the optimizer overlay still wins.
    assert parse("ternary.yaml", "model/130m.yaml", overlay)["model"]["init_args"]["optimizer"]["init_args"][
        "lr"] == 5e-4


def test_optimizer_survives_deepcopy() -> None:
    # Lightning and users may deepcopy or pickle optimizers.
    params = _params()
    optimizer = AdamW(_groups(params), state_dtype="int8")
    _train(optimizer, params, 1)
    clone = copy.deepcopy(optimizer)
    assert clone.state_dict()["param_groups"][0]["state_dtype"] == "int8"


def test_adamw_is_one_registered_rule_that_both_optimizers_find() -> None:
    assert optimizer_rule(torch.optim.AdamW(_params())) is OPTIMIZER_RULES["adamw"]
    assert optimizer_rule(AdamW(_params())) is OPTIMIZER_RULES["adamw"]
    assert optimizer_rule(torch.optim.SGD(_params(), lr=0.1)) is None
    assert OPTIMIZER_RULES["adamw"].update is adamw_update
    # Pure: the inputs are read only (the fused update keeps a skipped layer's old moments).
    w, g, m, v = (torch.randn(8) for _ in range(4))
    v = v.abs()
    before = [t.clone() for t in (w, g, m, v)]
    adamw_update(w, g, m, v, 0.99, 0.9, 0.95, 1e-8, 0.01, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, (w, g, m, v)))


def test_a_subclass_runs_another_registered_rule_with_the_same_states() -> None:
    from dqt_lightning.train.optim import register_optimizer_rule

    @register_optimizer_rule("test_sign_descent", lambda group, step: (float(group["lr"]),))
    def sign_descent(weights, grad, exp_avg, exp_avg_sq, lr):
        return weights - lr * torch.sign(grad), exp_avg, exp_avg_sq

    class SignDescent(AdamW):
        rule = "test_sign_descent"

    try:
        params = _params()
        start = params[0].detach().clone()
        optimizer = SignDescent(params, lr=0.5, state_dtype="bfloat16")
        params[0].grad = torch.randn(params[0].shape)
        optimizer.step()
        assert torch.equal(params[0].detach(), start - 0.5 * torch.sign(params[0].grad))
        assert optimizer_rule(optimizer).name == "test_sign_descent"
    finally:
        del OPTIMIZER_RULES["test_sign_descent"]


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "int8"])
def test_a_large_parameter_steps_in_parts_exactly_as_whole(state_dtype, monkeypatch):
    # 3000 elements: parts of 512 (two blocks of 256) and a last part that ends inside a block.
    results = []
    for chunk in (1 << 20, 512):
        monkeypatch.setattr(optim, "CHUNK", chunk)
        param = torch.nn.Parameter(torch.linspace(-1, 1, 3000).reshape(30, 100))
        opt = optim.AdamW([param], lr=1e-2, state_dtype=state_dtype, seed=5)
        for step in range(3):
            param.grad = torch.sin(torch.arange(3000.0) * (step + 1)).reshape(30, 100)
            opt.step()
        results.append((param.detach().clone(), {k: v.clone() for k, v in opt.state[param].items()
                                                 if torch.is_tensor(v)}))
    (whole, whole_state), (parts, parts_state) = results
    assert torch.equal(whole, parts)
    assert whole_state.keys() == parts_state.keys() and all(torch.equal(whole_state[k], parts_state[k])
                                                            for k in whole_state)
