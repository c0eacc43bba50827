"""What ``fit``, ``validate`` and ``test`` refuse before they build anything.

LightningCLI calls these from its hooks that run before any class is instantiated: no logger has opened a run
directory and no ``config.yaml`` is written yet, so a refused run leaves nothing behind to delete. The same refusals
stay where the objects meet at run time (the precision plugin, the update callback), for code that builds a Trainer
by hand; here they only come first, with the same words.
"""

from __future__ import annotations

import difflib
import importlib
import math
import re
from pathlib import Path

import torch
import yaml
from jsonargparse import Namespace

from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.fp8 import require_fp8
from dqt_lightning.train.precision import Execution, Method
from dqt_lightning.module import NEEDS_THE_CALLBACK, check_learning_rate, check_window
from dqt_lightning.tools.plan import settings_from_config
from dqt_lightning.train.checkpoint import check_checkpoint_grids
from dqt_lightning.train.update import QuantizedUpdate


def shipped_configs() -> Path:
    """The configs the package ships (``configs/`` of a checkout, ``dqt_lightning.configs`` of an install)."""
    import dqt_lightning.configs  # noqa: PLC0415 - a package of YAML files

    return Path(dqt_lightning.configs.__file__).parent


def resolve_config_files(argv: list[str]) -> list[str]:
    """``--config NAME`` that names no file here, resolved against the shipped configs: ``ternary.yaml``,
    ``bits/8.yaml``, ``recipes/lean.yaml`` (or ``configs/ternary.yaml`` run from elsewhere) work from any directory
    and in any install. A local file of that name comes first; a name found in neither is one line listing close
    names."""
    shipped = shipped_configs()
    resolved = list(argv)
    for i, (flag, value) in enumerate(zip(argv, argv[1:])):
        if flag not in ("-c", "--config") or Path(value).is_file() or "=" in value:
            continue
        name = value.removeprefix("configs/")
        if (shipped / name).is_file():
            resolved[i + 1] = str(shipped / name)
            continue
        names = sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*.yaml"))
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        raise ConfigError(f"config file {value} does not exist, here or among the shipped configs"
                          + (f"; did you mean {' or '.join(close)}?" if close else f" ({', '.join(names[:6])}, ...)"))
    return resolved


def check_config_files(argv: list[str]) -> None:
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


def check_ckpt_path(path: str | None) -> None:
    """A checkpoint path that names no readable checkpoint, refused before Lightning loads it (at parse time, for
    the hyper-parameters it holds: a traceback there)."""
    named = path and (path in ("best", "last", "hpc") or str(path).startswith("registry") or "://" in str(path))
    if not path or named:
        return
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path {path} " + ("is a directory, not a checkpoint file" if Path(path).is_dir()
                                                   else "does not exist"))
    if is_safetensors(Path(path)):  # torch.load reads its index too, and Lightning's load would then fail
        beside = Path(path).parent
        hint = (f"to start from this Hugging Face model, use --model.init_args.init_from {beside}"
                if (beside / "config.json").is_file() else "a Lightning checkpoint is a .ckpt file that fit wrote")
        raise ConfigError(f"ckpt_path {path} is a safetensors file of weights, not a checkpoint to resume; {hint}")
    try:  # memory-mapped: reads the file's index, not its tensors
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        reason = re.split(r"(?<=[.!?])\s", str(error).strip().splitlines()[0])[0] if str(error).strip() else ""
        raise ConfigError(f"ckpt_path {path} cannot be read as a checkpoint ({type(error).__name__}"
                          f"{': ' + reason.rstrip('.') if reason else ''}); the file is damaged (a copy cut short?) "
                          "or not a checkpoint") from error


def is_safetensors(path: Path) -> bool:
    """Whether a file is safetensors: an 8-byte little-endian header length, then that many bytes of JSON."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size


def check_trainer_numbers(trainer: Namespace) -> None:
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
    strategy = trainer.get("strategy")
    name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "")
    if "fsdp" in str(name).lower():
        raise ConfigError(f"trainer.strategy={name} is not supported: FSDP shards float parameters and insists on its "
                          "own precision plugin, while DQT weights are integer buffers; use trainer.strategy: ddp")


def quant_plugin(trainer: Namespace) -> Namespace | None:
    """The ``QuantPrecision`` entry of ``trainer.plugins``, if the config has one."""
    plugins = trainer.get("plugins")
    plugins = plugins if isinstance(plugins, list) else [plugins]
    return next((p for p in plugins if isinstance(p, Namespace)
                 and str(p.get("class_path", "")).endswith("QuantPrecision")), None)


def check_the_run_can_start(config: Namespace) -> None:
    """The refusals that otherwise come only once training starts: a learning rate no step can take, FP8 without
    the hardware, DQT weights without the callback that updates them, an update in backward with accumulation or
    clipping."""
    lr = config.get("model.init_args.optimizer.init_args.lr")
    if isinstance(lr, (int, float)):
        check_learning_rate(lr, config.get("model.init_args.optimizer.init_args.betas") or (0.0,))
    seq_len = config.get("data.init_args.seq_len")
    if isinstance(seq_len, int):
        check_window(seq_len, settings_from_config(config).config.block_size)
    trainer = config.trainer
    plugin = quant_plugin(trainer)
    if plugin is None:
        return
    method = plugin.init_args.get("method") or Namespace()
    execution = plugin.init_args.get("execution") or Namespace()
    if execution.get("precision", Execution.precision) == "fp8" and (device := _device(trainer)) is not None:
        require_fp8(device)
    if method.get("mode", Method.mode) == "dqt" and not any(_is_update(c) for c in _listed(trainer.get("callbacks"))):
        raise ConfigError(NEEDS_THE_CALLBACK)
    in_backward = Execution(update_in_backward=execution.get("update_in_backward", Execution.update_in_backward))
    in_backward.check_trainer(trainer.get("accumulate_grad_batches") or 1, trainer.get("gradient_clip_val"))
    ckpt_path = config.get("ckpt_path")
    schedules = [c for c in _listed(trainer.get("callbacks"))
                 if isinstance(c, Namespace) and "BitWidthSchedule" in str(c.get("class_path", ""))]
    if ckpt_path and Path(ckpt_path).is_file() and method.get("mode", Method.mode) == "dqt" and not schedules:
        grid = Method(**{k: v for k, v in method.items() if v is not None}).grid()
        check_checkpoint_grids(ckpt_path, grid)


def _device(trainer: Namespace) -> torch.device | None:
    """The device a run of these settings trains on, where the settings alone say it."""
    accelerator = trainer.get("accelerator") or "auto"
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("auto", "gpu", "cuda"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return None  # another accelerator, or an object: the plugin checks when it meets the device


def _listed(callbacks: object) -> list:
    return callbacks if isinstance(callbacks, list) else [] if callbacks is None else [callbacks]


def _is_update(callback: object) -> bool:
    path = str(callback.get("class_path", "")) if isinstance(callback, Namespace) else ""
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name) if module else None
    except ImportError:
        return False
    return isinstance(found, type) and issubclass(found, QuantizedUpdate)
