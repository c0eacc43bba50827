"""Two-process DDP on CPU (gloo): quantized replicas stay bit-identical, and the replica check catches drift."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = 30


def _config(tmp_path: Path, base: str, plugin: dict | None, update_args: dict) -> Path:
    config = yaml.safe_load((REPO / "configs" / base).read_text())
    config["trainer"]["plugins"]["init_args"].update(plugin or {})
    if "update_in_backward" in (plugin or {}):  # either way, so that both arms of a comparison run unclipped
        config["trainer"]["gradient_clip_val"] = None
    config["trainer"]["callbacks"] = [
        {"class_path": "dqt_lightning.QuantizedUpdate", "init_args": update_args},
        {"class_path": "tests.helpers.SaveReplica", "init_args": {"directory": str(tmp_path)}},
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit_ddp(tmp_path: Path, config: Path, data_cache: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dqt_lightning", "fit", "--config", str(config),
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar",
           "false", "--data.init_args.vocab_size", "512", "--data.init_args.seq_len", "32",
           "--data.init_args.batch_size", "4", "--data.init_args.cache_dir", data_cache]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("base,plugin", [
    ("ternary.yaml", None), ("dqt-8bit.yaml", None), ("dqt-8bit.yaml", {"rounding": "nearest"}), ("bitnet.yaml", None),
    # The fused update's counter-based noise must agree across ranks too (eager: the same function, no compile time).
    ("ternary.yaml", {"fused_update": True, "compile_fused_update": False}),
], ids=["ternary", "8bit", "8bit-nearest", "bitnet", "ternary-fused"])
def test_every_rank_holds_identical_weights(base, plugin, tmp_path, data_cache):
    config = _config(tmp_path, base, plugin, {"check_replicas_every_n_steps": 1})
    result = _fit_ddp(tmp_path, config, data_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["step"] == rank1["step"] == STEPS
    assert len(rank0["weights"]) == 28
    for name, w0 in rank0["weights"].items():
        assert torch.equal(w0, rank1["weights"][name]), name
    if base != "bitnet.yaml":
        assert all(w.dtype == torch.int8 for w in rank0["weights"].values())
    # Only rank 0 logs: one run directory, with its TensorBoard events.
    runs = list((tmp_path / "runs").glob("*/version_*"))
    assert len(runs) == 1 and list(runs[0].glob("events.out.tfevents.*"))


def test_the_update_in_backward_under_ddp_matches_the_usual_path(tmp_path, data_cache):
    # bf16 gradient buffers on both sides: the per-layer average in backward must round like the one-bucket one.
    weights = {}
    for arm in ("usual", "in-backward"):
        directory = tmp_path / arm
        directory.mkdir()
        plugin = {"grad_dtype": "bfloat16", "update_in_backward": arm == "in-backward"}
        config = _config(directory, "ternary.yaml", plugin, {"check_replicas_every_n_steps": 1})
        result = _fit_ddp(directory, config, data_cache)
        assert result.returncode == 0, result.stderr[-3000:]
        rank0, rank1 = (torch.load(directory / f"rank{r}.pt") for r in (0, 1))
        assert all(torch.equal(w, rank1["weights"][name]) for name, w in rank0["weights"].items())
        weights[arm] = rank0["weights"]
    for name, w in weights["usual"].items():
        assert torch.equal(w, weights["in-backward"][name]), name


def test_the_replica_check_catches_ranks_that_draw_different_noise(tmp_path, data_cache):
    config = _config(tmp_path, "ternary.yaml", None, {"check_replicas_every_n_steps": 5, "shared_noise": False})
    result = _fit_ddp(tmp_path, config, data_cache)
    assert result.returncode != 0
    assert "integer weights differ across DDP ranks after step 4" in result.stderr
    assert not (tmp_path / "rank0.pt").exists()
