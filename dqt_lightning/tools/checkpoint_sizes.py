"""Checkpoint sizes per storage format: ``python -m dqt_lightning.tools.checkpoint_sizes``."""

from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from dqt_lightning.commands import script
from dqt_lightning.model import Config
from dqt_lightning.module import LanguageModel
from dqt_lightning.tools.memory import fit_on_tokens
from dqt_lightning.train.checkpoint import AtomicCheckpointIO
from dqt_lightning.train.optim import default_adamw
from dqt_lightning.train.precision import QuantPrecision

FP_FORMAT = "fp (float32)"
# label: (QuantPrecision arguments, AdamW state dtype). The fp baseline is plain torch.optim.AdamW with float32 moments.
FORMATS: dict[str, tuple[dict[str, Any], str]] = {
    FP_FORMAT: (dict(mode="fp"), "float32"),
    "DQT 8-bit (int8)": (dict(mode="dqt", bits=8), "float32"),
    "DQT ternary (int8)": (dict(mode="dqt", bits=1.58), "float32"),
    "DQT ternary (packed 2-bit)": (dict(mode="dqt", bits=1.58, pack_ternary=True), "float32"),
    "DQT ternary packed + quantized embeddings/head": (
        dict(mode="dqt", bits=1.58, pack_ternary=True, quantize_embeddings=True), "float32"),
    "DQT ternary packed + int8 AdamW states": (dict(mode="dqt", bits=1.58, pack_ternary=True), "int8"),
    "DQT ternary packed + quantized embeddings/head + int8 AdamW states": (
        dict(mode="dqt", bits=1.58, pack_ternary=True, quantize_embeddings=True), "int8"),
    "DQT 8-bit + quantized embeddings/head + int8 AdamW states": (
        dict(mode="dqt", bits=8, quantize_embeddings=True), "int8"),
}


def measure_checkpoint_sizes(size: str, vocab_size: int, directory: Path) -> dict[str, tuple[int, int]]:
    """Train ``size`` one step on random tokens in each storage format of :data:`FORMATS` and save it as Lightning does.

    Returns ``{label: (full checkpoint bytes, weights-only checkpoint bytes)}``; a full checkpoint also holds the
    optimizer states, scheduler, loops and callbacks needed to resume.
    """
    tokens = torch.randint(0, vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for label, (plugin_args, state_dtype) in FORMATS.items():
        torch.manual_seed(0)
        model = LanguageModel(Config.from_name(size), vocab_size=vocab_size, optimizer=default_adamw(state_dtype),
                              warmup_steps=0)
        plugins = [QuantPrecision.from_settings(**plugin_args), AtomicCheckpointIO()]
        trainer = fit_on_tokens(model, tokens, batch_size=2, plugins=plugins)
        full, weights = directory / "full.ckpt", directory / "weights.ckpt"
        trainer.save_checkpoint(full)
        trainer.save_checkpoint(weights, weights_only=True)
        sizes[label] = (full.stat().st_size, weights.stat().st_size)
        full.unlink()
        weights.unlink()
        # Trainer and model reference each other: without a collection every format's 130m model and optimizer
        # states would stay alive until the end (over 12 GB at a 32k vocabulary).
        del model, trainer
        gc.collect()
    return sizes


def checkpoint_sizes(size: str = "130m", vocab_size: list[int] | None = None) -> None:
    """Checkpoint sizes of a model per storage format, full checkpoints and weights only.

    Args:
        size: model size (a name in dqt_lightning.model.SIZES)
        vocab_size: vocabulary sizes to measure (default: 32000 4096)
    """
    import datetime
    import logging
    import platform
    import time

    args = SimpleNamespace(size=size, vocab_size=vocab_size or [32000, 4096])
    # Lightning's "GPU available / TPU available" banners are noise in a table meant for pasting.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    started = time.perf_counter()
    print("| model | vocab | format | full checkpoint (MB) | ratio to fp | weights only (MB) | ratio to fp |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for vocab in args.vocab_size:
        with tempfile.TemporaryDirectory() as tmp:
            sizes = measure_checkpoint_sizes(args.size, vocab, Path(tmp))
        fp_full, fp_weights = sizes[FP_FORMAT]
        for label, (full, weights) in sizes.items():
            print(f"| {args.size} | {vocab} | {label} | {full / 1e6:.1f} | {full / fp_full:.2f} | "
                  f"{weights / 1e6:.1f} | {weights / fp_weights:.2f} |")
    print(f"\nMeasured with torch {torch.__version__} on {platform.machine()} CPU, {datetime.date.today()}, in "
          f"{time.perf_counter() - started:.0f} s: "
          f"`python -m dqt_lightning.tools.checkpoint_sizes --size {args.size} "
          f"--vocab-size {' '.join(map(str, args.vocab_size))}`")


if __name__ == "__main__":
    sys.exit(script(checkpoint_sizes))
