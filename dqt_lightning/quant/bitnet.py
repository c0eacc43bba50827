"""BitNet b1.58's layers (training mode ``ste``): a float master weight, fake-quantized in every forward through a
straight-through estimator, and 8-bit per-token activations. The baseline DQT is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dqt_lightning.quant.fp8 import fp8_linear
from dqt_lightning.quant.grid import Grid, quantize_activations, ste_quantize


def refuse_embedding_options(embedding: nn.Embedding) -> None:
    # The LLaMA embedding is a plain lookup; these options would change what the gradient is.
    if embedding.padding_idx is not None or embedding.max_norm is not None or embedding.sparse:
        raise TypeError("quantized embeddings support a plain lookup only (no padding_idx, max_norm or sparse)")


class BitLinear(nn.Linear):
    """BitNet b1.58: a float master weight, fake-quantized (absmean, ``grid``) in every forward through an STE, and
    8-bit per-token activations."""

    fp8 = False  # set by the fp8 precision on a GPU that has FP8 matmuls

    def __init__(self, in_features: int, out_features: int, grid: Grid) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.grid = grid

    @classmethod
    def from_linear(cls, linear: nn.Linear, grid: Grid) -> BitLinear:
        layer = cls(linear.in_features, linear.out_features, grid).to(linear.weight.device)
        layer.weight.data.copy_(linear.weight.data)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (fp8_linear if self.fp8 else F.linear)(quantize_activations(x), ste_quantize(self.weight, self.grid))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels=[{self.grid.qmin}, {self.grid.qmax}]"


class BitEmbedding(nn.Embedding):
    """The STE counterpart of :class:`DQTEmbedding`: a float master table, fake-quantized (absmean over the whole
    table, ``grid``) in every forward; the lookup's gradient passes straight through to the master."""

    def __init__(self, num_embeddings: int, embedding_dim: int, grid: Grid) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.grid = grid

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, grid: Grid) -> BitEmbedding:
        refuse_embedding_options(embedding)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, grid).to(embedding.weight.device)
        layer.weight.data.copy_(embedding.weight.data)
        return layer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, ste_quantize(self.weight, self.grid))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels=[{self.grid.qmin}, {self.grid.qmax}]"
