"""Training on pre-tokenized shards: windows read straight from memmaps, a whole batch per read.

``TokenShards`` takes the same arguments as :func:`prepare` (source, tokenizer, vocabulary, shard directory), so one
YAML file serves both ``python -m dqt_lightning prepare`` and ``fit``; training itself reads only the shard directory.
The shard format and the writer live in :mod:`dqt_lightning.data.shard_files`.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dqt_lightning.errors import ConfigError
from dqt_lightning.data.sampling import PositionedLoader, ResumablePosition, TrainEvalLoaders
from dqt_lightning.data.shard_files import PREPARE_HINT, Manifest, default_shard_dir, prepare
from dqt_lightning.data.text_source import TextSource
from dqt_lightning.data.tokenizer import BPE_SPECS, TextTokenizer, resolve_tokenizer

__all__ = ["ShardWindows", "TokenShards", "prepare", "prepare_from_config"]


class ShardWindows(Dataset[torch.Tensor]):
    """Non-overlapping windows of ``window`` tokens over the concatenation of some shards, as ``torch.long``.

    Window ``i`` is tokens ``[i * window, (i + 1) * window)`` of that concatenation (it may span a shard boundary);
    the tail shorter than a window is never used. ``__getitems__`` reads a whole batch into one array and converts it
    to int64 once, which is what makes this loader fast.

    Args:
        paths: Shard files, in order.
        counts: Tokens in each shard.
        dtype: Their dtype.
        window: Tokens per window (``seq_len + 1``).
    """

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype, window: int) -> None:
        self.paths, self.dtype, self.window = paths, np.dtype(dtype), window
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.r_[0, np.cumsum(self.counts)].astype(np.int64)  # token offset of each shard
        self._maps: list[np.ndarray] | None = None  # opened lazily: per process, never pickled to workers

    def __len__(self) -> int:
        return int(self.starts[-1]) // self.window

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_maps": None}

    def _memmaps(self) -> list[np.ndarray]:
        if self._maps is None:
            # Plain ndarray views of the maps: slicing an np.memmap builds a memmap object per slice, which made this
            # loader markedly slower.
            self._maps = [np.asarray(np.memmap(p, dtype=self.dtype, mode="r", shape=(int(n),)))
                          for p, n in zip(self.paths, self.counts)]
        return self._maps

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        maps, window = self._memmaps(), self.window
        index = np.asarray(indices, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"window index out of range(0, {len(self)})")
        starts = index * window
        shards = np.searchsorted(self.starts, starts, side="right") - 1  # one vectorized lookup per batch
        locals_ = (starts - self.starts[shards]).tolist()
        out = np.empty((len(index), window), dtype=self.dtype)
        for row, (shard, local) in enumerate(zip(shards.tolist(), locals_)):
            piece = maps[shard][local : local + window]
            out[row, : len(piece)] = piece
            filled = len(piece)
            while filled < window:  # a window crossing a shard boundary takes the rest from the next shards
                shard += 1
                piece = maps[shard][: window - filled]
                out[row, filled : filled + len(piece)] = piece
                filled += len(piece)
        return torch.from_numpy(out.astype(np.int64))

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]


def whole_batch(batch: torch.Tensor) -> torch.Tensor:
    """Collate function for ``ShardWindows``: ``__getitems__`` already returns the stacked batch."""
    return batch


def _require(ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"data.{field} must be {rule}, got {value!r}")


class TokenShards(ResumablePosition, TrainEvalLoaders, pl.LightningDataModule):
    """Training windows sampled from the shards ``python -m dqt_lightning prepare`` wrote.

    Args:
        source: The text the shards are made from (read by ``prepare``; training reads only the shard directory).
        tokenizer: Tokenizer spec as for ``prepare``; checked against the shards' own tokenizer.
        vocab_size: BPE vocabulary size asked of ``prepare``; the model gets the shards' vocabulary size.
        shard_dir: Directory of the shards and ``manifest.json``; None: ``<cache_dir>/shards/<name>`` named after
            (a hash of) source, tokenizer, vocabulary and shard settings, so each combination gets its own.
        seq_len: Tokens the model sees per example; each window holds ``seq_len + 1`` tokens.
        batch_size: Windows per batch, for training and evaluation alike.
        seed: Seeds the order of training windows (one shuffle per epoch).
        num_workers: DataLoader worker processes; 0 reads in the main process (fast enough: memmap reads).
        shard_tokens: For ``prepare``: a shard closes at the first document end past this many tokens.
        dtype: For ``prepare``: ``uint16``/``uint32``; unset picks the smallest that holds the vocabulary.
        cache_dir: Cache of trained tokenizers (and of the default shard directories).
        bpe_train_documents: For ``prepare``: a trained BPE learns from the first this many training documents.

    Raises:
        ConfigError: When the shard directory has not been prepared, is unfinished, was prepared with another
            tokenizer, or holds fewer tokens than one batch of windows (validation: one window).
    """

    def __init__(  # noqa: PLR0913 - one argument per user-facing config field
        self, source: TextSource | None = None, tokenizer: str | None = None, vocab_size: int = 4096,
        shard_dir: str | None = None, seq_len: int = 128, batch_size: int = 16, seed: int = 1234,
        num_workers: int = 0, shard_tokens: int = 50_000_000, dtype: str | None = None,
        cache_dir: str = ".cache/dqt_lightning", bpe_train_documents: int | None = 100_000,
    ) -> None:
        super().__init__()
        _require(seq_len >= 2, "seq_len", ">= 2", seq_len)
        _require(batch_size >= 1, "batch_size", ">= 1", batch_size)
        _require(num_workers >= 0, "num_workers", ">= 0", num_workers)
        _require(shard_tokens >= 1, "shard_tokens", ">= 1", shard_tokens)
        self.source = source if source is not None else TextSource()
        self.save_hyperparameters(ignore=["source"])
        self.hparams["source"] = asdict(self.source)  # plain values, so checkpoints load without the class
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.shard_dir = Path(shard_dir).expanduser() if shard_dir is not None else default_shard_dir(
            self.source, tokenizer, vocab_size, shard_tokens, dtype, bpe_train_documents, cache_dir)
        self.manifest = self._checked_manifest(tokenizer, vocab_size, dtype)
        self.vocab_size = self.manifest.vocab_size  # set here: the CLI links it to the model at instantiation time
        self.train_windows, self.val_windows = (self._windows(split) for split in ("train", "validation"))
        self._check_lengths()
        self.tokenizer: TextTokenizer | None = None
        self._resume: dict[str, Any] | None = None

    def _checked_manifest(self, tokenizer: str | None, vocab_size: int, dtype: str | None) -> Manifest:
        directory = self.shard_dir
        manifest = Manifest.load(directory)
        if manifest is None:
            raise ConfigError(f"data.shard_dir={directory} has no prepared shards (no manifest.json); run "
                              f"{PREPARE_HINT} first")
        if not manifest.complete():
            raise ConfigError(f"data.shard_dir={directory} is only partly prepared (prepare was interrupted); run "
                              f"{PREPARE_HINT} again to finish it")
        settings = manifest.settings
        if dtype is not None and dtype != settings["dtype"]:
            raise ConfigError(f"data.dtype={dtype} but the shards in {directory} are {settings['dtype']}")
        spec = None if tokenizer in BPE_SPECS else tokenizer
        asked = settings.get("requested", {})
        asked_spec = None if asked.get("tokenizer") in BPE_SPECS else asked.get("tokenizer")
        if spec is not None and Path(spec).expanduser().exists():
            # A local tokenizer file is cheap to load: compare what it is, not what it is called.
            fingerprint = resolve_tokenizer(spec, vocab_size, list, self.hparams.cache_dir, "").fingerprint
            same = fingerprint == settings["tokenizer_fingerprint"]
            theirs, ours = settings["tokenizer_fingerprint"], fingerprint
        else:
            same = spec == asked_spec and (spec is not None or vocab_size == asked.get("vocab_size"))
            theirs = f"{asked_spec or 'bpe'} vocab {asked.get('vocab_size')}"
            ours = f"{spec or 'bpe'} vocab {vocab_size}"
        if not same:
            raise ConfigError(
                f"data.shard_dir={directory} was prepared with a different tokenizer ({theirs}, the config asks for "
                f"{ours}); point data.shard_dir elsewhere and run {PREPARE_HINT}"
            )
        for split in ("train", "validation"):
            whole = manifest.verified_shards(directory, split)
            if whole < len(manifest.shards(split)):
                name = manifest.shards(split)[whole]["file"]
                raise ConfigError(f"shard {directory / name} is missing or has the wrong size; run {PREPARE_HINT} "
                                  "again to rewrite it")
        return manifest

    def _windows(self, split: str) -> ShardWindows:
        shards = self.manifest.shards(split)
        return ShardWindows([self.shard_dir / s["file"] for s in shards], [int(s["tokens"]) for s in shards],
                            self.manifest.dtype, self.seq_len + 1)

    def _check_lengths(self) -> None:
        need = self.seq_len + 1
        train, val = self.manifest.tokens("train"), self.manifest.tokens("validation")
        if val < need:
            raise ConfigError(
                f"data.seq_len={self.seq_len} needs {need} tokens per window but the validation shards in "
                f"{self.shard_dir} hold only {val} tokens; lower data.seq_len or use a larger corpus"
            )
        if len(self.train_windows) < self.batch_size:  # drop_last would leave no training batch at all
            raise ConfigError(
                f"data.seq_len={self.seq_len} with data.batch_size={self.batch_size} needs {need * self.batch_size} "
                f"tokens per batch but the train shards in {self.shard_dir} hold only {train} tokens; lower "
                "data.seq_len or data.batch_size, or use a larger corpus"
            )

    def setup(self, stage: str | None = None) -> None:
        """Load the shards' own copy of the tokenizer (for ``decode``) and check it is the one the manifest names."""
        if self.tokenizer is not None:
            return
        path = self.shard_dir / self.manifest.settings["tokenizer_file"]
        tokenizer = resolve_tokenizer(str(path), self.vocab_size, list, self.hparams.cache_dir, "")
        if tokenizer.fingerprint != self.manifest.settings["tokenizer_fingerprint"]:
            raise ConfigError(f"{path} is not the tokenizer {self.shard_dir / 'manifest.json'} names; run "
                              f"{PREPARE_HINT} again")
        self.tokenizer = tokenizer

    def _loader(self, train: bool) -> DataLoader:
        windows = self.train_windows if train else self.val_windows
        workers = self.hparams.num_workers
        if workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers never tokenize
        sampler = self._train_sampler(windows, self.seed) if train else None
        return (PositionedLoader if train else DataLoader)(
            windows, batch_size=self.batch_size, sampler=sampler, drop_last=train, num_workers=workers,
            persistent_workers=workers > 0, collate_fn=whole_batch,
        )

    def unigram_entropy(self, max_tokens: int = 200_000_000) -> float:
        """Entropy (nats/token) of the training tokens' frequencies (of the first ``max_tokens`` of a larger corpus):
        the loss of a model that ignores context."""
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        left = max_tokens
        for path, n in zip(self.train_windows.paths, self.train_windows.counts):
            block = min(int(n), left)
            tokens = np.memmap(path, dtype=self.manifest.dtype, mode="r", shape=(int(n),))[:block]
            counts += np.bincount(tokens, minlength=self.vocab_size)[: self.vocab_size]
            left -= block
            if not left:
                break
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def describe(self) -> str:
        """One line summarizing the shards, for logs and run records."""
        settings = self.manifest.settings
        return (
            f"shards {self.shard_dir} ({settings['dtype']}): {settings['source']}, "
            f"train {self.manifest.tokens('train'):,} / val {self.manifest.tokens('validation'):,} tokens, "
            f"vocab {self.vocab_size}"
        )


def prepare_from_config(init_args: dict[str, Any], progress: bool = True) -> TokenShards:
    """Run :func:`prepare` with the ``data.init_args`` of a config, then build the ``TokenShards`` fit would build.

    Building it checks what training will need (windows that fit in the shards), so a corpus too short for the
    configured ``seq_len`` fails here rather than after the first training step.
    """
    args = dict(init_args)
    if isinstance(args.get("source"), dict):
        args["source"] = TextSource(**args["source"])
    wanted = inspect.signature(prepare).parameters
    prepare(**{key: value for key, value in args.items() if key in wanted}, progress=progress)
    return TokenShards(**args)
