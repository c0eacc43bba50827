"""A trained model back from a checkpoint or an export directory: what ``export``, ``generate`` and ``eval`` load.

- :func:`model_from_checkpoint`: the model of a Lightning checkpoint (or a run directory's ``last.ckpt``), converted
  the way its run trained it, from the method the checkpoint records (or, for one written before checkpoints
  recorded it, its run's ``config.yaml``).
- :func:`load_exported`: the model of a ``--format dqt`` export directory, with integer layers wherever it holds
  integers.
- :func:`integer_state`: what inference needs of a model: integer levels and scales of every quantized weight.
- :func:`tokenizer_of_checkpoint`, :func:`tokenizer_beside`: the tokenizer a checkpoint keeps, or its directory's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from dqt_lightning.data.tokenizer import TextTokenizer, resolve_tokenizer
from dqt_lightning.errors import ConfigError
from dqt_lightning.model import Config, LLaMA
from dqt_lightning.pretrained import Pretrained, pretrained_weights
from dqt_lightning.quant.grid import Grid, absmean_quantize, unpack_ternary
from dqt_lightning.quant.layers import BitEmbedding, BitLinear, DQTWeight
from dqt_lightning.tools.compare import plugin_args, run_config
from dqt_lightning.train.checkpoint import (GRIDS_KEY, METHOD_KEY, PACKED_KEY, check_checkpoint_fits,
                                           tokenizer_from_checkpoint, unpack_ternary_weights)
from dqt_lightning.train.precision import Method, QuantPrecision

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _plugin(mode: str, bits: float, quantize_embeddings: bool, per_row_scale: bool) -> QuantPrecision:
    return QuantPrecision(Method(mode=mode, bits=bits, quantize_embeddings=quantize_embeddings,
                                 per_row_scale=per_row_scale))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (or its ``checkpoints/``) standing for the ``last.ckpt`` in it."""
    path = Path(path)
    if path.is_dir():
        found = next((c for c in (path / "checkpoints" / "last.ckpt", path / "last.ckpt") if c.is_file()), None)
        if found is None:
            raise ConfigError(f"checkpoint {path} is a directory without checkpoints/last.ckpt; name a .ckpt file")
        return found
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    return path


def model_from_checkpoint(ckpt_path: str | Path) -> tuple[LLaMA, dict]:
    """The trained model of a Lightning checkpoint, converted the way its run trained it.

    The training mode comes from the checkpoint itself (the precision plugin's saved state), or, for a checkpoint
    written before checkpoints recorded it, from the ``config.yaml`` that the CLI saved in the run directory
    (``runs/<name>/version_N/config.yaml``, two levels above ``checkpoints/``).

    Returns:
        The model (DQT, BitNet or float layers, weights loaded) and the plugin settings it was trained with.
    """
    path = resolve_checkpoint(ckpt_path)
    import dqt_lightning.module  # noqa: F401, PLC0415 - registers Config as safe for weights_only loading

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise ConfigError(f"checkpoint {path} cannot be read ({type(error).__name__}){_what_it_is(path)}") from error
    hparams = ckpt.get("hyper_parameters") or {}
    if "state_dict" not in ckpt or "config" not in hparams:
        raise ConfigError(f"checkpoint {path} is not a dqt_lightning LanguageModel checkpoint{_what_it_is(path)}")
    sizes = hparams["config"] or {}  # a Config in code, a plain mapping when LightningCLI built the model
    sizes = asdict(sizes) if is_dataclass(sizes) else dict(sizes)
    # The vocabulary size is linked in from the data module, so the hyper-parameter, not the config, holds it.
    config = Config(**{**sizes, "vocab_size": hparams.get("vocab_size", sizes.get("vocab_size"))})
    # The method the plugin saved into the checkpoint; a checkpoint from before it did has its run's config.yaml.
    method = (ckpt.get(METHOD_KEY) or {}).get("method") or plugin_args(run_config(path.parent.parent))
    settings = {"mode": method.get("mode", "fp"), "bits": float(method.get("bits") or 1.58),
                "quantize_embeddings": bool(method.get("quantize_embeddings", False)),
                "per_row_scale": bool(method.get("per_row_scale", False))}
    model = _built_for_loading(config, None if settings["mode"] == "fp" else _plugin(**settings))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    unpack_ternary_weights(state, {k.removeprefix("model."): v for k, v in ckpt.get(PACKED_KEY, {}).items()})
    # The grids come from the checkpoint, not from config.yaml's bits: a bit-width schedule may have moved them.
    grids = {k.removeprefix("model."): v for k, v in ckpt.get(GRIDS_KEY, {}).items()}
    check_checkpoint_fits({"state_dict": state, GRIDS_KEY: grids}, model, f"checkpoint {path}",
                          [Grid.from_levels(*levels) for levels in grids.values()])
    model.load_state_dict(state)
    return model.eval(), settings


