"""What docs/extending.md promises: a rounding rule written outside the package, in a few lines, trains through the
CLI by its dotted path and is really the rule that rounds; a name that is no rule is one line naming the field."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dqt_lightning.quant import rounding
from dqt_lightning.quant.grid import Grid
from dqt_lightning.quant.step import round_to_grid

REPO = Path(__file__).resolve().parents[1]

# The rule of docs/extending.md, plus one line that records each call (the size of what it rounds) in a file.
RULE = '''
import os

import torch

from dqt_lightning.quant.rounding import register_rounding


@register_rounding("half_away", needs_noise=False)
def half_away(y, u):
    """Round half away from zero: sign(y) * floor(|y| + 0.5)."""
    with open(os.environ["HALF_AWAY_LOG"], "a") as log:
        log.write(f"{y.numel()}\\n")
    return torch.sign(y) * torch.floor(y.abs() + 0.5)
'''


def _python_block(text: str, containing: str) -> str:
    return next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if containing in block)


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "rules"), str(REPO)]),
           "HALF_AWAY_LOG": str(tmp_path / "calls.txt")}
    cmd = [sys.executable, "-m", "dqt_lightning", "fit", "--config", str(REPO / "configs" / "ternary.yaml"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_a_rounding_rule_defined_outside_the_package_trains_through_the_cli(tmp_path, data_cache):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "my_rounding.py").write_text(RULE)
    steps = 3
    result = _run(tmp_path, "--trainer.plugins.init_args.method.rounding", "my_rounding.half_away",
                  "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "2",
                  "--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false",
                  "--data.init_args.vocab_size", "512", "--data.init_args.seq_len", "64",
                  "--data.init_args.batch_size", "4", "--data.init_args.cache_dir", data_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [int(line) for line in (tmp_path / "calls.txt").read_text().split()]
    # The rule rounded every projection (4 blocks x 7) once per optimizer step, each over all its weights.
    sizes = {128 * 128, 128 * 384}
    assert len(calls) == steps * 28 and set(calls) == sizes
    run_dir = next((tmp_path / "runs").glob("*/version_*"))
    assert "rounding: my_rounding.half_away" in (run_dir / "config.yaml").read_text()
    checkpoint = torch.load(next(run_dir.glob("checkpoints/*.ckpt")), map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == steps


def test_an_unknown_rounding_rule_is_one_line_naming_the_field_and_the_known_rules(tmp_path, monkeypatch, capsys):
    from dqt_lightning.cli import main  # in this process: the error comes before anything trains

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "configs" / "ternary.yaml"),
              "--trainer.plugins.init_args.method.rounding", "floor"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: trainer.plugins.method.rounding must be a registered rounding rule (stochastic, "
                      "nearest) or the dotted path of one (package.module.function); got 'floor'"]
    assert not (tmp_path / "runs").exists()


def test_the_rule_in_the_docs_registers_and_rounds_half_away_from_zero(tmp_path, monkeypatch):
    text = (REPO / "docs" / "extending.md").read_text()
    source = _python_block(text, "register_rounding")
    (tmp_path / "docs_rounding.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(rounding._RULES)
    try:
        name = rounding.rounding_rule("docs_rounding.half_away").name
        y = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 0.49, 3.7])
        assert round_to_grid(y, Grid.from_bits(8), name, None).tolist() == [1, -1, 2, 3, -3, 0, 4]
    finally:
        rounding._RULES.clear()
        rounding._RULES.update(before)
        sys.modules.pop("docs_rounding", None)


@pytest.mark.parametrize("path", ["dqt_lightning/quant/rounding.py", "dqt_lightning/quant/step.py",
                                  "dqt_lightning/train/optim.py", "dqt_lightning/train/fused.py"])
def test_the_docs_link_the_modules_they_describe(path):
    assert f"../{path}" in (REPO / "docs" / "extending.md").read_text()


def test_the_optimizer_rule_in_the_docs_trains_fused_and_unfused_alike(tmp_path, monkeypatch, one_thread):
    from functools import partial

    from dqt_lightning.quant.layers import dqt_layers
    from dqt_lightning.train import optim
    from tests.conftest import fit, make_model

    text = (REPO / "docs" / "extending.md").read_text()
    source = _python_block(text, "register_optimizer_rule")
    (tmp_path / "docs_optim.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import docs_optim

        lion = partial(docs_optim.Lion, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, state_dtype="bfloat16")
        usual, fused = make_model(optimizer=lion), make_model(optimizer=lion)
        start = [layer.weight.clone() for layer in dqt_layers(make_model_converted())]
        fit(usual, bits=8, steps=4)
        fit(fused, bits=8, steps=4, fused_update=True, compile_fused_update=False)
        for a, b in zip(dqt_layers(usual), dqt_layers(fused)):
            assert torch.equal(a.weight, b.weight)
        assert sum(int((s != layer.weight).sum()) for s, layer in zip(start, dqt_layers(usual))) > 100
    finally:
        optim.OPTIMIZER_RULES.pop("lion", None)
        sys.modules.pop("docs_optim", None)


def make_model_converted():
    from dqt_lightning import Method, QuantPrecision
    from tests.conftest import make_model

    model = make_model()
    QuantPrecision(Method(bits=8)).convert_module(model)
    return model
