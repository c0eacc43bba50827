"""FP8 matmuls for the ``fp8`` precision overlay: bf16 autocast everywhere, FP8 tensor cores in the projections.

- ``fp`` mode converts the projections to torchao's ``Float8Linear`` (:func:`convert_fp_linears`): torchao's float8
  training recipe, with FP8 in the forward matmul and in both backward matmuls.
- ``dqt`` and ``ste`` layers compute their own weights (``alpha * q``, or the fake-quantized master), which torchao's
  layer cannot take, so they call :func:`fp8_matmul` / :func:`fp8_linear` here: ``torch._scaled_mm`` on
  ``float8_e4m3fn`` operands with one scale per row of the input and one per row of the weight. Only their forward
  matmul is FP8; the two backward matmuls stay bf16.

What has run where: the numerics of :func:`fp8_matmul` and :func:`fp8_linear` and torchao's conversion are tested on
CPU, where ``torch._scaled_mm`` accepts the same operands. Training with FP8 on a CUDA GPU has never been run in this
project: no FP8-capable GPU was available when this was written.
"""

from __future__ import annotations

from contextlib import nullcontext

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dqt_lightning.errors import ConfigError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# Ada (8.9) and Hopper (9.0) are the first NVIDIA architectures with FP8 tensor cores.
MIN_CAPABILITY = (8, 9)
# cuBLAS/CUTLASS FP8 kernels need the reduction width and the output width to be multiples of 16 bytes (16 FP8
# values); other shapes take a plain matmul instead.
ALIGNMENT = 16


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why FP8 training cannot run on ``device``, or ``None`` when it can.

    It can on an NVIDIA GPU of compute capability 8.9 or newer with torchao installed. The check never imports
    torchao (its import loads CUDA extensions and is slow); it only looks for it.
    """
    if device.type != "cuda":
        return f"this machine trains on {device.type}"
    if torch.version.hip is not None:
        # AMD's FP8 (MI300) is the e4m3fnuz format, which these kernels do not use.
        return "this is a ROCm build; FP8 here is written for NVIDIA GPUs"
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        return (f"cuda:{index} is compute capability {capability[0]}.{capability[1]}; FP8 matmuls need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (H100, L40S, RTX 4090)")
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    return None


def require_fp8(device: torch.device) -> None:
    """Refuse, naming the setting, FP8 training on ``device`` where :func:`fp8_unsupported_reason` finds a reason."""
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        raise ConfigError(f"trainer.plugins.execution.precision: fp8 needs an NVIDIA GPU of compute capability 8.9+ "
                          f"and torchao; {reason}; use bf16-mixed")


def autocast_off(device: torch.device):
    """A context without autocast on ``device`` (a no-op where autocast does not exist, as on the meta device, where
    the memory plan runs the model)."""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else nullcontext()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: autocast's where autocast is on, else ``x``'s own."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):  # none on the meta device
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _fits_fp8_kernels(in_features: int, out_features: int) -> bool:
    return in_features % ALIGNMENT == 0 and out_features % ALIGNMENT == 0


def _to_fp8_by_row(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix`` (2-D) as FP8 values and float32 per-row scales, ``matrix ~= values * scales``; each row's largest
    magnitude maps onto FP8's largest, 448."""
    amax = matrix.abs().amax(dim=1, keepdim=True).float()
    scales = amax.clamp(min=1e-12) / FP8_MAX  # an all-zero row keeps a finite scale and stays zero
    # The clamp guards the rounding of the division: a value a hair above 448 would not saturate, it would become NaN.
    values = (matrix.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return values, scales


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` with FP8 operands, in ``x``'s dtype; forward only (no autograd of its own).

    Both operands are cast to ``float8_e4m3fn`` with one scale per row (per token of ``x``, per output feature of
    ``weight``), and ``torch._scaled_mm`` multiplies them and applies the scales. Its result is bf16 (the only
    output row-wise scaling supports on CUDA), then cast to ``x``'s dtype. The relative error against a float matmul
    is a few percent (3 mantissa bits). When ``in_features`` or ``out_features`` is not a multiple of 16, the FP8
    kernels do not apply and this is a plain matmul in ``x``'s dtype instead, on every device alike.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``.

    Returns:
        ``(..., out_features)`` in ``x``'s dtype.
    """
    out_features, in_features = weight.shape
    with autocast_off(x.device):
        if not _fits_fp8_kernels(in_features, out_features):
            return F.linear(x, weight.to(x.dtype))
        rows = x.reshape(-1, in_features)
        x_fp8, x_scales = _to_fp8_by_row(rows)
        w_fp8, w_scales = _to_fp8_by_row(weight)
        # _scaled_mm wants its second operand column-major: the transpose of the row-major FP8 weight is exactly that.
        y = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scales, scale_b=w_scales.reshape(1, out_features),
                             out_dtype=torch.bfloat16)
        return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


class _FP8LinearFn(torch.autograd.Function):
    """``y = x @ W^T`` with an FP8 forward and a backward in the compute dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype):
        x_c, w_c = x.to(dtype), weight.to(dtype)
        # The same copies a bf16 F.linear under autocast would keep for its backward.
        ctx.save_for_backward(x_c, w_c)
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return fp8_matmul(x_c, w_c)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_c, w_c = ctx.saved_tensors
        g = g.to(x_c.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w_c).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.reshape(-1, g.shape[-1]).t() @ x_c.reshape(-1, x_c.shape[-1])).to(ctx.weight_dtype)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) with its forward matmul in FP8 (:func:`fp8_matmul`), differentiable.

    The compute dtype is the autocast dtype where autocast is on (bf16 under the ``fp8`` overlay), else ``x``'s
    dtype; the output has it. Only the forward is FP8: the two backward matmuls, ``grad_x = g @ W`` and
    ``grad_W = g^T @ x``, run in the compute dtype, where torchao's float8 recipe (used in ``fp`` mode) runs all
    three in FP8. Gradients come back in the dtypes of ``x`` and ``weight``, as autocast's would.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
    """
    return _FP8LinearFn.apply(x, weight, compute_dtype(x))


def convert_fp_linears(module: nn.Module, is_target: Callable[[str], bool]) -> nn.Module:
    """Swap, in place, the plain ``nn.Linear`` layers whose qualified names ``is_target`` accepts for torchao's
    ``Float8Linear`` (tensor-wise dynamic scaling, FP8 in forward and backward); the weight parameters are kept,
    so an optimizer built before the swap still holds them. Layers whose widths are not multiples of 16 stay as they
    are (torchao's kernels need that). Converting twice is a no-op.

    Args:
        module: The model.
        is_target: Takes a qualified module name, says whether that layer should run in FP8.

    Returns:
        ``module``.
    """
    from torchao.float8 import convert_to_float8_training  # noqa: PLC0415 - heavy, and only fp8 runs need it

    def wanted(layer: nn.Module, qualified_name: str) -> bool:
        # Float8Linear subclasses nn.Linear: the exact type check is what keeps a second conversion from nesting.
        return (type(layer) is nn.Linear and is_target(qualified_name)
                and _fits_fp8_kernels(layer.in_features, layer.out_features))

    return convert_to_float8_training(module, module_filter_fn=wanted)
