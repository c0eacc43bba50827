"""``export --format hf`` without the optional ``transformers`` package: one line naming the extra that installs it,
exit 2, nothing written. (With the package, tests/test_export_hf.py checks the directory against transformers' own
loader; those tests run in the interop step.)"""

from __future__ import annotations

import importlib.util

import pytest

from dqt_lightning.cli import main


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
