"""``python -m dqt_lightning generate MODEL --prompt TEXT``: sample text from a checkpoint or an export.

``MODEL`` is a checkpoint written by ``fit`` or a directory written by ``export``; ``--ternary`` runs it with its
quantized weights re-quantized to ternary (:class:`~dqt_lightning.quant.ternary.TernaryWeights`). The sampler is
the plain one: temperature, then top-k, one token at a time over the whole context (no KV cache: these models are
small and this is for looking at what a model learned, not for serving).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from dqt_lightning.errors import ConfigError
from dqt_lightning.tools.export import load_exported, model_from_checkpoint, resolve_checkpoint, tokenizer_of_checkpoint
from dqt_lightning.model import LLaMA
from dqt_lightning.quant.ternary import TernaryWeights
from dqt_lightning.data.tokenizer import TextTokenizer


@torch.no_grad()
def sample(model: LLaMA, prompt: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
           generator: torch.Generator | None = None, stop_id: int | None = None) -> list[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` sampled tokens; stops early at ``stop_id``.

    Args:
        model: The model, in eval mode.
        prompt: Token ids to continue (at least one).
        max_new_tokens: How many tokens to add at most.
        temperature: Softmax temperature; 0 picks the most likely token every time.
        top_k: Sample only among the ``top_k`` most likely tokens (None: all).
        generator: Random generator, for reproducible samples.
        stop_id: A token (end of text) that ends the sample; it is not included.

    Returns:
        The new token ids.
    """
    idx = torch.tensor([prompt], dtype=torch.long)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size:])[0, -1].float()
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                cutoff = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        if token == stop_id:
            break
        new.append(token)
        idx = torch.cat([idx, torch.tensor([[token]])], dim=1)
    return new


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dqt_lightning generate", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a checkpoint (runs/<name>/version_N/checkpoints/*.ckpt), a run directory (its "
                        "checkpoints/last.ckpt) or an export directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from an end-of-text token)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="at most this many tokens (>= 1)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0: always the most "
                        "likely token")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0: among all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ternary", action="store_true", help="re-quantize the quantized weights to ternary")
    args = parser.parse_args(argv)
    for flag, value, ok in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1),
                            ("--temperature", args.temperature, args.temperature >= 0),
                            ("--top-k", args.top_k, args.top_k >= 0)):
        if not ok:
            parser.error(f"{flag} must be {'>= 1' if flag == '--max-new-tokens' else '>= 0'}; got {value:g}")
    try:
        model, tokenizer = load(args.model)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    prompt = tokenizer.encode_batch([args.prompt])[0] if args.prompt else []
    prompt = prompt or [tokenizer.eot_id]
    context = TernaryWeights(model) if args.ternary else contextlib.nullcontext()
    with context:
        new = sample(model, prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                     torch.Generator().manual_seed(args.seed), stop_id=tokenizer.eot_id)
    print(args.prompt + tokenizer.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
