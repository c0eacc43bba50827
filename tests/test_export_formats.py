"""Bad input to the commands that read a trained model (``export`` in every format, ``eval``, ``generate``): one line
naming the option or file, exit 2, nothing written. ``export --format hf`` without the optional ``transformers``
or ``--format gguf`` without ``gguf`` names the extra that installs it. (With the packages, tests/test_export_hf.py
and tests/test_export_gguf.py check the output against transformers', gguf's and llama.cpp's own readers; those tests
run in the interop step.)"""

from __future__ import annotations

import importlib.util

import pytest

from dqt_lightning.cli import main
from tests.trained import trained_runs  # noqa: F401 - a fixture


@pytest.mark.parametrize("fmt,package,extra,output", [("hf", "transformers", "hf", "last-export-hf"),
                                                        ("gguf", "gguf", "gguf", "model.gguf")])
def test_an_export_without_its_optional_package_names_the_extra(tmp_path, monkeypatch, capsys, fmt, package, extra,
                                                                output):
    find_spec = importlib.util.find_spec

    def hide(name, *args, **kwargs):
        return None if name == package else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hide)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not read: the missing package is reported first")
    with pytest.raises(SystemExit) as done:
        main(["export", str(ckpt), "--format", fmt, "--output", str(tmp_path / output)])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1
    assert err == (f"error: export --format {fmt} needs the optional package '{package}': pip install -e '.[{extra}]' "
                   f"(or pip install {package})")
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
