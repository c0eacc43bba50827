"""Training text from anywhere ``datasets`` reads: local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files, a
Hugging Face hub dataset, or (with neither) the embedded corpus, tokenized by any :mod:`dqt_lightning.data.tokenizer`.

:class:`TextSource` says where the documents are and which are held out; :class:`TextCorpus` is the DataModule that
tokenizes them (cached), separates documents with the end-of-text id and packs them into training windows, either
all at once (resumable, like ``EmbeddedDocs``) or on the fly when ``streaming`` is set.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import json
import math
import os
import platform
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dqt_lightning.data.embedded import PackedWindows, _corpus
from dqt_lightning.errors import ConfigError
from dqt_lightning.files import atomic_write
from dqt_lightning.data.sampling import ResumablePosition, streamed_start
from dqt_lightning.data.tokenizer import TextTokenizer, require_hub, resolve_tokenizer, tokenizer_vocab_size

FORMAT_VERSION = 1  # bump whenever document selection, splitting or the cache layout changes
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLITS = ("train", "validation")
ENCODE_BATCH = 1000  # documents per tokenizer call: large enough for its thread pool, small enough for memory
_HUB_DATA_HINT = "to train on local files instead, set data.init_args.source.path to a file, directory or glob of " \
                 ".txt/.jsonl/.json/.parquet files (see configs/data/local-files.yaml)"


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _seeded_unit(seed: int, index: int) -> float:
    """A number in [0, 1) fixed by (seed, index): the streaming hold-out rule, no state needed."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def held_out_documents(n_docs: int, val_fraction: float, max_val: int, seed: int) -> np.ndarray:
    """Sorted indices of the validation documents: a seeded shuffle's first ``ceil(val_fraction * n)`` (at least one,
    at most ``max_val``), the same rule as ``data.split_documents``."""
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    return np.sort(order[: min(max_val, max(1, math.ceil(val_fraction * n_docs)))])


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [error.__class__.__name__])[0]


