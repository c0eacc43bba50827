"""Tests for dqt_lightning.data.tokenizer: trained BPE (and its cache), tokenizer.json, SentencePiece, hub names offline."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from dqt_lightning.data import embedded as data
from dqt_lightning.data import tokenizer as tok
from dqt_lightning.errors import ConfigError
from dqt_lightning.data.tokenizer import EOT, TextTokenizer, resolve_tokenizer, tokenizer_vocab_size

VOCAB = 300
WORDS = "the quick brown fox jumps over lazy dogs while seven wizards quietly hex jovial kings near old river".split()


def make_docs(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


DOCS = make_docs()


def _never_called() -> list[str]:
    raise AssertionError("the cached tokenizer should have been used, not trained again")


def _train(cache: Path, vocab: int = VOCAB, fingerprint: str = "data-a") -> TextTokenizer:
    return resolve_tokenizer(None, vocab, lambda: DOCS, cache, fingerprint)


def test_trained_bpe_is_cached_by_data_and_size(tmp_path: Path) -> None:
    first = _train(tmp_path)
    assert first.vocab_size == VOCAB and first.eot_id == first.backend.token_to_id(EOT)
    assert len(first.fingerprint) == 16 and int(first.fingerprint, 16) >= 0
    cached = list(tmp_path.glob("bpe-*.json"))
    assert len(cached) == 1
    again = resolve_tokenizer("bpe", VOCAB, _never_called, tmp_path, "data-a")  # a cache hit trains nothing
    assert again.fingerprint == first.fingerprint
    assert again.encode_batch(DOCS[:3]) == first.encode_batch(DOCS[:3])
    # Other data or another size is another tokenizer, in its own file.
    _train(tmp_path, fingerprint="data-b")
    _train(tmp_path, vocab=VOCAB + 20)
    assert len(list(tmp_path.glob("bpe-*.json"))) == 3


def test_encoding_adds_no_specials_and_keeps_a_literal_eot_as_text(tmp_path: Path) -> None:
    bpe = _train(tmp_path)
    text = f"the fox {EOT} jumps"
    (ids,) = bpe.encode_batch([text])
    assert bpe.eot_id not in ids and bpe.decode(ids) == text
    encoded = bpe.encode_batch(DOCS)
    assert all(0 <= i < bpe.vocab_size for ids in encoded for i in ids)
    assert [bpe.decode(ids) for ids in encoded] == DOCS
    assert bpe.decode([bpe.eot_id]) == EOT


def test_damaged_cache_is_retrained_and_an_interrupted_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _train(tmp_path)
    (cached,) = tmp_path.glob("bpe-*.json")
    cached.write_text("{not json")
    assert _train(tmp_path).fingerprint == good.fingerprint
    cached.unlink()

    def killed(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("dqt_lightning.files.os.fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the cache file nor a temp file


def test_embedded_docs_use_the_same_bpe_recipe() -> None:
    assert data._train_tokenizer is tok.train_bpe and data.EOT == tok.EOT


def test_tokenizer_json_loads_with_its_own_vocab_size(tmp_path: Path) -> None:
    bpe = _train(tmp_path / "cache")
    bpe.save(tmp_path / "mine.json")
    loaded = resolve_tokenizer(str(tmp_path / "mine.json"), 99_999, _never_called, tmp_path, "")
    assert loaded.fingerprint == bpe.fingerprint and loaded.eot_id == bpe.eot_id
    assert loaded.encode_batch(DOCS[:2]) == bpe.encode_batch(DOCS[:2])
    assert tokenizer_vocab_size(str(tmp_path / "mine.json"), 99_999) == VOCAB  # the file's size, not the config's
    # A directory holding tokenizer.json (as hub model folders do) works too.
    (tmp_path / "model").mkdir()
    bpe.save(tmp_path / "model")
    assert resolve_tokenizer(str(tmp_path / "model"), 0, _never_called, tmp_path, "").fingerprint == bpe.fingerprint


def test_tokenizer_json_eot_is_found_by_its_family_name(tmp_path: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "x": 9}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.save(str(tmp_path / "llama-like.json"))
    loaded = resolve_tokenizer(str(tmp_path / "llama-like.json"), 0, _never_called, tmp_path, "")
    assert loaded.eot_id == 2 and loaded.vocab_size == 10  # ids up to 9: the embedding must cover them all
    assert loaded.encode_batch(["hello world"]) == [[3, 4]]

    no_eot = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    no_eot.save(str(tmp_path / "no-eot.json"))
    with pytest.raises(ConfigError, match="no-eot.json has no end-of-text token") as info:
        resolve_tokenizer(str(tmp_path / "no-eot.json"), 0, _never_called, tmp_path, "")
    assert "\n" not in str(info.value)


def _sentencepiece_model(tmp_path: Path) -> Path:
    import sentencepiece

    corpus = tmp_path / "sp.txt"
    corpus.write_text("\n".join(make_docs(200, seed=1)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "llama-like"), vocab_size=120, model_type="bpe",
        minloglevel=2, num_threads=1,
    )
    return tmp_path / "llama-like.model"


def test_sentencepiece_model_loads_like_the_llama_tokenizer(tmp_path: Path) -> None:
    model = _sentencepiece_model(tmp_path)
    sp = resolve_tokenizer(str(model), 4096, _never_called, tmp_path, "")
    assert sp.is_sentencepiece and sp.vocab_size == 120 == tokenizer_vocab_size(str(model), 4096)
    assert sp.eot_id == sp.backend.piece_to_id("</s>") == 2  # SentencePiece's default eos, as in LLaMA
    encoded = sp.encode_batch(DOCS[:5])
    assert all(ids and sp.eot_id not in ids and 1 not in ids for ids in encoded)  # neither bos nor eos added
    assert [sp.decode(ids) for ids in encoded] == DOCS[:5]
    (ids,) = sp.encode_batch(["the fox </s> jumps"])
    assert sp.eot_id not in ids  # a literal "</s>" stays text
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    sp.save(copy_dir)
    assert (copy_dir / "tokenizer.model").is_file()
    assert resolve_tokenizer(str(copy_dir), 0, _never_called, tmp_path, "").fingerprint == sp.fingerprint


def test_hub_tokenizer_name_fails_at_once_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def unreachable(address: tuple[str, int], timeout: float) -> None:
        calls.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    for call in (lambda: resolve_tokenizer("meta-llama/Llama-2-7b-hf", 0, _never_called, tmp_path, ""),
                 lambda: tokenizer_vocab_size("gpt2", 0)):
        with pytest.raises(ConfigError, match="hub name but there is no network") as info:
            call()
        assert "tokenizer.json" in str(info.value) and "\n" not in str(info.value)
    assert calls and all(timeout <= 5 for _, timeout in calls)  # one quick look, no retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        tokenizer_vocab_size("gpt2", 0)
    assert len(calls) == 2  # offline mode is believed without trying the network


@pytest.mark.parametrize(
    ("spec", "vocab", "message"),
    [
        ("missing/tokenizer.json", 0, "data.tokenizer: file missing/tokenizer.json does not exist"),
        ("./nowhere", 0, "does not exist"),
        ("bad.json", 0, "bad.json is not a readable tokenizer.json"),
        ("bad.model", 0, "bad.model is not a readable SentencePiece model"),
        ("empty-dir", 0, "holds neither tokenizer.json nor tokenizer.model"),
        (None, 100, "data.vocab_size must be at least 257"),
    ],
)
def test_bad_tokenizer_specs_are_one_line_errors(
    spec: str | None, vocab: int, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text('{"model": 3}')
    (tmp_path / "bad.model").write_bytes(b"\x00not a protobuf")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(ConfigError, match=message) as info:
        resolve_tokenizer(spec, vocab, lambda: DOCS, tmp_path / "cache", "x")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists()
