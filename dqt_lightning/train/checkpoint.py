"""Checkpoint files that are either whole or absent: a run killed while saving leaves the previous one intact."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from dqt_lightning.errors import ConfigError
from dqt_lightning.files import atomic_write
from dqt_lightning.data.tokenizer import TextTokenizer
from dqt_lightning.quant.layers import DQTWeight
from dqt_lightning.quant.grid import Grid, pack_ternary, unpack_ternary

PACKED_KEY = "dqt_packed_ternary"
# {layer name: [qmin, qmax]}: the grid each DQT weight's levels were on when saved. Levels alone cannot say it: an
# 8-bit layer whose levels all happen to be small looks ternary.
GRIDS_KEY = "dqt_grids"
# {"file": "tokenizer.json" or "tokenizer.model", "data": its bytes as a uint8 tensor}: the training tokenizer, so
# that a checkpoint copied alone anywhere still decodes (export, generate).
TOKENIZER_KEY = "dqt_tokenizer"
# Where the precision plugin's state_dict (the method a checkpoint was trained with) lands: Lightning stores it under
# the plugin class's name.
METHOD_KEY = "QuantPrecision"
_WHERE_FROM = "the config of the run that saved it (config.yaml in its run directory) says how it was trained"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to a temporary file beside the target, fsyncs it, and renames it into place.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp directory;
    when that is another filesystem the final move is a copy, and a kill during it leaves a truncated checkpoint
    under the real name. A rename within one directory is atomic.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


def pack_ternary_weights(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Replace each ternary DQT weight in ``state_dict`` by its 2-bit packing (layers stored packed already stay as
    they are); returns {key: shape} to undo it."""
    shapes = {}
    for name, layer in module.named_modules():
        key = f"{name}.weight"
        if isinstance(layer, DQTWeight) and layer.grid.is_ternary and key in state_dict:
            shapes[key] = list(layer.shape)
            if not layer.packed:
                state_dict[key] = pack_ternary(state_dict[key])
    return shapes


