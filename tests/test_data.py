"""Tests for the embedded-docs datamodule: corpus, tokenizer cache, split, packing and config errors."""

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydoc_data.topics import topics

from dqt_lightning.data import embedded as data
from dqt_lightning.data.embedded import EmbeddedDocs, build_corpus, cache_key
from dqt_lightning.errors import ConfigError

VOCAB = 512  # small, so the one tokenizer training the fixture pays for is fast
SEQ_LEN = 32


def _make(cache_dir: Path | str, **overrides: object) -> EmbeddedDocs:
    kwargs = {"seq_len": SEQ_LEN, "batch_size": 4, "vocab_size": VOCAB, "cache_dir": str(cache_dir)} | overrides
    return EmbeddedDocs(**kwargs)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def dm(cache_dir: Path) -> EmbeddedDocs:
    module = _make(cache_dir)
    module.prepare_data()
    module.setup("fit")
    return module


def _cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("tokenizer-*.json")) + sorted(cache_dir.glob("tokens-*.npy"))


def test_corpus_is_deterministic_and_nontrivial() -> None:
    # Two independent builds: the one every datamodule of this session shares (built once, by whichever test came
    # first) and a fresh one.
    first, second = list(data._corpus()), build_corpus()
    assert first == second
    assert sum(map(len, first)) > 1_000_000
    assert all(len(doc) >= data.MIN_DOC_CHARS for doc in first)
    # Both sources are in: a pydoc topic verbatim, and a stdlib module docstring read without importing it.
    assert "assert" in topics and topics["assert"] in first
    assert any(doc.startswith(inspect.cleandoc(json.__doc__)) for doc in first)


def test_token_ids_fit_vocab_and_decode_round_trips(dm: EmbeddedDocs) -> None:
    assert dm.tokenizer is not None
    assert dm.vocab_size == VOCAB == dm.hparams["vocab_size"]
    assert int(dm.tokens.max()) < VOCAB and dm.tokens.dtype == np.uint16
    docs = data._corpus()
    non_ascii = next(doc for doc in docs if not doc.isascii())
    for doc in (docs[0], docs[-1], non_ascii, topics["assert"]):
        assert dm.tokenizer.decode(dm.tokenizer.encode(doc).ids) == doc
    # The end-of-text marker written as text stays text: it must not fake a document boundary.
    eot = dm.tokenizer.token_to_id(data.EOT)
    ids = dm.tokenizer.encode(f"before {data.EOT} after").ids
    assert eot not in ids and dm.tokenizer.decode(ids) == f"before {data.EOT} after"


def test_split_covers_every_document_once(dm: EmbeddedDocs) -> None:
    assert len(np.intersect1d(dm.train_docs, dm.val_docs)) == 0
    assert sorted(np.r_[dm.train_docs, dm.val_docs]) == list(range(dm.n_docs))
    assert len(dm.val_docs) == math.ceil(0.05 * dm.n_docs)
    # Each split re-joins its documents with one separator fewer than it has documents; the whole stream had n-1.
    assert len(dm.train_stream) + len(dm.val_stream) == len(dm.tokens) - 1


def test_cache_is_reused(dm: EmbeddedDocs, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _cache_files(cache_dir)
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]

    def no_training(*args: object) -> None:
        raise AssertionError("tokenizer was retrained despite a valid cache")

    monkeypatch.setattr(data, "_train_tokenizer", no_training)
    again = _make(cache_dir)
    again.prepare_data()
    again.setup("fit")
    assert [f.stat().st_mtime_ns for f in _cache_files(cache_dir)] == mtimes
    np.testing.assert_array_equal(again.tokens, dm.tokens)
    assert again.tokenizer.to_str() == dm.tokenizer.to_str()
    docs = data._corpus()
    assert cache_key(docs, VOCAB) != cache_key(docs, VOCAB + 1)
    assert cache_key(docs, VOCAB) in files[0].name


