"""Pre-tokenized shards: ``prepare`` tokenizes a text source once into ``uint16``/``uint32`` memmap files.

A shard directory holds

- ``train-00000.bin``, ``train-00001.bin``, ... and ``validation-00000.bin``, ...: raw token ids in the manifest's
  dtype, every document followed by the end-of-text id, documents never split between shards;
- ``tokenizer.json`` (or ``tokenizer.model``): a copy of the tokenizer, so training needs nothing but this directory;
- ``manifest.json``: format version, dtype, vocabulary size, end-of-text id, tokenizer and source fingerprints and,
  per split, the finished shards with their token counts and the documents consumed up to their end.

Every shard is written under a temporary name, fsynced and renamed into place, and the manifest is rewritten the
same way after each one. So an interrupted ``prepare`` (Ctrl-C or SIGKILL) leaves only whole shards that the
manifest lists, and running it again skips them (checked by file size) and continues after the last one's documents.
The training side lives in :mod:`dqt_lightning.data.shards`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dqt_lightning.errors import ConfigError
from dqt_lightning.files import atomic_write
from dqt_lightning.data.text_source import TextSource
from dqt_lightning.data.tokenizer import BPE_SPECS, TextTokenizer, resolve_tokenizer

FORMAT_VERSION = 1  # bump whenever the file layout or the token stream's definition changes
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
ENCODE_CHARS = 1_000_000  # characters per encode_batch call: work for every core, memory bounded, progress often
ENCODE_DOCS = 4096
# The default shard directory is named after every data setting, so prepare must see the same ones as fit.
PREPARE_HINT = ("python -m dqt_lightning prepare --config ... (the same --config files and --data.init_args overrides "
                "as fit)")


def shard_dtype(vocab_size: int, dtype: str | None = None) -> str:
    """The smallest dtype that holds every id below ``vocab_size``, or ``dtype`` when given and large enough.

    Raises:
        ConfigError: ``dtype`` is not ``uint16``/``uint32``, or cannot hold ids up to ``vocab_size - 1``.
    """
    if dtype is None:
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in DTYPES:
        raise ConfigError(f"data.dtype must be uint16 or uint32 (or unset), got {dtype!r}")
    limit = np.iinfo(DTYPES[dtype]).max + 1
    if vocab_size > limit:
        raise ConfigError(
            f"data.dtype={dtype} holds token ids below {limit} but the tokenizer's vocabulary has {vocab_size} ids; "
            "use uint32 or leave data.dtype unset"
        )
    return dtype


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


# --- the manifest ---------------------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """What ``manifest.json`` says about a shard directory.

    Attributes:
        settings: Everything that decides the tokens (format version, dtype, vocabulary size, end-of-text id,
            tokenizer and source fingerprints, shard size); a directory is only resumed or trained on when these match.
        splits: Per split, ``{"complete": bool, "shards": [{"file", "tokens", "docs_end"}, ...]}``.
    """

    settings: dict[str, Any]
    splits: dict[str, dict[str, Any]]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.settings["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.settings["vocab_size"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        return self.splits[split]["shards"]

    def tokens(self, split: str) -> int:
        return sum(int(s["tokens"]) for s in self.shards(split))

    def complete(self) -> bool:
        return all(self.splits[split]["complete"] for split in SPLITS)

    def save(self, directory: Path) -> None:
        text = json.dumps({"settings": self.settings, "splits": self.splits}, indent=1)
        atomic_write(directory / MANIFEST, lambda f: f.write(text.encode()))

    @classmethod
    def load(cls, directory: Path) -> Manifest | None:
        """The manifest of ``directory``, or None when there is none yet.

        Raises:
            ConfigError: The manifest exists but is unreadable or of another format version.
        """
        path = directory / MANIFEST
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            manifest = cls(settings=raw["settings"], splits=raw["splits"])
            version = manifest.settings["format_version"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{path} is not a readable shard manifest ({error}); delete {directory} and prepare "
                              "again") from None
        if version != FORMAT_VERSION:
            raise ConfigError(f"{path} has shard format version {version}, this code reads {FORMAT_VERSION}; "
                              f"delete {directory} and run {PREPARE_HINT}")
        dtype, vocab = manifest.settings.get("dtype"), manifest.vocab_size
        if dtype not in DTYPES or vocab > np.iinfo(DTYPES[dtype]).max + 1:
            raise ConfigError(f"{path}: dtype {dtype!r} cannot hold the token ids of vocab_size {vocab}; delete "
                              f"{directory} and prepare again")
        return manifest

    def verified_shards(self, directory: Path, split: str) -> int:
        """How many of ``split``'s listed shards, from the first, are on disk whole (file size = tokens x itemsize)."""
        for count, shard in enumerate(self.shards(split)):
            path = directory / shard["file"]
            if not path.is_file() or path.stat().st_size != int(shard["tokens"]) * self.dtype.itemsize:
                return count
        return len(self.shards(split))


