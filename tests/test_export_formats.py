"""Bad input to the commands that read a trained model (``export`` in every format, ``eval``, ``generate``): one line
naming the option or file, exit 2, nothing written. ``export --format hf`` without the optional ``transformers``
package names the extra that installs it. (With the package, tests/test_export_hf.py checks the directory against
transformers' own loader; those tests run in the interop step.)"""

from __future__ import annotations

import importlib.util

import pytest

from dqt_lightning.cli import main
from tests.trained import trained_runs  # noqa: F401 - a fixture


def test_hf_export_without_transformers_names_the_extra(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec

    def hide_transformers(name, *args, **kwargs):
        return None if name == "transformers" else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hide_transformers)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not read: the missing package is reported first")
    with pytest.raises(SystemExit) as done:
        main(["export", str(ckpt), "--format", "hf"])  # the default --output: last-export-hf beside it
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1
    assert err == ("error: export --format hf needs the optional package 'transformers': pip install -e '.[hf]' "
                   "(or pip install transformers)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# Bad input to the commands that read a trained model: one line each, exit 2, nothing written.

@pytest.fixture
def checkpoint(trained_runs):
    return trained_runs.checkpoint("ternary")


def _one_error_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len([line for line in err.splitlines() if "error:" in line]) == 1, err
    return err.splitlines()[-1]


@pytest.mark.parametrize("command", [["export"], ["eval", "--tasks", "copy"], ["generate", "--prompt", "The"]])
def test_a_file_of_another_format_says_what_it_is(tmp_path, capsys, command):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))  # the magic llama.cpp's files start with
    err = _one_error_line([command[0], str(gguf), *command[1:]], capsys)
    assert err.startswith(f"error: checkpoint {gguf} cannot be read") and "it is a GGUF file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize("command", [["eval", "--tasks", "copy"], ["generate", "--prompt", "The"]])
def test_an_export_directory_missing_its_weights_is_named(tmp_path, capsys, command):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    err = _one_error_line([command[0], str(export), *command[1:]], capsys)
    assert str(export) in err
    assert sorted(p.name for p in export.iterdir()) == ["config.json"]


@pytest.mark.parametrize("flags,named", [(["--format", "onnx"], "--format"), (["--type", "q4_0"], "--type"),
                                         (["--format", "hf", "--type", "tq1_0"], "--type"),
                                         (["--pack", "--format", "gguf"], "--pack")])
def test_an_unknown_or_misplaced_export_option_is_one_line(checkpoint, tmp_path, capsys, flags, named):
    err = _one_error_line(["export", str(checkpoint), "--output", str(tmp_path / "out"), *flags], capsys)
    assert named in err
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_written_is_one_line(checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    err = _one_error_line(["export", str(checkpoint), "--output", str(blocker / "export")], capsys)
    assert err.startswith(f"error: --output {blocker / 'export'} cannot be written")
    err = _one_error_line(["eval", str(checkpoint), "--tasks", "copy", "--output", str(blocker / "eval.json")], capsys)
    assert str(blocker / "eval.json") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and blocker.read_text() == "in the way"
