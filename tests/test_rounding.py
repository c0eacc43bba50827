"""The one noise scheme (counter-based, keyed by run seed, step and layer) and the registry of rounding rules."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from dqt_lightning.errors import ConfigError
from dqt_lightning.quant import rounding
from dqt_lightning.quant.grid import Grid
from dqt_lightning.quant.rounding import (EXP_AVG, WEIGHTS, counter_bits, counter_uniform, noise_keys,
                                          register_rounding, rounding_names, rounding_rule, run_seed, step_seed)
from dqt_lightning.quant.step import round_to_grid


@pytest.fixture
def registry():
    """The rules registered by a test are gone after it."""
    before = dict(rounding._RULES)
    yield
    rounding._RULES.clear()
    rounding._RULES.update(before)


# --- the noise ---------------------------------------------------------------------------------------------------

def test_counter_noise_is_uniform_and_a_pure_function_of_key_and_index():
    keys = noise_keys(step_seed(7, 3, 2))
    u = counter_uniform(keys[WEIGHTS], (1 << 20,))
    assert u.dtype == torch.float32 and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u, bins=64, min=0.0, max=1.0)
    expected = u.numel() / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 120  # 63 degrees of freedom: p < 1e-5 beyond this
    assert torch.equal(u, counter_uniform(noise_keys(step_seed(7, 3, 2))[WEIGHTS], (1 << 20,)))
    # The same numbers whatever the shape: element i of the flat view.
    assert torch.equal(counter_uniform(keys[WEIGHTS], (1 << 10, 1 << 10)).reshape(-1), u)
    # Each of the 32 bits is a fair coin.
    bits = counter_bits(keys[WEIGHTS], (1 << 16,))
    shares = torch.stack([((bits >> b) & 1).float().mean() for b in range(32)])
    assert float((shares - 0.5).abs().max()) < 0.01


def test_neighbouring_steps_layers_and_streams_draw_unrelated_noise():
    n = 1 << 16
    base = counter_uniform(noise_keys(step_seed(0, 10, 5))[WEIGHTS], (n,))
    others = [counter_uniform(noise_keys(step_seed(0, 11, 5))[WEIGHTS], (n,)),   # next step
              counter_uniform(noise_keys(step_seed(0, 10, 6))[WEIGHTS], (n,)),   # next layer
              counter_uniform(noise_keys(step_seed(1, 10, 5))[WEIGHTS], (n,)),   # another run seed
              counter_uniform(noise_keys(step_seed(0, 10, 5))[EXP_AVG], (n,)),   # another stream
              counter_uniform(noise_keys(step_seed(0, 10, 5))[WEIGHTS], (n + 1,))[1:]]  # shifted by one index
    for other in others:
        correlation = float(torch.corrcoef(torch.stack([base, other]))[0, 1])
        assert abs(correlation) < 4 / math.sqrt(n)  # four standard errors of independent samples


def test_the_keys_of_many_seeds_are_each_seeds_keys_and_pairs_mix_two():
    seeds = [step_seed(3, 10, layer) for layer in range(5)]
    many = noise_keys(seeds)
    assert many.shape == (5, 3, 2)
    for index, seed in enumerate(seeds):
        assert torch.equal(many[index], noise_keys(seed))
    # (weights seed, moments seed): the weights' row of the first, the moments' rows of the second.
    pair = noise_keys([(seeds[0], seeds[1])])[0]
    assert torch.equal(pair[0], noise_keys(seeds[0])[0]) and torch.equal(pair[1:], noise_keys(seeds[1])[1:])


def test_run_seed_falls_back_to_the_global_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")
    assert run_seed(None) == 42 and run_seed(7) == 7
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert run_seed(None) == 0


# --- the rules ---------------------------------------------------------------------------------------------------

def test_the_built_in_rules():
    assert rounding_names()[:2] == ("stochastic", "nearest")
    assert rounding_rule("stochastic").needs_noise and not rounding_rule("nearest").needs_noise
    y = torch.tensor([0.25, -0.25, 1.5, 2.5, -1.75])
    u = torch.tensor([0.8, 0.1, 0.4, 0.6, 0.9])
    assert rounding_rule("stochastic").fn(y, u).tolist() == [1.0, -1.0, 1.0, 3.0, -1.0]  # floor(y + u)
    assert rounding_rule("nearest").fn(y, None).tolist() == [0.0, -0.0, 2.0, 2.0, -2.0]  # half to even


def test_a_registered_rule_is_used_by_name_and_a_noiseless_one_gets_no_noise(registry):
    seen = []

    @register_rounding("test_toward_zero", needs_noise=False)
    def toward_zero(y, u):
        seen.append(u)
        return torch.trunc(y)

    y = torch.tensor([1.9, -1.9, 0.4, 9.0])
    assert round_to_grid(y, Grid.from_bits(3), "test_toward_zero", None).tolist() == [1, -1, 0, 3]  # clipped to 3
    assert seen == [None]
    assert "test_toward_zero" in rounding_names()


def test_a_rule_draws_the_noise_of_its_key(registry):
    @register_rounding("test_up_if_noisy")
    def up_if_noisy(y, u):
        return torch.floor(y) + (u > 0.5)

    y = torch.zeros(1000)
    key = noise_keys(5)[WEIGHTS]
    assert torch.equal(round_to_grid(y, Grid.from_bits(8), "test_up_if_noisy", key),
                       (counter_uniform(key, y.shape) > 0.5).to(torch.int8))
    with pytest.raises(ValueError, match="'test_up_if_noisy' draws noise"):
        round_to_grid(y, Grid.from_bits(8), "test_up_if_noisy", None)


def test_a_name_is_registered_once(registry):
    register_rounding("test_once")(lambda y, u: torch.round(y))
    with pytest.raises(ValueError, match="rounding rule 'test_once' is registered already"):
        register_rounding("test_once")(lambda y, u: torch.floor(y))
    with pytest.raises(ValueError, match="rounding rule 'nearest' is registered already"):
        register_rounding("nearest")(lambda y, u: torch.floor(y))


def _write_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_dotted_path_imports_and_registers_a_rule_defined_elsewhere(tmp_path, monkeypatch, registry):
    _write_module(tmp_path, monkeypatch, "my_rules", """
