"""Training text every Python ships with (pydoc topics + stdlib docstrings), BPE-tokenized and packed into windows."""

import ast
import contextlib
import functools
import hashlib
import math
import os
import platform
import random
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from dqt_lightning.errors import ConfigError
from dqt_lightning.files import atomic_write
from dqt_lightning.data.sampling import PositionedLoader, ResumablePosition, TrainEvalLoaders
from dqt_lightning.data.tokenizer import EOT, TextTokenizer, resolve_tokenizer, tokenizer_vocab_size
from dqt_lightning.data.tokenizer import train_bpe as _train_tokenizer  # the one BPE recipe; tests patch this name

FORMAT_VERSION = 1  # bump whenever corpus selection, tokenizer recipe or file layout changes, so old caches are ignored
MIN_DOC_CHARS = 200
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages"})
_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STATEMENTS = (ast.stmt, ast.excepthandler, ast.match_case)


def _stdlib_files() -> list[str]:
    """Paths of the standard library's ``*.py`` files, tests and third-party packages excluded, sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # prune, so site-packages is never even listed
        found += [os.path.join(dirpath, name) for name in filenames if name.endswith(".py")]
    return sorted(found)


def _definitions(tree: ast.Module) -> Iterator[ast.AST]:
    """Yield the module and every class and function in it, in source order.

    Same nodes as filtering ``ast.walk``, but it only descends into statements: definitions never sit inside
    expressions, and skipping those makes the scan of the whole stdlib about 4x faster.
    """
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DEFS):
            yield node
        stack += [child for child in reversed(list(ast.iter_child_nodes(node))) if isinstance(child, _STATEMENTS)]


def _module_docs(path: str) -> str:
    """All docstrings of one source file (read with ``ast``, never imported), blank-line separated; '' if unreadable."""
    try:
        with open(path, "rb") as f:
            source = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources only warn
            tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return ""
    docs = (ast.get_docstring(node) for node in _definitions(tree))
    text = "\n\n".join(doc for doc in docs if doc)
    try:
        text.encode()  # a lone surrogate escape in a docstring would break hashing and the tokenizer
    except UnicodeEncodeError:
        return ""
    return text


def build_corpus() -> list[str]:
    """Build the corpus from scratch: pydoc topics (sorted by key), then one document per stdlib module.

    Returns:
        Documents of at least ``MIN_DOC_CHARS`` characters, in a fixed order for a given Python installation.
    """
    docs = [topics[key] for key in sorted(topics)] + [_module_docs(path) for path in _stdlib_files()]
    return [doc for doc in docs if len(doc) >= MIN_DOC_CHARS]


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    # The stdlib does not change under a running process; tests and sweeps build several datamodules.
    return tuple(build_corpus())


def cache_key(docs: Sequence[str], vocab_size: int) -> str:
    """Short hash naming the cache files of one (corpus, vocab size, Python version, format version)."""
    text_hash = hashlib.sha256("\0".join(docs).encode()).hexdigest()
    ident = f"{text_hash}|{vocab_size}|{platform.python_version()}|{FORMAT_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _encode(tokenizer: Tokenizer, docs: Sequence[str]) -> np.ndarray:
    """Encode the documents into one uint16 stream with the end-of-text id between consecutive documents."""
    eot = np.array([tokenizer.token_to_id(EOT)], np.uint16)
    encoded = [np.array(enc.ids, np.uint16) for enc in tokenizer.encode_batch(docs)]
    return np.concatenate([piece for ids in encoded for piece in (eot, ids)][1:])


def _load(tok_path: Path, ids_path: Path) -> tuple[Tokenizer, np.ndarray] | None:
    """The cached tokenizer and token ids, or None when either file is missing or damaged."""
    try:
        tokenizer, tokens = Tokenizer.from_file(str(tok_path)), np.load(ids_path)
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        return None
    tokenizer.encode_special_tokens = True  # not saved in the JSON; see tokenizer.train_bpe
    return (tokenizer, tokens) if tokens.dtype == np.uint16 and tokens.ndim == 1 else None


def load_or_encode(cache_dir: str | Path, tokenizer: TextTokenizer, docs: Sequence[str]) -> np.ndarray:
    """The corpus encoded with a given tokenizer (a checkpoint's), from ``cache_dir`` if present, else encoded and
    saved: one uint16 stream with the tokenizer's end-of-text id between consecutive documents."""
    key = hashlib.sha256(f"{cache_key(docs, tokenizer.vocab_size)}|{tokenizer.fingerprint}".encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"tokens-{key}.npy"
    with contextlib.suppress(OSError, ValueError):
        tokens = np.load(path)
        if tokens.dtype == np.uint16 and tokens.ndim == 1:
            return tokens
    eot = np.array([tokenizer.eot_id], np.uint16)
    tokens = np.concatenate([piece for ids in tokenizer.encode_batch(list(docs))
                             for piece in (eot, np.array(ids, np.uint16))][1:])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, tokens))
    return tokens