def _built_for_loading(config: Config, plugin: QuantPrecision | None) -> LLaMA:
    """A model of ``config`` in ``plugin``'s layers (float without one), its weights left for a state dict to fill:
    no random init, and no float copy of a layer that becomes integers."""
    model = LLaMA.empty(config)
    convert = None if plugin is None else lambda name, layer: plugin.convert_layer(name, layer, quantize=False)
    model.materialize(convert, initialize=False)
    if plugin is not None:
        plugin.convert_module(model)
    return model


def _what_it_is(path: Path) -> str:
    """For a file that is not a checkpoint: what it is, when it is an export another tool reads, as an ending."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic == b"GGUF":
        return ": it is a GGUF file, which llama.cpp runs; give a checkpoint or a --format dqt export directory"
    if path.suffix == ".safetensors":
        return ": it is a safetensors file; give the export directory that holds it"
    return ""


def tokenizer_of_checkpoint(path: Path, vocab_size: int) -> TextTokenizer | None:
    """The tokenizer a checkpoint keeps inside it, or else the one its run directory keeps beside ``config.yaml``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    inside = tokenizer_from_checkpoint(ckpt, vocab_size, f"checkpoint {path}")
    return inside if inside is not None else tokenizer_beside(path.parent.parent, vocab_size)


def integer_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """What inference needs: integer levels and scales for every quantized weight, float32 for the rest.

    Returns:
        The tensors, and ``{module name: bits}`` of the integer weights.
    """
    tensors, integer = {}, {}
    for name, tensor in model.state_dict().items():
        tensors[name] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
    for name, module in model.named_modules():
        if isinstance(module, DQTWeight):
            integer[name] = module.grid.bits
        elif isinstance(module, (BitLinear, BitEmbedding)):
            q, alpha = absmean_quantize(module.weight, module.grid)  # what the STE forward multiplies by
            tensors[f"{name}.weight"], tensors[f"{name}.scale"] = q, alpha
            integer[name] = module.grid.bits
    return {k: v.contiguous() for k, v in tensors.items()}, integer


def load_exported(directory: str | Path) -> tuple[LLaMA, TextTokenizer | None]:
    """Build the model of an export (integer layers where the file holds integers) and load its tokenizer.

    Returns:
        The model in eval mode, and the tokenizer (None when the export has none).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise ConfigError(f"{directory} is not an export (needs config.json and model.safetensors)")
    config = json.loads((directory / "config.json").read_text())
    if "quantization" not in config:  # a Hugging Face checkpoint (or a --format hf export): its float model
        return load_pretrained(directory)
    quant = config.pop("quantization")
    tensors = load_file(str(directory / "model.safetensors"))
    for name, shape in quant["packed"].items():
        tensors[f"{name}.weight"] = unpack_ternary(tensors.pop(f"{name}.weight_packed"), tuple(shape))
    integer, plugin = quant["integer_weights"], None
    if integer:
        bits = {float(b) for b in integer.values()}
        if len(bits) != 1:
            raise ConfigError(f"{directory}: mixed bit widths {sorted(bits)} are not supported by this loader")
        per_row = any(tensors[f"{name}.scale"].dim() > 0 for name in integer)
        plugin = _plugin("dqt", bits.pop(), quant.get("quantize_embeddings", False), per_row)
    model = _built_for_loading(Config(**config), plugin)
    model.load_state_dict(tensors)
    return model.eval(), tokenizer_beside(directory, config["vocab_size"])


def load_pretrained(directory: str | Path) -> tuple[LLaMA, TextTokenizer | None]:
    """A Hugging Face LLaMA-family checkpoint directory as our float model (:mod:`dqt_lightning.pretrained`), read one
    tensor at a time, and its tokenizer: what ``generate`` and ``eval`` run when given such a directory."""
    pretrained = Pretrained(directory)
    model = LLaMA.empty(pretrained.config(Config(norm_layout="llama")))
    pretrained.check(pretrained_weights(model), "llama")
    model.materialize(weights=pretrained.reader("llama"))
    return model.eval(), tokenizer_beside(Path(directory), model.config.vocab_size)


def tokenizer_beside(directory: Path, vocab_size: int) -> TextTokenizer | None:
    """The ``tokenizer.json`` or ``tokenizer.model`` kept in a run or export directory, or None when there is none."""
    found = next((directory / n for n in TOKENIZER_FILES if (directory / n).is_file()), None)
    if found is None:
        return None
    # A file spec is loaded, never trained: no documents and no cache are needed.
    return resolve_tokenizer(str(found), vocab_size, lambda: [], directory, "")