def test_interrupted_or_damaged_cache_is_never_trusted(
    dm: EmbeddedDocs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = cache_key(data._corpus(), VOCAB)

    def killed_save(file: object, array: np.ndarray) -> None:
        file.write(b"\x93NUMPY half-written")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(data.np, "save", killed_save)
        with pytest.raises(KeyboardInterrupt):
            _make(tmp_path).prepare_data()
    assert not list(tmp_path.glob("tokens-*")) and not list(tmp_path.glob(".tokens-*"))

    # Leftovers of a run killed harder (SIGKILL skips cleanup) sit under temp names that are never read.
    (tmp_path / f".tokens-{key}.npy.x1.tmp").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / f".tokenizer-{key}.json.x1.tmp").write_text("{not json")
    fresh = _make(tmp_path)
    fresh.setup()  # without prepare_data: setup builds on its own
    np.testing.assert_array_equal(fresh.tokens, dm.tokens)
    assert fresh.tokenizer.to_str() == dm.tokenizer.to_str()
    assert fresh.tokenizer.token_to_id(data.EOT) not in fresh.tokenizer.encode(data.EOT).ids  # same as loaded

    # A final file damaged afterwards (disk trouble, manual edit) is rebuilt rather than loaded.
    (tmp_path / f"tokens-{key}.npy").write_bytes(b"\x93NUMPY truncated")
    rebuilt = _make(tmp_path)
    rebuilt.setup()
    np.testing.assert_array_equal(rebuilt.tokens, dm.tokens)


def test_split_depends_only_on_seed(dm: EmbeddedDocs, cache_dir: Path) -> None:
    a, b, other = _make(cache_dir, seed=7), _make(cache_dir, seed=7), _make(cache_dir, seed=8)
    for module in (a, b, other):
        module.setup("fit")
    val_a, val_b = torch.cat(list(a.val_dataloader())), torch.cat(list(b.val_dataloader()))
    assert torch.equal(val_a, val_b)
    assert torch.equal(next(iter(a.train_dataloader())), next(iter(b.train_dataloader())))
    assert not np.array_equal(a.val_docs, other.val_docs)
    assert not np.array_equal(a.val_docs, dm.val_docs)


def test_batches_are_packed_windows(dm: EmbeddedDocs, cache_dir: Path) -> None:
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, SEQ_LEN + 1) and batch.dtype == torch.long
    val_windows = torch.cat(list(dm.val_dataloader()))
    assert val_windows.shape == (len(dm.val_stream) // (SEQ_LEN + 1), SEQ_LEN + 1)
    # Windows do not overlap: laid end to end they are the start of the validation stream.
    assert torch.equal(val_windows.flatten(), torch.from_numpy(dm.val_stream[: val_windows.numel()].astype(np.int64)))
    assert torch.equal(torch.cat(list(dm.test_dataloader())), val_windows)
    assert len(dm.train_dataloader()) == len(dm.train_stream) // (SEQ_LEN + 1) // 4  # drop_last
    assert not dm.train_dataloader().persistent_workers
    assert _make(cache_dir, num_workers=1).train_dataloader().persistent_workers


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"seq_len": 1}, "data.seq_len"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"vocab_size": 100}, "data.vocab_size"),
        ({"vocab_size": 70_000}, "data.vocab_size"),
        ({"val_fraction": 0.9}, "data.val_fraction"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"num_workers": -1}, "data.num_workers"),
    ],
)
def test_bad_config_names_the_field(overrides: dict[str, object], field: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        _make(tmp_path, **overrides)
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())  # rejected before any work


def test_window_longer_than_split_is_a_config_error(dm: EmbeddedDocs, cache_dir: Path) -> None:
    too_long = len(dm.val_stream) + 10
    with pytest.raises(ConfigError, match=rf"data\.seq_len={too_long} .*validation split") as info:
        _make(cache_dir, seq_len=too_long).setup("fit")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="train split"):
        _make(cache_dir, seq_len=SEQ_LEN, batch_size=len(dm.train_stream)).setup("fit")


def test_unigram_entropy_is_between_zero_and_uniform(dm: EmbeddedDocs) -> None:
    entropy = dm.unigram_entropy()
    assert 1.0 < entropy < math.log(VOCAB)


def test_describe_is_one_line(dm: EmbeddedDocs) -> None:
    line = dm.describe()
    assert "\n" not in line and dm.python_version in line and str(VOCAB) in line and f"{dm.n_docs} docs" in line
