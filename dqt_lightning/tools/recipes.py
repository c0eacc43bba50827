"""The training recipes that ``bench`` measures, by name: fp, BitNet STE, DQT with its options, torchao's two.

A recipe name is ``fp``, ``ste[-BITS]``, ``dqt-BITS[-OPTION...]`` or a torchao recipe; :func:`recipe_plugin` and
:func:`optimizer_for` turn it into the precision plugin and the optimizer it trains with.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from dqt_lightning.module import LanguageModel
from dqt_lightning.train.optim import default_adamw
from dqt_lightning.train.precision import Execution, Method, QuantPrecision, is_projection

RECIPES = ("fp", "ste", "dqt-1.58", "dqt-2", "dqt-3", "dqt-4", "dqt-8", "dqt-1.58-lean", "dqt-8-lean")
# Lean-state options a DQT recipe can add as suffixes, e.g. `dqt-1.58-packed-inbwd`: weights packed four per
# byte in memory (ternary only), the update inside backward (no gradient buffer), AdamW with 8-bit moments; `lean`
# is all three. `qemb` also puts the token embedding and the output head on the grid (as the official DQT code);
# `int8mm` runs the forward matmuls on integers (torch._int_mm); `fused` steps and rounds each DQT layer in one
# compiled pass (dqt_lightning.train.fused; the first warm-up step compiles); `ckpt` turns on activation
# checkpointing; `factored` trains with torch.optim.Adafactor (a factored second moment, no first moment) instead of
# AdamW. configs/recipes/lean.yaml is `dqt-1.58-lean-fused-ckpt`, configs/recipes/lean-factored.yaml
# `dqt-1.58-packed-inbwd-factored-ckpt`.
OPTIONS = ("packed", "inbwd", "adam8", "lean", "qemb", "int8mm", "fused", "ckpt", "factored")
LEAN = ("packed", "inbwd", "adam8")
# Adafactor's step is relative to each weight's scale, so its learning rate is its own
# (configs/recipes/lean-factored.yaml).
FACTORED_LR = 1e-2
# torchao's import logs a warning per CUDA kernel library it cannot load (always, on a CPU-only torch) and torch logs
# a deprecation of how torchao registers an enum; neither says anything about the benchmark.
TORCHAO_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str], level: int = logging.ERROR) -> Iterator[None]:
    """Raise the named loggers to ``level`` inside ``with``, and give them their own levels back after it."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _torchao(recipe: str, model: LanguageModel, precision: str) -> None:
    # Only the seven projections of every block become torchao weights: embeddings, lm_head and norm gains stay float,
    # exactly what QuantPrecision converts for the ste and dqt recipes.
    with quiet_loggers(TORCHAO_IMPORT_LOGGERS):
        from torchao import quantize_
        from torchao.prototype.quantized_training import bitnet_training, int8_weight_only_quantized_training

    model.configure_model()  # the float model, which torchao converts before the trainer sees it
    if precision == "bf16-mixed":
        # torchao's quantized training is built for a bf16 model (its pretraining benchmark calls model.bfloat16()):
        # its autograd functions ignore autocast, and an int8 weight quantized from float32 (float32 scale) gives a
        # float32 output whose gradient then meets a bf16 input in the weight-gradient matmul and fails. So under
        # bf16-mixed these rows train torchao's way, every weight and state in bf16, against our bf16-autocast
        # baseline, as the published peer measurements (docs/benchmarks.md) compare them.
        model.to(torch.bfloat16)
    config = int8_weight_only_quantized_training() if recipe == "torchao-int8" else bitnet_training()
    projections = {name: m for name, m in model.model.named_modules()
                   if isinstance(m, nn.Linear) and is_projection(name)}
    quantize_(model.model, config, filter_fn=lambda m, fqn: fqn in projections)


def optimizer_for(recipe: str) -> Callable[..., torch.optim.Optimizer] | None:
    """The optimizer factory a recipe trains with; ``None`` means :class:`LanguageModel`'s default AdamW.

    Every recipe runs that AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.01 on matrices) except ``torchao-int8``,
    which runs it without weight decay: torchao 0.18's int8 weight subclass implements no ``aten.mul_``, the op
    AdamW's decoupled decay applies to the weight, and the step fails with ``NotImplementedError``.
    ``torchao-bitnet`` keeps a float master weight and takes the decay.

    On a GPU the float32-moment AdamW is ``torch.optim.AdamW(fused=True)``, the baseline the published peer
    measurements use (torch's default there is the slower ``foreach`` form, which would flatter every ratio to fp);
    torchao's int8 weights keep the default form, as the peers ran them.

    Args:
        recipe: A recipe name (see :func:`run_recipe`).

    Returns:
        A factory taking parameter groups, or ``None``.
    """
    if recipe == "torchao-int8":
        return default_adamw(weight_decay=0.0)
    class_path, args = optimizer_settings(recipe)
    if class_path == "torch.optim.Adafactor":
        return lambda params: torch.optim.Adafactor(params, **args)
    if args.get("state_dtype") == "int8":
        return default_adamw("int8")
    return default_adamw(fused=True) if torch.cuda.is_available() else None


def optimizer_settings(recipe: str) -> tuple[str, dict]:
    """The class path and arguments of a recipe's optimizer, as a config names them (what the memory plan reads)."""
    options = set(recipe.split("-")[2:])
    if "factored" in options:
        return "torch.optim.Adafactor", {"lr": FACTORED_LR, "weight_decay": 0.01}
    if {"adam8", "lean"} & options:
        return "dqt_lightning.train.optim.AdamW", {"state_dtype": "int8"}
    return "torch.optim.AdamW", {}


def recipe_plugin(recipe: str, precision: str) -> QuantPrecision:
    """The precision plugin a recipe trains under (a torchao recipe's model trains under the fp one)."""
    name, _, rest = recipe.partition("-")
    bits, *suffixes = rest.split("-")
    options = set(suffixes) | (set(LEAN) if "lean" in suffixes else set())
    torchao = name == "torchao"
    # A torchao recipe's suffix names torchao's method, not a bit width.
    grid_bits = float(bits) if bits and not torchao else 1.58
    return QuantPrecision(
        Method(mode="fp" if torchao else name, bits=grid_bits, quantize_embeddings="qemb" in options),
        Execution(precision=precision, update_in_backward="inbwd" in options, int8_matmul="int8mm" in options,
                  pack_in_memory="packed" in options and grid_bits == 1.58, fused_update="fused" in options,
                  activation_checkpointing="ckpt" in options))
