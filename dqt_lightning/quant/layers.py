"""The DQT layers: integer weights, and the float view the optimizer steps. (BitNet b1.58's STE layers, re-exported
here, live in :mod:`dqt_lightning.quant.bitnet`; full precision keeps ``nn.Linear``.)

Every DQT layer derives from :class:`DQTWeight`: the weight lives only as an int8 buffer ``weight`` plus a float32
``scale``; its gradient goes to a separate ``update_param`` whose storage is a single number between optimizer steps.
That parameter exists so the optimizer configured in YAML (its hyper-parameters, state and LR schedule) and gradient
clipping treat quantized and float weights alike: the layer fills it with ``alpha * q`` just before the step
(:meth:`DQTWeight.materialize`) and rounds the result back onto the grid just after (:meth:`DQTWeight.round_step`),
when :class:`dqt_lightning.train.update.QuantizedUpdate` says so. :class:`DQTLinear` (the
projections, and optionally the output head) and :class:`DQTEmbedding` (optionally the token embedding) differ only
in their forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dqt_lightning.quant.fp8 import autocast_off, compute_dtype, fp8_matmul
from dqt_lightning.quant import step as quant_step
from dqt_lightning.quant.bitnet import BitEmbedding, BitLinear, refuse_embedding_options
from dqt_lightning.quant.grid import Grid, absmean_quantize, pack_ternary, quantize_input, unpack_ternary

GRAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROUNDING_CHUNK = 1 << 16  # elements per pass of the unfused rounding on a CPU
# On a GPU the caching allocator reuses temporaries of any size, and every pass costs a few dozen kernel launches:
# parts of 16M elements (a few 64 MiB temporaries) keep a 7B layer's update to a handful of passes.
GPU_PASS_ELEMENTS = 1 << 24


def elements_per_pass(device: torch.device, on_cpu: int) -> int:
    """How many elements an eager pass over a large tensor takes at once on ``device``: ``on_cpu`` on a CPU, where
    parts of a few hundred KiB are what malloc reuses instead of holding several times the tensor in temporaries,
    else :data:`GPU_PASS_ELEMENTS`. The parts draw the same noise by flat index: any size gives the same result."""
    return on_cpu if device.type == "cpu" else max(on_cpu, GPU_PASS_ELEMENTS)


class DQTWeight(nn.Module):
    """What every DQT layer shares: an integer weight on ``grid`` times a float scale, and the optimizer's view of it.

    Between optimizer steps the layer holds the int8 levels, the scale, and ``update_param``: a zero-stride view of
    one number with the weight's shape, so that gradients and optimizer bookkeeping line up at 2 or 4 bytes of
    storage. Its dtype is the gradient buffer's dtype (``grad_dtype``). The layer owns that float view; one optimizer
    step of it is:

    - :meth:`materialize`: ``update_param`` becomes a float32 ``alpha * q`` with a float32 gradient;
    - the optimizer steps it (any optimizer, with clipping and the LR schedule as configured);
    - :meth:`round_step`: the stepped float view goes back onto the grid with one rounding
      (:mod:`dqt_lightning.quant.step`), and :meth:`release` frees the float values again.

    The fused update skips the float view: it reads levels and gradient and stores new levels itself
    (:meth:`set_levels`, :meth:`release`); :meth:`widen_gradient` gives clipping the same float32 gradient before it.

    Args:
        shape: ``(rows, columns)`` of the weight: ``(out_features, in_features)`` or ``(vocab, width)``.
        grid: The integer levels of the weight.
        rounding: The name of a registered rounding rule (:mod:`dqt_lightning.quant.rounding`), e.g. ``stochastic``.
        per_row_scale: One scale per row instead of one per tensor.
        grad_dtype: ``torch.float32`` or ``torch.bfloat16``: the dtype of the gradient buffer between backward and
            the optimizer step.
    """

    # fixed: the scale set at initialisation stays (the paper's default); absmax: re-derived from the stepped weight
    # at every update (quant.step.rescaled_step). Read by quantize_from and round_step.
    scale_policy = "fixed"

    def __init__(self, shape: tuple[int, int], grid: Grid, rounding: str = "stochastic", per_row_scale: bool = False,
                 grad_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.grid, self.rounding, self.grad_dtype = grid, rounding, grad_dtype
        self.shape = torch.Size(shape)  # of the levels, whichever way ``weight`` stores them
        self.packed = False  # see pack_storage
        self.register_buffer("weight", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(shape[0], 1) if per_row_scale else torch.ones(()))
        # Not registered as a parameter on purpose: DDP, state_dict and .parameters() must see integer storage only.
        object.__setattr__(self, "update_param", nn.Parameter(self._placeholder(self.weight.device)))

    def quantize_from(self, weight: torch.Tensor) -> None:
        """Set the levels and scale from a float weight, round to nearest (absmean initialisation), or the
        absolute maximum under the ``absmax`` scale policy, so its first step does not jump from one rule to the
        other."""
        statistic = "absmax" if self.scale_policy == "absmax" else "absmean"
        q, alpha = absmean_quantize(weight, self.grid, per_row=self.scale.dim() > 0, statistic=statistic)
        self.set_levels(q)
        self.scale.copy_(alpha)

    def pack_storage(self) -> None:
        """Keep the levels packed four per byte from now on (ternary grids only): ``weight`` becomes a flat uint8
        buffer of ``numel / 4`` bytes, and every use unpacks it transiently (:meth:`levels`). Idempotent."""
        if self.packed:
            return
        if not self.grid.is_ternary:
            raise ValueError(f"only ternary weights can be packed; this layer's grid is [{self.grid.qmin}, "
                             f"{self.grid.qmax}]")
        self.weight = pack_ternary(self.weight, check=not self.weight.is_meta)
        self.packed = True

    def levels(self) -> torch.Tensor:
        """The int8 levels, shaped as the weight: the buffer itself, or a transient unpacked copy when packed."""
        return unpack_ternary(self.weight, self.shape) if self.packed else self.weight

    def set_levels(self, q: torch.Tensor) -> None:
        """Store new int8 levels (on this layer's grid) into ``weight``, packing them when the storage is packed."""
        self.weight.copy_(pack_ternary(q, check=False) if self.packed else q)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint stores the levels as this layer does, or the other way (an int8 run resumed with packed
        # storage, or the reverse): convert to this layer's form before torch copies it in.
        key = prefix + "weight"
        saved = state_dict.get(key)
        if saved is not None and saved.dtype != self.weight.dtype:
            state_dict[key] = pack_ternary(saved) if self.packed else unpack_ternary(saved, self.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _placeholder(self, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.zeros((), device=device, dtype=dtype or self.grad_dtype).expand(self.shape)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.update_param.device != self.weight.device:
            self.update_param.data = self._placeholder(self.weight.device)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantized(self.weight, self.scale, self.shape if self.packed else None, dtype)

    def materialize(self) -> None:
        """Give the optimizer a float32 ``alpha * q`` (and float32 gradient) to step from; freed by :meth:`release`.

        The step is float32 whatever ``grad_dtype`` is: the update only keeps ``stepped - alpha * q``, and a bf16
        ``alpha * q`` would be off by up to a quarter grid step at level 127, and would swallow steps below its
        spacing before stochastic rounding ever saw them.
        """
        param = self.update_param
        param.data = self.dequantize(torch.float32)
        if param.grad is not None and param.grad.dtype != torch.float32:
            param.grad = param.grad.float()

    def widen_gradient(self) -> None:
        """A float32 gradient without materializing the weight: what clipping sees before the fused update, as it
        does on the usual path (:meth:`materialize`). :meth:`release` undoes it."""
        param = self.update_param
        if param.grad is not None and param.grad.dtype != torch.float32:
            param.data = self._placeholder(self.weight.device, torch.float32)
            param.grad = param.grad.float()

    @property
    def materialized(self) -> bool:
        """Whether ``update_param`` holds a float ``alpha * q`` (or its stepped value) rather than the placeholder."""
        data = self.update_param.data
        return data.dim() > 0 and 0 not in data.stride()

    @torch.no_grad()
    def round_step(self, key: torch.Tensor | None) -> torch.Tensor:
        """Write the optimizer's stepped float view back onto the grid, one rounding with this layer's rule and the
        noise stream ``key`` (:func:`~dqt_lightning.quant.step.dqt_step`, or
        :func:`~dqt_lightning.quant.step.rescaled_step` under the ``absmax`` scale policy), then :meth:`release`.

        Returns:
            The number of levels that changed, as a tensor (no host sync).
        """
        q, stepped = self.levels(), self.update_param.data
        if self.scale_policy == "absmax":
            q_new, alpha = quant_step.rescaled_step(stepped, self.grid, self.scale.dim() > 0, self.rounding, key)
            self.scale.copy_(alpha.reshape(self.scale.shape))
        else:
            # A few rows at a time (elements_per_pass), drawing the same noise by flat index: the rounding's float and
            # int64 temporaries stay one part's size instead of several times the layer.
            q_new = torch.empty_like(q)
            rows = max(1, elements_per_pass(q.device, ROUNDING_CHUNK) // q.shape[1])
            for start in range(0, q.shape[0], rows):
                part = slice(start, start + rows)
                alpha = self.scale[part] if self.scale.dim() else self.scale
                q_new[part] = quant_step.dqt_step(q[part], alpha, stepped[part], self.grid, self.rounding, key,
                                                  start * q.shape[1])
        flips = torch.count_nonzero(q_new != q)
        self.set_levels(q_new)
        self.release()
        return flips

    def release(self) -> None:
        """Back to the placeholder between steps; a gradient still held is kept in the buffer's own dtype."""
        param = self.update_param
        param.data = self._placeholder(self.weight.device)
        if param.grad is not None and param.grad.dtype != self.grad_dtype:
            # The gradient is spent; kept in the buffer's own dtype so that what stays allocated until the next
            # zero_grad (and what memory.py measures) is the bf16 buffer, not the step's float32 copy.
            param.grad = param.grad.to(self.grad_dtype)

    @torch.no_grad()
    def regrid(self, grid: Grid, rounding: str = "stochastic", key: torch.Tensor | None = None,
               scale_rule: str = "absmean") -> float:
        """Move the weight onto another grid (a bit-width schedule's switch), keeping ``W = alpha * q`` in expectation.

        The new scale follows BitNet's absmean rule on the current weight, ``alpha' = mean|W| / Qp'`` (per row when
        the layer has per-row scales), or with ``scale_rule="range"`` keeps the grid's range,
        ``alpha' = alpha * Qp / Qp'``, so that no weight falls outside it. Then ``q' = round(W / alpha')`` clipped
        to ``grid``: stochastic rounding keeps ``E[alpha' q'] = W`` for every weight inside the new grid's range;
        ``nearest`` is the deterministic ablation. The float ``W`` exists only inside this call.

        Args:
            grid: The new levels.
            rounding: A registered rounding rule, e.g. ``stochastic`` or ``nearest``.
            key: The noise stream of the rounding (:func:`~dqt_lightning.quant.rounding.noise_keys`; the same on
                every DDP rank).
            scale_rule: ``absmean`` (BitNet's quantizer) or ``range`` (the old grid's range, rescaled).

        Returns:
            The share of weights that fell outside the new grid's range and were clipped to its edge.
        """
        w = self.dequantize(torch.float32)
        if scale_rule == "range":
            alpha = self.scale.float() * (self.grid.positive_levels / grid.positive_levels)
        elif scale_rule == "absmean":
            mean_abs = w.abs().mean(dim=1, keepdim=True) if self.scale.dim() else w.abs().mean()
            alpha = mean_abs.clamp(min=1e-8) / grid.positive_levels
        else:
            raise ValueError(f"scale_rule must be absmean or range; got '{scale_rule}'")
        if self.packed and not grid.is_ternary:
            raise ValueError("a layer with packed ternary storage cannot move onto a wider grid")
        y = w.div_(alpha)
        clipped = ((y < grid.qmin) | (y > grid.qmax)).float().mean().item()
        self.set_levels(quant_step.round_to_grid(y, grid, rounding, key))
        self.scale.copy_(alpha.reshape(self.scale.shape))
        self.grid = grid
        return clipped

    def _describe(self) -> str:
        scale = "per-row" if self.scale.dim() else "per-tensor"
        scale += ", rescaled by absmax" if self.scale_policy == "absmax" else ""
        grad = "" if self.grad_dtype == torch.float32 else f", grad_dtype={str(self.grad_dtype).removeprefix('torch.')}"
        packed = ", packed 2-bit" if self.packed else ""
        return f"levels=[{self.grid.qmin}, {self.grid.qmax}]{packed}, rounding={self.rounding}, scale={scale}{grad}"


def dequantized(q: torch.Tensor, scale: torch.Tensor, packed_shape: torch.Size | None,
                dtype: torch.dtype) -> torch.Tensor:
    """``alpha * q`` in ``dtype`` from stored levels (int8, or packed with ``packed_shape``): the int8 levels times the
    scale in one product (``q.to(dtype) * scale`` in the same IEEE operations, without a second full-size tensor)."""
    levels = q if packed_shape is None else unpack_ternary(q, packed_shape)
    return torch.mul(levels, scale.to(dtype))


class _DQTLinearFn(torch.autograd.Function):
    """``y = x_q @ (alpha * q)^T`` with the true gradient w.r.t. the stored weight, ``grad_W = g^T @ x_q`` (no STE
    there), and the straight-through gradient of the activation quantizer, ``grad_x = g @ (alpha * q)``.

    ``x_q`` is ``x`` quantized to 8 bits per token, already in the compute dtype; ``x`` only receives the gradient.
    With ``fp8`` the forward matmul runs on FP8 tensor cores (:func:`~dqt_lightning.quant.fp8.fp8_matmul`); the backward
    is the same either way.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_q: torch.Tensor, update_param: torch.Tensor, q: torch.Tensor,
                scale: torch.Tensor, fp8: bool = False, packed_shape: torch.Size | None = None):
        # Autocast does not reach inside a custom Function's forward; cast by hand, and dequantize only transiently.
        # Packed levels are saved packed and unpacked again in backward: the unpacked copy never waits for it.
        ctx.save_for_backward(x_q, q, scale)
        ctx.grad_dtype = update_param.dtype
        ctx.input_dtype = x.dtype
        ctx.packed_shape = packed_shape
        with autocast_off(x.device):
            return (fp8_matmul if fp8 else F.linear)(x_q, dequantized(q, scale, packed_shape, x_q.dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_q, q, scale = ctx.saved_tensors
        grad_x, grad_w = _linear_grads(ctx, g, x_q, q, scale, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return grad_x, None, grad_w, None, None, None, None


def _linear_grads(ctx, g: torch.Tensor, x_q: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, need_x: bool,
                  need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward both DQT linear functions share: ``grad_x = g @ (alpha * q)`` (straight through the activation
    quantizer) and ``grad_W = g^T @ x_q`` (the true gradient w.r.t. the stored weight), in ``x_q``'s dtype."""
    g = g.to(x_q.dtype)
    grad_x = (g @ dequantized(q, scale, ctx.packed_shape, g.dtype)).to(ctx.input_dtype) if need_x else None
    grad_w = (g.reshape(-1, g.shape[-1]).t() @ x_q.reshape(-1, x_q.shape[-1])).to(ctx.grad_dtype) if need_w else None
    return grad_x, grad_w


class _DQTLinearInt8Fn(torch.autograd.Function):
    """:class:`_DQTLinearFn` with its forward matmul on integers: ``y = (levels_x @ q^T) * alpha / s``, the int8
    activation levels times the int8 weight levels summed exactly in int32 (``torch._int_mm``: INT8 tensor cores on
    a GPU, VNNI/AMX on a CPU), then one scaling per output. The same function as the float path up to float32
    rounding, which the float path adds at every product and this one only once. The backward is the float path's;
    it recomputes ``x_q = levels_x / s`` from the saved int8 levels, a quarter of the float copy's memory.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: torch.Tensor, s: torch.Tensor, update_param: torch.Tensor,
                q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, packed_shape: torch.Size | None = None):
        ctx.save_for_backward(levels, s, q, scale)
        ctx.grad_dtype, ctx.input_dtype, ctx.dtype, ctx.packed_shape = update_param.dtype, x.dtype, dtype, packed_shape
        weight = q if packed_shape is None else unpack_ternary(q, packed_shape)
        rows = levels.reshape(-1, levels.shape[-1])
        out = torch._int_mm(rows, weight.t()).float()  # weight.t(): the column-major second operand it wants
        alpha = scale.reshape(1, -1) if scale.dim() else scale
        out = out.mul_(alpha).div_(s.reshape(-1, 1))
        return out.to(dtype).reshape(*levels.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        levels, s, q, scale = ctx.saved_tensors
        # x_q exactly as the float path has it: levels / s in float32, then in the compute dtype
        x_q = (levels.float() / s).to(ctx.dtype)
        grad_x, grad_w = _linear_grads(ctx, g, x_q, q, scale, ctx.needs_input_grad[0], ctx.needs_input_grad[3])
        return grad_x, None, None, grad_w, None, None, None, None


def _int_mm_fits(tokens: int, in_features: int, out_features: int, device: torch.device) -> bool:
    # cuBLASLt's int8 kernels want more than 16 rows and widths in multiples of 8; the CPU kernels take any shape.
    return device.type != "cuda" or (tokens > 16 and in_features % 8 == 0 and out_features % 8 == 0)


class DQTLinear(DQTWeight):
    """A bias-free linear layer whose weight persists only as integers on ``grid`` times a float scale; its input is
    quantized to 8 bits per token, as in BitNet b1.58.

    Args:
        in_features: Input width.
        out_features: Output width.
        grid: The integer levels of the weight.
        rounding: A registered rounding rule (see :class:`DQTWeight`).
        per_row_scale: One scale per output row instead of one per tensor.
        grad_dtype: Dtype of the gradient buffer (see :class:`DQTWeight`).
    """

    fp8 = False  # set by the fp8 precision on a GPU that has FP8 matmuls
    int8_matmul = False  # set by Execution(int8_matmul=True): the forward matmul on integers

    def __init__(self, in_features: int, out_features: int, grid: Grid, rounding: str = "stochastic",
                 per_row_scale: bool = False, grad_dtype: torch.dtype = torch.float32) -> None:
        super().__init__((out_features, in_features), grid, rounding, per_row_scale, grad_dtype)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, grid: Grid, rounding: str, per_row_scale: bool = False,
                    grad_dtype: torch.dtype = torch.float32, scale_policy: str = "fixed",
                    quantize: bool = True) -> DQTLinear:
        """The DQT layer of ``linear``'s shape, its levels quantized from ``linear.weight`` (or left zero, for a
        checkpoint to fill, with ``quantize=False``)."""
        layer = cls(linear.in_features, linear.out_features, grid, rounding, per_row_scale, grad_dtype)
        layer.scale_policy = scale_policy
        if quantize:
            layer.quantize_from(linear.weight)
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The input quantized as BitNet b1.58 does (per-token absmax, 8 bits): the same values as
        # quantize_activations(x).to(compute dtype), shared with the sibling projections that read the same x.
        dtype = compute_dtype(x)
        packed_shape = self.shape if self.packed else None
        tokens = x.numel() // self.in_features
        if self.int8_matmul and _int_mm_fits(tokens, self.in_features, self.out_features, x.device):
            levels, s = quantize_input(x, torch.int8)
            return _DQTLinearInt8Fn.apply(x, levels, s, self.update_param, self.weight, self.scale, dtype,
                                          packed_shape)
        x_q = quantize_input(x, dtype)
        return _DQTLinearFn.apply(x, x_q, self.update_param, self.weight, self.scale, self.fp8, packed_shape)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self._describe()}"


class _DQTEmbeddingFn(torch.autograd.Function):
    """``y = alpha * q[idx]`` (gather the integer rows, then scale) with the true gradient w.r.t. the stored weight:
    each row's gradient is the sum of the output gradients of the tokens that looked it up."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, update_param: torch.Tensor, q: torch.Tensor, scale: torch.Tensor):
        ctx.save_for_backward(idx)
        ctx.grad_dtype, ctx.rows = update_param.dtype, q.shape[0]
        rows_scale = scale[idx] if scale.dim() else scale
        return q[idx].to(scale.dtype) * rows_scale

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        grad_w = None
        if ctx.needs_input_grad[1]:
            (idx,) = ctx.saved_tensors
            width = g.shape[-1]
            # Summed in float32 (a token seen many times adds many terms), stored in the buffer's dtype.
            grad_w = torch.zeros(ctx.rows, width, dtype=torch.float32, device=g.device)
            grad_w.index_add_(0, idx.reshape(-1), g.reshape(-1, width).float())
            grad_w = grad_w.to(ctx.grad_dtype)
        return None, grad_w, None, None


class DQTEmbedding(DQTWeight):
    """A token embedding whose table persists only as integers on ``grid`` times a float scale.

    A lookup has no activation to quantize, so the forward is just ``alpha * q[idx]``, in float32 as a plain
    ``nn.Embedding`` under autocast.

    Args:
        num_embeddings: Vocabulary size.
        embedding_dim: Width of each row.
        grid: The integer levels of the table.
        rounding: A registered rounding rule (see :class:`DQTWeight`).
        per_row_scale: One scale per token row instead of one per tensor.
        grad_dtype: Dtype of the gradient buffer (see :class:`DQTWeight`).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, grid: Grid, rounding: str = "stochastic",
                 per_row_scale: bool = False, grad_dtype: torch.dtype = torch.float32) -> None:
        super().__init__((num_embeddings, embedding_dim), grid, rounding, per_row_scale, grad_dtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, grid: Grid, rounding: str, per_row_scale: bool = False,
                       grad_dtype: torch.dtype = torch.float32, scale_policy: str = "fixed",
                       quantize: bool = True) -> DQTEmbedding:
        """The DQT table of ``embedding``'s shape, quantized from its weight (or left zero with ``quantize=False``)."""
        refuse_embedding_options(embedding)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, grid, rounding, per_row_scale, grad_dtype)
        layer.scale_policy = scale_policy
        if quantize:
            layer.quantize_from(embedding.weight)
        return layer.to(embedding.weight.device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return _DQTEmbeddingFn.apply(idx, self.update_param, self.levels(), self.scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._describe()}"


def dqt_layers(module: nn.Module) -> Iterator[DQTWeight]:
    """The DQT layers of ``module`` (projections, and embedding and head when quantized) in a fixed order
    (``named_modules`` order), the order layer indices come from."""
    return (m for m in module.modules() if isinstance(m, DQTWeight))


def quantized_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The optimizer-facing parameters of every DQT layer; pass them to the optimizer with the float parameters."""
    return [layer.update_param for layer in dqt_layers(module)]


__all__ = ["BitEmbedding", "BitLinear", "DQTEmbedding", "DQTLinear", "DQTWeight", "dqt_layers", "quantized_parameters"]
