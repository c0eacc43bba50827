"""``python -m dqt_lightning export CKPT``: a trained model as safetensors with integer weights, and its loader.

An export is a directory a Hugging Face user recognises:

- ``model.safetensors``: every quantized weight as its ``int8`` levels (``<name>.weight``) plus its float
  ``<name>.scale``, or, with ``--pack``, ternary levels four per byte (``<name>.weight_packed``, ``uint8``);
  everything else in float32.
- ``config.json``: the model sizes (:class:`~dqt_lightning.model.Config`) and a ``quantization`` entry (mode, bits,
  which weights are integers, packed shapes).
- ``tokenizer.json`` (or ``tokenizer.model``): the one the checkpoint keeps, or else its run directory's.

A DQT checkpoint already holds integers, so they are written as they are. A BitNet (STE) checkpoint holds float
masters: they are quantized with the absmean rule the model was trained with, which is how BitNet b1.58 is deployed.
A full-precision checkpoint is written in float32. :func:`load_exported` builds the model back, with integer layers
wherever the file holds integers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from dqt_lightning.train.checkpoint import (GRIDS_KEY, METHOD_KEY, PACKED_KEY, check_checkpoint_fits,
                                           tokenizer_from_checkpoint, unpack_ternary_weights)
from dqt_lightning.tools.compare import plugin_args, run_config
from dqt_lightning.errors import ConfigError
from dqt_lightning.files import atomic_directory
from dqt_lightning.quant.layers import BitEmbedding, BitLinear, DQTWeight
from dqt_lightning.model import LLaMA, Config
from dqt_lightning.train.precision import Method, QuantPrecision
from dqt_lightning.quant.grid import Grid, absmean_quantize, pack_ternary, unpack_ternary
from dqt_lightning.data.tokenizer import TextTokenizer, resolve_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
EXPORT_FILES = ("model.safetensors", "config.json", *TOKENIZER_FILES)


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
        raise ConfigError(f"checkpoint {path} cannot be read ({type(error).__name__})") from error
    hparams = ckpt.get("hyper_parameters") or {}
    if "state_dict" not in ckpt or "config" not in hparams:
        raise ConfigError(f"checkpoint {path} is not a dqt_lightning LanguageModel checkpoint")
    sizes = hparams["config"] or {}  # a Config in code, a plain mapping when LightningCLI built the model
    sizes = asdict(sizes) if is_dataclass(sizes) else dict(sizes)
    # The vocabulary size is linked in from the data module, so the hyper-parameter, not the config, holds it.
    config = Config(**{**sizes, "vocab_size": hparams.get("vocab_size", sizes.get("vocab_size"))})
    # The method the plugin saved into the checkpoint; a checkpoint from before it did has its run's config.yaml.
    method = (ckpt.get(METHOD_KEY) or {}).get("method") or plugin_args(run_config(path.parent.parent))
    settings = {"mode": method.get("mode", "fp"), "bits": float(method.get("bits") or 1.58),
                "quantize_embeddings": bool(method.get("quantize_embeddings", False)),
                "per_row_scale": bool(method.get("per_row_scale", False))}
    model = LLaMA(config)
    if settings["mode"] != "fp":
        _plugin(**settings).convert_module(model)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    unpack_ternary_weights(state, {k.removeprefix("model."): v for k, v in ckpt.get(PACKED_KEY, {}).items()})
    # The grids come from the checkpoint, not from config.yaml's bits: a bit-width schedule may have moved them.
    grids = {k.removeprefix("model."): v for k, v in ckpt.get(GRIDS_KEY, {}).items()}
    check_checkpoint_fits({"state_dict": state, GRIDS_KEY: grids}, model, f"checkpoint {path}",
                          [Grid.from_levels(*levels) for levels in grids.values()])
    model.load_state_dict(state)
    return model.eval(), settings


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


def export(ckpt_path: str | Path, output: str | Path, pack: bool = False) -> Path:
    """Write ``model.safetensors``, ``config.json`` and the run's tokenizer to ``output``.

    Args:
        ckpt_path: A checkpoint written by ``fit`` (``runs/<name>/version_N/checkpoints/*.ckpt``).
        output: Directory to write; created when needed, replaced whole when it exists (written beside it first,
            then renamed into place).
        pack: Store ternary levels four per byte.

    Returns:
        The output directory.
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file; give a directory to write the export into")
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES) if out.is_dir() else []
    if others:  # an earlier export is replaced whole; anything else there is the user's, and stays
        raise ConfigError(f"--output {out} holds files that are not an export's ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); give a new directory or an earlier export")
    ckpt_path = resolve_checkpoint(ckpt_path)
    model, settings = model_from_checkpoint(ckpt_path)
    tensors, integer = integer_state(model)
    packed = {}
    if pack:
        for name in integer:
            q = tensors[f"{name}.weight"]
            # By value, not by the configured bits: a run whose bit-width schedule ended on the ternary grid is
            # configured as 8-bit but holds only -1, 0 and 1, and packing those loses nothing.
            if int(q.abs().max()) <= 1:
                packed[name] = list(q.shape)
                tensors[f"{name}.weight_packed"] = pack_ternary(tensors.pop(f"{name}.weight"))
    config = {**asdict(model.config), "quantization": {**settings, "integer_weights": integer, "packed": packed}}
    tokenizer = tokenizer_of_checkpoint(ckpt_path, model.config.vocab_size)
    # Whole or not at all: a reader never finds weights without their config, nor an earlier export half replaced.
    with atomic_directory(out, "--output") as staging:
        (staging / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            name, data = tokenizer.definition()
            (staging / name).write_bytes(data)
    return out


def load_exported(directory: str | Path) -> tuple[LLaMA, TextTokenizer | None]:
    """Build the model of an export (integer layers where the file holds integers) and load its tokenizer.

    Returns:
        The model in eval mode, and the tokenizer (None when the export has none).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise ConfigError(f"{directory} is not an export (needs config.json and model.safetensors)")
    config = json.loads((directory / "config.json").read_text())
    quant = config.pop("quantization")
    model = LLaMA(Config(**config))
    tensors = load_file(str(directory / "model.safetensors"))
    for name, shape in quant["packed"].items():
        tensors[f"{name}.weight"] = unpack_ternary(tensors.pop(f"{name}.weight_packed"), tuple(shape))
    integer = quant["integer_weights"]
    if integer:
        bits = {float(b) for b in integer.values()}
        if len(bits) != 1:
            raise ConfigError(f"{directory}: mixed bit widths {sorted(bits)} are not supported by this loader")
        per_row = any(tensors[f"{name}.scale"].dim() > 0 for name in integer)
        _plugin("dqt", bits.pop(), quant.get("quantize_embeddings", False), per_row).convert_module(model)
    model.load_state_dict(tensors)
    return model.eval(), tokenizer_beside(directory, config["vocab_size"])


def tokenizer_beside(directory: Path, vocab_size: int) -> TextTokenizer | None:
    """The ``tokenizer.json`` or ``tokenizer.model`` kept in a run or export directory, or None when there is none."""
    found = next((directory / n for n in TOKENIZER_FILES if (directory / n).is_file()), None)
    if found is None:
        return None
    # A file spec is loaded, never trained: no documents and no cache are needed.
    return resolve_tokenizer(str(found), vocab_size, lambda: [], directory, "")


def default_output(ckpt: Path, fmt: str = "dqt", gguf_type: str = "tq2_0") -> Path:
    """Where an export goes unless ``--output`` says: beside the run (``<run dir>/export``, ``export-hf``,
    ``model-<type>.gguf``) for a checkpoint in a run's ``checkpoints/``, else beside the checkpoint, named after it."""
    name = {"dqt": "export", "hf": "export-hf", "gguf": f"model-{gguf_type}.gguf"}[fmt]
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / name
    return ckpt.with_name(f"{ckpt.stem}-{name.removeprefix('model-')}")


FORMATS = ("dqt", "hf", "gguf")
GGUF_TYPES = ("tq2_0", "tq1_0", "f16")
HF_DTYPES = ("float32", "bfloat16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dqt_lightning export",
        description="Export a checkpoint: our safetensors with integer weights (dqt), a Hugging Face model directory "
                    "that transformers loads without custom code (hf), or a GGUF file for llama.cpp (gguf).")
    parser.add_argument("ckpt", help="a checkpoint written by fit (runs/<name>/version_N/checkpoints/*.ckpt), or a "
                        "run directory for its checkpoints/last.ckpt")
    parser.add_argument("--format", default="dqt", choices=FORMATS,
                        help="dqt: int8 levels and scales, read back by this package; hf: BitNet layout for ternary "
                             "models, float LlamaForCausalLM otherwise; gguf: llama.cpp (default: dqt)")
    parser.add_argument("--output", help="directory (a .gguf file for --format gguf) to write (default: export, "
                        "export-hf or model-<type>.gguf in the run directory, or named after a checkpoint outside one)")
    parser.add_argument("--pack", action="store_true",
                        help="--format dqt: store weights that hold only -1, 0 and 1 four per byte")
    parser.add_argument("--dtype", choices=HF_DTYPES, default=None,
                        help="--format hf: dtype of the float weights of a non-ternary model (default: float32)")
    parser.add_argument("--type", dest="gguf_type", choices=GGUF_TYPES, default=None,
                        help="--format gguf: tensor type of the projections (default: tq2_0)")
    parser.add_argument("--ternary", action="store_true",
                        help="--format hf or gguf: re-quantize every projection to ternary first (as validation's "
                             "ternary_eval), so an n-bit or full-precision model goes into the ternary layout")
    args = parser.parse_args(argv)
    try:
        for flag, value, fmt in (("--pack", args.pack, "dqt"), ("--dtype", args.dtype, "hf"),
                                 ("--type", args.gguf_type, "gguf"), ("--ternary", args.ternary, "hf or gguf")):
            if value and args.format not in fmt.split(" or "):
                raise ConfigError(f"{flag} applies to --format {fmt}, not --format {args.format}")
        ckpt = resolve_checkpoint(args.ckpt)
        gguf_type = args.gguf_type or "tq2_0"
        out = Path(args.output) if args.output else default_output(ckpt, args.format, gguf_type)
        if args.format == "hf":
            from dqt_lightning.tools.export_hf import export_hf  # noqa: PLC0415 - needs the optional transformers

            export_hf(ckpt, out, dtype=args.dtype or "float32", ternary=args.ternary)
        elif args.format == "gguf":
            from dqt_lightning.tools.export_gguf import export_gguf  # noqa: PLC0415 - needs the optional gguf

            export_gguf(ckpt, out, gguf_type=gguf_type, ternary=args.ternary)
        else:
            export(ckpt, out, pack=args.pack)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    if out.is_file():
        print(f"[export] {out}: {out.stat().st_size / 1e6:.2f} MB")
    else:
        files = sorted(out.iterdir())
        size = sum(p.stat().st_size for p in files)
        print(f"[export] {out}: {size / 1e6:.2f} MB in {', '.join(p.name for p in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
