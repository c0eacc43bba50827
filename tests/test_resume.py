"""Exact resume (SPEC §3 invariant 6): kill a run with SIGKILL, resume from its last checkpoint, and reach the same
integer weights as a run that was never interrupted, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = 24


def _config(tmp_path: Path, out: Path, slow: float) -> Path:
    config = yaml.safe_load((REPO / "configs" / "ternary.yaml").read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "dqt_lightning.QuantizedUpdate"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": 4}},
        {"class_path": "tests.helpers.SaveReplica", "init_args": {"directory": str(out)}},
        {"class_path": "tests.helpers.SlowDown", "init_args": {"seconds": slow}},
    ]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _command(config: Path, data_cache: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dqt_lightning", "fit", "--config", str(config), "--trainer.max_steps", str(STEPS),
            "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
            "--data.init_args.vocab_size", "512", "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4",
            "--data.init_args.cache_dir", data_cache, *extra]


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, data_cache):
    straight = _config(tmp_path, tmp_path / "straight", slow=0.0)
    done = subprocess.run(_command(straight, data_cache), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    killed = _config(tmp_path, killed_dir, slow=0.25)
    proc = subprocess.Popen(_command(killed, data_cache), cwd=killed_dir, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(killed_dir.glob("runs/*/version_*/checkpoints/*step=8.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "rank0.pt").exists()  # it really died before the end
    # The newest complete checkpoint (last.ckpt is rewritten just after the step file, so it may lag behind).
    saved = killed_dir.glob("runs/*/version_*/checkpoints/*step=*.ckpt")
    last = max(saved, key=lambda p: int(p.stem.split("step=")[1]))
    stopped_at = torch.load(last, weights_only=False)["global_step"]
    assert 8 <= stopped_at < STEPS

    resumed = subprocess.run(_command(killed, data_cache, "--ckpt_path", str(last)), cwd=killed_dir, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = torch.load(tmp_path / "straight" / "rank0.pt"), torch.load(killed_dir / "rank0.pt")
    assert a["step"] == b["step"] == STEPS
    for name, w in a["weights"].items():
        assert w.dtype == torch.int8 and torch.equal(w, b["weights"][name]), name
