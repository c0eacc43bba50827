"""Runs trained once per session through the CLI (``python -m dqt_lightning fit``'s main()), shared by the tests that
read them: compare's table and plot, export and generate, ternary validation, what a checkpoint holds and how it
resumes. Each is trained when a test first asks for it. A test that would change a run (export into its directory,
say) works on a copy: ``trained_runs.copy(name, tmp_path)``.

    from tests.trained import trained_runs  # noqa: F401 - the fixture, for the test module's tests
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from dqt_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Six steps, validation at steps 3 and 6 (plus the CLI's final one), a one-layer model: small, but every piece of a
# run (curves, checkpoints with optimizer and callback state, config.yaml, hparams) is there.
TINY_MODEL = ["--model.init_args.config.n_layer", "1", "--model.init_args.config.n_embd", "32",
              "--model.init_args.config.n_head", "2", "--model.init_args.config.intermediate_size", "64",
              "--data.init_args.vocab_size", "512", "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4"]
STEPS = 6
TINY = ["--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--model.init_args.warmup_steps", "2", *TINY_MODEL]
RUNS = {"fp": ["fp.yaml"], "bitnet": ["bitnet.yaml"], "dqt-8bit": ["ternary.yaml", "bits/8.yaml"], "ternary": ["ternary.yaml"],
        "bitnet-4bit": ["bitnet.yaml", "bits/4.yaml"], "8-to-ternary": ["ternary.yaml", "schedule/8-to-ternary.yaml"]}


def config_args(name: str) -> list[str]:
    """The --config flags of run ``name``."""
    return [a for c in RUNS[name] for a in ("--config", str(CONFIGS / c))]


class TrainedRuns:
    def __init__(self, root: Path, data_cache: str) -> None:
        self.root, self.data_cache = root, data_cache
        self._dirs: dict[str, Path] = {}

    def run_dir(self, name: str) -> Path:
        """``runs/<config names>/version_0`` of run ``name``, in a directory of its own; read it, do not change it."""
        if name not in self._dirs:
            home = self.root / name
            home.mkdir()
            cwd, threads = Path.cwd(), torch.get_num_threads()
            os.chdir(home)  # the CLI writes runs/ under the working directory
            torch.set_num_threads(1)  # as conftest.one_thread: a session fixture is set up before a test's fixtures
            try:
                main(["fit", *config_args(name), *TINY, "--data.init_args.cache_dir", self.data_cache])
            finally:
                os.chdir(cwd)
                torch.set_num_threads(threads)
            (run,) = (home / "runs").glob("*/version_0")
            self._dirs[name] = run
        return self._dirs[name]

    def checkpoint(self, name: str) -> Path:
        return self.run_dir(name) / "checkpoints" / "last.ckpt"

    def copy(self, name: str, into: Path) -> Path:
        """A copy of run ``name``'s directory under ``into`` (same relative layout: runs/<names>/version_0)."""
        run = self.run_dir(name)
        target = into / run.relative_to(self.root / name)
        shutil.copytree(run, target)
        return target


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, data_cache) -> TrainedRuns:
    return TrainedRuns(tmp_path_factory.mktemp("trained"), data_cache)
