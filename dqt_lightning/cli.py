"""``python -m dqt_lightning {fit,validate,test,prepare} --config ...`` and the tools
``{compare,export,generate,bench,reproduce} ...``: LightningCLI with the project's defaults, and the tools that work on
its runs.

- The data module's vocabulary size reaches the model through a link, never by hand.
- With no logger configured, runs log to TensorBoard under ``runs/<config names>/version_N``: a new directory for
  every run, so repeating a command never fails on, or overwrites, an earlier run.
- A user mistake ends with one line on stderr naming the field or file, not a traceback.
- ``prepare`` parses the same configs as ``fit`` and writes the token shards its ``data`` section describes.
- ``compare`` prints a table of finished runs and plots their validation loss against tokens; ``export`` writes a
  checkpoint as safetensors with integer weights; ``generate`` samples text from a checkpoint or an export;
  ``bench`` measures every recipe's throughput and memory; ``reproduce`` trains the comparison of the paper's claims.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from dqt_lightning.train.checkpoint import AtomicCheckpointIO
from dqt_lightning.errors import ConfigError, TrainingStopped
from dqt_lightning.files import atomic_write
from dqt_lightning.runs import RUNS_DIR, resumable_checkpoint, run_name
from dqt_lightning.train.precision import PRECISIONS, Execution

FLOAT32_MATMUL_PRECISIONS = ("highest", "high", "medium")
# Commands beside LightningCLI's, each a module with a main(argv) -> exit code; imported only when used.
TOOLS = {**{name: f"dqt_lightning.tools.{name}" for name in ("compare", "export", "generate", "bench", "reproduce")},
         "eval": "dqt_lightning.tools.evaluate"}


def _user_facing_error_in(error: BaseException | None) -> Exception | None:
    seen = set()
    while error is not None and id(error) not in seen:
        # MisconfigurationException: Lightning's own word for Trainer settings that contradict each other.
        if isinstance(error, (ConfigError, TrainingStopped, MisconfigurationException)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class _OneLineErrorParser(LightningArgumentParser):
    """jsonargparse prints usage plus a nested report (with tracebacks of failed instantiations); users get the one
    line that matters."""

    def error(self, message: str, ex: Exception | None = None):
        found = _user_facing_error_in(ex) or ConfigError.latest_in(message)
        line = str(found) if found else _first_reason(message)
        if "arguments are required" in line and "model" in line:
            line += " (start from a config that names them: --config configs/ternary.yaml)"
        sys.stderr.write(f"error: {line}\n")
        sys.exit(2)


def _first_reason(message: str) -> str:
    lines = [ln.strip().removeprefix("- ").strip() for ln in message.splitlines() if ln.strip()]
    head = lines[0] if lines else message
    given = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Given value:")), None)
    if head.startswith("Parser key") and given is not None:
        # jsonargparse's report of a value no type accepts: name the value and the types, not the report's layout.
        subtypes = next((ln for ln in lines if ln.startswith("Subtypes:")), "")
        types = re.findall(r"<class '([\w.]+)'>", subtypes) or re.findall(r"Expected a <class '([\w.]+)'>", message)
        expected = f" (expected {' or '.join(dict.fromkeys(types))})" if types else ""
        return f"{head.rstrip(':')}: {given!r} is not a valid value{expected}"
    detail = next((ln for ln in lines[1:] if ln.startswith(("Expected", "Does not", "Problem", "No action", "Unable",
                                                            "Not a valid", "Path", "Parser key"))), "")
    return f"{head} {detail}".strip()


class _SaveConfig(SaveConfigCallback):
    """Lightning's config saving, with its refusal to overwrite an earlier run's config.yaml (which happens when runs
    without a logger share a directory) turned into a one-line error instead of a traceback."""

    _written: Path | None = None  # the config.yaml this run wrote, once it has

    def setup(self, trainer, pl_module, stage: str) -> None:
        path = Path(trainer.log_dir or ".") / self.config_filename  # log_dir broadcasts: every rank must ask
        try:
            super().setup(trainer, pl_module, stage)
        except RuntimeError as error:
            if "to NOT exist" not in str(error):
                raise
            raise ConfigError(f"{path} exists already, from an earlier run in the same directory; set "
                              "trainer.default_root_dir to a new directory (or keep the default logger, which gives "
                              "every run its own)") from error
        self._written = path if trainer.is_global_zero else None
        if self._written is not None:
            _record_integer_ones(path, trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # A run refused before its first step (fp8 on a CPU, settings that contradict each other) takes its
        # config.yaml with it: left behind, it would make the corrected rerun in the same directory refuse as well.
        refused = isinstance(exception, (ConfigError, MisconfigurationException)) and trainer.global_step == 0
        if refused and self._written is not None:
            self._written.unlink(missing_ok=True)
            # So does the TensorBoard file this process opened (its name ends in our pid), and the logger's version
            # directory when nothing else is in it: `compare runs/` then finds no empty run. Without a logger the
            # directory is the user's own (trainer.default_root_dir, the working directory) and stays.
            run_dir = self._written.parent
            for events in run_dir.glob(f"events.out.tfevents.*.{os.getpid()}.*"):
                events.unlink(missing_ok=True)
            if trainer.logger is not None and trainer.logger.log_dir and Path(trainer.logger.log_dir) == run_dir:
                with contextlib.suppress(OSError):  # not empty: something else lives there
                    run_dir.rmdir()
                    if trainer.logger.name and run_dir.parent.name == trainer.logger.name:  # not save_dir itself
                        run_dir.parent.rmdir()  # the config's name directory, when this was its only run


# The Trainer types these Union[float, int], float first, so jsonargparse reads an integer 1 as the float 1.0: for the
# limits, every batch instead of one; for val_check_interval, once an epoch instead of every batch.
BATCH_COUNTS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                "val_check_interval")


def _written_batch_counts(args: list[str]) -> dict[str, object]:
    """The value each of ``BATCH_COUNTS`` was last given, as written (YAML scalar or flag text), in argument order."""
    written: dict[str, object] = {}
    for i, token in enumerate(args):
        if token in ("-c", "--config") and i + 1 < len(args):
            try:
                data = yaml.safe_load(Path(args[i + 1]).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError, UnicodeDecodeError):
                continue  # jsonargparse reports it
            trainer = data.get("trainer") if isinstance(data, dict) else None
            if isinstance(trainer, dict):
                written.update({key: trainer[key] for key in BATCH_COUNTS if key in trainer})
        for key in BATCH_COUNTS:
            if token == f"--trainer.{key}" and i + 1 < len(args):
                written[key] = args[i + 1]
            elif token.startswith(f"--trainer.{key}="):
                written[key] = token.split("=", 1)[1]
    return written


def _keep_integer_one(trainer: Namespace, args: list[str] | None) -> None:
    """A 1 written as an integer stays the integer 1 (one batch), as Lightning documents it."""
    for key, value in _written_batch_counts(args or []).items():
        integer_one = (type(value) is int and value == 1) or (isinstance(value, str) and value.strip() == "1")
        if integer_one and trainer.get(key) == 1.0:
            trainer[key] = 1


def _record_integer_ones(path: Path, trainer) -> None:
    """jsonargparse writes the 1 that the run took as one batch (``_keep_integer_one``) as 1.0 into config.yaml,
    which would mean every batch when the file is run again."""
    ones = [key for key in BATCH_COUNTS if type(getattr(trainer, key, None)) is int and getattr(trainer, key) == 1]
    config = yaml.safe_load(path.read_text(encoding="utf-8")) if ones and path.is_file() else None
    section = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(section, dict) or all(section.get(key) == 1 and type(section.get(key)) is int for key in ones):
        return
    section.update({key: 1 for key in ones})
    atomic_write(path, lambda f: f.write(yaml.safe_dump(config, sort_keys=False).encode()))


def _move_trainer_precision_into_the_plugin(trainer: Namespace) -> None:
    """``--trainer.precision bf16-mixed``, the Lightning way, sets the plugin's precision: Lightning itself refuses a
    Trainer given both a precision and a precision plugin."""
    wanted = trainer.get("precision")
    plugins = trainer.get("plugins")
    plugins = plugins if isinstance(plugins, list) else [plugins]
    ours = [p for p in plugins if isinstance(p, Namespace) and str(p.get("class_path", "")).endswith("QuantPrecision")]
    if wanted is None or not ours:
        return
    value = {"32": "32-true", "bf16": "bf16-mixed"}.get(str(wanted), str(wanted))
    if value not in PRECISIONS:
        raise ConfigError(f"trainer.precision={wanted} is not one the DQT precision plugin runs; choose from "
                          f"{', '.join(PRECISIONS)} (it sets trainer.plugins.init_args.execution.precision)")
    init_args = ours[0].init_args
    if init_args.get("execution") is None:  # no execution block: Execution's defaults, with this precision
        init_args.execution = Namespace(**asdict(Execution()))
    init_args.execution.precision = value
    trainer.precision = None


def _check_trainer_numbers(trainer: Namespace) -> None:
    """Trainer settings Lightning takes without a word or with a traceback deep in the loop."""
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and (not isinstance(accumulate, int) or accumulate < 1):
        raise ConfigError(f"trainer.accumulate_grad_batches must be an integer >= 1 (1: no accumulation); got "
                          f"{accumulate}")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip >= 0):
        # Lightning skips clipping for any value <= 0: a negative one would train unclipped with no word.
        raise ConfigError(f"trainer.gradient_clip_val must be a finite number >= 0 (0 or null: no clipping); got "
                          f"{clip:g}")


class DQTLightningCLI(LightningCLI):
    _raw_args: list[str] | None = None  # the command line as written, for what parsing does not keep

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", _SaveConfig)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No predict: the model has no predict_step (sampling text is `generate`), and Lightning would refuse it only
        # after opening a run directory.
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        # In the config, not left to a line of Python: a run's config.yaml then says whether its float32 matmuls ran
        # as TF32 on the GPU's tensor cores (several times faster) or in full float32, torch's default.
        parser.add_argument("--float32_matmul_precision", choices=FLOAT32_MATMUL_PRECISIONS, default="highest",
                            help="torch.set_float32_matmul_precision for this run: highest (float32, torch's "
                            "default), high (TF32 on NVIDIA GPUs since Ampere), medium (bf16 passes)")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        if args is None:
            self._raw_args = sys.argv[1:]
        elif isinstance(args, (list, tuple)):
            self._raw_args = list(args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # Lightning's own method loads the checkpoint at parse time (for the model hyper-parameters it holds), so a
        # wrong path or a file that is not a checkpoint ends here, as a traceback unless caught.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path == "last" and self.config[subcommand].trainer.logger in (None, True):
            # Lightning looks for "last" in this run's own checkpoint directory, which the default logger has just
            # made new, so it would never resume anything: look in the runs of this config before it.
            runs = Path(RUNS_DIR) / run_name(self.config[subcommand])
            # Only a run of the same settings: the newest last.ckpt may be another experiment's of the same configs
            # with other overrides (an interrupted run killed before its first save leaves none of its own).
            current = yaml.safe_load(self._parser(subcommand).dump(self.config[subcommand], skip_none=False))
            found, differs = resumable_checkpoint(runs, current)
            if found is None and differs:
                shown = ", ".join(differs[:4]) + (f" and {len(differs) - 4} more" if len(differs) > 4 else "")
                raise ConfigError(f"ckpt_path last: the newest run under {runs} with a last.ckpt has other settings "
                                  f"({shown}) and none has these; resume one by its path, or drop --ckpt_path last to "
                                  "start a new run")
            # With none, fit starts from scratch (Lightning's rule, for jobs that may or may not be resuming);
            # validate and test would score an untrained model.
            if found is None and subcommand != "fit":
                raise ConfigError(f"ckpt_path last: no {runs}/version_N/checkpoints/last.ckpt to {subcommand}")
            if found is not None:
                rank_zero_info(f"ckpt_path last: {found}, the newest last.ckpt under {runs} with these settings")
                self.config[subcommand].ckpt_path = path = str(found)
        named = path and (path in ("best", "last", "hpc") or str(path).startswith("registry") or "://" in str(path))
        if path and not named and not Path(path).is_file():
            raise ConfigError(f"ckpt_path {path} " + ("is a directory, not a checkpoint file" if Path(path).is_dir()
                                                       else "does not exist"))
        try:
            super()._parse_ckpt_path()
        except SystemExit:
            raise
        except Exception as error:  # torch raises many types for a file that is not a checkpoint
            reason = re.split(r"(?<=[.!?])\s", str(error).strip().splitlines()[0])[0] if str(error).strip() else ""
            raise ConfigError(f"ckpt_path {path} cannot be read as a checkpoint ({type(error).__name__}"
                              f"{': ' + reason.rstrip('.') if reason else ''}); the file is damaged (a copy cut "
                              "short?) or not a checkpoint") from error

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        torch.set_float32_matmul_precision(config.float32_matmul_precision)
        strategy = config.trainer.strategy
        name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "")
        if "fsdp" in str(name).lower():
            raise ConfigError(
                f"trainer.strategy={name} is not supported: FSDP shards float parameters and insists on its own "
                "precision plugin, while DQT weights are integer buffers; use trainer.strategy: ddp"
            )
        _check_trainer_numbers(config.trainer)
        _move_trainer_precision_into_the_plugin(config.trainer)
        if config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=RUNS_DIR, name=run_name(config), default_hp_metric=False),
            )

    def instantiate_trainer(self, **kwargs):
        # Here, not before instantiating the classes: that pass types every value again, and 1 would be 1.0 again.
        _keep_integer_one((self.config_init[self.subcommand] if self.subcommand else self.config_init)["trainer"],
                          self._raw_args)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except RuntimeError as error:
            # An overlay that lists a callback the base config already has: Lightning refuses two of one kind whose
            # checkpoint states would collide, with a paragraph about state_key.
            twice = re.search(r"more than one stateful callback of type `(\w+)`", str(error))
            if twice is None:
                raise
            raise ConfigError(f"trainer.callbacks lists {twice.group(1)} more than once (a --config overlay or "
                              "--trainer.callbacks+= may add one the base config has already); keep one") from error
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default, not a user's choice
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def after_fit(self) -> None:
        # Validation runs every val_check_interval steps, which need not fall on the last one: measure the end state.
        if self.trainer.limit_val_batches and not self.trainer.interrupted:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self._report("fit")

    def after_validate(self) -> None:
        self._report("validate")

    def _report(self, stage: str) -> None:
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        data = self.datamodule
        lines = [f"[{stage}] run directory: {log_dir}"]
        if "val/loss" in metrics:
            loss = metrics["val/loss"]
            lines.append(f"[{stage}] final validation loss {loss:.4f} nats/token (perplexity {math.exp(loss):.2f})")
        if "val/loss_ternary" in metrics:
            loss = metrics["val/loss_ternary"]
            lines.append(f"[{stage}] with weights re-quantized to ternary {loss:.4f} nats/token "
                         f"(perplexity {math.exp(loss):.2f})")
        if "val/loss_ternary_absmean" in metrics:
            loss = metrics["val/loss_ternary_absmean"]
            lines.append(f"[{stage}] the same with BitNet's absmean scale {loss:.4f} nats/token "
                         f"(perplexity {math.exp(loss):.2f})")
        if hasattr(data, "unigram_entropy"):
            lines.append(f"[{stage}] unigram entropy of the training tokens {data.unigram_entropy():.4f} nats/token")
        print("\n".join(lines), flush=True)


def _close_process_group() -> None:
    # Lightning leaves the process group open at exit; gloo's worker threads then die in static destructors and the
    # process can abort ("terminate called without an active exception", exit -6) after a run that succeeded.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _ParseOnly(DQTLightningCLI):
    """Parses fit's configs (same files, overlays and overrides) without building a trainer or a model."""

    def instantiate_classes(self) -> None:
        pass


