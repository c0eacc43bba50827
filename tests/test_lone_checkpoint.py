"""A checkpoint describes itself: copied alone into an empty directory, `export`, `generate` and `validate` work on it
(the method from the precision plugin's saved state, the tokenizer from inside the checkpoint); checkpoints written
before it did still export through their run's config.yaml."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dqt_lightning.cli import main as cli_main
from dqt_lightning.commands import run as run_tool
from dqt_lightning.tools import loading
from dqt_lightning.train.checkpoint import METHOD_KEY, TOKENIZER_KEY

REPO = Path(__file__).resolve().parents[1]
FIT = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
       "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An 8-bit DQT run of two steps (8-bit, so that a reader that fell back to ternary would be caught)."""
    root = tmp_path_factory.mktemp("lone")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        cli_main(["fit", "--config", str(REPO / "configs/ternary.yaml"), "--config", str(REPO / "configs/bits/8.yaml"),
                  *FIT])
    return next(root.glob("runs/*/version_0"))


@pytest.fixture
def lone(run_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "alone" / "model.ckpt"
    path.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", path)
    return path


def test_the_checkpoint_records_the_method_and_the_tokenizer(lone: Path):
    ckpt = torch.load(lone, map_location="cpu", weights_only=True)
    assert ckpt[METHOD_KEY]["method"] == {"mode": "dqt", "bits": 8.0, "symmetric": False, "rounding": "stochastic",
                                          "per_row_scale": False, "scale_policy": "fixed",
                                          "quantize_embeddings": False,
                                          "ste_warmup_steps": 0}
    assert ckpt[METHOD_KEY]["execution"]["precision"] == "32-true"
    assert ckpt[TOKENIZER_KEY]["file"] == "tokenizer.json"
    assert ckpt[TOKENIZER_KEY]["data"].dtype == torch.uint8


def test_export_and_generate_work_on_a_checkpoint_alone(lone: Path, run_dir: Path, capsys):
    assert sorted(p.name for p in lone.parent.iterdir()) == ["model.ckpt"]
    assert run_tool(["export", str(lone)]) == 0
    out = lone.parent / "model-export"
    assert json.loads((out / "config.json").read_text())["quantization"]["mode"] == "dqt"
    assert json.loads((out / "config.json").read_text())["quantization"]["integer_weights"]
    # The tokenizer came out of the checkpoint, byte for byte the run's own.
    assert (out / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()
    model, _ = loading.model_from_checkpoint(lone)
    levels = model.layers[0].attn.q_proj.weight
    assert levels.dtype == torch.int8 and int(levels.abs().max()) > 1  # 8-bit levels, not ternary
    capsys.readouterr()
    argv = ["--prompt", "The", "--max-new-tokens", "5", "--temperature", "0"]
    assert run_tool(["generate", str(lone), *argv]) == 0
    from_checkpoint = capsys.readouterr().out
    assert run_tool(["generate", str(out), *argv]) == 0
    assert capsys.readouterr().out == from_checkpoint and from_checkpoint.startswith("The")


def test_validate_works_on_a_checkpoint_alone(lone: Path, monkeypatch, capsys):
    monkeypatch.chdir(lone.parent)
    cli_main(["validate", "--config", str(REPO / "configs/ternary.yaml"), "--config", str(REPO / "configs/bits/8.yaml"),
              "--ckpt_path", str(lone), *FIT[2:]])
    assert "final validation loss" in capsys.readouterr().out


def test_a_checkpoint_without_the_record_exports_through_its_run_config(run_dir: Path, tmp_path: Path):
    old_run = tmp_path / "run"
    shutil.copytree(run_dir, old_run)
    ckpt_path = old_run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    del ckpt[METHOD_KEY], ckpt[TOKENIZER_KEY]
    torch.save(ckpt, ckpt_path)
    model, settings = loading.model_from_checkpoint(ckpt_path)
    assert settings["mode"] == "dqt" and settings["bits"] == 8.0
    assert run_tool(["export", str(ckpt_path)]) == 0
    assert (old_run / "export" / "tokenizer.json").is_file()  # from the run directory, as before
