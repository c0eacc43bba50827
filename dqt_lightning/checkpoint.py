"""Checkpoint files that are either whole or absent: a run killed while saving leaves the previous one intact."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from dqt_lightning.layers import DQTLinear
from dqt_lightning.quant import pack_ternary, unpack_ternary

PACKED_KEY = "dqt_packed_ternary"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to a temporary file beside the target, fsyncs it, and renames it into place.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp directory;
    when that is another filesystem the final move is a copy, and a kill during it leaves a truncated checkpoint
    under the real name. A rename within one directory is atomic.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def pack_ternary_weights(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Replace each ternary DQT weight in ``state_dict`` by its 2-bit packing; returns {key: shape} to undo it."""
    shapes = {}
    for name, layer in module.named_modules():
        key = f"{name}.weight"
        if isinstance(layer, DQTLinear) and layer.grid.is_ternary and key in state_dict:
            shapes[key] = list(state_dict[key].shape)
            state_dict[key] = pack_ternary(state_dict[key])
    return shapes


def unpack_ternary_weights(state_dict: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
    for key, shape in shapes.items():
        state_dict[key] = unpack_ternary(state_dict[key], tuple(shape))