def _prepare(args: list[str]) -> None:
    """``prepare --config ...``: tokenize the ``data`` section's source into shards (``dqt_lightning.data.shards``)."""
    try:
        with warnings.catch_warnings():  # that args and sys.argv differ is the point here: "prepare" is not fit's
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = _ParseOnly(LightningModule, LightningDataModule, subclass_mode_model=True,
                             subclass_mode_data=True, parser_class=_OneLineErrorParser, run=False, args=args,
                             parser_kwargs={"prog": "python -m dqt_lightning prepare"})
        config = cli.config
        from dqt_lightning.data.shards import TokenShards, prepare_from_config  # noqa: PLC0415 - only prepare needs it

        wanted = f"{TokenShards.__module__}.{TokenShards.__name__}"
        if config.data.class_path != wanted:
            raise ConfigError(f"prepare needs data.class_path: {wanted}, got {config.data.class_path}; add "
                              "--config configs/data/shards.yaml")
        shards = prepare_from_config(config.data.init_args.as_dict())
    except KeyboardInterrupt:
        sys.stderr.write("error: prepare interrupted; the finished shards are kept, run the same command again to "
                         "continue\n")
        sys.exit(130)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)
    print(f"[prepare] {shards.describe()}", flush=True)


# Dispatched in main() before LightningCLI parses anything, so its --help would not know them.
_OTHER_COMMANDS = (
    "other commands (each takes --help): "
    "prepare --config ... (tokenize the data section's source into shards); "
    "compare RUN_DIR... (table and validation-loss plot of finished runs); "
    "export CKPT (safetensors with integer weights, --format hf or gguf for transformers and llama.cpp); "
    "generate CKPT_OR_EXPORT (sample text); "
    "eval CKPT_OR_EXPORT (perplexity on local text, multiple-choice accuracy); "
    "bench (throughput and memory of every recipe); "
    "reproduce (train and report the paper's comparison)"
)


