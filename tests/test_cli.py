"""Every YAML under configs/ parses, overlays merge, and user mistakes end in one line naming the field."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule

from dqt_lightning.cli import DQTLightningCLI, main

# Torch on one thread (conftest.one_thread): these models are tiny, and on shared cores two OpenMP threads make
# each small op wait for a descheduled partner (runs several times slower).
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BASES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
OVERLAYS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.yaml"))


class ParseOnly(DQTLightningCLI):
    """Parses and validates a config without building the (possibly 1B-parameter) model."""

    def instantiate_classes(self) -> None:
        pass


def parse(*configs: str) -> dict:
    args = [a for c in configs for a in ("--config", str(CONFIGS / c))]
    cli = ParseOnly(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    run=False, args=args)
    return cli.config.as_dict()


def test_configs_exist():
    # Three bases, one per mode; bit widths are overlays on them.
    assert set(BASES) == {"ternary.yaml", "bitnet.yaml", "fp.yaml"}
    assert {"bits/2.yaml", "bits/3.yaml", "bits/4.yaml", "bits/8.yaml"} <= set(OVERLAYS)
    assert {"ablation/nearest.yaml", "model/tiny.yaml", "model/130m.yaml", "model/320m.yaml", "model/1b.yaml",
            "precision/fp32.yaml", "precision/bf16.yaml"} <= set(OVERLAYS)


@pytest.mark.parametrize("base", BASES)
def test_every_base_config_builds(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = DQTLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          run=False, args=["--config", str(CONFIGS / base)])
    plugin = cli.trainer.precision_plugin
    assert type(plugin).__name__ == "QuantPrecision"
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size  # linked, not set by hand


def test_the_tf32_overlay_sets_the_float32_matmul_precision_of_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse("ternary.yaml")["float32_matmul_precision"] == "highest"  # torch's default unless asked
    try:
        DQTLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        run=False, args=["--config", str(CONFIGS / "ternary.yaml"), "--config",
                                         str(CONFIGS / "precision/tf32.yaml")])
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("given,runs", [("bf16-mixed", "bf16-mixed"), ("bf16", "bf16-mixed"), ("32", "32-true")])
def test_trainer_precision_the_lightning_way_sets_the_plugins_precision(tmp_path, monkeypatch, given, runs):
    # Lightning alone would refuse a Trainer given both a precision and a precision plugin.
    monkeypatch.chdir(tmp_path)
    cli = DQTLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          run=False, args=["--config", str(CONFIGS / "ternary.yaml"), "--trainer.precision", given])
    assert type(cli.trainer.precision_plugin).__name__ == "QuantPrecision"
    assert cli.trainer.precision_plugin.precision == runs
    assert cli.config.trainer.plugins.init_args.execution.precision == runs  # and so says the run's config.yaml


@pytest.fixture(scope="module")
def base_config() -> dict:
    return parse("ternary.yaml")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_merges_onto_the_base(overlay, base_config):
    base, merged = base_config, parse("ternary.yaml", overlay)
    assert merged != base
    assert merged["trainer"]["plugins"]["class_path"].endswith("QuantPrecision")  # the overlay did not drop it


def test_quantized_configs_differ_from_their_base_by_a_few_lines():
    base = (CONFIGS / "ternary.yaml").read_text().splitlines()
    for name in BASES:
        other = (CONFIGS / name).read_text().splitlines()
        assert len(other) == len(base)
        assert sum(a != b for a, b in zip(base, other)) <= 3, name


def test_model_overlays_set_the_named_sizes():
    cfg = parse("ternary.yaml", "model/130m.yaml")
    sizes = cfg["model"]["init_args"]["config"]
    assert (sizes["n_embd"], sizes["n_layer"], sizes["n_head"], sizes["intermediate_size"]) == (768, 12, 12, 2048)
    assert cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 5e-4


def _subprocess(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m dqt_lightning ARGS`` in a fresh interpreter: the real entry point, for the few tests that need it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "dqt_lightning", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """``python -m dqt_lightning ARGS`` run in this process, in tmp_path: ``main`` is the entry point's whole body,
    so the exit code, stdout and stderr are the command's, without five seconds of imports per call. A traceback
    would be an exception here, failing the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dqt_lightning"])  # pytest's own arguments are not the command's

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as done:
            code = 0 if done.code is None else done.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def _fit(*args: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "ternary.yaml"), *args]


