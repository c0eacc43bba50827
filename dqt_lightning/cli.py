"""``python -m dqt_lightning {fit,validate,test,prepare} --config ...``: LightningCLI with the project's defaults, and
the dispatch to the tools that work on its runs (``compare``, ``export``, ``generate``, ``eval``, ``bench``,
``reproduce``: :mod:`dqt_lightning.commands`).

- The data module's vocabulary size reaches the model through a link, never by hand.
- With no logger configured, runs log to TensorBoard under ``runs/<config names>/version_N``: a new directory for
  every run, so repeating a command never fails on, or overwrites, an earlier run.
- ``--ckpt_path last`` continues the newest run of the same settings, in its own directory.
- A user mistake ends with one line on stderr naming the field or file, not a traceback; a run that cannot start is
  refused before anything is written (:mod:`dqt_lightning.checks`).
- ``prepare`` parses the same configs as ``fit`` and writes the token shards its ``data`` section describes.
"""

from __future__ import annotations

import math
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
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from dqt_lightning import commands
from dqt_lightning.checks import (check_ckpt_path, check_config_files, check_the_run_can_start, check_trainer_numbers,
                                  quant_plugin, resolve_config_files)
from dqt_lightning.commands import first_reason
from dqt_lightning.train.checkpoint import AtomicCheckpointIO
from dqt_lightning.train.summary import IntegerWeightModelSummary
from dqt_lightning.errors import ConfigError, TrainingStopped
from dqt_lightning.files import atomic_write
from dqt_lightning.runs import RUNS_DIR, resumable_checkpoint, run_name
from dqt_lightning.pretrained import settle_data_tokenizer
from dqt_lightning.tools.plan import check_memory, print_plan
from dqt_lightning.train.precision import PRECISIONS, Execution

FLOAT32_MATMUL_PRECISIONS = ("highest", "high", "medium")


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
        line = str(found) if found else first_reason(message)
        if "arguments are required" in line and "model" in line:
            line += " (start from a config that names them: --config configs/ternary.yaml)"
        not_finite = re.match(r"""Parser key "lr": '([-+]?(?:inf|nan|infinity))' is not a valid value""", line, re.I)
        if not_finite:  # YAML reads inf and nan as words; say what is wrong with them as numbers
            line = f"model.init_args.optimizer.init_args.lr must be a finite number; got {not_finite.group(1)}"
        if line.startswith('expected "subcommand" to be one of'):
            names = [*DQTLightningCLI.subcommands(), "prepare", "plan", *commands.TOOLS]
            line = f"give a command: {', '.join(names)} (python -m dqt_lightning --help)"
        sys.stderr.write(f"error: {line}\n")
        sys.exit(2)


class _SaveConfig(SaveConfigCallback):
    """Lightning's config saving, with its refusal to overwrite an earlier run's config.yaml (which happens when runs
    without a logger share a directory) turned into a one-line error instead of a traceback."""

    integer_ones: list[str] = []  # batch limits the Trainer took as the integer 1 (see _integer_ones)

    def setup(self, trainer, pl_module, stage: str) -> None:
        path = Path(trainer.log_dir or ".") / self.config_filename  # log_dir broadcasts: every rank must ask
        # Lightning's own test, asked first: it would refuse with a paragraph-long RuntimeError.
        if not self.already_saved and self.save_to_log_dir and not self.overwrite:
            if trainer.strategy.broadcast(path.is_file() if trainer.is_global_zero else False):
                raise ConfigError(f"{path} exists already, from an earlier run in the same directory; set "
                                  "trainer.default_root_dir to a new directory (or keep the default logger, which "
                                  "gives every run its own)")
        super().setup(trainer, pl_module, stage)
        ones = self.integer_ones if trainer.is_global_zero and path.is_file() else []
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) if ones else None
        if isinstance(saved, dict) and isinstance(saved.get("trainer"), dict):  # jsonargparse wrote them as 1.0
            saved["trainer"].update({key: 1 for key in ones})
            atomic_write(path, lambda f: f.write(yaml.safe_dump(saved, sort_keys=False).encode()))


# The integer 1 of a batch limit. Lightning types these Optional[Union[int, float]], but Python's typing cache can hand
# jsonargparse an equal Union created elsewhere with float first, and then a 1 is read as 1.0: for the limits every
# batch instead of one, for val_check_interval once an epoch instead of every batch. Whether it happens depends on
# what was imported before (https://github.com/Lightning-AI/pytorch-lightning/issues/21259): in this project's test
# environment it does. The workaround: the keys written as the integer 1 are found in the command line and its YAML
# files, and set back to 1 for the Trainer and in config.yaml.
# Delete when: with this function returning [], tests/test_cli.py::test_a_limit_written_as_the_integer_1_is_one_batch
# passes in a fresh `make test` environment.
BATCH_COUNTS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                "val_check_interval")