def _check_config_files(argv: list[str]) -> None:
    """jsonargparse reports a YAML syntax error without the file's name; with several --config files that leaves
    the user guessing."""
    for flag, value in zip(argv, argv[1:]):
        if flag in ("-c", "--config") and Path(value).is_file():
            try:
                data = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                mark = getattr(error, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(error, "problem", None) or type(error).__name__
                raise ConfigError(f"config file {value} is not valid YAML: {problem}{where}") from error
            if data is None:
                raise ConfigError(f"config file {value} is empty (or only comments); give it settings or leave it out")
            if not isinstance(data, dict):
                raise ConfigError(f"config file {value} holds a YAML {type(data).__name__}, not a mapping of settings "
                                  "(trainer:, model:, data: ...)")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    try:
        _check_config_files(argv)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)
    if argv[:1] == ["prepare"]:  # not a Trainer method, so not a LightningCLI subcommand: dispatched here
        _prepare(argv[1:])
        return
    if argv[:1] and argv[0] in TOOLS:  # work on finished runs: no config, model or trainer to build
        sys.exit(importlib.import_module(TOOLS[argv[0]]).main(argv[1:]))
    if argv[:1] and not argv[0].startswith("-") and argv[0] not in DQTLightningCLI.subcommands():
        commands = [*DQTLightningCLI.subcommands(), "prepare", *TOOLS]
        sys.stderr.write(f"error: unknown command '{argv[0]}'; choose from {', '.join(commands)} "
                         "(python -m dqt_lightning --help)\n")
        sys.exit(2)
    try:
        DQTLightningCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=_OneLineErrorParser,
            parser_kwargs={"prog": "python -m dqt_lightning", "epilog": _OTHER_COMMANDS},
            args=args,
        )
    except Exception as error:
        # jsonargparse re-raises a failed instantiation as its own ValueError with our message inside its text.
        found = _user_facing_error_in(error) or ConfigError.latest_in(str(error))
        if found is None:
            raise
        sys.stderr.write(f"error: {found}\n")
        sys.exit(2)
    finally:
        _close_process_group()
