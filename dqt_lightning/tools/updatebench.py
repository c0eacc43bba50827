"""Time of one DQT layer's update: the usual path against the fused one, eager and compiled.

    python -m dqt_lightning.tools.updatebench [--shapes 256x256 768x2048] [--state-dtypes float32 bfloat16 int8]

For each weight shape and AdamW state dtype it times one optimizer step of one ternary layer, stochastic rounding
included: the usual path (materialize ``alpha * q``, the optimizer's step, ``round_step``) and
:func:`~dqt_lightning.train.fused.dqt_adamw_step` run eagerly and compiled. On a GPU (when one is present) the kernels
are timed with the device synchronized. The first compiled call compiles and is not timed. A benchmark, not a test.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable

import torch

from dqt_lightning.commands import script
from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.grid import TernaryGrid
from dqt_lightning.quant.layers import DQTWeight
from dqt_lightning.quant.rounding import WEIGHTS, noise_keys
from dqt_lightning.train.fused import compiled_dqt_adamw_step, dqt_adamw_step
from dqt_lightning.train.moments import init_state
from dqt_lightning.train.optim import STATE_DTYPES, adamw_scalars, default_adamw

LR, BETAS, EPS, WEIGHT_DECAY, BLOCK = 1e-3, (0.9, 0.95), 1e-8, 0.01, 256


def _median_ms(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    run()  # warm-up (and the compile, for the compiled form)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3


def time_layer_update(shape: tuple[int, int], state_dtype: str, device: torch.device, repeats: int = 10
                      ) -> dict[str, float]:
    """Milliseconds per update of one ternary layer of ``shape``: ``usual``, ``fused eager``, ``fused compiled``."""
    generator = torch.Generator().manual_seed(0)
    layer = DQTWeight(shape, TernaryGrid).to(device)
    layer.quantize_from((torch.randn(shape, generator=generator) * 0.02).to(device))
    grad = (torch.randn(shape, generator=generator) * 1e-3).to(device)
    param = layer.update_param
    optimizer = default_adamw(state_dtype, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)([param])
    keys = noise_keys(1, device)

    def usual() -> None:
        param.grad = grad
        layer.materialize()
        optimizer.step()
        layer.round_step(keys[WEIGHTS])

    state: dict = {}
    init_state(state, torch.Size(shape), device, state_dtype, BLOCK)
    scalars = adamw_scalars({"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY}, 1)

    def fused(step: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[[], None]:
        def run() -> None:
            q_new, *_ = step(layer.weight, layer.scale, grad, state["exp_avg"], state["exp_avg_sq"],
                             state.get("exp_avg_scale"), state.get("exp_avg_sq_scale"), keys, scalars, TernaryGrid,
                             "stochastic", BLOCK)
            layer.weight.copy_(q_new)
        return run

    return {"usual": _median_ms(usual, device, repeats),
            "fused eager": _median_ms(fused(dqt_adamw_step), device, repeats),
            "fused compiled": _median_ms(fused(compiled_dqt_adamw_step(device.type)), device, repeats)}


def _shape(text: str) -> tuple[int, int]:
    rows, _, columns = text.partition("x")
    if not (rows.isdigit() and columns.isdigit()):
        raise ConfigError(f"--shapes: a shape is ROWSxCOLUMNS, e.g. 768x2048; got '{text}'")
    return int(rows), int(columns)


def updatebench(shapes: list[str] | None = None, state_dtypes: list[str] | None = None, repeats: int = 10,
                threads: int | None = None) -> None:
    """One layer's DQT update, the usual path against the fused one (eager and compiled), in milliseconds.

    Args:
        shapes: layer shapes as ROWSxCOLUMNS (default: 256x256 768x2048)
        state_dtypes: AdamW state dtypes to time (default: all)
        repeats: timed updates per row; the row is their median
        threads: CPU threads for torch (default: torch's)
    """
    sizes = [_shape(text) for text in shapes or ["256x256", "768x2048"]]
    unknown = [d for d in state_dtypes or [] if d not in STATE_DTYPES]
    if unknown:
        raise ConfigError(f"--state-dtypes: {unknown[0]} is not one of {', '.join(STATE_DTYPES)}")
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()}), " \
        f"{torch.get_num_threads()} threads"
    print("| shape | AdamW states | usual ms | fused eager ms | fused compiled ms | usual / compiled |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in sizes:
        for state_dtype in state_dtypes or list(STATE_DTYPES):
            ms = time_layer_update(shape, state_dtype, device, repeats)
            print(f"| {shape[0]}x{shape[1]} | {state_dtype} | {ms['usual']:.2f} | {ms['fused eager']:.2f} | "
                  f"{ms['fused compiled']:.2f} | {ms['usual'] / ms['fused compiled']:.1f}x |", flush=True)
    print(f"\nDevice: {name}; torch {torch.__version__}; median of {repeats}.")


if __name__ == "__main__":
    sys.exit(script(updatebench))