# --- prepare --------------------------------------------------------------------------------------------------------


def document_batches(docs: Iterable[str]) -> Iterator[list[str]]:
    """Documents grouped for one ``encode_batch`` call each, by a character budget."""
    chunk: list[str] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if chars >= ENCODE_CHARS or len(chunk) >= ENCODE_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encoded(tokenizer: TextTokenizer, docs: Iterable[str], dtype: np.dtype, vocab_size: int,
             progress: Any) -> Iterator[np.ndarray]:
    """Each document's ids followed by the end-of-text id, as ``dtype`` arrays, in document order."""
    for chunk in document_batches(docs):
        encoded = tokenizer.encode_batch(chunk)
        arrays = [np.array([*ids, tokenizer.eot_id], dtype=np.int64) for ids in encoded]
        top = max(int(a.max()) for a in arrays)
        if top >= vocab_size:  # a tokenizer breaking its own contract would corrupt the embedding lookup silently
            raise ConfigError(f"data.tokenizer {tokenizer.origin} produced id {top} >= its vocab_size {vocab_size}")
        progress.update(sum(len(a) for a in arrays))
        yield from (a.astype(dtype) for a in arrays)


def _write_split(directory: Path, manifest: Manifest, split: str, docs: Iterator[str], tokenizer: TextTokenizer,
                 shard_tokens: int, progress: Any) -> None:
    """Append whole shards of ``split`` after the ones the manifest already lists, then mark the split complete."""
    shards = manifest.shards(split)
    docs_done = int(shards[-1]["docs_end"]) if shards else 0
    stream = _encoded(tokenizer, itertools.islice(docs, docs_done, None), manifest.dtype, manifest.vocab_size,
                      progress)
    pending = next(stream, None)
    while pending is not None:
        written = {"tokens": 0, "docs": 0}

        def fill(file: BinaryIO) -> None:
            nonlocal pending
            while pending is not None and written["tokens"] < shard_tokens:
                file.write(memoryview(pending))
                written["tokens"] += len(pending)
                written["docs"] += 1
                pending = next(stream, None)

        name = shard_name(split, len(shards))
        atomic_write(directory / name, fill)
        docs_done += written["docs"]
        shards.append({"file": name, "tokens": written["tokens"], "docs_end": docs_done})
        manifest.save(directory)
    manifest.splits[split]["complete"] = True
    manifest.save(directory)


