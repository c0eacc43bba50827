"""Tests for dqt_lightning.data.text: every source (txt, jsonl, json, parquet, embedded, streaming, hub offline), the
seeded validation split, token caching, packing, resume, the data configs, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dqt_lightning.data import embedded as data
from dqt_lightning.data import text, text_source
from dqt_lightning.data import tokenizer as tok
from dqt_lightning.cli import main
from dqt_lightning.errors import ConfigError
from dqt_lightning.data.text import StreamedWindows, TextCorpus, TextSource
from tests.test_tokenizer import make_docs

# Torch on one thread (conftest.one_thread): these models are tiny, and on shared cores two OpenMP threads make
# each small op wait for a descheduled partner (runs several times slower).
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DOCS = make_docs(60)
VOCAB = 300
SEQ_LEN = 16


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the Arrow copies that `datasets` makes of local files out of the user's ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


def write_docs(path: Path, docs: list[str], fmt: str, **extra: object) -> Path:
    """Write ``docs`` as one file of format ``fmt`` (jsonl, json, parquet, txt) at ``path`` (suffix added)."""
    path = path.with_suffix(f".{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"text": doc, **extra} for doc in docs]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("\n\n".join(docs) + "\n")
    return path


def make_corpus(tmp_path: Path, **overrides: object) -> TextCorpus:
    kwargs = {"vocab_size": VOCAB, "seq_len": SEQ_LEN, "batch_size": 4, "cache_dir": str(tmp_path / "cache")}
    return TextCorpus(**(kwargs | overrides))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt"])
def test_each_local_format_gives_every_document_once(fmt: str, tmp_path: Path) -> None:
    source = TextSource(path=str(write_docs(tmp_path / "corpus", DOCS, fmt)), val_fraction=0.1, seed=3)
    train, val = list(source.documents("train")), list(source.documents("validation"))
    assert len(val) == math.ceil(0.1 * len(DOCS)) and not set(train) & set(val)
    assert sorted(train + val) == sorted(DOCS)
    assert train == [doc for doc in DOCS if doc not in val]  # corpus order kept
    # The hold-out depends on positions and the seed only, so every format holds out the same documents.
    expected = [DOCS[i] for i in text_source.held_out_documents(len(DOCS), 0.1, 2000, seed=3)]
    assert val == expected


def test_directory_and_glob_read_files_in_sorted_order(tmp_path: Path) -> None:
    write_docs(tmp_path / "dir" / "b", DOCS[30:], "jsonl")
    write_docs(tmp_path / "dir" / "sub" / "c", DOCS[:0] + ["only in sub " * 5], "jsonl")
    write_docs(tmp_path / "dir" / "a", DOCS[:30], "jsonl")
    (tmp_path / "dir" / "README.md").write_text("ignored: not a corpus format")
    from_dir = TextSource(path=str(tmp_path / "dir"))
    assert [f.name for f in from_dir.files()] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    everything = list(from_dir.documents("train")) + list(from_dir.documents("validation"))
    assert sorted(everything) == sorted([*DOCS, "only in sub " * 5])
    from_glob = TextSource(path=str(tmp_path / "dir" / "*.jsonl"))
    assert [f.name for f in from_glob.files()] == ["a.jsonl", "b.jsonl"]


def test_datamodule_packs_documents_separated_by_eot(tmp_path: Path) -> None:
    path = write_docs(tmp_path / "corpus", DOCS, "jsonl", id=7)
    dm = make_corpus(tmp_path, source=TextSource(path=str(path), val_fraction=0.1))
    assert dm.vocab_size == VOCAB  # known before any tokenizing, for the CLI's link to the model
    dm.setup("fit")
    eot = dm.tokenizer.eot_id
    val_docs = list(dm.source.documents("validation"))
    assert int((dm.val_stream == eot).sum()) == len(val_docs) - 1
    assert int((dm.train_stream == eot).sum()) == len(DOCS) - len(val_docs) - 1
    first = dm.val_stream[: int(np.flatnonzero(dm.val_stream == eot)[0])]
    assert dm.tokenizer.decode(first) == val_docs[0]
    assert int(dm.train_stream.max()) < VOCAB and dm.train_stream.dtype == np.uint16
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, SEQ_LEN + 1) and batch.dtype == torch.long
    val = torch.cat(list(dm.val_dataloader()))
    assert torch.equal(val.flatten(), torch.from_numpy(dm.val_stream[: val.numel()].astype(np.int64)))
    assert 0 < dm.unigram_entropy() < math.log(VOCAB)
    assert "\n" not in dm.describe() and "1 " in dm.describe()


def test_same_seed_gives_the_same_validation_set_in_separate_runs(tmp_path: Path) -> None:
    path = str(write_docs(tmp_path / "corpus", DOCS, "parquet"))
    runs = [make_corpus(tmp_path / run, source=TextSource(path=path, seed=seed, val_fraction=0.1))
            for run, seed in (("a", 5), ("b", 5), ("c", 6))]
    for dm in runs:
        dm.setup("fit")  # each its own cache dir: tokenizer and tokens built from scratch every time
    first, second, other = (torch.cat(list(dm.val_dataloader())) for dm in runs)
    assert torch.equal(first, second)
    assert not torch.equal(first[: len(other)], other[: len(first)])


def test_tokens_are_cached_and_invalidated_when_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_docs(tmp_path / "corpus", DOCS, "jsonl")
    dm = make_corpus(tmp_path, source=TextSource(path=str(path)))
    dm.setup()
    before = dm.source.fingerprint()
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len([n for n in cached if n.startswith("text-")]) == 2 and not [n for n in cached if n.startswith(".")]

    def no_tokenizing(*args: object) -> None:
        raise AssertionError("a second run must load the cached tokens")

    with monkeypatch.context() as patch:
        patch.setattr(text, "encode_stream", no_tokenizing)
        again = make_corpus(tmp_path, source=TextSource(path=str(path)))
        again.setup()
    np.testing.assert_array_equal(again.train_stream, dm.train_stream)
    write_docs(tmp_path / "corpus", DOCS[:-1], "jsonl")
    changed = make_corpus(tmp_path, source=TextSource(path=str(path)))
    assert changed.source.fingerprint() != before
    changed.setup()
    assert len(changed.train_stream) < len(dm.train_stream)


def test_named_validation_files(tmp_path: Path) -> None:
    train = write_docs(tmp_path / "train", DOCS[:50], "jsonl")
    val = write_docs(tmp_path / "val", DOCS[50:], "jsonl")
    source = TextSource(path=str(train), validation_split=str(val))
    assert list(source.documents("validation")) == DOCS[50:]
    assert list(source.documents("train")) == DOCS[:50]  # nothing held out of train when validation is named


def test_embedded_source_holds_out_like_embedded_docs() -> None:
    source = TextSource(val_fraction=0.05)
    assert source.kind == "embedded"
    corpus = data._corpus()
    _, embedded_val = data.split_documents(len(corpus), 0.05, 1234)
    assert list(source.documents("validation")) == [corpus[i] for i in embedded_val]
    assert len(list(source.documents("train"))) == len(corpus) - len(embedded_val)
    assert source.fingerprint() == TextSource(val_fraction=0.05).fingerprint() != TextSource().fingerprint()


def test_streaming_holds_out_a_deterministic_set_and_packs_on_the_fly(tmp_path: Path) -> None:
    path = str(write_docs(tmp_path / "corpus", DOCS, "jsonl"))
    source = TextSource(path=path, streaming=True, val_fraction=0.2, seed=9, max_val_documents=5)
    val, train = list(source.documents("validation")), list(source.documents("train"))
    assert len(val) == 5 and sorted(val + train) == sorted(DOCS)
    assert val == list(TextSource(path=path, streaming=True, val_fraction=0.2, seed=9,
                                  max_val_documents=5).documents("validation"))
    assert val != list(TextSource(path=path, streaming=True, val_fraction=0.2, seed=10,
                                  max_val_documents=5).documents("validation"))

    dm = make_corpus(tmp_path, source=source)
    dm.setup()
    assert len(dm.train_stream) == 0 and len(dm.val_stream) > 0  # training windows are never materialized
    batches = list(dm.train_dataloader())
    assert batches and all(b.shape == (4, SEQ_LEN + 1) for b in batches)

    # Ranks share nothing: rank 0 and rank 1 of two together hold the windows each rank packs from its documents.
    def windows(rank: int, world: int) -> list[tuple[int, ...]]:
        stream = StreamedWindows(source, dm.tokenizer, SEQ_LEN, world, rank, seed=1, shuffle_buffer=0)
        return [tuple(w.tolist()) for w in stream]

    rank0, rank1 = windows(0, 2), windows(1, 2)
    assert rank0 and rank1 and not set(rank0) & set(rank1)
    assert len(rank0) + len(rank1) <= len(windows(0, 1)) + 1  # same tokens, at most one partial window more lost


def test_resume_continues_with_the_next_batch(tmp_path: Path) -> None:
    path = write_docs(tmp_path / "corpus", DOCS, "jsonl")
    dm = make_corpus(tmp_path, source=TextSource(path=str(path)))
    epoch = list(dm.train_dataloader())
    resumed = make_corpus(tmp_path, source=TextSource(path=str(path)))
    resumed.load_state_dict({"epoch": 0, "batches_done": 2})
    assert all(torch.equal(a, b) for a, b in zip(list(resumed.train_dataloader()), epoch[2:], strict=True))


def test_hub_dataset_fails_at_once_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="no network") as info:
        make_corpus(tmp_path, source=TextSource(dataset="wikimedia/wikipedia", name="20231101.en"))
    message = str(info.value)
    assert "data.source.dataset='wikimedia/wikipedia'" in message and "source.path" in message and "\n" not in message
    assert not (tmp_path / "cache").exists()


def _run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr("sys.argv", ["dqt_lightning"])  # pytest's own arguments are not the CLI's
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_hub_config_fails_with_one_line_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run_cli(["fit", "--config", str(CONFIGS / "ternary.yaml"), "--config",
                             str(CONFIGS / "data" / "hub.yaml")], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: data.source.dataset='wikimedia/wikipedia'")
    assert "no network" in err and not (tmp_path / ".cache").exists()


@pytest.mark.parametrize("overlay", ["local-files.yaml", "embedded.yaml", "hub.yaml"])
def test_data_overlays_keep_the_training_configs_sizes(overlay: str, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run_cli(["fit", "--config", str(CONFIGS / "ternary.yaml"), "--config",
                             str(CONFIGS / "model" / "130m.yaml"), "--config", str(CONFIGS / "data" / overlay),
                             "--data.init_args.source.path", "/data/corpus", "--print_config"], capsys)
    assert code == 0
    init = yaml.safe_load(out)["data"]["init_args"]
    assert yaml.safe_load(out)["data"]["class_path"] == "dqt_lightning.data.text.TextCorpus"
    assert (init["seq_len"], init["batch_size"], init["vocab_size"]) == (512, 32, 32000)  # 130m's, kept
    assert init["source"]["path"] == "/data/corpus"


@pytest.mark.parametrize("tokenizer", ["bpe", "tokenizer.json"])
def test_fit_on_a_directory_of_jsonl_trains_and_validates(
    tokenizer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for part in range(3):
        write_docs(tmp_path / "corpus" / f"part{part}", make_docs(40, seed=part), "jsonl")
    if tokenizer == "tokenizer.json":  # a tokenizer file of another size than the config's: the file's size wins
        tok.resolve_tokenizer(None, 280, lambda: DOCS, tmp_path / "bpe", "x").save(tmp_path / tokenizer)
    monkeypatch.chdir(tmp_path)  # the run directory lands in tmp_path
    monkeypatch.setattr("sys.argv", ["dqt_lightning"])
    tiny = ["--model.init_args.config.n_layer", "1", "--model.init_args.config.n_embd", "32",
            "--model.init_args.config.n_head", "2", "--model.init_args.config.intermediate_size", "64"]
    main(["fit", "--config", str(CONFIGS / "ternary.yaml"), "--config", str(CONFIGS / "data" / "local-files.yaml"),
          "--data.init_args.source.path", "corpus", "--data.init_args.vocab_size", "300", "--data.init_args.seq_len",
          "32", "--data.init_args.batch_size", "4", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
          "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
          "--data.init_args.tokenizer", tokenizer, *tiny])
    out = capsys.readouterr().out
    assert "final validation loss" in out and "unigram entropy" in out
    (hparams,) = Path(tmp_path).glob("runs/*/version_0/hparams.yaml")
    assert yaml.safe_load(hparams.read_text())["vocab_size"] == (280 if tokenizer == "tokenizer.json" else 300)


# --- bad input: one line naming the file or field, and nothing left in the cache ---------------------------------


def _bad(tmp_path: Path, case: str) -> tuple[dict, str]:
    corpus = tmp_path / "in"
    corpus.mkdir()
    good = write_docs(corpus / "good", DOCS, "jsonl")
    if case == "empty file":
        (corpus / "empty.jsonl").touch()
        return {"path": str(corpus)}, r"data\.source\.path: .*empty\.jsonl is empty"
    if case == "non-UTF-8 text":
        (corpus / "latin1.txt").write_bytes("caf\u00e9 au lait\n\nmore text here\n".encode("latin-1"))
        return {"path": str(corpus / "latin1.txt")}, r"latin1\.txt is not UTF-8 text \(first bad byte at byte " \
                                                      r"offset 3\)"
    if case == "non-UTF-8 jsonl":
        good.write_bytes(good.read_bytes() + b'{"text": "caf\xe9"}\n')
        return {"path": str(corpus)}, r"good\.jsonl is not UTF-8 text"
    if case == "missing text_field":
        return {"path": str(good), "text_field": "body"}, r"data\.source\.text_field: .*good\.jsonl has no field " \
                                                          r"'body'; its fields are 'text'"
    if case == "text_field not text":
        write_docs(corpus / "good", DOCS, "jsonl", n=3)
        return {"path": str(good), "text_field": "n"}, r"'n' in .*good\.jsonl holds int values, not text"
    if case == "shorter than a window":
        short = write_docs(corpus / "short", ["a tiny corpus."] * 3, "jsonl")
        # Streamed, the seeded hash may hold out none of three documents: that is named as the problem instead.
        return {"path": str(short)}, r"(data\.seq_len=16 needs 17 tokens per window|validation split of) .*short\.jsonl"
    if case == "missing path":
        return {"path": str(corpus / "nope")}, r"data\.source\.path: .*nope does not exist"
    if case == "unknown extension":
        (corpus / "table.csv").write_text("text\nhello\n")
        return {"path": str(corpus / "table.csv")}, r"table\.csv has an unknown extension; use one of \.txt"
    if case == "mixed formats":
        write_docs(corpus / "other", DOCS, "txt")
        return {"path": str(corpus)}, r"mixes json and text files"
    raise AssertionError(case)


BAD_CASES = ["empty file", "non-UTF-8 text", "non-UTF-8 jsonl", "missing text_field", "text_field not text",
             "shorter than a window", "missing path", "unknown extension", "mixed formats"]


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_a_one_line_error_naming_the_file_or_field(case: str, streaming: bool, tmp_path: Path) -> None:
    source, message = _bad(tmp_path, case)
    with pytest.raises(ConfigError, match=message) as info:
        make_corpus(tmp_path, source=TextSource(**source, streaming=streaming)).setup()
    assert "\n" not in str(info.value)
    cache = tmp_path / "cache"
    left = sorted(cache.iterdir()) if cache.exists() else []
    assert not [p for p in left if p.name.startswith(".")]  # no temp file of an interrupted write
    for whole in (p for p in left if p.suffix == ".npy"):  # a corpus too short still tokenized fine: caches are whole
        assert np.load(whole).ndim == 1
    if case != "shorter than a window":
        assert not [p for p in left if p.name.startswith("text-")]  # rejected before any tokens were cached


@pytest.mark.parametrize(
    ("source", "overrides", "field"),
    [
        ({"val_fraction": 0.0}, {}, "data.source.val_fraction"),
        ({"max_val_documents": 0}, {}, "data.source.max_val_documents"),
        ({"path": "x", "dataset": "y"}, {}, "data.source: set either path"),
        ({"streaming": True}, {}, "data.source.streaming"),
        ({"validation_split": "val"}, {}, "data.source.validation_split needs data.source.path"),
        ({}, {"seq_len": 1}, "data.seq_len"),
        ({}, {"batch_size": 0}, "data.batch_size"),
        ({}, {"vocab_size": 100}, "data.vocab_size"),
        ({}, {"shuffle_buffer": -1}, "data.shuffle_buffer"),
    ],
)
def test_bad_settings_name_the_field(source: dict, overrides: dict, field: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=field):
        make_corpus(tmp_path, source=TextSource(**source), **overrides)
    assert not (tmp_path / "cache").exists()
