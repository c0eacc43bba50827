"""The tools' one parser: a function's signature and docstring are its command line."""

from __future__ import annotations

from typing import Literal

import pytest

from dqt_lightning import commands
from dqt_lightning.commands import run
from dqt_lightning.errors import ConfigError

called: dict = {}


def toy(model: str, max_new_tokens: int = 3, mode: Literal["a", "b"] = "a", seeds: list[int] | None = None,
        pack: bool = False, fit_args: list[str] | None = None) -> int:
    """Do the toy thing.

    Args:
        model: what to work on
        max_new_tokens: how many
        mode: which way
        seeds: one or more seeds
        pack: pack it
        fit_args: what follows --
    """
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0; got {max_new_tokens}")
    called.update(model=model, max_new_tokens=max_new_tokens, mode=mode, seeds=seeds, pack=pack, fit_args=fit_args)
    return 0


@pytest.fixture
def with_toy(monkeypatch):
    monkeypatch.setitem(commands.TOOLS, "toy", f"{__name__}:toy")
    called.clear()


def test_the_signature_is_the_command_line(with_toy):
    assert run(["toy", "m", "--max-new-tokens", "5", "--mode", "b", "--seeds", "1", "2", "--pack"]) == 0
    assert called == dict(model="m", max_new_tokens=5, mode="b", seeds=[1, 2], pack=True, fit_args=None)
    argv = ["toy", "m", "--pack", "false", "--seeds", "1", "--seeds", "2", "3", "--", "--trainer.max_steps", "9"]
    assert run(argv) == 0
    assert called == dict(model="m", max_new_tokens=3, mode="a", seeds=[1, 2, 3], pack=False,
                          fit_args=["--trainer.max_steps", "9"])


@pytest.mark.parametrize("argv,says", [
    (["m", "--max-new-tokens", "x"], "--max-new-tokens: 'x' is not an int"),
    (["m", "--mode", "c"], "--mode: 'c' is not one of a, b"),
    (["m", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    ([], "missing the argument model"),
    (["m", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0; got -1"),
])
def test_a_mistake_is_one_line_and_exit_code_2(with_toy, capsys, argv, says):
    try:
        code = run(["toy", *argv])
    except SystemExit as done:  # the parser's own refusals exit; the tool's return
        code = done.code
    assert code == 2 and capsys.readouterr().err == f"error: {says}\n" and not called


def test_help_comes_from_the_docstring(with_toy, capsys):
    with pytest.raises(SystemExit):
        run(["toy", "--help"])
    out = capsys.readouterr().out
    assert "Do the toy thing." in out and "--max-new-tokens" in out and "one or more seeds" in out
    assert "fit_args" not in out and "fit-args" not in out


def test_every_tool_is_a_plain_function_in_the_one_parser(capsys):
    parser = commands.parser()  # imports every tool and builds its subcommand: a bad signature fails here
    for name in commands.TOOLS:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([name, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: python -m dqt_lightning") and f" {name} " in out.splitlines()[0]
