"""``python -m dqt_lightning generate MODEL --prompt TEXT``: sample text from a checkpoint or an export.

``MODEL`` is a checkpoint written by ``fit`` or a directory written by ``export``; ``--ternary`` runs it with its
quantized weights re-quantized to ternary (:class:`~dqt_lightning.quant.ternary.TernaryWeights`). The sampler is
the plain one: temperature, then top-k, one token at a time, with every layer's keys and values cached so that each
new token runs through the model alone. The text is written as it is produced, and tokens/s at the end (on stderr).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import TextIO
from pathlib import Path

import torch

from dqt_lightning.errors import ConfigError
from dqt_lightning.tools.loading import (load_exported, model_from_checkpoint, resolve_checkpoint,
                                         tokenizer_of_checkpoint)
from dqt_lightning.model import LLaMA
from dqt_lightning.quant.ternary import TernaryWeights
from dqt_lightning.data.tokenizer import TextTokenizer


@torch.no_grad()
def sample(model: LLaMA, prompt: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
           generator: torch.Generator | None = None, stop_id: int | None = None, kv_cache: bool = True,
           on_token: Callable[[list[int]], None] | None = None) -> list[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` sampled tokens; stops early at ``stop_id``.

    Args:
        model: The model, in eval mode.
        prompt: Token ids to continue (at least one).
        max_new_tokens: How many tokens to add at most; the prompt and they must fit in the block size.
        temperature: Softmax temperature; 0 picks the most likely token every time.
        top_k: Sample only among the ``top_k`` most likely tokens (None: all).
        generator: Random generator (a CPU one, whatever the model's device), for reproducible samples.
        stop_id: A token (end of text) that ends the sample; it is not included.
        kv_cache: Keep every layer's keys and values (:class:`~dqt_lightning.model.KVCache`), so that each new token
            runs through the model alone; ``False`` recomputes the whole context for every token (same tokens).
        on_token: Called with the new ids so far after each one, for streaming.

    Returns:
        The new token ids.
    """
    if len(prompt) + max_new_tokens > model.config.block_size:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} with a prompt of {len(prompt)} tokens is more than the "
                          f"model's block size of {model.config.block_size} tokens")
    device = model.rope_cos.device
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    caches = model.kv_caches() if kv_cache else None
    done = 0  # positions whose keys and values are in the caches
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = (model(idx) if caches is None else model(idx[:, done:], caches, done))[0, -1].float()
        done = idx.shape[1]
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                cutoff = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            # Drawn on the CPU, whatever device the model is on: a CPU generator serves every model, and a seed gives
            # the same tokens for the same logits on any device.
            token = int(torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator))
        if token == stop_id:
            break
        new.append(token)
        if on_token is not None:
            on_token(new)
        idx = torch.cat([idx, torch.tensor([[token]], device=device)], dim=1)
    return new


class TextStream:
    """Writes a sample's text as its tokens arrive: each time, the part of the decoded text not written yet. Waits
    while the text ends in an incomplete character (a multi-byte character split across byte-level tokens)."""

    def __init__(self, tokenizer: TextTokenizer, out: TextIO) -> None:
        self.tokenizer, self.out, self.written = tokenizer, out, ""

    def __call__(self, ids: list[int]) -> None:
        text = self.tokenizer.decode(ids)
        if text.endswith("\ufffd") or not text.startswith(self.written):
            return
        self.out.write(text[len(self.written):])
        self.out.flush()
        self.written = text

    def finish(self, ids: list[int]) -> None:
        text = self.tokenizer.decode(ids)
        self.out.write(text[len(self.written):] if text.startswith(self.written) else "")
        self.out.write("\n")
        self.out.flush()


def load(path: str | Path) -> tuple[LLaMA, TextTokenizer]:
    """The model and tokenizer of a checkpoint (it keeps its tokenizer, as does its run directory) or of an export
    directory."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = load_exported(path)
    else:
        try:
            path = resolve_checkpoint(path)
        except ConfigError as error:
            if not path.is_dir():
                raise
            raise ConfigError(f"{path} is neither an export (config.json and model.safetensors) nor a run directory "
                              "(checkpoints/last.ckpt)") from error
        model, _ = model_from_checkpoint(path)
        tokenizer = tokenizer_of_checkpoint(path, model.config.vocab_size)
    if tokenizer is None:
        raise ConfigError(f"{path} has no tokenizer inside it or beside it (tokenizer.json or tokenizer.model in the "
                          "run or export directory); checkpoints written by this version of fit keep one inside")
    return model, tokenizer


def generate(model: str, prompt: str = "", max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 50,
             seed: int = 0, ternary: bool = False, no_kv_cache: bool = False) -> int:
    """Sample text from a checkpoint or an export.

    Args:
        model: a checkpoint (runs/<name>/version_N/checkpoints/*.ckpt), a run directory (its checkpoints/last.ckpt)
            or an export directory
        prompt: text to continue (default: start from an end-of-text token)
        max_new_tokens: at most this many tokens (>= 1); the prompt and they must fit in the model's block size (no
            sliding window)
        temperature: softmax temperature; 0: always the most likely token
        top_k: sample among the k most likely tokens; 0: among all
        seed: the sampling generator's seed
        ternary: re-quantize the quantized weights to ternary
        no_kv_cache: recompute the whole context for every new token instead of caching keys and values (slower; the
            same tokens)
    """
    for flag, value, ok in (("--max-new-tokens", max_new_tokens, max_new_tokens >= 1),
                            ("--temperature", temperature, temperature >= 0), ("--top-k", top_k, top_k >= 0)):
        if not ok:
            raise ConfigError(f"{flag} must be {'>= 1' if flag == '--max-new-tokens' else '>= 0'}; got {value:g}")
    net, tokenizer = load(model)
    ids = tokenizer.encode_batch([prompt])[0] if prompt else []
    ids = ids or [tokenizer.eot_id]
    context = TernaryWeights(net) if ternary else contextlib.nullcontext()
    sys.stdout.write(prompt)
    stream = TextStream(tokenizer, sys.stdout)
    started = time.perf_counter()
    with context:
        new = sample(net, ids, max_new_tokens, temperature, top_k or None, torch.Generator().manual_seed(seed),
                     stop_id=tokenizer.eot_id, kv_cache=not no_kv_cache, on_token=stream)
    seconds = time.perf_counter() - started
    stream.finish(new)
    sys.stderr.write(f"[generate] {len(new)} tokens in {seconds:.2f} s ({len(new) / max(seconds, 1e-9):.1f} "
                     "tokens/s)\n")
    return 0
