"""Linear layers for the three training modes: DQT (integer weights), BitNet b1.58 (STE) and full precision.

A ``DQTLinear`` keeps its weight only as an int8 buffer ``weight`` plus a float32 ``scale``; its gradient goes to a
separate ``update_param`` whose storage is a single float between optimizer steps. That parameter exists so the
optimizer configured in YAML (its hyper-parameters, state and LR schedule) and gradient clipping treat quantized and
float weights alike; :class:`dqt_lightning.update.QuantizedUpdate` fills it with ``alpha * q`` just before the step
and rounds the result back onto the grid just after.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dqt_lightning.quant import Grid, absmean_quantize, quantize_activations, ste_quantize


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _DQTLinearFn(torch.autograd.Function):
    """``y = x @ (alpha * q)^T`` with the true gradient w.r.t. the stored weight: ``grad_W = g^T @ x`` (no STE)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, update_param: torch.Tensor, q: torch.Tensor, scale: torch.Tensor):
        dtype = _compute_dtype(x)
        # Autocast does not reach inside a custom Function's forward; cast by hand, and dequantize only transiently.
        x_c = x.to(dtype)
        ctx.save_for_backward(x_c, q, scale)
        ctx.grad_dtype = update_param.dtype
        ctx.input_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x_c, q.to(dtype) * scale.to(dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_c, q, scale = ctx.saved_tensors
        g = g.to(x_c.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ (q.to(g.dtype) * scale.to(g.dtype))).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.reshape(-1, g.shape[-1]).t() @ x_c.reshape(-1, x_c.shape[-1])).to(ctx.grad_dtype)
        return grad_x, grad_w, None, None


class DQTLinear(nn.Module):
    """A bias-free linear layer whose weight persists only as integers on ``grid`` times a float scale.

    Args:
        in_features: Input width.
        out_features: Output width.
        grid: The integer levels of the weight.
        rounding: ``stochastic`` or ``nearest``; read by the update callback.
        per_row_scale: One scale per output row instead of one per tensor.
    """

    def __init__(self, in_features: int, out_features: int, grid: Grid, rounding: str = "stochastic",
                 per_row_scale: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.grid, self.rounding = grid, rounding
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1) if per_row_scale else torch.ones(()))
        # Not registered as a parameter on purpose: DDP, state_dict and .parameters() must see integer storage only.
        object.__setattr__(self, "update_param", nn.Parameter(self._placeholder(torch.device("cpu"))))

    @classmethod
    def from_linear(cls, linear: nn.Linear, grid: Grid, rounding: str, per_row_scale: bool = False) -> DQTLinear:
        layer = cls(linear.in_features, linear.out_features, grid, rounding, per_row_scale)
        q, alpha = absmean_quantize(linear.weight, grid, per_row=per_row_scale)
        layer.weight.copy_(q)
        layer.scale.copy_(alpha)
        return layer.to(linear.weight.device)

    def _placeholder(self, device: torch.device) -> torch.Tensor:
        # A zero-stride view of one float: the weight's shape (so gradients and optimizer bookkeeping line up) at
        # 4 bytes of storage.
        return torch.zeros((), device=device).expand(self.out_features, self.in_features)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.update_param.device != self.weight.device:
            self.update_param.data = self._placeholder(self.weight.device)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale.to(dtype)

    def materialize(self) -> None:
        """Give the optimizer ``alpha * q`` to step from; freed again by :meth:`release`."""
        self.update_param.data = self.dequantize(self.update_param.dtype)

    def release(self) -> None:
        self.update_param.data = self._placeholder(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DQTLinearFn.apply(quantize_activations(x), self.update_param, self.weight, self.scale)

    def extra_repr(self) -> str:
        scale = "per-row" if self.scale.dim() else "per-tensor"
        return (f"{self.in_features}, {self.out_features}, levels=[{self.grid.qmin}, {self.grid.qmax}], "
                f"rounding={self.rounding}, scale={scale}")


class BitLinear(nn.Linear):
    """BitNet b1.58: a float master weight, fake-quantized (absmean, ``grid``) in every forward through an STE, and
    8-bit per-token activations."""

    def __init__(self, in_features: int, out_features: int, grid: Grid) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.grid = grid

    @classmethod
    def from_linear(cls, linear: nn.Linear, grid: Grid) -> BitLinear:
        layer = cls(linear.in_features, linear.out_features, grid).to(linear.weight.device)
        layer.weight.data.copy_(linear.weight.data)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_activations(x), ste_quantize(self.weight, self.grid))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels=[{self.grid.qmin}, {self.grid.qmax}]"


def dqt_layers(module: nn.Module) -> Iterator[DQTLinear]:
    """The DQT layers of ``module`` in a fixed order (``named_modules`` order), the order layer indices come from."""
    return (m for m in module.modules() if isinstance(m, DQTLinear))


def quantized_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The optimizer-facing parameters of every DQT layer; pass them to the optimizer with the float parameters."""
    return [layer.update_param for layer in dqt_layers(module)]
