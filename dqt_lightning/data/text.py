"""Training text from anywhere ``datasets`` reads: local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files, a
Hugging Face hub dataset, or (with neither) the embedded corpus, tokenized by any :mod:`dqt_lightning.data.tokenizer`.

:class:`~dqt_lightning.data.text_source.TextSource` says where the documents are and which are held out;
:class:`TextCorpus` is the DataModule that tokenizes them (cached), separates documents with the end-of-text id and
packs them into training windows, either all at once (resumable, like ``EmbeddedDocs``) or on the fly when
``streaming`` is set.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dqt_lightning.data.embedded import PackedWindows
from dqt_lightning.errors import ConfigError
from dqt_lightning.files import atomic_write
from dqt_lightning.data.sampling import PositionedLoader, ResumablePosition, streamed_start
from dqt_lightning.data.tokenizer import TextTokenizer, resolve_tokenizer, tokenizer_vocab_size

from dqt_lightning.data.text_source import ENCODE_BATCH, FORMAT_VERSION, TextSource, _hash


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_documents(tokenizer: TextTokenizer, docs: Iterable[str]) -> Iterator[np.ndarray]:
    """Token ids of each document, as arrays of ``token_dtype(tokenizer.vocab_size)``, tokenized in batches."""
    dtype = token_dtype(tokenizer.vocab_size)
    docs = iter(docs)
    while batch := list(itertools.islice(docs, ENCODE_BATCH)):
        yield from (np.asarray(ids, dtype) for ids in tokenizer.encode_batch(batch))


def encode_stream(tokenizer: TextTokenizer, docs: Iterable[str]) -> np.ndarray:
    """One token stream of the documents with the end-of-text id between consecutive documents."""
    sep = np.array([tokenizer.eot_id], token_dtype(tokenizer.vocab_size))
    pieces = [piece for ids in encode_documents(tokenizer, docs) for piece in (sep, ids)][1:]
    return np.concatenate(pieces) if pieces else np.empty(0, sep.dtype)


class StreamedWindows(IterableDataset):
    """Training windows packed on the fly from a streamed source.

    Documents are dealt round-robin to (rank, worker) slots, so no two ranks or workers ever share a window; each slot
    packs its documents, separated by end-of-text, into windows of ``seq_len + 1`` tokens and shuffles them through a
    seeded buffer.

    Args:
        source: The documents.
        tokenizer: Their tokenizer.
        seq_len: Model context length; windows hold one token more.
        world_size: Data-parallel ranks.
        rank: This rank.
        seed: Seeds the shuffle buffer (with the epoch and slot).
        shuffle_buffer: Windows held for shuffling; 0 or 1 keeps stream order.
    """

    def __init__(self, source: TextSource, tokenizer: TextTokenizer, seq_len: int, world_size: int, rank: int,
                 seed: int, shuffle_buffer: int) -> None:
        self.source, self.tokenizer, self.window = source, tokenizer, seq_len + 1
        self.world_size, self.rank, self.seed, self.shuffle_buffer = world_size, rank, seed, shuffle_buffer
        self.epoch, self.skip_windows = 0, 0

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _windows(self, slot: int, slots: int) -> Iterator[np.ndarray]:
        docs = itertools.islice(self.source.documents("train"), slot, None, slots)
        buffer = np.empty(0, token_dtype(self.tokenizer.vocab_size))
        sep = np.array([self.tokenizer.eot_id], buffer.dtype)
        for ids in encode_documents(self.tokenizer, docs):
            buffer = np.concatenate([buffer, sep, ids]) if len(buffer) else ids
            full = len(buffer) // self.window * self.window
            yield from buffer[:full].reshape(-1, self.window)
            buffer = buffer[full:]

    def __iter__(self) -> Iterator[torch.Tensor]:
        slot, slots = self._slot()
        rng = random.Random(f"{self.seed}:{self.epoch}:{slot}")
        self.epoch += 1  # each (persistent) worker counts its own passes, in step with the others
        skip, self.skip_windows = self.skip_windows, 0
        buffer: list[np.ndarray] = []
        produced = 0
        for window in self._windows(slot, slots):
            produced += 1
            if len(buffer) < max(self.shuffle_buffer, 1):
                buffer.append(window)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], window = window, buffer[i]
            if skip:
                skip -= 1
            else:
                yield torch.from_numpy(window.astype(np.int64))
        if produced == 0:
            raise ConfigError(
                f"data.seq_len={self.window - 1}: the training documents of {self.source.describe()} that reach "
                f"rank {self.rank} fill no {self.window}-token window; lower data.seq_len or add data"
            )
        rng.shuffle(buffer)
        for window in buffer[skip:]:
            yield torch.from_numpy(window.astype(np.int64))


# --- the data module -----------------------------------------------------------------------------------------------


def _require(ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"data.{field} must be {rule}, got {value!r}")


class _CountedPasses(PositionedLoader):
    """A DataLoader that counts the passes begun over it, in the main process whatever its workers do."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