def unpack_ternary_weights(state_dict: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
    for key, shape in shapes.items():
        state_dict[key] = unpack_ternary(state_dict[key], tuple(shape))


def tokenizer_record(tokenizer: TextTokenizer) -> dict[str, Any]:
    """What :data:`TOKENIZER_KEY` holds for ``tokenizer``: loadable with ``torch.load(weights_only=True)``."""
    name, data = tokenizer.definition()
    return {"file": name, "data": torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def tokenizer_from_checkpoint(checkpoint: dict[str, Any], vocab_size: int, source: str) -> TextTokenizer | None:
    """The tokenizer a checkpoint keeps (see :func:`tokenizer_record`), or None for a checkpoint without one."""
    record = checkpoint.get(TOKENIZER_KEY)
    if record is None:
        return None
    return TextTokenizer.from_definition(record["file"], record["data"].numpy().tobytes(), source, vocab_size)


def dqt_grids(module: nn.Module) -> dict[str, list[int]]:
    return {name: [layer.grid.qmin, layer.grid.qmax] for name, layer in module.named_modules()
            if isinstance(layer, DQTWeight)}


def _levels(qmin: int, qmax: int) -> str:
    return "ternary levels {-1, 0, 1}" if (qmin, qmax) == (-1, 1) else f"levels [{qmin}, {qmax}]"


def grid_mismatch(source: str, name: str, saved: tuple[int, int], grid: Grid) -> str:
    """The one line refusing a checkpoint whose layer ``name`` is on the levels ``saved``, not on ``grid``."""
    return (f"{source} holds {name} on {_levels(*saved)}, this config's DQT grid has {_levels(grid.qmin, grid.qmax)} "
            f"(trainer.plugins.method.bits, symmetric); {_WHERE_FROM}")


def check_checkpoint_grids(path: str | Path, grid: Grid) -> None:
    """Refuse, before anything is built or written, a checkpoint whose DQT layers are on other levels than ``grid``
    (an 8-bit checkpoint into a ternary run): the check :func:`check_checkpoint_fits` makes again when it loads, for
    a run without a bit-width schedule, whose grids cannot move. Reads only the checkpoint's record of its grids."""
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(GRIDS_KEY, {})
    for name, levels in saved.items():
        if tuple(levels) != (grid.qmin, grid.qmax):
            raise ConfigError(grid_mismatch(f"ckpt_path {path}", name, tuple(levels), grid))


def check_checkpoint_fits(checkpoint: dict[str, Any], module: nn.Module, source: str, grids: Iterable[Grid] = (),
                          strict: bool = True) -> None:
    """Refuse, in one line, a checkpoint whose weights ``module`` cannot hold as they are, before torch copies them.

    Loading an 8-bit DQT checkpoint into ternary layers raises nothing in torch (both are int8 tensors of one shape),
    yet the next update clamps every level to {-1, 0, 1}; float weights into integer layers, or the reverse, fail
    deep inside the load. A DQT layer saved on another grid is accepted when that grid is in ``grids`` (a bit-width
    schedule's) and the layer is moved onto it. Checkpoints older than :data:`GRIDS_KEY` skip the grid check.

    Args:
        checkpoint: The loaded checkpoint, ternary weights already unpacked.
        module: The model, converted for its training mode; its state-dict keys are the checkpoint's.
        source: How the error names the checkpoint, e.g. ``ckpt_path runs/a/last.ckpt``.
        grids: Other grids the config's DQT layers may be on.
        strict: Also refuse missing and unexpected keys (``LightningModule.strict_loading``).
    """
    saved = checkpoint["state_dict"]
    layers = {name: layer for name, layer in module.named_modules() if isinstance(layer, DQTWeight)}
    expected = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    for name, layer in layers.items():
        expected[f"{name}.weight"] = tuple(layer.shape)  # packed storage keeps fewer bytes of the same levels
    for key, tensor in saved.items():
        layer_name = key.removesuffix(".weight")
        is_dqt = layer_name in layers and key.endswith(".weight")
        if key in expected and tensor.is_floating_point() == is_dqt:
            held, made = ("float", "DQT integer levels") if is_dqt else ("DQT integer levels", "float weights")
            raise ConfigError(f"{source} holds {key} as {held}, this config makes it {made} "
                              f"(trainer.plugins.method.mode); {_WHERE_FROM}")
    saved_grids = checkpoint.get(GRIDS_KEY, {})
    for name, layer in layers.items():
        if name not in saved_grids or tuple(saved_grids[name]) == (layer.grid.qmin, layer.grid.qmax):
            continue
        other = next((g for g in grids if (g.qmin, g.qmax) == tuple(saved_grids[name])), None)
        if other is None:
            raise ConfigError(grid_mismatch(source, name, saved_grids[name], layer.grid))
        layer.grid = other
    for key, shape in expected.items():
        if key in saved and tuple(saved[key].shape) != shape:
            differ = ("trainer.plugins.method.per_row_scale differs" if key.endswith(".scale")
                      else "model sizes or data vocab_size differ")
            raise ConfigError(f"{source} holds {key} of shape {list(saved[key].shape)}, this config makes "
                              f"{list(shape)} ({differ}); {_WHERE_FROM}")
    missing = [key for key in expected if key not in saved]
    unexpected = [key for key in saved if key not in expected]
    if strict and (missing or unexpected):
        first = f"lacks {missing[0]}" if missing else f"holds {unexpected[0]}"
        raise ConfigError(f"{source} {first}, which this config's model "
                          f"{'has' if missing else 'does not have'} ({len(missing)} missing, {len(unexpected)} "
                          f"unexpected tensors: trainer.plugins.method.quantize_embeddings or the model's norm_layout "
                          f"differ?); {_WHERE_FROM}")
