"""The memory plan: its components equal what a real run holds, its activations what a real forward saves, and fit
refuses a run that would not fit, in one line, before it writes anything."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from dqt_lightning import cli
from dqt_lightning.tools import plan as plan_module
from dqt_lightning.tools.bench import optimizer_for, optimizer_settings, recipe_plugin, state_bytes
from dqt_lightning.tools.memory import StateAtUpdate
from dqt_lightning.tools.plan import RunSettings, activation_bytes, plan, settings_from_config
from dqt_lightning.train.precision import Method, QuantPrecision
from tests.conftest import SMALL, TokenWindows, make_model

import lightning.pytorch as pl

from dqt_lightning import QuantizedUpdate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = ("fp", "ste", "dqt-1.58", "dqt-8", "dqt-1.58-packed-inbwd-adam8", "dqt-1.58-packed-inbwd-factored-ckpt")


def _settings(recipe: str, batch_size: int = 8, seq_len: int = 16) -> RunSettings:
    plugin = recipe_plugin(recipe, "32-true")
    class_path, args = optimizer_settings(recipe)
    return RunSettings(replace(SMALL, vocab_size=128), batch_size, seq_len, plugin.method, plugin.execution,
                       class_path, args)


@pytest.mark.parametrize("recipe", RECIPES)
def test_weights_states_and_gradients_are_those_a_run_holds_at_its_update(recipe, one_thread):
    model = make_model(optimizer=optimizer_for(recipe))
    accounted = StateAtUpdate(state_bytes)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, plugins=[recipe_plugin(recipe, "32-true")],
                         callbacks=[QuantizedUpdate(), accounted], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=TokenWindows())
    weights, grads, states = accounted.last
    predicted = plan(_settings(recipe))
    rope = model.model.rope_cos.nbytes + model.model.rope_sin.nbytes  # buffers the accounting leaves out
    assert predicted.weights == weights + rope
    assert predicted.gradients == grads
    # torch's optimizers keep a 4-byte step count per parameter, which the plan leaves out
    steps = sum(4 for state in trainer.optimizers[0].state.values() if torch.is_tensor(state.get("step")))
    assert predicted.optimizer_states == states - steps


@pytest.mark.parametrize("recipe", ["fp", "ste", "dqt-1.58", "dqt-1.58-packed-int8mm"])
def test_the_activations_counted_on_the_meta_device_are_what_a_real_forward_saves(recipe):
    settings = _settings(recipe, batch_size=4, seq_len=32)
    per_block, outside = activation_bytes(settings, recipe_plugin(recipe, "32-true"))
    model = make_model()
    QuantPrecision(settings.method, settings.execution).convert_module(model)
    persistent = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in persistent:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, 128, (4, 33))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model._loss(tokens)
    assert sum(saved.values()) == outside + SMALL.n_layer * per_block
    assert per_block > 0 and outside > 0


def test_activation_checkpointing_plans_one_block_inside_and_every_block_input():
    plain, checkpointed = _settings("dqt-1.58"), _settings("dqt-1.58-ckpt")
    config = replace(plain.config, n_layer=24)
    a, b = plan(replace(plain, config=config)), plan(replace(checkpointed, config=config))
    per_block, outside = activation_bytes(plain, recipe_plugin("dqt-1.58", "32-true"))
    inputs = 4 * 8 * 16 * config.n_embd * 24
    assert a.activations - b.activations == 23 * per_block - inputs


def test_the_plan_of_a_parsed_config_reads_its_sizes_method_and_optimizer():
    config = {"model": {"init_args": {"config": {"name": "7b", "n_layer": 32, "n_head": 32, "n_embd": 4096,
                                                 "intermediate_size": 11008},
                                      "optimizer": {"class_path": "dqt_lightning.train.optim.AdamW",
                                                    "init_args": {"state_dtype": "int8"}}}},
              "data": {"init_args": {"vocab_size": 32000, "seq_len": 256, "batch_size": 1}},
              "trainer": {"accelerator": "cpu", "plugins": {"class_path": "dqt_lightning.QuantPrecision", "init_args": {
                  "method": {"mode": "dqt", "bits": 1.58}, "execution": {"pack_in_memory": True}}}}}
    settings = settings_from_config(config)
    assert (settings.config.n_embd, settings.config.vocab_size, settings.seq_len, settings.batch_size) == \
        (4096, 32000, 256, 1)
    assert settings.execution.pack_in_memory and settings.optimizer_args == {"state_dtype": "int8"}
    predicted = plan(settings)
    projections = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert predicted.optimizer_states == pytest.approx(2.03 * (projections + 2 * 32000 * 4096), rel=0.01)
    assert predicted.weights == pytest.approx(projections / 4 + 4 * 2 * 32000 * 4096, rel=0.01)


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        cli.main(args)
    return done.value.code, capsys.readouterr().err


FIT_SMALL = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
             "--model.init_args.config.n_layer", "1", "--model.init_args.config.n_embd", "32",
             "--model.init_args.config.n_head", "2", "--model.init_args.config.intermediate_size", "64",
             "--data.init_args.vocab_size", "300", "--data.init_args.seq_len", "16", "--data.init_args.batch_size",
             "2"]


def test_fit_refuses_a_run_the_machine_cannot_hold_and_names_what_fits(tmp_path, monkeypatch, capsys, data_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plan_module, "machine_memory", lambda: 20 * 2**30)
    code, err = _run_cli(["fit", "--config", str(CONFIGS / "ternary.yaml"), "--config", str(CONFIGS / "model/7b.yaml"),
                          "--data.init_args.cache_dir", data_cache], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: this run needs about 83.6 GiB at its peak and this machine has 20.0 GiB")
    assert "it fits with --config configs/recipes/lean.yaml (17.8 GiB) or --config configs/recipes/lean-factored.yaml" \
        in err and err.rstrip().endswith("or add --check_memory false to try anyway")
    assert list(tmp_path.iterdir()) in ([], [tmp_path / ".cache"])  # no run directory, no config.yaml


def test_check_memory_false_lets_a_run_try(tmp_path, monkeypatch, capsys, data_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plan_module, "machine_memory", lambda: 2**20)  # 1 MiB: nothing fits
    args = ["fit", "--config", str(CONFIGS / "ternary.yaml"), *FIT_SMALL, "--data.init_args.cache_dir", data_cache]
    code, err = _run_cli(args, capsys)
    assert code == 2 and "or add --check_memory false to try anyway" in err
    cli.main([*args, "--check_memory", "false"])
    assert (tmp_path / "runs").is_dir()


def test_the_plan_command_prints_the_components_and_refuses_an_unknown_size(capsys):
    cli.main(["plan", "--config", str(CONFIGS / "ternary.yaml"), "--config", str(CONFIGS / "model/7b.yaml"),
              "--config", str(CONFIGS / "recipes/lean.yaml")])
    out = capsys.readouterr().out
    for part in ("runtime", "weights", "optimizer states", "gradients", "activations", "transients", "peak"):
        assert part in out
    assert "7b (d 4096, 32 layers" in out
    code, err = _run_cli(["plan", "--config", str(CONFIGS / "ternary.yaml"), "--size", "70b"], capsys)
    assert (code, err) == (2, "error: --size 70b is not a model size; choose from tiny, 130m, 320m, 1b, 7b\n")


@pytest.mark.parametrize("extra", [["--trainer.accumulate_grad_batches", "4"], ["--trainer.gradient_clip_val", "1.0"]])
def test_the_lean_recipe_refuses_what_it_cannot_do_in_one_line(extra, tmp_path, monkeypatch, capsys, data_cache):
    monkeypatch.chdir(tmp_path)
    code, err = _run_cli(["fit", "--config", str(CONFIGS / "ternary.yaml"), "--config",
                          str(CONFIGS / "recipes/lean.yaml"), *FIT_SMALL, *extra,
                          "--data.init_args.cache_dir", data_cache], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: trainer.plugins.execution.update_in_backward ")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("overlay", "recipe"), [("recipes/lean.yaml", "dqt-1.58-lean-fused-ckpt"),
                                                 ("recipes/lean-factored.yaml",
                                                  "dqt-1.58-packed-inbwd-factored-ckpt")])
def test_the_bench_recipes_are_the_overlays(overlay, recipe):
    base = yaml.safe_load((CONFIGS / "ternary.yaml").read_text())
    laid = plan_module._merged(base, yaml.safe_load((CONFIGS / overlay).read_text()))
    settings = settings_from_config(laid)
    plugin = recipe_plugin(recipe, "32-true")
    assert (settings.method, settings.execution) == (plugin.method, plugin.execution)
    class_path, args = optimizer_settings(recipe)
    assert settings.optimizer == class_path
    assert {k: settings.optimizer_args[k] for k in args} == args
