"""Where training documents come from: local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files, a Hugging Face
hub dataset, or (with neither) the embedded corpus; :class:`TextSource` also says which documents are held out for
validation, by a seeded hash of their position."""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import math
import os
import platform
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dqt_lightning.data.embedded import _corpus
from dqt_lightning.errors import ConfigError
from dqt_lightning.data.tokenizer import require_hub

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

    def held_out_of(self) -> tuple[int, int] | None:
        """``(documents, held out for validation)`` where validation is held out of one split of known length
        (local files or a hub split, not streamed); None where it is not."""
        if self.kind == "embedded" or self.validation_split or self.streaming:
            return None
        n = self._count("train")
        return n, len(held_out_documents(n, self.val_fraction, self.max_val_documents, self.seed))

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