def _undecodable(path: Path) -> str | None:
    """Where a file stops being UTF-8 ('byte offset N'), or None when it all decodes."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                return f"byte offset {offset + error.start}"
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"byte offset {offset} (truncated character at the end)"
    return None


@dataclass
class TextSource:
    """Where documents come from and which of them are held out for validation.

    With neither ``path`` nor ``dataset`` it is the embedded corpus (the documentation shipped with Python), so
    configs work in a fresh clone with no data.

    Args:
        path: Local file, directory (searched recursively) or glob of ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet``
            files, all of one format. In ``.txt`` files a blank line separates documents.
        dataset: Hugging Face hub dataset, e.g. ``wikimedia/wikipedia`` (needs a network).
        name: Hub dataset config, e.g. ``20231101.en``.
        split: The split training documents come from.
        validation_split: A named split (hub) or a path/glob of held-out files (local) for validation; when None,
            a seeded share of ``split`` is held out.
        text_field: Column (json key) holding each document's text.
        streaming: Read documents lazily (corpora larger than disk or memory) and pack windows on the fly.
        val_fraction: Share of documents held out when ``validation_split`` is None.
        seed: Seeds the hold-out.
        max_val_documents: Cap on held-out documents, so a huge corpus keeps a validation set that is quick to
            tokenize and evaluate; in streaming mode the first ones the seeded rule picks.
    """

    path: str | None = None
    dataset: str | None = None
    name: str | None = None
    split: str = "train"
    validation_split: str | None = None
    text_field: str = "text"
    streaming: bool = False
    val_fraction: float = 0.01
    seed: int = 1234
    max_val_documents: int = 2000

    # --- what kind of source ---------------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``"files"``, ``"hub"`` or ``"embedded"``."""
        return "files" if self.path else "hub" if self.dataset else "embedded"

    def validate(self) -> None:
        """Check settings and inputs that are cheap to check, so mistakes fail before any work (and offline hub
        names fail at once)."""
        if self.path and self.dataset:
            raise ConfigError("data.source: set either path (local files) or dataset (hub), not both")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.source.val_fraction must be in (0, 0.5), got {self.val_fraction!r}")
        if self.max_val_documents < 1:
            raise ConfigError(f"data.source.max_val_documents must be >= 1, got {self.max_val_documents!r}")
        if self.kind == "files":
            self.files()
            if self.validation_split:
                self.files(self.validation_split, "data.source.validation_split")
        elif self.kind == "hub":
            require_hub(f"data.source.dataset={self.dataset!r}", _HUB_DATA_HINT)
        else:
            for field in ("streaming", "validation_split"):
                if getattr(self, field):
                    raise ConfigError(f"data.source.{field} needs data.source.path or data.source.dataset")

    def files(self, pattern: str | None = None, field: str = "data.source.path") -> list[Path]:
        """The local files a path, directory or glob names, sorted; each non-empty and of one supported format."""
        pattern = os.path.expanduser(pattern or self.path or "")
        root = Path(pattern)
        if glob.has_magic(pattern):
            found = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
            if not found:
                raise ConfigError(f"{field}: {pattern} matches no files")
        elif root.is_dir():
            found = [p for p in root.rglob("*") if p.is_file() and p.suffix in BUILDERS
                     and not any(part.startswith(".") for part in p.relative_to(root).parts)]
            if not found:
                raise ConfigError(f"{field}: directory {pattern} holds no {'/'.join(BUILDERS)} files")
        elif root.is_file():
            found = [root]
        else:
            raise ConfigError(f"{field}: {pattern} does not exist")
        found.sort()
        for file in found:
            if file.suffix not in BUILDERS:
                raise ConfigError(f"{field}: {file} has an unknown extension; use one of {', '.join(BUILDERS)}")
            if file.stat().st_size == 0:
                raise ConfigError(f"{field}: {file} is empty")
        formats = sorted({BUILDERS[file.suffix] for file in found})
        if len(formats) > 1:
            raise ConfigError(f"{field}: {pattern} mixes {' and '.join(formats)} files; point it at one format")
        return found

    # --- reading -----------------------------------------------------------------------------------------------------

    def _load(self, split: str) -> tuple[Any, str, list[Path]]:
        """(datasets Dataset or IterableDataset, its description, its files) for a split, opened once per source
        (a local file that changes in between gets a new fingerprint, hence a new TextCorpus cache entry anyway)."""
        key = (split, self.fingerprint())
        opened = self.__dict__.setdefault("_opened", {})  # not a dataclass field: configs and asdict never see it
        if key not in opened:
            opened.clear()
            opened[key] = self._open(split)
        return opened[key]

    def _open(self, split: str) -> tuple[Any, str, list[Path]]:
        import datasets  # noqa: PLC0415 - heavy; only sources that need it pay for the import

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        named = split == "validation" and self.validation_split
        if self.kind == "hub":
            require_hub(f"data.source.dataset={self.dataset!r}", _HUB_DATA_HINT)
            hub_split = self.validation_split if named else self.split
            where = f"{self.dataset}" + (f" ({self.name})" if self.name else "") + f" split {hub_split}"
            try:
                loaded = datasets.load_dataset(self.dataset, self.name, split=hub_split, streaming=self.streaming)
            except Exception as error:  # noqa: BLE001 - the hub client raises many kinds
                raise ConfigError(f"data.source.dataset: cannot load {where}: {_first_line(error)}") from None
            return loaded, where, []
        files = self.files(self.validation_split, "data.source.validation_split") if named else self.files()
        builder = BUILDERS[files[0].suffix]
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        root = self.validation_split if named else self.path
        where = str(files[0]) if len(files) == 1 else f"{len(files)} {builder} files under {root}"
        try:
            loaded = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                           streaming=self.streaming, **options)
        except Exception as error:  # noqa: BLE001 - datasets wraps reader errors in its own
            raise self._diagnose(files, error) from None
        return loaded, where, files

    def _diagnose(self, files: list[Path], error: BaseException) -> ConfigError:
        """A one-line error naming the file that broke reading (not UTF-8, not parseable)."""
        if isinstance(error, ConfigError):
            return error
        for file in files:
            if BUILDERS[file.suffix] != "parquet" and (where := _undecodable(file)):
                return ConfigError(f"data.source.path: {file} is not UTF-8 text (first bad byte at {where})")
        cause = error.__cause__ or error.__context__ or error
        names = str(files[0]) if len(files) == 1 else f"one of {len(files)} files under {self.path}"
        return ConfigError(f"data.source.path: cannot read {names}: {_first_line(cause)}")

    def _texts(self, split: str) -> Iterator[tuple[int, str]]:
        """(position in the split, text) of every document of the split dataset, empty ones skipped."""
        loaded, where, files = self._load(split)
        try:
            yield from self._rows(loaded, where, strip=bool(files) and BUILDERS[files[0].suffix] == "text")
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - streamed files only fail once they are read
            raise self._diagnose(files, error) if files else ConfigError(
                f"data.source.dataset: reading {where} failed: {_first_line(error)}") from None

    def _rows(self, loaded: Any, where: str, strip: bool) -> Iterator[tuple[int, str]]:
        columns = loaded.column_names
        if columns is None:  # a stream whose columns are only known from its first row
            columns = list(next(iter(loaded), {}))
        if self.text_field not in columns:
            raise ConfigError(
                f"data.source.text_field: {where} has no field {self.text_field!r}; its fields are "
                f"{', '.join(map(repr, columns)) or 'none'}"
            )
        position = 0
        for batch in loaded.select_columns([self.text_field]).iter(batch_size=ENCODE_BATCH):
            for text in batch[self.text_field]:
                if text is not None and not isinstance(text, str):
                    raise ConfigError(
                        f"data.source.text_field: {self.text_field!r} in {where} holds {type(text).__name__} "
                        "values, not text"
                    )
                if strip and text:
                    text = text.strip("\n")  # .txt paragraphs keep the newlines of runs of blank lines
                if text and not text.isspace():
                    yield position, text
                position += 1

    def _count(self, split: str) -> int:
        loaded, _, _ = self._load(split)
        return len(loaded)  # an Arrow table's row count: no text is read

    def documents(self, split: str) -> Iterator[str]:
        """The documents of ``"train"`` or ``"validation"``, in a fixed order for a given seed.

        Without ``validation_split`` the validation documents are held out of ``split``: a seeded shuffle's first
        ``ceil(val_fraction * n)`` (at most ``max_val_documents``); when streaming, where ``n`` is unknown, each
        document is held out when a seeded hash of its position falls below ``val_fraction``, until
        ``max_val_documents`` are held out.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.kind == "embedded":
            docs = _corpus()
            val = set(held_out_documents(len(docs), self.val_fraction, self.max_val_documents, self.seed).tolist())
            yield from (doc for i, doc in enumerate(docs) if (i in val) == (split == "validation"))
            return
        if self.validation_split:  # a named validation split: nothing is held out of the training split
            yield from (text for _, text in self._texts(split))
            return
        if self.streaming:
            yield from self._streamed(split)
            return
        val = held_out_documents(self._count("train"), self.val_fraction, self.max_val_documents, self.seed)
        val_set = set(val.tolist())
        want_val = split == "validation"
        for position, text in self._texts("train"):
            if (position in val_set) == want_val:
                yield text

    def _streamed(self, split: str) -> Iterator[str]:
        held_out = 0
        want_val = split == "validation"
        for position, text in self._texts("train"):
            is_val = held_out < self.max_val_documents and _seeded_unit(self.seed, position) < self.val_fraction
            held_out += is_val
            if is_val == want_val:
                yield text
            if want_val and held_out >= self.max_val_documents:
                return  # the rest of the stream is all training data

    # --- identity ----------------------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """16 hex chars identifying the data and the selection settings; changes when a local file changes."""
        settings = asdict(self)
        if self.kind == "files":
            listed = self.files() + (self.files(self.validation_split, "data.source.validation_split")
                                     if self.validation_split else [])
            data: object = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in listed]
        elif self.kind == "hub":
            data = [self.dataset, self.name]  # a hub dataset's revision is its name; files are not listed offline
        else:
            data = [platform.python_version(), hashlib.sha256("\0".join(_corpus()).encode()).hexdigest()]
        return _hash("text-source", FORMAT_VERSION, settings, data)

    def describe(self) -> str:
        """One line naming the source, for logs and error messages."""
        if self.kind == "files":
            files = self.files()
            where = str(files[0]) if len(files) == 1 else f"{len(files)} {files[0].suffix} files under {self.path}"
        elif self.kind == "hub":
            where = f"hub dataset {self.dataset}" + (f" ({self.name})" if self.name else "") + f" split {self.split}"
        else:
            where = f"embedded corpus (python {platform.python_version()})"
        held = f"validation split {self.validation_split}" if self.validation_split else \
            f"{self.val_fraction:g} held out (seed {self.seed}, at most {self.max_val_documents} docs)"
        return f"{where}, field {self.text_field!r}, {held}" + (", streaming" if self.streaming else "")


# --- tokenizing ----------------------------------------------------------------------------------------------------


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


class _CountedPasses(DataLoader):
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
            hint = "; raise data.source.val_fraction or set data.source.validation_split" if split != "train" else ""
            raise ConfigError(f"data.source: the {split} split of {self.source.describe()} holds no text{hint}")
        atomic_write(path, lambda f: np.save(f, stream))
        return stream

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
        return DataLoader(windows, batch_size=self.batch_size, sampler=self._train_sampler(windows, seed),
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

