"""User mistakes and leftovers that used to misbehave: each ends in one line naming the field or file, and nothing
on disk is lost or left half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from dqt_lightning import LanguageModel, Method, QuantizedUpdate, QuantPrecision
from dqt_lightning.files import atomic_directory, atomic_write, remove_dead_writers_files
from dqt_lightning.commands import run as run_tool
from tests.conftest import SMALL
from tests.test_cli import cli  # noqa: F401 - the in-process command fixture


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A two-step ternary DQT checkpoint, trained in-process on random tokens."""
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    pl.seed_everything(0, verbose=False)
    model = LanguageModel(SMALL, vocab_size=128, warmup_steps=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         plugins=[QuantPrecision(Method(mode="dqt", bits=1.58))], callbacks=[QuantizedUpdate()])
    trainer.fit(model, DataLoader(torch.randint(0, 128, (8, 17)), batch_size=4))
    trainer.save_checkpoint(path)
    return path


def test_export_to_an_impossible_path_is_one_line(checkpoint, capsys):
    assert run_tool(["export", str(checkpoint), "--output", "/proc/dqt-export"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --output /proc/dqt-export cannot be written: ")


def test_export_never_replaces_a_directory_of_other_files(checkpoint, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert run_tool(["export", str(checkpoint), "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --output {tmp_path} holds files that are not an export's "
                                               "(notes.txt); give a new directory or an earlier export")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    out = tmp_path / "export"
    assert run_tool(["export", str(checkpoint), "--output", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert run_tool(["export", str(checkpoint), "--output", str(out)]) == 0  # an earlier export is replaced whole
    assert (out / "model.safetensors").read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == ["export", "notes.txt"]  # no staging or old copy left behind


def test_a_failed_directory_write_changes_nothing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target, "--output") as staging:
        (staging / "config.json").write_text("new")
        raise RuntimeError("disk full")
    assert (target / "config.json").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out"]


def test_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "last.ckpt"
    # A writer that died mid-save: a real process id that has exited.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.{dead.stdout.strip()}.abcd1234.tmp"
    stale.write_bytes(b"half")
    live = tmp_path / f".last.ckpt.{os.getppid()}.efgh5678.tmp"  # our parent is alive
    live.write_bytes(b"writing")
    other = tmp_path / f".other.ckpt.{dead.stdout.strip()}.abcd1234.tmp"  # another file's: not ours to judge
    other.write_bytes(b"x")
    atomic_write(target, lambda f: f.write(b"whole"))
    assert sorted(os.listdir(tmp_path)) == sorted(["last.ckpt", live.name, other.name])
    assert remove_dead_writers_files(tmp_path / "other.ckpt") == [other]


def test_compare_marks_runs_that_failed_or_stopped_early(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def run(name: str, max_steps: int, steps: list[int]) -> None:
        directory = tmp_path / name / "version_0"
        directory.mkdir(parents=True)
        (directory / "config.yaml").write_text(f"trainer:\n  max_steps: {max_steps}\n")
        writer = SummaryWriter(str(directory))
        writer.add_text("hparams", "a run refused at its start still opens an event file", 0)
        for step in steps:
            writer.add_scalar("val/loss", 5.0 - step / 100, step)
        writer.close()

    run("finished", 30, [10, 20, 30])
    run("killed", 30, [10, 20])
    run("refused", 30, [])
    assert run_tool(["compare", str(tmp_path), "--plot", str(tmp_path / "c.png")]) == 0
    rows = {line.split(" | ")[0].removeprefix("| ").split("/")[-2]: line for line in capsys.readouterr().out.splitlines()
            if "version_0" in line}
    assert rows["finished"].endswith("| finished |")
    assert rows["killed"].endswith("| stopped at step 20 of 30 |")
    assert rows["refused"].endswith("| failed: nothing logged |")


def test_tokens_seen_after_a_resume_is_that_of_an_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    tokens = torch.randint(0, 128, (32, 17), generator=torch.Generator().manual_seed(0))

    def fit(steps: int, ckpt_path: Path | None = None) -> LanguageModel:
        pl.seed_everything(0, verbose=False)
        model = LanguageModel(SMALL, vocab_size=128, warmup_steps=0)
        saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
        trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[saver])
        trainer.fit(model, DataLoader(tokens, batch_size=4), ckpt_path=ckpt_path)
        return model

    fit(2)  # saves last.ckpt after step 2, from ModelCheckpoint's own batch-end hook
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["tokens_seen"]
    assert saved == 2 * 4 * 16
    resumed = fit(4, tmp_path / "last.ckpt")
    assert resumed.tokens_seen == fit(4).tokens_seen == 4 * 4 * 16


@pytest.mark.parametrize("streaming", [False, True])
def test_resuming_mid_epoch_raises_no_not_resumable_warning(tmp_path, streaming, recwarn):
    import json

    from lightning.pytorch.callbacks import ModelCheckpoint

    from dqt_lightning.data.text import TextCorpus, TextSource

    words = "the quick brown fox jumps over the lazy dog while five boxing wizards jump quickly".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(200)) for i in range(12)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def fit(steps: int, ckpt_path: Path | None = None) -> None:
        data = TextCorpus(source=TextSource(path=str(corpus), streaming=streaming, val_fraction=0.2), vocab_size=300,
                          seq_len=8, batch_size=4, cache_dir=str(tmp_path / "cache"))
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
        trainer.fit(LanguageModel(SMALL, vocab_size=300, warmup_steps=0), datamodule=data, ckpt_path=ckpt_path)
        assert trainer.num_training_batches > steps or streaming  # the first run stops mid-epoch

    fit(2)
    fit(4, tmp_path / "ckpt" / "last.ckpt")
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def test_a_corpus_of_one_document_says_it_all_went_to_validation(tmp_path):
    from dqt_lightning.data.text import TextCorpus, TextSource
    from dqt_lightning.errors import ConfigError

    (tmp_path / "big.txt").write_text(" ".join(f"word{i % 50}" for i in range(20000)) + "\n")  # one line: one doc
    data = TextCorpus(source=TextSource(path=str(tmp_path / "big.txt")), vocab_size=300, seq_len=8, batch_size=2,
                      cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"^data.source: all 1 document of .*big.txt.* went to validation, leaving "
                                          r"the train split empty .*\(in a \.txt file a blank line separates "
                                          r"documents\), or set data.source.validation_split$"):
        data.setup()
    # Following the hint: the same words as paragraphs, a blank line between them.
    (tmp_path / "paragraphs.txt").write_text("\n\n".join(" ".join(f"word{i % 50}" for i in range(j, j + 2000))
                                                          for j in range(0, 20000, 2000)) + "\n")
    TextCorpus(source=TextSource(path=str(tmp_path / "paragraphs.txt")), vocab_size=300, seq_len=8, batch_size=2,
               cache_dir=str(tmp_path / "cache")).setup()


REPO = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--data.init_args.batch_size", "4"]


@pytest.fixture
def command(cli):
    """test_cli's in-process ``python -m dqt_lightning ARGS``, as (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        done = cli(*args)
        return done.returncode, done.stdout, done.stderr

    return run


def _fit(*args: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "ternary.yaml"), *QUICK, *args]


@pytest.mark.parametrize("args,says", [
    (["--trainer.accumulate_grad_batches", "0"],
     "trainer.accumulate_grad_batches must be an integer >= 1 (1: no accumulation); got 0"),
    (["--trainer.gradient_clip_val", "-1"],
     "trainer.gradient_clip_val must be a finite number >= 0 (0 or null: no clipping); got -1"),
    (["--model.init_args.optimizer.init_args.lr", "inf"],
     "model.init_args.optimizer.init_args.lr must be a finite number; got inf"),
    (["--model.init_args.optimizer.init_args.lr", "nan"],
     "model.init_args.optimizer.init_args.lr must be a finite number; got nan"),
    (["--model.init_args.optimizer.init_args.lr", "-0.001"], "model.init_args.optimizer.init_args.lr must be >= 0; "
                                                             "got -0.001"),
    (["--data.init_args.seq_len", "4096"], "data.seq_len=4096 is longer than model.config.block_size=2048"),
    (["--model.init_args.optimizer.init_args.lr", "1e38"],
     "model.init_args.optimizer.init_args.lr=1e+38 overflows float32 in the optimizer's first step (a step of up to "
     "1e+39, above 3.4e38)"),
])
def test_trainer_and_optimizer_mistakes_are_one_line_and_leave_no_run(command, tmp_path, args, says):
    code, _, err = command(*_fit(*args))
    assert code == 2 and err == f"error: {says}\n"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_an_empty_or_non_mapping_config_file_is_named(command, tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    (tmp_path / "list.yaml").write_text("- trainer\n")
    code, _, err = command(*_fit("--config", str(tmp_path / "empty.yaml")))
    assert code == 2 and err == f"error: config file {tmp_path / 'empty.yaml'} is empty (or only comments); give it " \
                                "settings or leave it out\n"
    code, _, err = command(*_fit("--config", str(tmp_path / "list.yaml")))
    assert code == 2 and err.startswith(f"error: config file {tmp_path / 'list.yaml'} holds a YAML list, not a mapping")


def test_an_unknown_command_lists_every_command(command):
    code, _, err = command("frobnicate")
    assert code == 2 and err == ("error: unknown command 'frobnicate'; choose from fit, validate, test, prepare, plan, "
                                 "compare, export, generate, bench, reproduce, eval (python -m dqt_lightning --help)\n")


def test_a_truncated_checkpoint_is_one_whole_sentence(command, checkpoint, tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(checkpoint.read_bytes()[:50_000])
    code, _, err = command("validate", "--config", str(REPO / "configs" / "ternary.yaml"), "--ckpt_path", str(cut))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: ckpt_path {cut} cannot be read as a checkpoint (")
    assert err.endswith("); the file is damaged (a copy cut short?) or not a checkpoint\n")
    assert "If you are seeing this error" not in err  # the reader's first sentence only, never cut inside one


def test_ckpt_path_last_never_continues_a_run_with_other_settings(command, tmp_path, monkeypatch):
    said: list[str] = []
    monkeypatch.setattr("dqt_lightning.cli.rank_zero_info", said.append)
    code, out, _ = command(*_fit("--model.init_args.optimizer.init_args.lr", "0.003"))
    assert code == 0
    # Same configs, another learning rate: the newest last.ckpt is not this run's to continue.
    code, _, err = command(*_fit("--ckpt_path", "last"))
    assert code == 2 and err.startswith("error: ckpt_path last: the newest run under runs/ternary with a last.ckpt "
                                        "has other settings (model.init_args.optimizer.init_args.lr) and none has ")
    assert sorted(p.name for p in (tmp_path / "runs" / "ternary").iterdir()) == ["version_0"]  # nothing new written
    # The same settings continue it, for longer too.
    code, out, err = command(*_fit("--model.init_args.optimizer.init_args.lr", "0.003", "--ckpt_path", "last",
                                   "--trainer.max_steps", "3"))
    assert code == 0 and said == ["ckpt_path last: runs/ternary/version_0/checkpoints/last.ckpt, the newest last.ckpt "
                                  "under runs/ternary with these settings; the run continues in runs/ternary/version_0"]


def test_a_resume_may_train_longer_or_elsewhere_but_not_change_the_experiment():
    from dqt_lightning.runs import differing_settings

    saved = {"model": {"init_args": {"optimizer": {"init_args": {"lr": 0.002}}}}, "seed_everything": 1,
             "trainer": {"max_steps": 100, "devices": 1, "plugins": {"init_args": {"method": {"bits": 8}}}}}
    longer = {**saved, "trainer": {**saved["trainer"], "max_steps": 500, "devices": 2}}
    assert differing_settings(saved, longer) == []
    other = {**longer, "trainer": {**longer["trainer"], "plugins": {"init_args": {"method": {"bits": 1.58}}}},
             "seed_everything": 2}
    assert differing_settings(saved, other) == ["seed_everything", "trainer.plugins.init_args.method.bits"]


def _diverging_run(steps: int, **update) -> pl.Trainer:
    """A DQT run at lr 1e30: the first step saturates every weight, every later gradient is non-finite."""
    from dqt_lightning.train.optim import default_adamw

    pl.seed_everything(0, verbose=False)
    model = LanguageModel(SMALL, vocab_size=128, warmup_steps=0, optimizer=default_adamw(lr=1e30))
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         plugins=[QuantPrecision(Method(mode="dqt", bits=1.58))], callbacks=[QuantizedUpdate(**update)])
    trainer.fit(model, DataLoader(torch.randint(0, 128, (64, 17)), batch_size=2))
    return trainer


def test_a_run_that_skips_step_after_step_stops_with_one_line():
    from dqt_lightning.errors import TrainingStopped

    with pytest.raises(TrainingStopped, match=r"^10 optimizer steps in a row skipped for non-finite gradients \(the "
                                              r"last at step 10\): the run is not learning"):
        _diverging_run(30)


def test_a_run_whose_steps_were_mostly_skipped_never_ends_as_a_success():
    from dqt_lightning.errors import TrainingStopped

    with pytest.raises(TrainingStopped, match=r"^11 of 12 optimizer steps were skipped for non-finite gradients"):
        _diverging_run(12, max_skipped_in_a_row=0)


def test_ddp_replicas_are_compared_at_the_end_of_every_run(monkeypatch):
    from types import SimpleNamespace

    update = QuantizedUpdate(check_replicas_every_n_steps=50)
    update._layers = [("layer", None)]
    checked: list[int] = []
    monkeypatch.setattr(update, "_check_replicas", checked.append)
    update.on_train_end(SimpleNamespace(world_size=2, global_step=20), None)  # a 20-step run: none of every 50
    assert checked == [19]
    update._checked_at = 49
    update.on_train_end(SimpleNamespace(world_size=2, global_step=50), None)  # its last step was checked already
    update.on_train_end(SimpleNamespace(world_size=1, global_step=20), None)  # no replicas to compare
    assert checked == [19]


def _leaves_nothing(tmp_path: Path) -> bool:
    return not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_safetensors_file_as_ckpt_path_is_named_and_points_to_init_from(command, tmp_path, subcommand):
    from safetensors.torch import save_file

    weights = tmp_path / "hf" / "model.safetensors"
    weights.parent.mkdir()
    save_file({"model.norm.weight": torch.ones(4)}, weights)
    code, _, err = command(subcommand, "--config", str(REPO / "configs" / "ternary.yaml"), "--ckpt_path", str(weights))
    assert code == 2 and err == (f"error: ckpt_path {weights} is a safetensors file of weights, not a checkpoint to "
                                 f"resume; a Lightning checkpoint is a .ckpt file that fit wrote\n")
    (weights.parent / "config.json").write_text("{}")
    code, _, err = command(subcommand, "--config", str(REPO / "configs" / "ternary.yaml"), "--ckpt_path", str(weights))
    assert code == 2 and err.endswith(f"to start from this Hugging Face model, use --model.init_args.init_from "
                                      f"{weights.parent}\n")
    assert _leaves_nothing(tmp_path)


def test_an_8bit_checkpoint_into_a_ternary_run_is_refused_before_anything_is_written(command, tmp_path):
    code, _, _ = command(*_fit("--config", str(REPO / "configs" / "bits" / "8.yaml"), "--model.init_args.config.n_layer",
                               "1", "--data.init_args.vocab_size", "300", "--trainer.limit_val_batches", "0"))
    assert code == 0
    runs = sorted((tmp_path / "runs").rglob("last.ckpt"))
    assert len(runs) == 1
    before = sorted(p for p in (tmp_path / "runs").rglob("*"))
    for subcommand in ("validate", "fit"):
        code, _, err = command(subcommand, *_fit("--model.init_args.config.n_layer", "1",
                                                 "--data.init_args.vocab_size", "300", "--ckpt_path", str(runs[0]))[1:])
        assert code == 2 and err == (f"error: ckpt_path {runs[0]} holds model.layers.0.attn.q_proj on levels [-128, "
                                     "127], this config's DQT grid has ternary levels {-1, 0, 1} "
                                     "(trainer.plugins.method.bits, symmetric); the config of the run that saved it "
                                     "(config.yaml in its run directory) says how it was trained\n"), subcommand
    assert sorted(p for p in (tmp_path / "runs").rglob("*")) == before


def test_a_config_named_without_its_folder_is_a_shipped_one(command, tmp_path):
    code, _, err = command("fit", "--config", "ternry.yaml")
    assert code == 2 and err == ("error: config file ternry.yaml does not exist, here or among the shipped configs; "
                                 "did you mean ternary.yaml or bitnet.yaml or model/tiny.yaml?\n")
    (tmp_path / "ternary.yaml").write_text("seed_everything: 7\n")  # a local file of that name comes first
    code, _, err = command("fit", "--config", "ternary.yaml")
    assert code == 2 and "start from a config that names them" in err  # it has no model: read, not the shipped one


def test_a_command_line_without_a_command_lists_every_command(command):
    code, _, err = command()
    assert code == 2 and err == ("error: give a command: fit, validate, test, prepare, plan, compare, export, "
                                 "generate, bench, reproduce, eval (python -m dqt_lightning --help)\n")


def test_a_negative_rate_reaches_the_tool_that_says_what_is_wrong(capsys, tmp_path):
    assert run_tool(["reproduce", "--out", str(tmp_path / "r"), "--lr-sweep", "-1e-3", "2e-3"]) == 2
    assert capsys.readouterr().err == "error: --lr-sweep takes distinct learning rates > 0; got -0.001 0.002\n"
