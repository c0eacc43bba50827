"""Data throughput benchmark: tokens/s each DataModule delivers to the training loop, and ``prepare``'s tokens/s.

    python -m dqt_lightning.tools.databench [--epochs 3] [--cache-dir .cache/dqt_lightning/databench] [--shard-dir DIR]

For every DataModule (``EmbeddedDocs``, ``TextCorpus``, ``TokenShards``) and batch shape it builds the module on the
embedded corpus (the same 4096-token BPE for all; caches are built before timing) and iterates its training
DataLoader as the Trainer does, counting the model's input tokens (``batch x seq_len``) per second of wall time, the
per-epoch shuffle included. It also times ``prepare`` writing the shards (tokenization included, BPE training not) and
the tokenizer alone, once with its own thread pool (``encode_batch``) and once with one process per core.
``--shard-dir`` adds ``TokenShards`` rows for directories already prepared (a larger corpus, say).
A benchmark, not a test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import torch

from dqt_lightning.commands import script
from dqt_lightning.data.embedded import EmbeddedDocs
from dqt_lightning.data.shard_files import Manifest, document_batches
from dqt_lightning.data.shards import TokenShards, prepare
from dqt_lightning.data.text_source import TextSource
from dqt_lightning.data.tokenizer import TextTokenizer, resolve_tokenizer

VOCAB = 4096
SHAPES = ((16, 128), (8, 2048))  # the demo configs' batch, and the SPEC's H100 measurement batch


def loader_tokens_per_second(datamodule: pl.LightningDataModule, epochs: int) -> tuple[float, int]:
    """Tokens/s (``batch x seq_len`` per batch) of ``epochs`` passes over the training DataLoader, and the batches."""
    loader = datamodule.train_dataloader()
    batches = tokens = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # what Lightning's fit loop does at every epoch start
        for batch in loader:
            tokens += batch.shape[0] * (batch.shape[1] - 1)
            batches += 1
    return tokens / (time.perf_counter() - start), batches


def _modules(cache_dir: Path, shard_dir: Path) -> dict[str, Callable[[int, int], pl.LightningDataModule]]:
    builders: dict[str, Callable[[int, int], pl.LightningDataModule]] = {
        "EmbeddedDocs": lambda b, s: EmbeddedDocs(seq_len=s, batch_size=b, vocab_size=VOCAB, cache_dir=str(cache_dir)),
        "TokenShards": lambda b, s: TokenShards(seq_len=s, batch_size=b, vocab_size=VOCAB, shard_dir=str(shard_dir),
                                                cache_dir=str(cache_dir)),
    }
    try:
        from dqt_lightning.data.text import TextCorpus  # noqa: PLC0415 - optional: written alongside this module

        builders["TextCorpus"] = lambda b, s: TextCorpus(seq_len=s, batch_size=b, vocab_size=VOCAB,
                                                         cache_dir=str(cache_dir))
    except ImportError:
        pass
    return builders


def _prepared_shards(directory: Path) -> Callable[[int, int], pl.LightningDataModule]:
    """A builder of TokenShards over an already prepared directory, with the tokenizer settings it was made with."""
    asked = Manifest.load(directory).settings["requested"]
    return lambda b, s: TokenShards(seq_len=s, batch_size=b, shard_dir=str(directory), **asked)


_pool_tokenizer: TextTokenizer | None = None


def _pool_init(path: str) -> None:
    global _pool_tokenizer  # noqa: PLW0603 - one tokenizer per worker process
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _pool_tokenizer = resolve_tokenizer(path, VOCAB, list, "", "")


def _pool_encode(texts: list[str]) -> int:
    return sum(map(len, _pool_tokenizer.encode_batch(texts)))


def encode_tokens_per_second(tokenizer_file: Path, docs: list[str]) -> dict[str, float]:
    """Tokenizer throughput on ``docs``: ``encode_batch`` (Rust threads) against a pool of one process per core."""
    tokenizer = resolve_tokenizer(str(tokenizer_file), VOCAB, list, "", "")
    chunks = list(document_batches(docs))  # the batches prepare encodes
    start = time.perf_counter()
    tokens = sum(sum(map(len, tokenizer.encode_batch(chunk))) for chunk in chunks)
    results = {"encode_batch (tokenizer threads)": tokens / (time.perf_counter() - start)}
    cores = os.cpu_count() or 1
    # spawn, not fork: a forked child of a process whose tokenizer already ran threads would encode single-threaded
    # anyway, but the measurement should not depend on that.
    tasks = [docs[i : i + 64] for i in range(0, len(docs), 64)]  # small tasks, so every process stays busy
    with get_context("spawn").Pool(cores, initializer=_pool_init, initargs=(str(tokenizer_file),)) as pool:
        pool.map(_pool_encode, tasks[:cores])  # start-up and tokenizer loading are not what is measured
        start = time.perf_counter()
        tokens = sum(pool.imap(_pool_encode, tasks))
        results[f"process pool ({cores} processes, 64-document tasks)"] = tokens / (time.perf_counter() - start)
    return results


def databench(epochs: int = 3, cache_dir: str = ".cache/dqt_lightning/databench",
              shard_dir: list[str] | None = None) -> None:
    """Data loading throughput of every data module, the tokenizer alone, and ``prepare``.

    Args:
        epochs: passes over the training windows per measurement
        cache_dir: where the benchmark's tokenizer and shards go
        shard_dir: also measure TokenShards on these prepared directories
    """
    args = SimpleNamespace(epochs=epochs, cache_dir=cache_dir, shard_dir=shard_dir or [])
    cache_dir = Path(args.cache_dir)
    shard_dir = cache_dir / "shards"
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"{platform.machine()}, {time.strftime('%Y-%m-%d')}")

    prepare(shard_dir, TextSource(), None, VOCAB, cache_dir=str(cache_dir), progress=False)  # trains the BPE once
    shutil.rmtree(shard_dir)
    start = time.perf_counter()
    _, manifest = prepare(shard_dir, TextSource(), None, VOCAB, cache_dir=str(cache_dir), progress=False)
    seconds = time.perf_counter() - start
    total = manifest.tokens("train") + manifest.tokens("validation")
    print(f"prepare (embedded corpus, BPE {VOCAB} cached): {total:,} tokens in {seconds:.2f} s = "
          f"{total / seconds:,.0f} tokens/s")

    docs = list(TextSource().documents("train"))
    for how, rate in encode_tokens_per_second(shard_dir / manifest.settings["tokenizer_file"], docs).items():
        print(f"tokenizer alone, {how}: {rate:,.0f} tokens/s")

    print("| DataModule | batch x seq_len | batches | tokens/s |")
    print("|---|---|---:|---:|")
    builders = _modules(cache_dir, shard_dir)
    for extra in args.shard_dir:
        builders[f"TokenShards ({extra})"] = _prepared_shards(Path(extra))
    for name, build in builders.items():
        for batch_size, seq_len in SHAPES:
            datamodule = build(batch_size, seq_len)
            datamodule.prepare_data()
            datamodule.setup("fit")
            rate, batches = loader_tokens_per_second(datamodule, args.epochs)
            print(f"| {name} | {batch_size} x {seq_len} | {batches} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    sys.exit(script(databench))
