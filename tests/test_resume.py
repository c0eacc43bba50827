"""Exact resume: kill a run with SIGKILL, resume from its last checkpoint, and reach the same
integer weights as a run that was never interrupted, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from dqt_lightning import LanguageModel, Method, QuantizedUpdate, QuantPrecision
from dqt_lightning.cli import main
from dqt_lightning.data.text import TextCorpus, TextSource
from tests.conftest import SMALL
from tests.test_checkpoint import StopAfter

# Torch on one thread (conftest.one_thread): these models are tiny, and on shared cores two OpenMP threads make
# each small op wait for a descheduled partner (runs several times slower).
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
# Two narrower layers than the tiny config's four of 128: exact resume does not depend on the size, and the three runs
# (and the checkpoint written every 4 steps) cost less.
SMALL_MODEL = ["--model.init_args.config.n_layer", "2", "--model.init_args.config.n_embd", "64",
               "--model.init_args.config.n_head", "2", "--model.init_args.config.intermediate_size", "128"]


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
            *SMALL_MODEL, "--data.init_args.vocab_size", "512", "--data.init_args.seq_len", "32",
            "--data.init_args.batch_size", "4", "--data.init_args.cache_dir", data_cache, *extra]


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _fit_here(directory: Path, command: list[str]) -> None:
    """``command`` (a ``python -m dqt_lightning ...`` line) as main() in this process, in ``directory``: the run
    killed below needs a process of its own, the uninterrupted run and the resumed one do not."""
    cwd = Path.cwd()
    os.chdir(directory)
    try:
        main(command[3:])
    finally:
        os.chdir(cwd)


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, data_cache, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dqt_lightning"])  # pytest's own arguments are not the command's
    straight = _config(tmp_path, tmp_path / "straight", slow=0.0)
    _fit_here(tmp_path, _command(straight, data_cache))

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

    _fit_here(killed_dir, _command(killed, data_cache, "--ckpt_path", str(last)))
    a, b = torch.load(tmp_path / "straight" / "rank0.pt"), torch.load(killed_dir / "rank0.pt")
    assert a["step"] == b["step"] == STEPS
    for name, w in a["weights"].items():
        assert w.dtype == torch.int8 and torch.equal(w, b["weights"][name]), name


# --- resuming from checkpoints written where an epoch or a fit ends ----------------------------------------------
# A data position saved after Lightning has closed an epoch (ModelCheckpoint's on_train_epoch_end, save_last at the
# end of a fit, a save after fit) once made a resumed run skip or repeat batches, or group them into other optimizer
# steps. Each case trains, writes the checkpoint, resumes to the final step and compares with a run never stopped.

DOCS = 3  # 3 training batches of 4 windows per epoch, packed or streamed
# Lightning's advice for loaders it cannot resume itself, and for checkpoints written by callbacks a run lacks.
quiet = pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint", "ignore:Be aware that when using")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small jsonl corpus whose epochs end within a few steps, and a cache for its tokenizer and tokens."""
    from tests.test_text import write_docs
    from tests.test_tokenizer import make_docs

    root = tmp_path_factory.mktemp("resume-corpus")
    return write_docs(root / "corpus", make_docs(DOCS), "jsonl")


