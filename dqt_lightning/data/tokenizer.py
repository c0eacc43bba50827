"""Tokenizers behind one small interface: a byte-level BPE trained on the data (cached), a local ``tokenizer.json``,
a SentencePiece ``*.model`` (the LLaMA tokenizer) or a Hugging Face hub tokenizer where a network exists.

The data modules only ever see :class:`TextTokenizer`: ``encode_batch`` without added specials, the end-of-text id
they put between documents, and ``vocab_size``, which reaches the model through the CLI's config link.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dqt_lightning.errors import ConfigError
from dqt_lightning.files import atomic_write

EOT = "<|endoftext|>"
BPE_RECIPE_VERSION = 1  # bump whenever train_bpe changes, so cached tokenizers of the old recipe are not reused
MIN_BPE_VOCAB = 257  # 256 byte tokens + the end-of-text token
# Document separators of common tokenizer families, in the order they are looked for: GPT-2 style, LLaMA-3,
# LLaMA-1/2 and T5 (SentencePiece exports), Gemma.
EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>")
BPE_SPECS = (None, "", "bpe")  # tokenizer specs that mean "train a byte-level BPE on the data"


def train_bpe(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) whose ids are all ``< vocab_size``; the project's one recipe.

    Args:
        docs: Training documents; read once.
        vocab_size: Largest vocabulary the trainer may build (it stops earlier when merges run out).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 bytes, so any text encodes without unknown tokens
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    # A literal "<|endoftext|>" in a document must stay text, not fake a document boundary.
    tokenizer.encode_special_tokens = True
    return tokenizer


def _fingerprint(definition: bytes) -> str:
    return hashlib.sha256(definition).hexdigest()[:16]


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` or a SentencePiece processor, seen the same way by the data modules.

    Args:
        backend: The wrapped ``tokenizers.Tokenizer`` or ``sentencepiece.SentencePieceProcessor``.
        origin: Where it came from (a path or a name), for error messages.
        vocab_size: Size to report when larger than the tokenizer's own (a trained BPE reports the size asked for,
            even when the trainer ran out of merges, so the model's embedding never depends on the data).

    Attributes:
        vocab_size: Every id is below it; the model's embedding size.
        eot_id: Id of the document separator.
        fingerprint: 16 hex chars, a hash of the tokenizer's full definition.
    """

    def __init__(self, backend: object, origin: str, vocab_size: int | None = None) -> None:
        self.backend, self.origin = backend, origin
        if isinstance(backend, Tokenizer):
            # Not saved in tokenizer.json, so set on every load: text that spells a special token stays text.
            backend.encode_special_tokens = True
            vocab = backend.get_vocab(with_added_tokens=True)
            own_size = max(vocab.values()) + 1  # ids may be sparse (added tokens); the embedding must cover all
            eot = next((vocab[token] for token in EOT_CANDIDATES if token in vocab), None)
            definition = backend.to_str().encode()
        else:
            own_size = backend.get_piece_size()
            eot = backend.eos_id() if backend.eos_id() >= 0 else None
            definition = backend.serialized_model_proto()
        if eot is None:
            raise ConfigError(
                f"data.tokenizer: {origin} has no end-of-text token to separate documents "
                f"(looked for {', '.join(EOT_CANDIDATES)} or a SentencePiece eos id)"
            )
        self.vocab_size = max(own_size, vocab_size or 0)
        self.eot_id = int(eot)
        self.fingerprint = _fingerprint(definition)

    @property
    def is_sentencepiece(self) -> bool:
        return not isinstance(self.backend, Tokenizer)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; no special tokens added, and a literal ``<|endoftext|>`` in a text stays text."""
        if self.is_sentencepiece:
            return self.backend.encode(list(texts), out_type=int)
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids (numpy or torch integers welcome); the end-of-text token is kept as text."""
        ids = [int(i) for i in ids]
        if self.is_sentencepiece:
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer where :func:`resolve_tokenizer` loads it back from, atomically.

        Args:
            path: A file (``*.json`` for a tokenizers tokenizer, ``*.model`` for SentencePiece), or an existing
                directory, which then receives ``tokenizer.json`` or ``tokenizer.model``.
        """
        path = Path(path).expanduser()
        name, data = self.definition()
        if path.is_dir():
            path = path / name
        atomic_write(path, lambda f: f.write(data))

    def definition(self) -> tuple[str, bytes]:
        """The file name and bytes that :meth:`save` writes: what a checkpoint keeps, so that it needs no file
        beside it."""
        if self.is_sentencepiece:
            return "tokenizer.model", self.backend.serialized_model_proto()
        return "tokenizer.json", self.backend.to_str().encode()

    @classmethod
    def from_definition(cls, name: str, data: bytes, origin: str, vocab_size: int | None = None) -> TextTokenizer:
        """The tokenizer :meth:`definition` described, without touching the file system."""
        if name.endswith(".model"):
            import sentencepiece  # noqa: PLC0415 - only needed for SentencePiece models

            processor = sentencepiece.SentencePieceProcessor()
            processor.LoadFromSerializedProto(data)
            return cls(processor, origin, vocab_size)
        return cls(Tokenizer.from_str(data.decode()), origin, vocab_size)

    def __repr__(self) -> str:
        kind = "sentencepiece" if self.is_sentencepiece else "tokenizers"
        return f"TextTokenizer({kind}, {self.origin}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# --- the network, for hub names -------------------------------------------------------------------------------------


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used right now, or None when it answers; takes at most ``timeout`` seconds.

    Checked before any hub call, so that a machine with no network fails at once instead of after the hub
    client's retries.
    """
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _truthy(name):
            return f"{name} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"{host} cannot be reached ({error.__class__.__name__}: {error})"
    return None