def _settings(tokenizer: TextTokenizer, source: TextSource, dtype: str, shard_tokens: int,
              requested: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer_file": "tokenizer.model" if getattr(tokenizer, "is_sentencepiece", False) else "tokenizer.json",
        "source_fingerprint": source.fingerprint(),
        "source": source.describe(),
        "shard_tokens": shard_tokens,
        # As the config asked, so that fit can tell a different tokenizer from the config alone, without training one.
        "requested": requested,
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = ("dtype", "vocab_size", "tokenizer_fingerprint", "source_fingerprint", "shard_tokens", "eot_id")
    return [f"{key} {old.get(key)!r} -> {new[key]!r}" for key in keys if old.get(key) != new[key]]


def default_shard_dir(source: TextSource, tokenizer: str | None, vocab_size: int, shard_tokens: int,
                      dtype: str | None, bpe_train_documents: int | None, cache_dir: str | Path) -> Path:
    """``<cache_dir>/shards/<source kind>-<tokenizer>-<hash of these settings>``: a model overlay that changes the
    vocabulary, or a new source, gets a directory of its own instead of an error."""
    settings = [asdict(source), tokenizer, vocab_size, shard_tokens, dtype, bpe_train_documents, FORMAT_VERSION]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = f"bpe{vocab_size}" if tokenizer in BPE_SPECS else Path(str(tokenizer)).stem or "tokenizer"
    return Path(cache_dir).expanduser() / "shards" / f"{source.kind}-{name}-{digest}"


def prepare(  # noqa: PLR0913 - the data section's fields
    shard_dir: str | Path | None = None, source: TextSource | None = None, tokenizer: str | None = None,
    vocab_size: int = 4096, shard_tokens: int = 50_000_000, dtype: str | None = None,
    cache_dir: str = ".cache/dqt_lightning", bpe_train_documents: int | None = 100_000, progress: bool = True,
) -> tuple[Path, Manifest]:
    """Tokenize ``source`` into shards in ``shard_dir``, continuing an interrupted run where it stopped.

    Args:
        shard_dir: Directory of the shards and the manifest, created when needed; None: :func:`default_shard_dir`.
        source: Where the documents come from; None is the embedded corpus.
        tokenizer: None/``"bpe"`` (train a byte-level BPE on the training documents, cached), a ``tokenizer.json``,
            a SentencePiece ``.model`` or a hub name; see :func:`dqt_lightning.data.tokenizer.resolve_tokenizer`.
        vocab_size: Vocabulary size of a trained BPE.
        shard_tokens: A shard is closed at the first document end at or past this many tokens.
        dtype: ``uint16``/``uint32``; None picks ``uint16`` when the vocabulary fits.
        cache_dir: Cache of trained tokenizers.
        bpe_train_documents: A trained BPE learns from the first this many training documents; None: all of them.
        progress: Show a progress bar (tokens written) on stderr.

    Returns:
        The shard directory and its finished manifest.

    Raises:
        ConfigError: One line naming the field, file or directory: bad settings, a directory prepared with another
            tokenizer, source or shard size, or bad input reported by the source or the tokenizer.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415 - only prepare draws a progress bar

    if shard_tokens < 1:
        raise ConfigError(f"data.shard_tokens must be >= 1, got {shard_tokens}")
    if bpe_train_documents is not None and bpe_train_documents < 1:
        raise ConfigError(f"data.bpe_train_documents must be >= 1 or null, got {bpe_train_documents}")
    source = source if source is not None else TextSource()
    source.validate()
    shard_dtype(vocab_size, dtype)  # a dtype that cannot hold the asked-for vocabulary fails before any work
    directory = Path(shard_dir).expanduser() if shard_dir is not None else default_shard_dir(
        source, tokenizer, vocab_size, shard_tokens, dtype, bpe_train_documents, cache_dir)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"data.shard_dir={directory} is a file; give a directory for the shards")
    fingerprint = source.fingerprint()
    text_tokenizer = resolve_tokenizer(
        tokenizer, vocab_size, lambda: itertools.islice(source.documents("train"), bpe_train_documents), cache_dir,
        hashlib.sha256(f"{fingerprint}|first {bpe_train_documents}".encode()).hexdigest()[:16],
    )
    requested = {"tokenizer": tokenizer, "vocab_size": vocab_size}
    settings = _settings(text_tokenizer, source, shard_dtype(text_tokenizer.vocab_size, dtype), shard_tokens,
                         requested)
    manifest = Manifest.load(directory)
    if manifest is not None:
        changed = _differences(manifest.settings, settings)
        if changed:
            raise ConfigError(
                f"data.shard_dir={directory} holds shards prepared with other settings ({'; '.join(changed)}); "
                "choose another data.shard_dir or delete that directory"
            )
        for split in SPLITS:  # a shard lost or damaged after the fact is written again, with every one after it
            whole = manifest.verified_shards(directory, split)
            if whole < len(manifest.shards(split)):
                del manifest.shards(split)[whole:]
                manifest.splits[split]["complete"] = False
    else:
        manifest = Manifest(settings, {split: {"complete": False, "shards": []} for split in SPLITS})
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".*.tmp"):  # what a run killed mid-write left (SIGKILL skips atomic_write's cleanup)
        stale.unlink()
    text_tokenizer.save(directory / settings["tokenizer_file"])
    manifest.save(directory)
    for split in SPLITS:
        if manifest.splits[split]["complete"]:
            continue
        done = manifest.tokens(split)
        with tqdm(desc=f"prepare {split}", unit="tok", unit_scale=True, initial=done, disable=not progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            _write_split(directory, manifest, split, source.documents(split), text_tokenizer, shard_tokens, bar)
    return directory, manifest
