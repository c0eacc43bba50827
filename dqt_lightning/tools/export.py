"""``python -m dqt_lightning export CKPT``: a trained model as safetensors with integer weights, or for transformers
or llama.cpp.

An export is a directory a Hugging Face user recognises:

- ``model.safetensors``: every quantized weight as its ``int8`` levels (``<name>.weight``) plus its float
  ``<name>.scale``, or, with ``--pack``, ternary levels four per byte (``<name>.weight_packed``, ``uint8``);
  everything else in float32.
- ``config.json``: the model sizes (:class:`~dqt_lightning.model.Config`) and a ``quantization`` entry (mode, bits,
  which weights are integers, packed shapes).
- ``tokenizer.json`` (or ``tokenizer.model``): the one the checkpoint keeps, or else its run directory's.

A DQT checkpoint already holds integers, so they are written as they are. A BitNet (STE) checkpoint holds float
masters: they are quantized with the absmean rule the model was trained with, which is how BitNet b1.58 is deployed.
A full-precision checkpoint is written in float32. :func:`~dqt_lightning.tools.loading.load_exported` builds the
model back, with integer layers wherever the file holds integers. ``--format hf`` and ``--format gguf`` write the
formats of transformers and llama.cpp instead (:mod:`~dqt_lightning.tools.export_hf`,
:mod:`~dqt_lightning.tools.export_gguf`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from safetensors.torch import save

from dqt_lightning.errors import ConfigError
from dqt_lightning.files import atomic_directory, check_replaceable_directory
from dqt_lightning.quant.grid import pack_ternary
from dqt_lightning.tools.loading import (TOKENIZER_FILES, integer_state, model_from_checkpoint, resolve_checkpoint,
                                         tokenizer_of_checkpoint)

# What an export directory may hold: its own files, and the scores `eval` wrote of them (replaced with the weights).
EXPORT_FILES = ("model.safetensors", "config.json", *TOKENIZER_FILES, "eval.json")


def export_dqt(ckpt_path: str | Path, output: str | Path, pack: bool = False) -> Path:
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
    check_replaceable_directory(out, EXPORT_FILES, "export")
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


def default_output(ckpt: Path, fmt: str = "dqt", gguf_type: str = "tq2_0") -> Path:
    """Where an export goes unless ``--output`` says: beside the run (``<run dir>/export``, ``export-hf``,
    ``model-<type>.gguf``) for a checkpoint in a run's ``checkpoints/``, else beside the checkpoint, named after it."""
    name = {"dqt": "export", "hf": "export-hf", "gguf": f"model-{gguf_type}.gguf"}[fmt]
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / name
    return ckpt.with_name(f"{ckpt.stem}-{name.removeprefix('model-')}")


def export(ckpt: str, format: Literal["dqt", "hf", "gguf"] = "dqt", output: str | None = None, pack: bool = False,
           dtype: Literal["float32", "bfloat16"] | None = None, type: Literal["tq2_0", "tq1_0", "f16"] | None = None,
           ternary: bool = False) -> int:
    """Export a checkpoint for this package (dqt), transformers (hf) or llama.cpp (gguf).

    dqt: our safetensors with integer weights; hf: a Hugging Face model directory that transformers loads without
    custom code; gguf: a GGUF file for llama.cpp.

    Args:
        ckpt: a checkpoint written by fit (runs/<name>/version_N/checkpoints/*.ckpt), or a run directory for its
            checkpoints/last.ckpt
        format: dqt: int8 levels and scales, read back by this package; hf: BitNet layout for ternary models, float
            LlamaForCausalLM otherwise; gguf: llama.cpp
        output: directory (a .gguf file for --format gguf) to write (default: export, export-hf or
            model-<type>.gguf in the run directory, or named after a checkpoint outside one)
        pack: --format dqt: store weights that hold only -1, 0 and 1 four per byte
        dtype: --format hf: dtype of the float weights of a non-ternary model (default: float32)
        type: --format gguf: tensor type of the projections (default: tq2_0)
        ternary: --format hf or gguf: re-quantize every projection to ternary first (as validation's ternary_eval),
            so an n-bit or full-precision model goes into the ternary layout
    """
    gguf_type = type
    for flag, value, fmt in (("--pack", pack, "dqt"), ("--dtype", dtype, "hf"), ("--type", gguf_type, "gguf"),
                             ("--ternary", ternary, "hf or gguf")):
        if value and format not in fmt.split(" or "):
            raise ConfigError(f"{flag} applies to --format {fmt}, not --format {format}")
    checkpoint = resolve_checkpoint(ckpt)
    gguf_type = gguf_type or "tq2_0"
    out = Path(output) if output else default_output(checkpoint, format, gguf_type)
    if format == "hf":
        from dqt_lightning.tools.export_hf import export_hf  # noqa: PLC0415 - needs the optional transformers

        export_hf(checkpoint, out, dtype=dtype or "float32", ternary=ternary)
    elif format == "gguf":
        from dqt_lightning.tools.export_gguf import export_gguf  # noqa: PLC0415 - needs the optional gguf

        export_gguf(checkpoint, out, gguf_type=gguf_type, ternary=ternary)
    else:
        export_dqt(checkpoint, out, pack=pack)
    if out.is_file():
        print(f"[export] {out}: {out.stat().st_size / 1e6:.2f} MB")
    else:
        files = sorted(out.iterdir())
        size = sum(p.stat().st_size for p in files)
        print(f"[export] {out}: {size / 1e6:.2f} MB in {', '.join(p.name for p in files)}")
    return 0