def load_or_build(cache_dir: str | Path, vocab_size: int, docs: Sequence[str]) -> tuple[Tokenizer, np.ndarray]:
    """Return the tokenizer and the encoded corpus, from ``cache_dir`` if present and readable, else built and saved.

    Args:
        cache_dir: Directory holding ``tokenizer-<key>.json`` and ``tokens-<key>.npy``; created when needed.
        vocab_size: Vocabulary size to train; part of the cache key.
        docs: The corpus documents; their text is part of the cache key.

    Returns:
        The tokenizer and one uint16 token stream with the end-of-text id between consecutive documents.
    """
    key = cache_key(docs, vocab_size)
    cache = Path(cache_dir).expanduser()
    tok_path, ids_path = cache / f"tokenizer-{key}.json", cache / f"tokens-{key}.npy"
    loaded = _load(tok_path, ids_path)
    if loaded is not None:
        return loaded
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(docs, vocab_size)
    tokens = _encode(tokenizer, docs)
    atomic_write(tok_path, lambda f: f.write(tokenizer.to_str().encode()))
    atomic_write(ids_path, lambda f: np.save(f, tokens))
    return tokenizer, tokens


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic document-level split; returns (train, validation) document indices, each in corpus order."""
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    n_val = max(1, math.ceil(val_fraction * n_docs))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class PackedWindows(Dataset[torch.Tensor]):
    """Non-overlapping windows of ``seq_len + 1`` tokens over a token stream, as 1-D ``torch.long`` tensors."""

    def __init__(self, stream: np.ndarray, seq_len: int) -> None:
        self.stream = stream
        self.window = seq_len + 1  # +1: inputs are window[:-1] and next-token targets window[1:]

    def __len__(self) -> int:
        return len(self.stream) // self.window

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.window
        return torch.from_numpy(self.stream[start : start + self.window].astype(np.int64))


def _join(tokens: np.ndarray, doc_ids: np.ndarray, eot: int) -> np.ndarray:
    """One flat stream of the chosen documents of ``tokens`` (documents separated by ``eot``), eot between them."""
    cuts = np.flatnonzero(tokens == eot)
    starts, ends = np.r_[0, cuts + 1], np.r_[cuts, len(tokens)]
    sep = np.array([eot], tokens.dtype)
    return np.concatenate([piece for i in doc_ids for piece in (sep, tokens[starts[i] : ends[i]])][1:])


def _require(ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"data.{field} must be {rule}, got {value!r}")


class EmbeddedDocs(ResumablePosition, TrainEvalLoaders, pl.LightningDataModule):
    """English prose every Python installation carries (pydoc topics + stdlib docstrings), packed for LM training.

    Args:
        seq_len: Tokens the model sees per example (its context length); each window holds ``seq_len + 1`` tokens.
        batch_size: Windows per batch, for training and evaluation alike.
        vocab_size: Size of the BPE vocabulary and of the model's embedding; every token id is below it.
        val_fraction: Share of documents (not tokens) held out for validation and test.
        seed: Seeds the document split and the order of training windows.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        cache_dir: Directory for the trained tokenizer and the encoded corpus, reused across runs.
        tokenizer: A ``tokenizer.json`` (or a directory holding one) to encode the corpus with instead of training a
            BPE: a pretrained model's (``model.init_args.init_from`` sets it); ``vocab_size`` is then its size, at
            most 65536 (the corpus is kept as uint16; ``configs/data/embedded.yaml`` takes any size).
    """

    def __init__(  # noqa: PLR0913 - one argument per user-facing config field
        self, seq_len: int = 128, batch_size: int = 16, vocab_size: int = 4096, val_fraction: float = 0.05,
        seed: int = 1234, num_workers: int = 0, cache_dir: str = ".cache/dqt_lightning", tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        _require(seq_len >= 2, "seq_len", ">= 2", seq_len)
        _require(batch_size >= 1, "batch_size", ">= 1", batch_size)
        if tokenizer is not None:
            vocab_size = tokenizer_vocab_size(tokenizer, vocab_size)
            _require(vocab_size <= 65536, "tokenizer", "one of at most 65536 tokens (the embedded corpus is kept as "
                     "uint16; configs/data/embedded.yaml takes any size)", f"{tokenizer} ({vocab_size} tokens)")
        _require(259 <= vocab_size <= 65536, "vocab_size", "between 259 (256 bytes + specials) and 65535", vocab_size)
        _require(0 < val_fraction < 0.5, "val_fraction", "in (0, 0.5)", val_fraction)
        _require(num_workers >= 0, "num_workers", ">= 0", num_workers)
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.vocab_size = vocab_size  # set here: the CLI links it to the model at instantiation time
        self.python_version = platform.python_version()
        self.tokenizer: Tokenizer | None = None
        self.tokens = self.train_docs = self.val_docs = self.train_stream = self.val_stream = np.empty(0, np.uint16)
        self.n_docs = self.n_chars = 0
        self._resume: dict[str, Any] | None = None

    def prepare_data(self) -> None:
        """Build (or find) the cached tokenizer and token ids; Lightning runs this once per node."""
        self._tokenize(_corpus())

    def _tokenize(self, docs: Sequence[str]) -> tuple[Tokenizer | TextTokenizer, np.ndarray, int]:
        """(tokenizer, encoded corpus, end-of-text id): a BPE trained here, or the given tokenizer's encoding."""
        spec = self.hparams.get("tokenizer")
        if spec is None:
            tokenizer, tokens = load_or_build(self.hparams.cache_dir, self.vocab_size, docs)
            return tokenizer, tokens, tokenizer.token_to_id(EOT)
        tokenizer = resolve_tokenizer(spec, self.vocab_size, lambda: docs, self.hparams.cache_dir, "")
        return tokenizer, load_or_encode(self.hparams.cache_dir, tokenizer, docs), tokenizer.eot_id

    def setup(self, stage: str | None = None) -> None:
        """Load the cache (building it if ``prepare_data`` was skipped), split by document and check window sizes."""
        if self.tokenizer is not None:
            return
        docs = _corpus()
        tokenizer, self.tokens, eot = self._tokenize(docs)
        self.n_docs, self.n_chars = len(docs), sum(map(len, docs))
        self.train_docs, self.val_docs = split_documents(self.n_docs, self.hparams.val_fraction, self.seed)
        self.train_stream, self.val_stream = (_join(self.tokens, ids, eot) for ids in (self.train_docs, self.val_docs))
        need = self.seq_len + 1
        if len(self.val_stream) < need:
            raise ConfigError(
                f"data.seq_len={self.seq_len} needs {need} tokens per window but the validation split has only "
                f"{len(self.val_stream)} tokens; lower data.seq_len or raise data.val_fraction"
            )
        if len(self.train_stream) < need * self.batch_size:  # drop_last would leave no training batch at all
            raise ConfigError(
                f"data.seq_len={self.seq_len} with data.batch_size={self.batch_size} needs {need * self.batch_size} "
                f"tokens per batch but the train split has only {len(self.train_stream)} tokens; lower data.seq_len "
                "or data.batch_size"
            )
        self.tokenizer = tokenizer  # last: it marks setup as done, so a failed check fails again when retried

    def _loader(self, train: bool) -> DataLoader:
        self.setup()  # also for loaders requested without Lightning's setup call, as in tests
        stream = self.train_stream if train else self.val_stream
        workers = self.hparams.num_workers
        if workers:
            # Training the tokenizer used its thread pool; without this every forked worker warns about it.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        windows = PackedWindows(stream, self.seq_len)
        sampler = self._train_sampler(windows, self.seed) if train else None
        return (PositionedLoader if train else DataLoader)(
            windows, batch_size=self.batch_size, sampler=sampler, drop_last=train, num_workers=workers,
            persistent_workers=workers > 0,
        )

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of train-split token frequencies: the loss of a model that ignores context."""
        self.setup()
        counts = np.bincount(self.train_stream, minlength=self.vocab_size)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def describe(self) -> str:
        """One line summarizing the corpus, for logs and run records."""
        self.setup()
        train, val = len(self.train_stream), len(self.val_stream)
        return (
            f"python {self.python_version}: {self.n_docs} docs, {self.n_chars:,} chars, "
            f"train {train:,} / val {val:,} tokens, vocab {self.vocab_size}"
        )