MISTAKES = {
    "bits0": (["--trainer.plugins.init_args.method.bits", "0"], "trainer.plugins.method.bits"),
    "bits9": (["--trainer.plugins.init_args.method.bits", "9"], "trainer.plugins.method.bits"),
    "mode-foo": (["--trainer.plugins.init_args.method.mode", "foo"], "trainer.plugins.method.mode"),
    "negative-lr": (["--model.init_args.optimizer.init_args.lr", "-0.001"], "model.init_args.optimizer.init_args.lr"),
    "seq-len-too-long": (["--data.init_args.seq_len", "100000"], "data.seq_len"),
    # Lightning's own refusal (the base config has a ModelCheckpoint), as one line too
    "checkpointing-off-with-a-checkpoint": (["--trainer.enable_checkpointing", "false"], "enable_checkpointing"),
    "matmul-precision": (["--float32_matmul_precision", "fast"], "float32_matmul_precision"),
    "update-callback-twice": (["--trainer.callbacks+=dqt_lightning.QuantizedUpdate"],
                              "trainer.callbacks lists QuantizedUpdate more than once"),
    "update-callback-missing": (["--trainer.callbacks=[]"], "mode=dqt needs the callback"),
    "fp16-precision": (["--trainer.precision", "16-mixed"],
                       "trainer.precision=16-mixed is not one the DQT precision plugin runs"),
}
# The 512-token vocabulary the other tests share (the data cache then holds one tokenizer), and small batches: none
# of these tests is about the numbers a run reaches.
SMALL_DATA = ["--data.init_args.vocab_size", "512", "--data.init_args.seq_len", "32", "--data.init_args.batch_size",
              "4"]


