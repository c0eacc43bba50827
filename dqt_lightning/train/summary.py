"""Lightning's model summary, counting the integer weights.

A DQT weight lives in buffers (int8 or packed levels and a scale), outside ``parameters()``, so Lightning's own summary
of a 1.25 B-parameter DQT model reads "17.1 M" (the embedding, head and norm gains) and sizes it as if every parameter
took four bytes. This summary counts each integer weight as one trainable parameter per level and sizes it by the bytes
its buffers really hold.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import model_summary as summaries
from torch import nn
from typing_extensions import override

from dqt_lightning.quant.layers import DQTWeight


def _integer_levels(module: nn.Module) -> int:
    return sum(layer.shape.numel() for layer in module.modules() if isinstance(layer, DQTWeight))


def _integer_bytes(module: nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for layer in module.modules() if isinstance(layer, DQTWeight)
               for t in (layer.weight, layer.scale))


class IntegerWeightSummary(summaries.ModelSummary):
    """:class:`lightning.pytorch.utilities.model_summary.ModelSummary` with every DQT layer's levels counted as
    trainable parameters, in the rows of the layers that hold them and in the totals, and their stored bytes in the
    model size."""

    @property
    @override
    def param_nums(self) -> list[int]:
        return [layer.num_parameters + _integer_levels(layer._module) for layer in self._layer_summary.values()]

    @property
    @override
    def total_parameters(self) -> int:
        return super().total_parameters + _integer_levels(self._model)

    @property
    @override
    def trainable_parameters(self) -> int:
        return super().trainable_parameters + _integer_levels(self._model)

    @property
    @override
    def model_size(self) -> float:
        floats = super().total_parameters * self._precision_megabytes
        return floats + _integer_bytes(self._model) / 1e6


class IntegerWeightModelSummary(ModelSummary):
    """The ``ModelSummary`` callback with :class:`IntegerWeightSummary`: the project's CLI uses it in place of
    Lightning's default; add it to ``trainer.callbacks`` where a Trainer is built by hand."""

    @override
    def _summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> summaries.ModelSummary:
        return IntegerWeightSummary(pl_module, max_depth=self._max_depth)
