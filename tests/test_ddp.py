"""Two-process DDP on CPU (gloo): quantized replicas stay bit-identical, and the replica check catches drift.

All the runs share one launch of two processes (tests/ddp_runs.py: each run is ``python -m dqt_lightning fit``'s
main(), one after another): imports, the embedded corpus and the process group are paid for once, not per run. The
run meant to fail, whose replicas draw different noise, goes last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = 30
# Two layers of the tiny model's shape, narrower: the gradients each step all-reduces are 64 KB instead of 3.4 MB
# (one DDP bucket either way); replicas, noise and the checks see the same code.
SMALL_MODEL = ["--model.init_args.config.n_layer", "2", "--model.init_args.config.n_embd", "32",
               "--model.init_args.config.n_head", "2", "--model.init_args.config.intermediate_size", "64"]
EVERY_STEP = {"check_replicas_every_n_steps": 1}
# run name: (base config, the plugin's init_args changed (by block), QuantizedUpdate's init_args)
IDENTICAL = {
    "ternary": ("ternary.yaml", None, EVERY_STEP),
    "8bit": ("ternary.yaml", {"method": {"bits": 8}}, EVERY_STEP),
    "8bit-nearest": ("ternary.yaml", {"method": {"bits": 8, "rounding": "nearest"}}, EVERY_STEP),
    "bitnet": ("bitnet.yaml", None, EVERY_STEP),
    # The fused update's counter-based noise must agree across ranks too (eager: the same function, no compile time).
    "ternary-fused": ("ternary.yaml", {"execution": {"fused_update": True, "compile_fused_update": False}},
                      EVERY_STEP),
}
# bf16 gradient buffers on both sides: the per-layer average in backward must round like the one-bucket one.
IN_BACKWARD = {arm: ("ternary.yaml",
                     {"execution": {"grad_dtype": "bfloat16", "update_in_backward": arm == "in-backward"}},
                     EVERY_STEP) for arm in ("usual", "in-backward")}
DIFFERENT_NOISE = {"different-noise": ("ternary.yaml", None, {"check_replicas_every_n_steps": 5,
                                                              "shared_noise": False})}
RUNS = {**IDENTICAL, **IN_BACKWARD, **DIFFERENT_NOISE}  # the failing run last: it ends the launch


def _config(directory: Path, base: str, plugin: dict | None, update_args: dict) -> Path:
    config = yaml.safe_load((REPO / "configs" / base).read_text())
    init_args = config["trainer"]["plugins"]["init_args"]
    for block, values in (plugin or {}).items():
        init_args.setdefault(block, {}).update(values)
    # Either way, so that both arms of a comparison run unclipped.
    if "update_in_backward" in init_args.get("execution", {}):
        config["trainer"]["gradient_clip_val"] = None
    config["trainer"]["callbacks"] = [
        {"class_path": "dqt_lightning.QuantizedUpdate", "init_args": update_args},
        {"class_path": "tests.helpers.SaveReplica", "init_args": {"directory": str(directory)}},
    ]
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, data_cache) -> tuple[subprocess.CompletedProcess, dict[str, Path]]:
    root = tmp_path_factory.mktemp("ddp")
    plan, dirs = [], {}
    for name, (base, plugin, update_args) in RUNS.items():
        dirs[name] = directory = root / name
        directory.mkdir()
        config = _config(directory, base, plugin, update_args)
        plan.append({"name": name, "dir": str(directory), "args": [
            "--config", str(config), "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false", *SMALL_MODEL, "--data.init_args.vocab_size", "512",
            "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4",
            "--data.init_args.cache_dir", data_cache]})
    (root / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "tests.ddp_runs", str(root / "plan.json")], cwd=root, env=env,
                            capture_output=True, text=True, timeout=900)
    return result, dirs


def _replicas(ddp, name: str) -> tuple[dict, dict]:
    result, dirs = ddp
    files = [dirs[name] / f"rank{r}.pt" for r in (0, 1)]
    assert all(f.exists() for f in files), f"run {name} did not finish: {result.stderr[-3000:]}"
    return torch.load(files[0]), torch.load(files[1])


@pytest.mark.parametrize("name", list(IDENTICAL))
def test_every_rank_holds_identical_weights(name, ddp):
    rank0, rank1 = _replicas(ddp, name)
    assert rank0["step"] == rank1["step"] == STEPS
    assert len(rank0["weights"]) == 2 * 7
    for layer, w0 in rank0["weights"].items():
        assert torch.equal(w0, rank1["weights"][layer]), layer
    if IDENTICAL[name][0] != "bitnet.yaml":
        assert all(w.dtype == torch.int8 for w in rank0["weights"].values())
    # Only rank 0 logs: one run directory, with its TensorBoard events.
    runs = list((ddp[1][name] / "runs").glob("*/version_*"))
    assert len(runs) == 1 and list(runs[0].glob("events.out.tfevents.*"))


def test_the_update_in_backward_under_ddp_matches_the_usual_path(ddp):
    weights = {}
    for arm in IN_BACKWARD:
        rank0, rank1 = _replicas(ddp, arm)
        assert rank0["step"] == STEPS
        assert all(torch.equal(w, rank1["weights"][name]) for name, w in rank0["weights"].items())
        weights[arm] = rank0["weights"]
    for name, w in weights["usual"].items():
        assert torch.equal(w, weights["in-backward"][name]), name


def test_the_replica_check_catches_ranks_that_draw_different_noise(ddp):
    result, dirs = ddp
    assert result.returncode != 0
    # Every run before it finished (only rank 0 reports), and it is this run that stopped the launch.
    assert result.stdout.count("[fit] final validation loss") == len(RUNS) - 1, result.stderr[-3000:]
    _, marker, failing = result.stderr.partition("=== run different-noise ===")
    assert marker and "integer weights differ across DDP ranks after step 4" in failing, result.stderr[-3000:]
    assert not (dirs["different-noise"] / "rank0.pt").exists()