def _one_error_line(result: subprocess.CompletedProcess, names: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and names in errors[0], result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_user_mistakes_end_in_one_line(mistake, cli, data_cache):
    args, names = MISTAKES[mistake]
    result = cli(*_fit(*SMALL_DATA, *args, "--data.init_args.cache_dir", data_cache, "--trainer.max_steps", "1"))
    _one_error_line(result, names)


def test_through_the_real_entry_point_a_mistake_is_one_line_and_exit_code_2(tmp_path):
    # The cases above call main() in this process; here `python -m dqt_lightning` itself, for its exit code and
    # stderr (a refusal while parsing: no data is touched).
    args, names = MISTAKES["bits0"]
    _one_error_line(_subprocess(tmp_path, *_fit(*args)), names)
    assert not (tmp_path / "runs").exists()


def test_a_repeated_command_starts_a_new_run_directory(tmp_path, cli, data_cache):
    args = _fit("--trainer.max_steps", "2", "--trainer.limit_val_batches", "2", *SMALL_DATA,
                "--data.init_args.cache_dir", data_cache)
    for _ in range(2):
        result = cli(*args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "unigram entropy" in result.stdout and "final validation loss" in result.stdout
    runs = sorted(p.name for p in (tmp_path / "runs" / "ternary").iterdir())
    assert runs == ["version_0", "version_1"]
    for run in runs:
        assert (tmp_path / "runs" / "ternary" / run / "config.yaml").exists()


def test_without_a_logger_a_second_run_in_the_same_directory_is_one_line_and_keeps_the_first(tmp_path, cli,
                                                                                              data_cache):
    args = _fit("--trainer.max_steps", "2", "--trainer.limit_val_batches", "2", *SMALL_DATA,
                "--data.init_args.cache_dir", data_cache, "--trainer.logger", "false")
    assert cli(*args).returncode == 0
    first = (tmp_path / "config.yaml").read_bytes()
    result = cli(*args)
    error = _one_error_line(result, "config.yaml exists already")
    assert "default_root_dir" in error
    assert (tmp_path / "config.yaml").read_bytes() == first


def test_a_run_refused_at_its_start_leaves_no_config_behind_to_block_its_rerun(tmp_path, cli, data_cache):
    # fp8 is refused on a CPU only once training starts, after Lightning has written config.yaml.
    args = _fit("--trainer.max_steps", "2", "--trainer.limit_val_batches", "2", *SMALL_DATA,
                "--data.init_args.cache_dir", data_cache, "--trainer.logger", "false")
    refused = cli(*args, "--trainer.plugins.init_args.execution.precision", "fp8")
    assert _one_error_line(refused, "fp8").startswith("error: trainer.plugins.execution.precision: fp8")
    assert not (tmp_path / "config.yaml").exists()
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "precision: 32-true" in (tmp_path / "config.yaml").read_text()


def test_a_run_refused_at_its_start_leaves_no_run_directory_behind(tmp_path, cli, data_cache):
    # With the default logger the refusal comes after TensorBoard opened its file in runs/ternary/version_0.
    (tmp_path / "runs" / "ternary" / "version_0").mkdir(parents=True)
    (tmp_path / "runs" / "ternary" / "version_0" / "notes.txt").write_text("an earlier run")
    refused = cli(*_fit("--trainer.max_steps", "2", *SMALL_DATA, "--data.init_args.cache_dir", data_cache,
                        "--trainer.plugins.init_args.execution.precision", "fp8"))
    _one_error_line(refused, "fp8")
    assert sorted(p.name for p in (tmp_path / "runs" / "ternary").iterdir()) == ["version_0"]
    assert sorted(p.name for p in (tmp_path / "runs" / "ternary" / "version_0").iterdir()) == ["notes.txt"]
    # A config's first run, refused, leaves not even the config's name directory for `compare runs/` to find.
    overlay = tmp_path / "no-callbacks.yaml"
    overlay.write_text("trainer:\n  callbacks: []\n")
    refused = cli(*_fit("--config", str(overlay), "--trainer.max_steps", "2", *SMALL_DATA,
                        "--data.init_args.cache_dir", data_cache))
    _one_error_line(refused, "mode=dqt needs the callback")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ternary"]


@pytest.fixture
def lightning_log(caplog):
    """What Lightning logs at INFO (its loggers write to the stderr of their import time, which capsys does not see;
    and a command run in this process before, bench's, may have raised their level)."""
    names = ("lightning.pytorch", "lightning.fabric")
    loggers = [logging.getLogger(name) for name in names]
    for name, logger in zip(names, loggers):
        caplog.set_level(logging.INFO, logger=name)  # restored after the test
        logger.addHandler(caplog.handler)
    yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)


def test_ckpt_path_last_resumes_the_newest_run_of_the_config(tmp_path, cli, data_cache, lightning_log):
    # Lightning would look for "last" only in the new run's own directory and start from scratch.
    args = _fit("--trainer.limit_val_batches", "2", *SMALL_DATA, "--data.init_args.cache_dir", data_cache)
    assert cli(*args, "--trainer.max_steps", "2").returncode == 0
    runs = tmp_path / "runs" / "ternary"
    saved = (runs / "version_0" / "checkpoints" / "last.ckpt").read_bytes()
    config = (runs / "version_0" / "config.yaml").read_bytes()
    for version in ("version_9", "version_10"):  # by number, not by name: version_10 is the newest
        (runs / version / "checkpoints").mkdir(parents=True)
        (runs / version / "checkpoints" / "last.ckpt").write_bytes(saved)
        (runs / version / "config.yaml").write_bytes(config)  # the same settings: a run `last` may continue
    (runs / "version_12").mkdir()  # newer, without a checkpoint
    lightning_log.clear()
    resumed = cli(*args, "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr + lightning_log.text
    assert "ckpt_path last: runs/ternary/version_10/checkpoints/last.ckpt" in said
    assert "; the run continues in runs/ternary/version_10" in said
    restored = r"Restored all states from the checkpoint at \S*runs/ternary/version_10/checkpoints/last.ckpt"
    assert re.search(restored, said)
    # It continued there: Lightning's own `last`, in the directory of the run it resumed. No new version_N. (The copy
    # remembers version_0's directory, so Lightning writes last-v1.ckpt beside it; its `last` takes the newest.)
    newest = max((runs / "version_10" / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert torch.load(newest, weights_only=False)["global_step"] == 3
    assert not (runs / "version_13").exists()
    assert "max_steps: 3" in (runs / "version_10" / "config.yaml").read_text()


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_ckpt_path_last_with_no_run_to_evaluate_is_one_line(tmp_path, monkeypatch, capsys, subcommand):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main([subcommand, "--config", str(CONFIGS / "ternary.yaml"), "--ckpt_path", "last"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1
    assert err == f"error: ckpt_path last: no runs/ternary/version_N/checkpoints/last.ckpt to {subcommand}\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content,says", [
    (None, "does not exist"), (b"not a checkpoint", "cannot be read as a checkpoint"), ("dir", "is a directory"),
], ids=["missing", "not-a-checkpoint", "a-directory"])
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_bad_ckpt_path_is_one_line_naming_it(tmp_path, cli, subcommand, content, says):
    path = tmp_path / "last.ckpt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    result = cli(subcommand, "--config", str(CONFIGS / "ternary.yaml"), "--ckpt_path", str(path))
    assert _one_error_line(result, "ckpt_path").startswith(f"error: ckpt_path {path} {says}")
    assert not (tmp_path / "runs").exists()  # refused while parsing: nothing written


def test_fsdp_is_refused_up_front_with_the_reason(cli, data_cache):
    result = cli(*_fit("--trainer.strategy", "fsdp", "--data.init_args.cache_dir", data_cache))
    assert "ddp" in _one_error_line(result, "trainer.strategy=fsdp is not supported")


@pytest.mark.parametrize("text,where", [("trainer:\n  max_steps: [\n", "line 3, column 1"),
                                        ("trainer:\n  max_steps: 3\n   bad: 1\n", "line 3, column 7")])
@pytest.mark.parametrize("subcommand", ["fit", "prepare"])
def test_a_config_file_that_is_not_yaml_is_named_with_its_line(tmp_path, capsys, subcommand, text, where):
    broken = tmp_path / "broken.yaml"
    broken.write_text(text)
    with pytest.raises(SystemExit) as done:
        main([subcommand, "--config", str(CONFIGS / "ternary.yaml"), "--config", str(broken)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith(f"error: config file {broken} is not valid YAML: ")
    assert err.endswith(f" at {where}\n") and err.count("\n") == 1


def test_the_help_names_the_commands_beside_the_trainer_ones(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: python -m dqt_lightning ")
    words = " ".join(out.split())  # argparse wraps the epilog wherever a line fills up
    for command in ("fit", "validate", "prepare", "plan", "compare", "export", "generate", "bench", "reproduce"):
        assert f"{command} " in words, command


def test_predict_is_not_offered_since_sampling_is_generate(capsys):
    with pytest.raises(SystemExit) as done:
        main(["predict", "--config", str(CONFIGS / "ternary.yaml")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: unknown command 'predict'; choose from fit, validate, test,")
    assert err.count("\n") == 1


@pytest.mark.parametrize("subcommand", ["fit", "prepare"])
def test_no_config_at_all_says_where_to_start(capsys, subcommand):
    with pytest.raises(SystemExit) as done:
        main([subcommand])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and "arguments are required" in err
    assert err.rstrip().endswith("--config configs/ternary.yaml)")


@pytest.mark.parametrize("written,runs", [
    (["--trainer.limit_val_batches", "1"], 1), (["--trainer.limit_val_batches=1"], 1),
    (["--trainer.limit_val_batches", "1.0"], 1.0), (["--config", "one.yaml"], 1), (["--config", "all.yaml"], 1.0),
    (["--config", "one.yaml", "--trainer.limit_val_batches", "1.0"], 1.0),
    (["--trainer.limit_val_batches", "1.0", "--config", "one.yaml"], 1), ([], 25),
], ids=["flag", "flag=", "flag-float", "yaml", "yaml-float", "flag-after-yaml", "yaml-after-flag", "base"])
def test_a_limit_written_as_the_integer_1_is_one_batch(tmp_path, monkeypatch, written, runs):
    # jsonargparse may read 1 for the Trainer's Union[int, float] as 1.0 (cli._integer_ones says when), which Lightning
    # takes as every batch.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.yaml").write_text("trainer:\n  limit_val_batches: 1\n")
    (tmp_path / "all.yaml").write_text("trainer:\n  limit_val_batches: 1.0\n")
    cli = DQTLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          run=False, args=["--config", str(CONFIGS / "ternary.yaml"), *written])
    assert cli.trainer.limit_val_batches == runs and type(cli.trainer.limit_val_batches) is type(runs)


def test_config_yaml_records_the_integer_1_so_that_a_rerun_takes_one_batch_too(tmp_path, cli, data_cache):
    done = cli(*_fit("--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", *SMALL_DATA,
                     "--data.init_args.cache_dir", data_cache, "--trainer.logger", "false",
                     "--trainer.enable_progress_bar", "false"))
    assert done.returncode == 0, done.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]["limit_val_batches"]
    assert saved == 1 and type(saved) is int