class TextCorpus(ResumablePosition, pl.LightningDataModule):
    """Documents from a :class:`TextSource`, tokenized (cached), end-of-text separated and packed into windows.

    Args:
        source: Where the documents come from (a nested ``source:`` mapping in YAML); the embedded corpus by default.
        tokenizer: None or ``"bpe"`` to train a byte-level BPE of ``vocab_size`` on the training documents (cached);
            a path to a ``tokenizer.json`` or SentencePiece ``*.model`` (e.g. LLaMA's ``tokenizer.model``), whose
            own size then replaces ``vocab_size``; or a hub tokenizer name (needs a network).
        vocab_size: Size of the BPE to train; after construction, the vocabulary size the model must use.
        seq_len: Tokens the model sees per example; each window holds ``seq_len + 1`` tokens.
        batch_size: Windows per batch, for training and evaluation alike.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        cache_dir: Directory for trained tokenizers and tokenized documents, reused across runs.
        bpe_train_documents: At most this many training documents train the BPE (the first ones); None: all.
        shuffle_buffer: Streaming only: windows held in a seeded shuffle buffer.
    """

    def __init__(  # noqa: PLR0913 - one argument per user-facing config field
        self, source: TextSource | None = None, tokenizer: str | None = None, vocab_size: int = 4096,
        seq_len: int = 128, batch_size: int = 16, num_workers: int = 0, cache_dir: str = ".cache/dqt_lightning",
        bpe_train_documents: int | None = 100_000, shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        _require(seq_len >= 2, "seq_len", ">= 2", seq_len)
        _require(batch_size >= 1, "batch_size", ">= 1", batch_size)
        _require(num_workers >= 0, "num_workers", ">= 0", num_workers)
        _require(bpe_train_documents is None or bpe_train_documents >= 1, "bpe_train_documents", ">= 1 or null",
                 bpe_train_documents)
        _require(shuffle_buffer >= 0, "shuffle_buffer", ">= 0", shuffle_buffer)
        self.source = source if source is not None else TextSource()
        self.source.validate()
        # A loaded tokenizer's own size replaces the configured one before the hyperparameters are recorded:
        # Lightning refuses model and data hyperparameters that disagree, and the model gets this size by the link.
        vocab_size = tokenizer_vocab_size(tokenizer, vocab_size)
        self.save_hyperparameters(ignore=["source"])
        # Under LightningCLI the recorded values are the config's, not the locals: write the tokenizer's size over
        # them, in the initial copy too (loggers compare that one with the model's, which gets it by the link).
        # The source goes in as plain values, so checkpoints load without this class.
        for recorded in (self._hparams, self._hparams_initial):
            recorded.update(vocab_size=vocab_size, source=asdict(self.source))
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.tokenizer_spec, self.cache_dir = tokenizer, Path(cache_dir).expanduser()
        self.vocab_size = vocab_size  # set here: the CLI links it to the model at instantiation time
        self.tokenizer: TextTokenizer | None = None
        self.train_stream = self.val_stream = np.empty(0, np.uint16)
        self._resume: dict[str, Any] | None = None
        self._stream_loader: _CountedPasses | None = None
        self._first_stream_epoch = 0

    # --- building -----------------------------------------------------------------------------------------------

    def _resolve_tokenizer(self) -> TextTokenizer:
        limit = self.hparams.bpe_train_documents
        return resolve_tokenizer(
            self.tokenizer_spec, self.vocab_size,
            lambda: itertools.islice(self.source.documents("train"), limit),
            self.cache_dir, _hash(self.source.fingerprint(), limit),
        )

    def _cached_stream(self, tokenizer: TextTokenizer, split: str, fingerprint: str) -> np.ndarray:
        """The split's token stream from the cache (memory-mapped), tokenized and written atomically if absent."""
        path = self.cache_dir / f"text-{_hash(fingerprint, tokenizer.fingerprint, FORMAT_VERSION)}-{split}.npy"
        dtype = token_dtype(tokenizer.vocab_size)
        try:
            stream = np.load(path, mmap_mode="r")
            if stream.dtype == dtype and stream.ndim == 1:
                return stream
        except (OSError, ValueError):  # missing, or damaged after it was written: tokenize again
            pass
        stream = encode_stream(tokenizer, self.source.documents(split))
        if len(stream) == 0:
            raise ConfigError(self._empty_split(split))
        atomic_write(path, lambda f: np.save(f, stream))
        return stream

    def _empty_split(self, split: str) -> str:
        """What to tell a user whose ``split`` tokenized to nothing, and what to set."""
        where = self.source.describe()
        if split != "train":
            return (f"data.source: the {split} split of {where} holds no text; raise data.source.val_fraction or set "
                    "data.source.validation_split")
        counts = self.source.held_out_of()
        if counts is not None and counts[0] == counts[1]:
            # Validation holds out at least one document: a corpus of one document (a .txt file without a blank line,
            # say) leaves nothing to train on, however large it is.
            n = counts[0]
            return (f"data.source: all {n} document{'s' if n != 1 else ''} of {where} went to validation, leaving "
                    "the train split empty (at least one is held out, and data.source.val_fraction of them); give it "
                    "more documents (in a .txt file a blank line separates documents), or set "
                    "data.source.validation_split")
        return f"data.source: the train split of {where} holds no text"

    def prepare_data(self) -> None:
        """Train or load the tokenizer and tokenize the documents into the cache; Lightning runs this once per node."""
        self._build()

    def _build(self) -> tuple[TextTokenizer, np.ndarray, np.ndarray]:
        tokenizer = self._resolve_tokenizer()
        if tokenizer.vocab_size > self.vocab_size:  # a BPE never exceeds it; a file's size was read in __init__
            raise ConfigError(f"data.tokenizer: {tokenizer.origin} has {tokenizer.vocab_size} tokens, more than "
                              f"data.vocab_size={self.vocab_size}")
        fingerprint = self.source.fingerprint()
        val = self._cached_stream(tokenizer, "validation", fingerprint)
        if self.source.streaming:  # training windows are packed on the fly
            return tokenizer, np.empty(0, val.dtype), val
        train = self._cached_stream(tokenizer, "train", fingerprint)
        return tokenizer, train, val

    def setup(self, stage: str | None = None) -> None:
        """Load the cache (building it if ``prepare_data`` was skipped) and check that the splits fill windows."""
        if self.tokenizer is not None:
            return
        tokenizer, self.train_stream, self.val_stream = self._build()
        need = self.seq_len + 1
        if len(self.val_stream) < need:
            raise ConfigError(
                f"data.seq_len={self.seq_len} needs {need} tokens per window but the validation split of "
                f"{self.source.describe()} has only {len(self.val_stream)} tokens; lower data.seq_len or add data"
            )
        if not self.source.streaming and len(self.train_stream) < need * self.batch_size:
            raise ConfigError(
                f"data.seq_len={self.seq_len} with data.batch_size={self.batch_size} needs {need * self.batch_size} "
                f"tokens per batch but the train split of {self.source.describe()} has only "
                f"{len(self.train_stream)} tokens; lower data.seq_len or data.batch_size, or add data"
            )
        self.tokenizer = tokenizer  # last: it marks setup as done, so a failed check fails again when retried

    # --- loading ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The data position. Streamed windows count their own passes, so the epoch saved is theirs: Lightning's
        epoch number runs one ahead of it after a resume from an epoch's or a fit's end, and a second resume would
        follow the wrong epoch's stream."""
        position = super().state_dict()
        loader = self._stream_loader
        if position and loader is not None and loader.passes:
            position["epoch"] = self._first_stream_epoch + loader.passes - 1
        return position

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        """Training windows: shuffled per epoch (seeded), split across ranks, incomplete last batch dropped."""
        self.setup()
        workers = self.num_workers
        if workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers after the tokenizer's threads
        world, rank = self._rank()
        seed = self.source.seed
        if self.source.streaming:
            windows = StreamedWindows(self.source, self.tokenizer, self.seq_len, world, rank, seed,
                                      self.hparams.shuffle_buffer)
            if self._resume:  # the same epoch's windows again, minus those already trained on
                windows.epoch, batches_done = streamed_start(self._resume, self.trainer)
                windows.skip_windows = batches_done * self.batch_size // max(workers, 1)
            self._first_stream_epoch = windows.epoch
            self._stream_loader = _CountedPasses(windows, batch_size=self.batch_size, drop_last=True,
                                                 num_workers=workers, persistent_workers=workers > 0)
            return self._stream_loader
        windows = PackedWindows(self.train_stream, self.seq_len)
        return PositionedLoader(windows, batch_size=self.batch_size, sampler=self._train_sampler(windows, seed),
                                drop_last=True, num_workers=workers, persistent_workers=workers > 0)

    def val_dataloader(self) -> DataLoader:
        """Validation windows in order, all of them."""
        self.setup()
        return DataLoader(PackedWindows(self.val_stream, self.seq_len), batch_size=self.batch_size,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def test_dataloader(self) -> DataLoader:
        """The validation windows."""
        return self.val_dataloader()

    # --- reporting ----------------------------------------------------------------------------------------------

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of token frequencies (of the train split; of validation when streaming)."""
        self.setup()
        stream = self.val_stream if self.source.streaming else self.train_stream
        counts = np.bincount(stream, minlength=self.vocab_size)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def describe(self) -> str:
        """One line summarizing source, tokenizer and split sizes, for logs and run records."""
        self.setup()
        train = "streamed" if self.source.streaming else f"{len(self.train_stream):,}"
        return (f"{self.source.describe()}; tokenizer {self.tokenizer.origin} (vocab {self.vocab_size}); "
                f"train {train} / val {len(self.val_stream):,} tokens")