class Batches(pl.Callback):
    """Records every training batch, in order."""

    def __init__(self) -> None:
        self.seen: list[list[list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch.tolist())


def _checkpointing(kind: str, directory: Path) -> ModelCheckpoint:
    """``epoch end``: on_train_epoch_end (no validation); ``fit end``: save_last in on_train_end, nothing before;
    ``every step``: on_train_batch_end, so the last file is the last batch's."""
    every = {"epoch end": None, "fit end": 10**6, "every step": 1}[kind]
    return ModelCheckpoint(dirpath=directory, save_last=True, every_n_train_steps=every)


def _fit(root: Path, corpus: Path, stop: dict, accumulate: int = 1, streaming: bool = False, workers: int = 0,
         save: str | None = None, ckpt_path: Path | None = None, callbacks=()) -> tuple[list, dict, pl.Trainer]:
    """Train the tiny model on ``corpus`` with a constant learning rate, so that a run stopped early by a smaller
    ``max_steps`` differs from a longer one only in where it stops. Returns the batches, weights and trainer."""
    data = TextCorpus(source=TextSource(path=str(corpus), streaming=streaming, val_fraction=0.2), vocab_size=300,
                      seq_len=8, batch_size=4, num_workers=workers, shuffle_buffer=8,
                      cache_dir=str(corpus.parent / "cache"))
    pl.seed_everything(0, verbose=False)
    model = LanguageModel(SMALL, vocab_size=300, warmup_steps=0, min_lr_ratio=1.0)
    batches = Batches()
    checkpoints = [_checkpointing(save, root)] if save else []
    trainer = pl.Trainer(
        accelerator="cpu", accumulate_grad_batches=accumulate, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(save), default_root_dir=root,
        plugins=[QuantPrecision(Method(mode="dqt", bits=1.58))],
        callbacks=[QuantizedUpdate(seed=3), batches, *checkpoints, *callbacks], **stop,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return batches.seen, {k: v.clone() for k, v in model.state_dict().items()}, trainer


# (first run's stop, final stop, accumulate_grad_batches, StopAfter step or None)
SITUATIONS = {
    "max_steps mid-epoch": (dict(max_steps=4), dict(max_steps=10), 1, None),
    "max_steps on the epoch end": (dict(max_steps=6), dict(max_steps=10), 1, None),
    "max_epochs": (dict(max_epochs=1), dict(max_epochs=3), 1, None),
    "max_epochs, then max_steps": (dict(max_epochs=1), dict(max_steps=10), 1, None),
    "should_stop mid-epoch": (dict(max_steps=10), dict(max_steps=10), 1, 4),
    # 2 steps per epoch, the second of a single batch
    "accumulating, mid-epoch": (dict(max_steps=3), dict(max_steps=6), 2, None),
    "accumulating, on the epoch end": (dict(max_steps=4), dict(max_steps=6), 2, None),
}


@pytest.fixture(scope="module")
def uninterrupted() -> dict:
    """Runs that were never stopped, by (situation, streaming), shared by the save points."""
    return {}


def _resume_matches(tmp_path: Path, corpus: Path, situation: str, save: str, streaming: bool, uninterrupted: dict,
                    workers: int = 0) -> None:
    first, final, accumulate, stop_after = SITUATIONS[situation]
    key = (situation, streaming)
    if key not in uninterrupted:
        seen, weights, trainer = _fit(tmp_path / "straight", corpus, final, accumulate, streaming)
        uninterrupted[key] = seen, weights, trainer.global_step
    straight, straight_weights, straight_steps = uninterrupted[key]
    stopper = [StopAfter(stop_after)] if stop_after else []
    before, _, stopped = _fit(tmp_path / "first", corpus, first, accumulate, streaming, workers, save=save,
                              callbacks=stopper)
    last = tmp_path / "first" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == stopped.global_step < straight_steps
    after, weights, resumed = _fit(tmp_path / "resumed", corpus, final, accumulate, streaming, workers, ckpt_path=last)
    assert resumed.global_step == straight_steps
    assert before + after == straight, "the resumed run trained on other batches, or in another order"
    for name, tensor in straight_weights.items():
        assert torch.equal(tensor, weights[name]), name


@quiet
@pytest.mark.parametrize("save", ["epoch end", "fit end", "every step"])
@pytest.mark.parametrize("situation", list(SITUATIONS))
def test_resume_from_an_epoch_or_fit_end_matches_the_uninterrupted_run(tmp_path, corpus, situation, save,
                                                                        uninterrupted, one_thread):
    _resume_matches(tmp_path, corpus, situation, save, streaming=False, uninterrupted=uninterrupted)


@quiet
@pytest.mark.parametrize("save", ["epoch end", "fit end", "every step"])
@pytest.mark.parametrize("situation", list(SITUATIONS))
def test_streamed_data_resumes_from_an_epoch_or_fit_end_too(tmp_path, corpus, situation, save, uninterrupted,
                                                             one_thread):
    _resume_matches(tmp_path, corpus, situation, save, streaming=True, uninterrupted=uninterrupted)


@quiet
@pytest.mark.parametrize("situation", ["max_epochs", "accumulating, on the epoch end"])
def test_resume_with_loader_workers_matches_too(tmp_path, corpus, situation, uninterrupted, one_thread):
    # With workers the first pass is sampled as the loader is built, which under max_epochs is before Lightning has
    # restored its loop state from the checkpoint.
    _resume_matches(tmp_path, corpus, situation, "fit end", streaming=False, uninterrupted=uninterrupted, workers=1)


@quiet
@pytest.mark.parametrize("streaming,workers", [(False, 0), (True, 0), (True, 1)],
                         ids=["sampled", "streamed", "streamed-worker"])
@pytest.mark.parametrize("save,stops", [
    ("fit end", (dict(max_steps=4), dict(max_steps=7), dict(max_steps=10))),
    ("epoch end", (dict(max_epochs=1), dict(max_epochs=2), dict(max_epochs=4))),
], ids=["fit-ends", "epoch-ends"])
def test_resuming_twice_matches_the_uninterrupted_run(tmp_path, corpus, streaming, workers, save, stops, one_thread):
    # After the first resume Lightning numbers its epochs one ahead of the data's; the second must not be misled
    # (streamed data saves the epoch its windows counted, not Lightning's).
    straight, straight_weights, straight_trainer = _fit(tmp_path / "straight", corpus, stops[-1], streaming=streaming)
    seen, ckpt_path = [], None
    for stage, stop in enumerate(stops):
        batches, weights, trainer = _fit(tmp_path / str(stage), corpus, stop, streaming=streaming, workers=workers,
                                         save=save, ckpt_path=ckpt_path)
        seen += batches
        ckpt_path = tmp_path / str(stage) / "last.ckpt"
    assert trainer.global_step == straight_trainer.global_step and seen == straight
    assert all(torch.equal(t, weights[name]) for name, t in straight_weights.items())