def require_hub(what: str, local_hint: str) -> None:
    """Raise a one-line ConfigError when the hub is unreachable.

    Args:
        what: What needed the hub, e.g. ``data.tokenizer='meta-llama/Llama-2-7b-hf'``.
        local_hint: How to do the same from local files.
    """
    reason = hub_unreachable_reason()
    if reason is not None:
        raise ConfigError(f"{what} is a Hugging Face hub name but there is no network ({reason}); {local_hint}")


# --- resolving a tokenizer spec -------------------------------------------------------------------------------------

_HUB_TOKENIZER_HINT = "pass the path of a local tokenizer.json or SentencePiece .model file as data.tokenizer instead"


def _local_file(spec: str) -> Path | None:
    """The tokenizer file a spec names, None when the spec is not a local path (then it is a hub name)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise ConfigError(f"data.tokenizer: directory {spec} holds neither tokenizer.json nor tokenizer.model")
    if path.exists():
        return path
    if path.suffix in {".json", ".model"} or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ConfigError(f"data.tokenizer: file {spec} does not exist")
    return None


def _load_file(path: Path) -> TextTokenizer:
    is_json = path.suffix == ".json" or (path.suffix != ".model" and path.read_bytes()[:1] == b"{")
    try:
        if is_json:
            return TextTokenizer(Tokenizer.from_file(str(path)), str(path))
        import sentencepiece  # noqa: PLC0415 - only needed for SentencePiece models

        processor = sentencepiece.SentencePieceProcessor()
        processor.load(str(path))
        return TextTokenizer(processor, str(path))
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - both libraries raise bare Exception/RuntimeError on bad files
        kind = "tokenizer.json" if is_json else "SentencePiece model"
        first_line = (str(error).splitlines() or [error.__class__.__name__])[0]
        raise ConfigError(f"data.tokenizer: {path} is not a readable {kind}: {first_line}") from None


def _load_hub(name: str) -> TextTokenizer:
    require_hub(f"data.tokenizer={name!r}", _HUB_TOKENIZER_HINT)
    try:
        return TextTokenizer(Tokenizer.from_pretrained(name), name)
    except Exception as error:  # noqa: BLE001 - the hub client raises many kinds
        first_line = (str(error).splitlines() or [error.__class__.__name__])[0]
        raise ConfigError(f"data.tokenizer: cannot load {name!r} from the Hugging Face hub: {first_line}") from None


def _check_bpe_size(vocab_size: int) -> None:
    if not MIN_BPE_VOCAB <= vocab_size:
        raise ConfigError(
            f"data.vocab_size must be at least {MIN_BPE_VOCAB} (256 bytes + end-of-text) to train a BPE, "
            f"got {vocab_size}"
        )


def bpe_cache_path(cache_dir: str | Path, vocab_size: int, data_fingerprint: str) -> Path:
    """Where the BPE trained for (data, vocab size, recipe version) is cached."""
    key = _fingerprint(f"{data_fingerprint}|{vocab_size}|{BPE_RECIPE_VERSION}".encode())
    return Path(cache_dir).expanduser() / f"bpe-{vocab_size}-{key}.json"


def _trained_bpe(vocab_size: int, documents: Callable[[], Iterable[str]], cache_dir: str | Path,
                 data_fingerprint: str) -> TextTokenizer:
    _check_bpe_size(vocab_size)
    path = bpe_cache_path(cache_dir, vocab_size, data_fingerprint)
    try:
        return TextTokenizer(Tokenizer.from_file(str(path)), str(path), vocab_size)
    except Exception:  # noqa: BLE001 - missing or damaged: train again (tokenizers raises bare Exception)
        pass
    tokenizer = TextTokenizer(train_bpe(documents(), vocab_size), str(path), vocab_size)
    tokenizer.save(path)
    return tokenizer


def resolve_tokenizer(spec: str | None, vocab_size: int, documents: Callable[[], Iterable[str]],
                      cache_dir: str | Path, data_fingerprint: str) -> TextTokenizer:
    """The tokenizer a config names.

    Args:
        spec: None or ``"bpe"``: train a byte-level BPE of ``vocab_size`` on ``documents()``, cached in ``cache_dir``
            by (data fingerprint, vocab size, recipe version); a path to a ``tokenizer.json``, a SentencePiece
            ``*.model`` or a directory holding one; otherwise a Hugging Face hub name (needs a network).
        vocab_size: BPE vocabulary size; ignored for a loaded tokenizer, whose size comes from its file.
        documents: Called (once, and only when a BPE must be trained) for the training documents.
        cache_dir: Directory of cached BPE tokenizers.
        data_fingerprint: Identifies the training documents.

    Raises:
        ConfigError: One line naming the file or field: a missing file, an unreadable one, no network for a hub
            name, a vocabulary too small for a byte-level BPE.
    """
    if spec in BPE_SPECS:
        return _trained_bpe(vocab_size, documents, cache_dir, data_fingerprint)
    path = _local_file(spec)
    return _load_file(path) if path is not None else _load_hub(spec)


def tokenizer_vocab_size(spec: str | None, vocab_size: int) -> int:
    """The vocabulary size the model needs for ``spec``, without training anything (for a DataModule's __init__).

    A BPE to be trained reports ``vocab_size``; a tokenizer file or hub tokenizer reports its own size.
    """
    if spec in BPE_SPECS:
        _check_bpe_size(vocab_size)
        return vocab_size
    path = _local_file(spec)
    return (_load_file(path) if path is not None else _load_hub(spec)).vocab_size
