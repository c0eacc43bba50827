"""Log-likelihoods of token windows: what ``eval``'s perplexity and multiple-choice accuracy, and the
lm-evaluation-harness adapter, are all computed from.

A :class:`Window` is a run of input tokens of which only the last ``n_scored`` predictions count. Perplexity slides
windows over a token stream (:func:`sliding_windows`); a multiple-choice item is one window per choice, the choice's
tokens scored after its context (:func:`encode_pair`, tokenized as lm-evaluation-harness does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dqt_lightning.data.tokenizer import TextTokenizer
from dqt_lightning.errors import ConfigError
from dqt_lightning.model import LLaMA


def load_model(path: str | Path) -> tuple[LLaMA, TextTokenizer]:
    """The model and tokenizer of a checkpoint, a run directory, an export or a Hugging Face LLaMA directory (as
    ``generate`` loads them); a Hugging Face model of another type is refused in one line, pointing to lm-eval's own
    ``hf`` model."""
    from dqt_lightning.tools.generate import load  # noqa: PLC0415 - generate imports the export module, itself heavy

    path = Path(path)
    config_file = path / "config.json"
    if path.is_dir() and config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"{config_file} is not valid JSON ({error})") from error
        if not isinstance(config, dict) or "quantization" not in config:
            if isinstance(config, dict) and config.get("model_type") == "llama":
                return load(path)  # its float model, imported as init_from imports it
            if isinstance(config, dict) and "model_type" in config:
                raise ConfigError(f"{path} is a Hugging Face model directory (config.json has model_type "
                                  f"{config['model_type']!r}), not an export of this package; evaluate it with "
                                  f"lm-eval's hf model: lm_eval --model hf --model_args pretrained={path}")
            raise ConfigError(f"{config_file} has no 'quantization' entry: {path} is not a directory written by export")
    return load(path)


@dataclass
class Window:
    """One forward pass: ``targets[j]`` is the token after ``inputs[j]``; targets from index ``first`` on count."""

    inputs: Sequence[int]
    targets: Sequence[int]
    first: int


@torch.no_grad()
def score_windows(model: LLaMA, windows: Sequence[Window], batch_size: int = 8,
                  progress: Any = None) -> list[tuple[float, bool, int]]:
    """(summed log-probability of the counted targets, whether each is the model's most likely token, how many) of
    every window, in the given order. Windows run in batches of similar length, padded on the right (a causal model's
    earlier positions never see the padding)."""
    device = model.rope_cos.device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].inputs))
    results: list[tuple[float, bool, int]] = [(0.0, True, 0)] * len(windows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = len(windows[chunk[0]].inputs)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, i in enumerate(chunk):
            window = windows[i]
            n = len(window.inputs)
            x[row, :n] = torch.as_tensor(np.asarray(window.inputs, dtype=np.int64))
            y[row, window.first:n] = torch.as_tensor(np.asarray(window.targets[window.first:], dtype=np.int64))
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        logprobs = -F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="none").double()
        greedy = (logits.argmax(-1) == y) | (y == -100)
        counted = (y != -100).sum(-1)
        for row, i in enumerate(chunk):
            results[i] = (float(logprobs[row].sum()), bool(greedy[row].all()), int(counted[row]))
        if progress is not None:
            progress.update(len(chunk))
    return results


def sliding_windows(tokens: Sequence[int], context: int, stride: int) -> list[Window]:
    """Windows of ``context`` input tokens starting every ``stride`` tokens (``stride <= context``), each predicting
    the token after every one of its positions and scoring only those after the last one the previous window scored,
    so every token but the first is scored exactly once. The last window is moved back to end at the last token,
    so it too sees a full context (as lm-eval's rolling windows; HF's perplexity guide shortens it instead)."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}]; got {stride}")
    windows, scored_to, begin = [], 0, 0  # scored_to: the last position scored so far (position 0 never is)
    while scored_to < len(tokens) - 1:
        end = min(begin + context, len(tokens) - 1)  # inputs end before, targets at, position ``end``
        start = max(0, end - context)  # == begin, except for a last window that would be short
        windows.append(Window(tokens[start:end], tokens[start + 1:end + 1], scored_to - start))
        scored_to, begin = end, begin + stride
    return windows


def stream_logprob(model: LLaMA, tokens: Sequence[int], context: int, stride: int, batch_size: int = 8,
                   progress: Any = None) -> tuple[float, int]:
    """(total log-probability, tokens scored) of a token stream under :func:`sliding_windows`."""
    scores = score_windows(model, sliding_windows(tokens, context, stride), batch_size, progress)
    return math.fsum(s for s, _, _ in scores), sum(n for _, _, n in scores)


def encode_pair(tokenizer: TextTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The tokens of ``context`` and of ``continuation`` after it, as lm-evaluation-harness splits them: trailing
    whitespace of the context moves to the continuation, both are tokenized together and the continuation's tokens
    are those after the context's own count; an empty context is the end-of-text token."""
    encode = lambda text: tokenizer.encode_batch([text])[0]  # noqa: E731
    if not context.strip():
        continuation = context + continuation
        return [tokenizer.eot_id], encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    cont = whole[len(ctx):]
    if not cont:  # the choice merged into the context's last token: score it tokenized on its own instead
        cont = encode(continuation)
    return ctx, cont


def continuation_window(context: list[int], continuation: list[int], max_length: int) -> Window:
    """The window scoring ``continuation`` after ``context``, keeping the last ``max_length + 1`` tokens."""
    ids = (context + continuation)[-(max_length + 1):]
    return Window(ids[:-1], ids[1:], max(0, len(ids) - 1 - len(continuation)))


def loglikelihoods(model: LLaMA, tokenizer: TextTokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                   progress: Any = None, max_length: int | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) of each ``(context, continuation)``: lm-eval's ``loglikelihood``."""
    length = max_length or model.config.block_size
    windows = [continuation_window(*encode_pair(tokenizer, c, x), length) for c, x in pairs]
    return [(logprob, greedy) for logprob, greedy, _ in score_windows(model, windows, batch_size, progress)]
