"""BitNet b1.58's layers (training mode ``ste``): a float master weight, fake-quantized in every forward through a
straight-through estimator, and 8-bit per-token activations. The baseline DQT is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dqt_lightning.quant.fp8 import autocast_off, compute_dtype, fp8_linear
from dqt_lightning.quant.grid import Grid, quantize_activations, ste_quantize


def refuse_embedding_options(embedding: nn.Embedding) -> None:
    # The LLaMA embedding is a plain lookup; these options would change what the gradient is.
    if embedding.padding_idx is not None or embedding.max_norm is not None or embedding.sparse:
        raise TypeError("quantized embeddings support a plain lookup only (no padding_idx, max_norm or sparse)")


class _BitLinearFn(torch.autograd.Function):
    """``y = x_q @ ste_quantize(w)^T`` with BitNet's straight-through gradient to the master weight ``w``, saving
    ``w`` itself for backward and quantizing it again there.

    Through plain autograd, every layer's fake-quantized weight would stay alive from its forward until its
    backward: a second float copy of the whole model at the peak of every step. The master weight is alive anyway,
    and quantizing it is cheap and deterministic, so backward recomputes the very same values
    (:func:`~dqt_lightning.quant.grid.ste_quantize`).
    """

    @staticmethod
    def forward(ctx, x_q: torch.Tensor, weight: torch.Tensor, grid: Grid, dtype: torch.dtype,
                strength: float = 1.0) -> torch.Tensor:
        # As autocast runs F.linear: both operands in the compute dtype; the saved input is that cast.
        x_q = x_q.to(dtype)
        ctx.save_for_backward(x_q, weight)
        ctx.grid, ctx.input_dtype, ctx.strength = grid, x_q.dtype, strength
        with autocast_off(x_q.device):
            return F.linear(x_q, ste_quantize(weight, grid, strength).to(dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_q, weight = ctx.saved_tensors
        w_q = ste_quantize(weight, ctx.grid, ctx.strength).to(x_q.dtype)
        grad_x = g @ w_q if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g.reshape(-1, g.shape[-1]).t() @ x_q.reshape(-1, x_q.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None, None, None


class BitLinear(nn.Linear):
    """BitNet b1.58: a float master weight, fake-quantized (absmean, ``grid``) in every forward through an STE, and
    8-bit per-token activations. ``strength`` below 1 blends both quantizers with their float inputs (the warm-up of
    ``Method.ste_warmup_steps``, which sets it)."""

    fp8 = False  # set by the fp8 precision on a GPU that has FP8 matmuls
    strength = 1.0

    def __init__(self, in_features: int, out_features: int, grid: Grid) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.grid = grid

    @classmethod
    def from_linear(cls, linear: nn.Linear, grid: Grid) -> BitLinear:
        """The BitNet layer whose master weight is ``linear``'s weight itself (no copy, no random init first)."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, grid)
        layer.weight = linear.weight
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = quantize_activations(x, self.strength)
        if self.fp8:
            return fp8_linear(x_q, ste_quantize(self.weight, self.grid, self.strength))
        return _BitLinearFn.apply(x_q, self.weight, self.grid, compute_dtype(x), self.strength)

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
        with torch.device("meta"):
            layer = cls(embedding.num_embeddings, embedding.embedding_dim, grid)
        layer.weight = embedding.weight
        return layer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, ste_quantize(self.weight, self.grid))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels=[{self.grid.qmin}, {self.grid.qmax}]"