def _integer_ones(args: list[str]) -> list[str]:
    """The keys of ``BATCH_COUNTS`` whose last value, in argument order (YAML files and flags), is written ``1``."""
    written: dict[str, object] = {}
    for i, token in enumerate(args):
        if token in ("-c", "--config") and i + 1 < len(args):
            try:
                data = yaml.safe_load(Path(args[i + 1]).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError, UnicodeDecodeError):
                continue  # jsonargparse reports it
            trainer = data.get("trainer") if isinstance(data, dict) else None
            written.update({key: trainer[key] for key in BATCH_COUNTS if key in trainer}
                           if isinstance(trainer, dict) else {})
        for key in BATCH_COUNTS:
            if token == f"--trainer.{key}" and i + 1 < len(args):
                written[key] = args[i + 1]
            elif token.startswith(f"--trainer.{key}="):
                written[key] = token.split("=", 1)[1]
    return [key for key, value in written.items()
            if (type(value) is int and value == 1) or (isinstance(value, str) and value.strip() == "1")]


def _move_trainer_precision_into_the_plugin(trainer: Namespace) -> None:
    """``--trainer.precision bf16-mixed``, the Lightning way, sets the plugin's precision: Lightning itself refuses a
    Trainer given both a precision and a precision plugin."""
    wanted = trainer.get("precision")
    ours = quant_plugin(trainer)
    if wanted is None or ours is None:
        return
    value = {"32": "32-true", "bf16": "bf16-mixed"}.get(str(wanted), str(wanted))
    if value not in PRECISIONS:
        raise ConfigError(f"trainer.precision={wanted} is not one the DQT precision plugin runs; choose from "
                          f"{', '.join(PRECISIONS)} (it sets trainer.plugins.init_args.execution.precision)")
    init_args = ours.init_args
    if init_args.get("execution") is None:  # no execution block: Execution's defaults, with this precision
        init_args.execution = Namespace(**asdict(Execution()))
    init_args.execution.precision = value
    trainer.precision = None


class DQTLightningCLI(LightningCLI):
    # fit with --ckpt_path last: the version directory of the run it continues (the default logger's only)
    _resume_version: int | None = None
    _integer_ones: list[str] = []

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
        parser.add_argument("--check_memory", type=bool, default=True,
                            help="fit refuses a run whose memory plan (python -m dqt_lightning plan) exceeds the "
                            "memory of this machine, or of its GPU, before it builds anything; false: try anyway")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self._integer_ones = _integer_ones(sys.argv[1:] if args is None else list(args))
        super().parse_arguments(parser, args)
        # Here, before Lightning reads the checkpoint's hyper-parameters: a bad path would be a traceback there.
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        if config.get("ckpt_path") == "last" and config.trainer.logger in (None, True):
            self._find_last(parser, subcommand)
        check_ckpt_path(config.get("ckpt_path"))

    def _find_last(self, parser: LightningArgumentParser, subcommand: str) -> None:
        """``--ckpt_path last`` with the default logger, which makes every run a new version directory where
        Lightning would find no last.ckpt: the newest run of these settings under ``runs/<config names>``.

        fit continues in that run's directory (the logger takes its version), where Lightning's own ``last`` then
        finds the checkpoint; validate and test name the file."""
        config = self.config[subcommand]
        runs = Path(RUNS_DIR) / run_name(config)
        # Only a run of the same settings: the newest last.ckpt may be another experiment's of the same configs with
        # other overrides (an interrupted run killed before its first save leaves none of its own).
        current = yaml.safe_load(parser.dump(self.config, skip_none=False))[subcommand]
        found, differs = resumable_checkpoint(runs, current)
        if found is None and differs:
            shown = ", ".join(differs[:4]) + (f" and {len(differs) - 4} more" if len(differs) > 4 else "")
            raise ConfigError(f"ckpt_path last: the newest run under {runs} with a last.ckpt has other settings "
                              f"({shown}) and none has these; resume one by its path, or drop --ckpt_path last to "
                              "start a new run")
        # With none, fit starts from scratch (Lightning's rule, for jobs that may or may not be resuming); validate
        # and test would score an untrained model.
        if found is None and subcommand != "fit":
            raise ConfigError(f"ckpt_path last: no {runs}/version_N/checkpoints/last.ckpt to {subcommand}")
        if found is None:
            return
        run_dir = found.parent.parent
        rank_zero_info(f"ckpt_path last: {found}, the newest last.ckpt under {runs} with these settings"
                       + (f"; the run continues in {run_dir}" if subcommand == "fit" else ""))
        if subcommand == "fit":
            self._resume_version = int(run_dir.name.removeprefix("version_"))
            self.save_config_kwargs["overwrite"] = True  # its config.yaml: the same settings, max_steps aside
        else:
            config.ckpt_path = str(found)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        torch.set_float32_matmul_precision(config.float32_matmul_precision)
        # Refused here, before a logger opens a run directory or config.yaml is written: nothing to clean up.
        check_trainer_numbers(config.trainer)
        _move_trainer_precision_into_the_plugin(config.trainer)
        settle_data_tokenizer(config)
        if self.subcommand is not None:  # a run, not a parse (prepare, or tests of the configs)
            check_the_run_can_start(config)
        if self.subcommand == "fit" and config.get("check_memory", True):
            check_memory(config)
        if config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=RUNS_DIR, name=run_name(config), default_hp_metric=False,
                                    version=self._resume_version),
            )

    def instantiate_trainer(self, **kwargs):
        # Here, not before instantiating the classes: that pass types every value again, and 1 would be 1.0 again.
        trainer_config = (self.config_init[self.subcommand] if self.subcommand else self.config_init)["trainer"]
        ones = [key for key in self._integer_ones if trainer_config.get(key) == 1.0]
        for key in ones:
            trainer_config[key] = 1
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if trainer_config.get("enable_model_summary") is not False and not any(
                isinstance(c, ModelSummary) for c in callbacks):
            # Lightning's own would count a DQT model's parameters without its integer weights.
            trainer_config["callbacks"] = [*callbacks, IntegerWeightModelSummary()]
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
        for callback in trainer.callbacks:
            if isinstance(callback, _SaveConfig):
                callback.integer_ones = ones
        return trainer

    def _weights_from_checkpoint(self) -> None:
        # A run that restores a checkpoint file builds its model without the random init the checkpoint overwrites
        # ("best" and "hpc" may find none, so those still draw it).
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if (ckpt_path == "last" and self._resume_version is not None) or (ckpt_path and Path(ckpt_path).is_file()):
            if hasattr(self.model, "weights_from_checkpoint"):
                self.model.weights_from_checkpoint = True

    def before_fit(self) -> None:
        self._weights_from_checkpoint()

    def before_validate(self) -> None:
        self._weights_from_checkpoint()

    def before_test(self) -> None:
        self._weights_from_checkpoint()

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