import torch
from dqt_lightning.quant.rounding import register_rounding

@register_rounding("test_ceil", needs_noise=False)
def ceil(y, u):
    return torch.ceil(y)

def floor(y, u):  # not registered: the dotted path registers it under the path
    return torch.floor(y)
floor.needs_noise = False
""")
    assert "test_ceil" not in rounding_names()
    rule = rounding_rule("my_rules.ceil", field="trainer.plugins.method.rounding")
    assert rule.name == "test_ceil" and rounding_rule("test_ceil") is rule  # now known by its name too
    assert "my_rules.ceil" in rounding_names()  # and by its path, without another import (the compiled kernel's lookup)
    assert rounding_rule("my_rules:ceil") is rule
    plain = rounding_rule("my_rules.floor")
    assert plain.name == "my_rules.floor" and not plain.needs_noise
    assert round_to_grid(torch.tensor([0.5, -0.5]), Grid.from_bits(4), "my_rules.floor", None).tolist() == [0, -1]
    assert round_to_grid(torch.tensor([0.5, -0.5]), Grid.from_bits(4), "my_rules.ceil", None).tolist() == [1, 0]


@pytest.mark.parametrize("name,message", [
    ("floor", r"^trainer\.plugins\.method\.rounding must be a registered rounding rule \(stochastic, nearest\) or the dotted "
              r"path of one \(package\.module\.function\); got 'floor'$"),
    ("no_such_module.rule", r"^trainer\.plugins\.method\.rounding: cannot load the rounding rule 'no_such_module\.rule' "
                            r"\(No module named 'no_such_module'\); known rules: stochastic, nearest$"),
    ("math.pi", r"^trainer\.plugins\.method\.rounding: 'math\.pi' is not a function"),
])
def test_an_unknown_rule_is_one_line_naming_the_field_and_the_known_rules(name, message):
    with pytest.raises(ConfigError, match=message) as caught:
        rounding_rule(name, field="trainer.plugins.method.rounding")
    assert "\n" not in str(caught.value)


def test_the_plugin_and_the_schedule_check_their_rounding():
    from dqt_lightning import Method, QuantPrecision
    from dqt_lightning.train.schedule import BitWidthSchedule

    with pytest.raises(ConfigError, match=r"^trainer\.plugins\.method\.rounding must be a registered rounding rule"):
        QuantPrecision(Method(rounding="up"))
    with pytest.raises(ConfigError, match=r"^BitWidthSchedule\.rounding must be a registered rounding rule"):
        BitWidthSchedule([[0.0, 8]], rounding="up")


def test_a_registered_rule_runs_inside_the_compiled_fused_kernel(registry):
    from dqt_lightning.train.fused import compiled_dqt_adamw_step, dqt_adamw_step
    from dqt_lightning.train.moments import init_state

    @register_rounding("test_half_up", needs_noise=False)
    def half_up(y, u):
        return torch.floor(y + 0.5)

    levels = torch.randint(-100, 100, (16, 24), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(levels.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for step_fn in (dqt_adamw_step, compiled_dqt_adamw_step()):
        state: dict = {}
        init_state(state, levels.shape, levels.device, "float32", 64)
        new, *_ = step_fn(levels, torch.tensor(0.01), grad, state["exp_avg"], state["exp_avg_sq"], None, None,
                          noise_keys(1), (1.0, 0.9, 0.95, 1e-8, 0.05, 0.05**0.5), Grid.from_bits(8), "test_half_up", 64)
        results.append(new)
    assert torch.equal(results[0], results[1]) and int((results[0] != levels).sum()) > 100
