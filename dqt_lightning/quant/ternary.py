"""Ternary inference: run any model (fp, BitNet STE, DQT at any bit width) with its quantized weights re-quantized to
ternary, levels {-1, 0, 1}, and 8-bit activations.

The levels are BitNet b1.58's, ``q' = clip(round(W / mean|W|), -1, 1)``. The scale of a DQT weight is by default the
least-squares one for those levels, ``alpha' = <W, q'> / <q', q'>`` (per row where the layer has per-row scales): it
reproduces a weight that is already ternary exactly (its levels come back unchanged and ``<alpha q, q> / <q, q> =
alpha``), and no other scale of the same levels is closer to ``W``. BitNet's own scale, ``mean|W|`` per tensor, is
the named option ``absmean``: on a ternary weight it is ``alpha`` times the share of non-zero levels, not ``alpha``.
BitNet and full-precision layers are quantized by BitNet's rule either way, as BitNet b1.58 deploys them.

The paper's claim 4 is that an 8-bit DQT model keeps most of its quality this way. :class:`TernaryWeights` computes
the ternary levels once (for example at the start of a validation epoch) and then swaps them in and out around each
forward, so one validation pass can report the model's own loss and its ternary loss side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dqt_lightning.quant.layers import BitEmbedding, BitLinear, DQTWeight
from dqt_lightning.train.precision import is_projection
from dqt_lightning.quant.grid import TernaryGrid, absmean_quantize

SCALES = ("least_squares", "absmean")


@dataclass
class _Swap:
    """One layer's ternary stand-in and what it replaces."""

    parent: nn.Module
    name: str
    original: nn.Module
    ternary: nn.Module


class TernaryWeights:
    """A context manager that gives ``model`` ternary weights inside ``with`` and its own weights back after it.

    - DQT layers get ternary levels and a scale (``scale``: least squares, or BitNet's per-tensor absmean) computed
      from their dequantized weight.
    - BitNet layers keep their float master and fake-quantize it on the ternary grid instead of their own.
    - Plain ``nn.Linear`` projections (a full-precision model) run as BitNet layers on the ternary grid, which also
      quantizes their input activations to 8 bits.

    Args:
        model: The model to evaluate; only its projections (and embedding and head, where those are quantized) change.
        scale: ``least_squares`` or ``absmean``: the scale of a DQT layer's ternary levels (see the module's text).
    """

    def __init__(self, model: nn.Module, scale: str = "least_squares") -> None:
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}; got '{scale}'")
        self.swaps: list[_Swap] = []
        with torch.no_grad():
            for parent_name, parent in model.named_modules():
                for name, child in parent.named_children():
                    ternary = _ternary_stand_in(child, f"{parent_name}.{name}", scale)
                    if ternary is not None:
                        self.swaps.append(_Swap(parent, name, child, ternary))
        if not self.swaps:
            raise TypeError("ternary inference found no projection to re-quantize in the model")

    def __enter__(self) -> TernaryWeights:
        for swap in self.swaps:
            setattr(swap.parent, swap.name, swap.ternary)
        return self

    def __exit__(self, *exc) -> None:
        for swap in self.swaps:
            setattr(swap.parent, swap.name, swap.original)


@torch.no_grad()
def ternary_levels(w: torch.Tensor, per_row: bool = False, scale: str = "least_squares") -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """BitNet's ternary levels of ``w`` and their scale: ``(q' as int8, alpha' as float32)``.

    ``absmean``: ``alpha' = mean|w|`` per tensor, BitNet b1.58's quantizer. ``least_squares``: ``alpha' =
    <w, q'> / <q', q'>`` per tensor, or per row with ``per_row``, summed in float64 so that a ``w`` that is already
    ``alpha * q`` gives back ``alpha`` bit for bit (a row of zero levels keeps its absmean scale).
    """
    if scale == "absmean":
        return absmean_quantize(w, TernaryGrid)
    q, fallback = absmean_quantize(w, TernaryGrid, per_row=per_row)
    w64, q64 = w.double(), q.double()
    dims = {"dim": 1, "keepdim": True} if per_row else {}
    count = (q64 * q64).sum(**dims)
    alpha = torch.where(count > 0, (w64 * q64).sum(**dims) / count.clamp(min=1), fallback.double())
    return q, alpha.float()


def _ternary_stand_in(layer: nn.Module, qualified_name: str, scale: str) -> nn.Module | None:
    if isinstance(layer, DQTWeight):
        ternary = _copy_structure(layer)
        q, alpha = ternary_levels(layer.dequantize(), per_row=layer.scale.dim() > 0, scale=scale)
        ternary.weight, ternary.scale, ternary.packed = q, alpha, False
        return ternary
    if isinstance(layer, (BitLinear, BitEmbedding)):
        ternary = _copy_structure(layer)
        ternary.grid = TernaryGrid  # the same float master, shared, quantized on the ternary grid
        return ternary
    # Any other Linear subclass too: an fp run in fp8 holds torchao's Float8Linear, whose weight is a plain float.
    if isinstance(layer, nn.Linear) and is_projection(qualified_name):
        ternary = BitLinear(layer.in_features, layer.out_features, TernaryGrid)
        ternary.weight = layer.weight  # shared, not copied: the fp model's own weight
        return ternary
    return None


def _copy_structure(layer: nn.Module) -> nn.Module:
    """A shallow twin of ``layer``: same class and attributes, the same tensors until the caller replaces some."""
    twin = layer.__class__.__new__(layer.__class__)
    twin.__dict__ = {**layer.__dict__, "_buffers": dict(layer._buffers), "_parameters": dict(layer._parameters)}
    return twin