def _parsed(command: str, args: list[str]) -> Namespace:
    """fit's configs and overrides, parsed (not instantiated) for another command: ``prepare`` or ``plan``."""
    with warnings.catch_warnings():  # that args and sys.argv differ is the point here: the command is not fit
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _ParseOnly(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         parser_class=_OneLineErrorParser, run=False, args=args,
                         parser_kwargs={"prog": f"python -m dqt_lightning {command}"})
    return cli.config


def _prepare(args: list[str]) -> None:
    """``prepare --config ...``: tokenize the ``data`` section's source into shards (``dqt_lightning.data.shards``)."""
    try:
        config = _parsed("prepare", args)
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


def _plan(args: list[str]) -> None:
    """``plan --config ... [--size NAME]``: the memory plan of the run fit would start (dqt_lightning.tools.plan)."""
    size = None
    if "--size" in args:
        at = args.index("--size")
        if at + 1 >= len(args):
            sys.stderr.write("error: --size needs a model size\n")
            sys.exit(2)
        size, args = args[at + 1], args[:at] + args[at + 2:]
    try:
        print_plan(_parsed("plan", args), size)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)


def _other_commands(argv: list[str]) -> str | None:
    """The tools, for ``--help``: LightningCLI's parser does not know them (main dispatches them first)."""
    if not {"-h", "--help"} & set(argv):
        return None  # naming them imports every tool
    return ("other commands (each takes --help): prepare --config ... (tokenize the data section's source into "
            "shards); plan --config ... [--size NAME] (the memory a fit of these configs will need, predicted before "
            f"anything is built); {commands.summaries()}")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    try:
        argv = resolve_config_files(argv)
        if args is None:
            sys.argv[1:] = argv  # LightningCLI reads them there
        else:
            args = argv
        check_config_files(argv)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)
    if argv[:1] == ["prepare"]:  # not a Trainer method, so not a LightningCLI subcommand: dispatched here
        _prepare(argv[1:])
        return
    if argv[:1] == ["plan"]:
        _plan(argv[1:])
        return
    if argv[:1] and argv[0] in commands.TOOLS:  # work on finished runs: no config, model or trainer to build
        sys.exit(commands.run(argv))
    if argv[:1] and not argv[0].startswith("-") and argv[0] not in DQTLightningCLI.subcommands():
        names = [*DQTLightningCLI.subcommands(), "prepare", "plan", *commands.TOOLS]
        sys.stderr.write(f"error: unknown command '{argv[0]}'; choose from {', '.join(names)} "
                         "(python -m dqt_lightning --help)\n")
        sys.exit(2)
    try:
        DQTLightningCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=_OneLineErrorParser,
            parser_kwargs={"prog": "python -m dqt_lightning", "epilog": _other_commands(argv)},
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
