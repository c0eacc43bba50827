"""``export --format gguf`` without the optional ``gguf`` package: one line naming the extra that installs it, exit 2,
nothing written. (With the package, tests/test_export_gguf.py checks the file against gguf's and llama.cpp's
readers; those tests run in the interop step.)"""

from __future__ import annotations

import importlib.util

import pytest

from dqt_lightning.cli import main


def test_gguf_export_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec

    def hide_gguf(name, *args, **kwargs):
        return None if name == "gguf" else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hide_gguf)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not read: the missing package is reported first")
    out = tmp_path / "model.gguf"
    with pytest.raises(SystemExit) as done:
        main(["export", str(ckpt), "--format", "gguf", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1
    assert err == ("error: export --format gguf needs the optional package 'gguf': pip install -e '.[gguf]' "
                   "(or pip install gguf)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
