"""Pre-tokenized shards: the prepare command (round trip, resume after SIGINT, skipping finished shards), the
TokenShards DataModule (windows, DDP split, seeded order, resume position) and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dqt_lightning.data import shard_files
from dqt_lightning.cli import main
from dqt_lightning.errors import ConfigError
from dqt_lightning.data.sampling import ResumableSampler
from dqt_lightning.data.shard_files import MANIFEST, Manifest, default_shard_dir, prepare, shard_dtype
from dqt_lightning.data.shards import TokenShards, prepare_from_config
from dqt_lightning.data.text import TextSource
from dqt_lightning.data.tokenizer import resolve_tokenizer, train_bpe

# Torch on one thread (conftest.one_thread): these models are tiny, and on shared cores two OpenMP threads make
# each small op wait for a descheduled partner (runs several times slower).
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
VOCAB = 300
SHARD_TOKENS = 4000
SEQ_LEN = 16
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zé", "qu", "ø", "an", "el", "or", "ix"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Made-up words (a few non-ASCII letters among them) in sentences; no real text needed."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(10, 150))) + "." for _ in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: doc, "id": i}) + "\n" for i, doc in enumerate(docs)))
    return path


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the Arrow copies that `datasets` makes of local files out of the user's ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_jsonl(root / "corpus" / "a.jsonl", make_docs(150, seed=1))
    write_jsonl(root / "corpus" / "b.jsonl", make_docs(150, seed=2))
    return root


def source_of(workdir: Path) -> TextSource:
    return TextSource(path=str(workdir / "corpus"), val_fraction=0.1, seed=5)


def run_prepare(workdir: Path, shard_dir: Path, **overrides: object) -> Manifest:
    kwargs = {"source": source_of(workdir), "vocab_size": VOCAB, "shard_tokens": SHARD_TOKENS,
              "cache_dir": str(workdir / "cache"), "progress": False} | overrides
    return prepare(shard_dir, **kwargs)[1]


@pytest.fixture(scope="module")
def reference(workdir: Path) -> tuple[Path, Manifest]:
    """One uninterrupted prepare that the other tests compare against (read-only)."""
    directory = workdir / "reference"
    return directory, run_prepare(workdir, directory)


def make_module(workdir: Path, shard_dir: Path, **overrides: object) -> TokenShards:
    kwargs = {"source": source_of(workdir), "vocab_size": VOCAB, "shard_dir": str(shard_dir), "seq_len": SEQ_LEN,
              "batch_size": 4, "shard_tokens": SHARD_TOKENS, "cache_dir": str(workdir / "cache")} | overrides
    return TokenShards(**kwargs)


def stream(directory: Path, manifest: Manifest, split: str) -> np.ndarray:
    return np.concatenate([np.fromfile(directory / s["file"], manifest.dtype) for s in manifest.shards(split)])


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.bin"))}


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.glob(".*")] if directory.exists() else []


# --- prepare ----------------------------------------------------------------------------------------------------------


def test_round_trip_every_document_once_with_separators(workdir: Path, reference: tuple[Path, Manifest]) -> None:
    directory, manifest = reference
    source = source_of(workdir)
    tokenizer = resolve_tokenizer(str(directory / "tokenizer.json"), VOCAB, list, "", "")
    assert tokenizer.fingerprint == manifest.settings["tokenizer_fingerprint"]
    assert manifest.complete() and manifest.settings["dtype"] == "uint16" and manifest.vocab_size == VOCAB
    for split in ("train", "validation"):
        docs = list(source.documents(split))
        tokens = stream(directory, manifest, split)
        assert tokens.dtype == np.uint16 and int(tokens.max()) < VOCAB
        # Every document, in order, each followed by the end-of-text id: nothing lost, nothing merged.
        ends = np.flatnonzero(tokens == tokenizer.eot_id)
        pieces = np.split(tokens, ends + 1)[:-1]
        assert len(pieces) == len(docs)
        assert [p[:-1].tolist() for p in pieces] == tokenizer.encode_batch(docs)
        assert tokenizer.decode(pieces[-1][:-1]) == docs[-1]
    shards = manifest.shards("train")
    assert len(shards) >= 5  # the corpus is several shards long, so the resume tests below mean something
    longest_doc = max(len(ids) for ids in tokenizer.encode_batch(list(source.documents("train")))) + 1
    for shard in shards[:-1]:  # closed at the first document end past shard_tokens
        assert SHARD_TOKENS <= shard["tokens"] < SHARD_TOKENS + longest_doc
    for shard in shards:  # files hold exactly what the manifest says, and end at a document end
        tokens = np.fromfile(directory / shard["file"], np.uint16)
        assert len(tokens) == shard["tokens"] and tokens[-1] == tokenizer.eot_id
    assert shards[-1]["docs_end"] == len(list(source.documents("train")))
    assert not leftovers(directory)


def test_uint32_shards_hold_the_same_tokens(workdir: Path, reference: tuple[Path, Manifest], tmp_path: Path) -> None:
    manifest = run_prepare(workdir, tmp_path, dtype="uint32")
    assert manifest.settings["dtype"] == "uint32"
    assert (tmp_path / "train-00000.bin").stat().st_size == 4 * manifest.shards("train")[0]["tokens"]
    for split in ("train", "validation"):
        np.testing.assert_array_equal(stream(tmp_path, manifest, split), stream(*reference, split))
    assert shard_dtype(2**16) == "uint16" and shard_dtype(2**16 + 1) == "uint32"


def test_finished_directory_is_not_rewritten(workdir: Path, reference: tuple[Path, Manifest], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "shards"
    shutil.copytree(reference[0], directory)
    written: list[str] = []
    real_write = shard_files.atomic_write
    monkeypatch.setattr(shard_files, "atomic_write", lambda path, fill: (written.append(path.name),
                                                                         real_write(path, fill)))
    again = run_prepare(workdir, directory)
    assert not [name for name in written if name.endswith(".bin")]
    assert again.splits == reference[1].splits


def test_damaged_shard_is_written_again_with_the_ones_after_it(
    workdir: Path, reference: tuple[Path, Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "shards"
    shutil.copytree(reference[0], directory)
    damaged = directory / "train-00002.bin"
    damaged.write_bytes(damaged.read_bytes()[:-2])
    with pytest.raises(ConfigError, match="train-00002.bin is missing or has the wrong size"):
        make_module(workdir, directory)
    written: list[str] = []
    real_write = shard_files.atomic_write
    monkeypatch.setattr(shard_files, "atomic_write", lambda path, fill: (written.append(path.name),
                                                                         real_write(path, fill)))
    run_prepare(workdir, directory)
    shards = [name for name in written if name.endswith(".bin")]
    assert shards[0] == "train-00002.bin" and "train-00001.bin" not in shards and "train-00000.bin" not in shards
    assert shard_bytes(directory) == shard_bytes(reference[0])


PREPARE_SLOWLY = """
import signal, sys, time
from dqt_lightning.data import shard_files
from dqt_lightning.cli import main

# Ctrl-C as in a terminal, even when the test runs in a background job, which starts children with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

real_write = shard_files.atomic_write

def slow_write(path, fill):
    def slow_fill(file):
        fill(file)
        if path.suffix == ".bin":
            print("filled", path.name, flush=True)
            time.sleep(0.4)  # the SIGINT lands here: this shard exists only under its temporary name
    real_write(path, slow_fill)

shard_files.atomic_write = slow_write
main(sys.argv[1:])
"""


def prepare_args(workdir: Path, shard_dir: Path) -> list[str]:
    return ["prepare", "--config", str(CONFIGS / "ternary.yaml"), "--config", str(CONFIGS / "data/shards.yaml"),
            "--data.init_args.source.path", str(workdir / "corpus"), "--data.init_args.shard_dir", str(shard_dir),
            "--data.init_args.shard_tokens", str(SHARD_TOKENS), "--data.init_args.vocab_size", str(VOCAB),
            "--data.init_args.seq_len", str(SEQ_LEN), "--data.init_args.cache_dir", str(workdir / "cache"),
            "--data.init_args.source.val_fraction", "0.1", "--data.init_args.source.seed", "5"]  # as source_of


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupted_prepare_reruns_to_the_same_tokens_without_redoing_finished_shards(
    sig: signal.Signals, workdir: Path, reference: tuple[Path, Manifest], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    interrupted = tmp_path / "interrupted"
    script = tmp_path / "prepare_slowly.py"
    script.write_text(PREPARE_SLOWLY)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    process = subprocess.Popen([sys.executable, str(script), *prepare_args(workdir, interrupted)], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:  # wait until three shards are finished and the fourth is being written
            if line.strip() == "filled train-00003.bin":
                break
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    manifest = Manifest.load(interrupted)
    assert [s["file"] for s in manifest.shards("train")] == ["train-00000.bin", "train-00001.bin", "train-00002.bin"]
    assert sorted(p.name for p in interrupted.glob("*.bin")) == [s["file"] for s in manifest.shards("train")]
    assert not manifest.complete()
    if sig == signal.SIGINT:
        assert process.returncode == 130 and "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1].startswith("error: prepare interrupted; the finished shards are kept")
        assert not leftovers(interrupted)  # the half-written fourth shard is gone
    else:  # no cleanup runs under SIGKILL: the fourth shard is left under a temporary name, never under its own
        assert process.returncode == -signal.SIGKILL
        assert [p.name for p in interrupted.glob(".train-00003.bin.*.tmp")] == leftovers(interrupted)
    with pytest.raises(ConfigError, match="only partly prepared"):
        TokenShards(shard_dir=str(interrupted))
    finished = {p.name: p.stat().st_ino for p in interrupted.glob("*.bin")}

    written: list[str] = []
    real_write = shard_files.atomic_write
    monkeypatch.setattr(shard_files, "atomic_write", lambda path, fill: (written.append(path.name),
                                                                         real_write(path, fill)))
    main(prepare_args(workdir, interrupted))
    assert written and not set(finished) & set(written)  # finished shards were neither redone nor touched
    assert {name: (interrupted / name).stat().st_ino for name in finished} == finished
    # The same tokens as an uninterrupted run (the reference, prepared with the same settings through the API).
    assert shard_bytes(interrupted) == shard_bytes(reference[0])
    assert Manifest.load(interrupted).splits == reference[1].splits
    assert not leftovers(interrupted)
    assert "[prepare] shards" in capsys.readouterr().out


# --- the DataModule ---------------------------------------------------------------------------------------------------


def test_windows_span_shards_and_validation_is_in_order(workdir: Path, reference: tuple[Path, Manifest]) -> None:
    directory, manifest = reference
    module = make_module(workdir, directory)
    assert module.vocab_size == VOCAB  # right after __init__, for the CLI's link to the model
    train = stream(directory, manifest, "train").astype(np.int64)
    windows = module.train_windows
    assert len(windows) == len(train) // (SEQ_LEN + 1)
    every = windows.__getitems__(list(range(len(windows))))
    assert every.dtype == torch.long and every.shape == (len(windows), SEQ_LEN + 1)
    np.testing.assert_array_equal(every.flatten().numpy(), train[: every.numel()])
    boundary = manifest.shards("train")[0]["tokens"] // (SEQ_LEN + 1)  # the window that crosses into shard 1
    assert torch.equal(windows[boundary], every[boundary])
    val = torch.cat(list(module.val_dataloader()))
    assert torch.equal(val.flatten(), torch.from_numpy(stream(directory, manifest, "validation").astype(np.int64)
                                                       [: val.numel()]))
    assert torch.equal(torch.cat(list(module.test_dataloader())), val)
    module.setup("fit")
    assert module.tokenizer.fingerprint == manifest.settings["tokenizer_fingerprint"]
    assert 0 < module.unigram_entropy() < np.log(VOCAB)
    assert "\n" not in module.describe() and str(directory) in module.describe()


def test_seeded_order_is_reproducible_and_changes_per_epoch(workdir: Path, reference: tuple[Path, Manifest]) -> None:
    def epoch(seed: int, number: int) -> torch.Tensor:
        loader = make_module(workdir, reference[0], seed=seed).train_dataloader()
        loader.sampler.set_epoch(number)
        return torch.cat(list(loader))

    first = epoch(7, 0)
    assert torch.equal(first, epoch(7, 0))
    assert not torch.equal(first, epoch(8, 0)) and not torch.equal(first, epoch(7, 1))
    module = make_module(workdir, reference[0], seed=7)
    order = list(module.train_dataloader().sampler)
    assert sorted(order) == list(range(len(module.train_windows)))  # a shuffle: every window once per epoch
    assert len(first) == len(order) // 4 * 4  # incomplete last batch dropped
    assert torch.equal(first[:4], module.train_windows.__getitems__(order[:4]))


def test_worker_processes_read_the_same_batches(workdir: Path, reference: tuple[Path, Manifest]) -> None:
    in_process = make_module(workdir, reference[0]).train_dataloader()
    module = make_module(workdir, reference[0], num_workers=1)
    module.train_windows[0]  # opens the memmaps here: the worker must not depend on (or pickle) them
    assert module.train_windows.__getstate__()["_maps"] is None
    in_worker = module.train_dataloader()
    assert in_worker.persistent_workers and len(in_worker) == len(in_process)
    assert all(torch.equal(a, b) for a, b in zip(in_process, in_worker))


def test_ranks_get_disjoint_windows(workdir: Path, reference: tuple[Path, Manifest]) -> None:
    windows = make_module(workdir, reference[0]).train_windows
    ranks = [list(ResumableSampler(windows, 2, rank, seed=3, batch_size=4)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(windows) // 2
    assert not set(ranks[0]) & set(ranks[1])
    assert len(set(ranks[0]) | set(ranks[1])) >= len(windows) - 1


def test_data_position_resumes_with_the_next_batch(workdir: Path, reference: tuple[Path, Manifest]) -> None:
    module = make_module(workdir, reference[0])
    assert module.state_dict() == {}  # no trainer: nothing to save
    full = list(module.train_dataloader())
    resumed = make_module(workdir, reference[0])
    resumed.load_state_dict({"epoch": 0, "batches_done": 3})
    rest = list(resumed.train_dataloader())
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, full[3:]))


def test_fit_trains_from_shards_through_the_cli(workdir: Path, reference: tuple[Path, Manifest], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dqt_lightning"])  # main gets its arguments as a list, not from pytest's
    main(["fit", "--config", str(CONFIGS / "ternary.yaml"), "--config", str(CONFIGS / "data/shards.yaml"),
          "--data.init_args.shard_dir", str(reference[0]), "--data.init_args.vocab_size", str(VOCAB),
          "--data.init_args.source.path", str(workdir / "corpus"), "--data.init_args.seq_len", str(SEQ_LEN),
          "--data.init_args.batch_size", "4", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
          "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false"])
    out = capsys.readouterr().out
    assert "final validation loss" in out and "unigram entropy" in out


# --- bad input --------------------------------------------------------------------------------------------------------


def one_line(error: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_fit_before_prepare_says_to_run_prepare(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["dqt_lightning"])
    with pytest.raises(ConfigError) as error:
        make_module(workdir, tmp_path / "nothing")
    assert "python -m dqt_lightning prepare --config" in one_line(error) and "data.shard_dir" in one_line(error)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "ternary.yaml"), "--config", str(CONFIGS / "data/shards.yaml"),
              "--data.init_args.shard_dir", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.shard_dir=") and "prepare" in err[0]


def test_prepare_needs_the_shards_data_module(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["prepare", "--config", str(CONFIGS / "ternary.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.class_path: dqt_lightning.data.shards.TokenShards" in err[0]


def test_shards_of_another_tokenizer_are_refused(workdir: Path, reference: tuple[Path, Manifest],
                                                 tmp_path: Path) -> None:
    directory = reference[0]
    before = (directory / MANIFEST).read_bytes()
    with pytest.raises(ConfigError) as error:  # prepare into it with another vocabulary
        run_prepare(workdir, directory, vocab_size=VOCAB + 20)
    assert f"data.shard_dir={directory}" in one_line(error) and "tokenizer_fingerprint" in one_line(error)
    assert (directory / MANIFEST).read_bytes() == before and not leftovers(directory)
    with pytest.raises(ConfigError) as error:  # train on it with another vocabulary
        make_module(workdir, directory, vocab_size=VOCAB + 20)
    assert f"data.shard_dir={directory} was prepared with a different tokenizer" in one_line(error)
    other = train_bpe(make_docs(50, seed=9), VOCAB)
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ConfigError) as error:  # or with a tokenizer file that is not the one it was made with
        make_module(workdir, directory, tokenizer=str(tmp_path / "other.json"))
    assert "different tokenizer" in one_line(error)
    shutil.copy(directory / "tokenizer.json", tmp_path / "same.json")  # the same tokenizer under another name is fine
    assert make_module(workdir, directory, tokenizer=str(tmp_path / "same.json")).vocab_size == VOCAB


def test_a_shard_dir_that_is_a_file_is_refused_and_kept(workdir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as error:
        run_prepare(workdir, tmp_path / "notes.txt")
    assert one_line(error) == f"data.shard_dir={tmp_path / 'notes.txt'} is a file; give a directory for the shards"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_vocabulary_larger_than_the_dtype_is_refused(workdir: Path, reference: tuple[Path, Manifest],
                                                     tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        run_prepare(workdir, tmp_path / "shards", vocab_size=70_000, dtype="uint16")
    assert "data.dtype=uint16" in one_line(error) and "70000" in one_line(error)
    assert not (tmp_path / "shards").exists()
    with pytest.raises(ConfigError, match="data.dtype"):
        shard_dtype(VOCAB, "int8")
    directory = tmp_path / "edited"
    shutil.copytree(reference[0], directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["settings"]["vocab_size"] = 70_000  # a manifest that claims ids uint16 cannot hold
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as error:
        make_module(workdir, directory)
    assert str(directory / MANIFEST) in one_line(error) and "uint16" in one_line(error)


def test_corpus_shorter_than_a_window_is_refused(workdir: Path, reference: tuple[Path, Manifest]) -> None:
    val_tokens = reference[1].tokens("validation")
    with pytest.raises(ConfigError) as error:
        make_module(workdir, reference[0], seq_len=val_tokens)
    assert f"data.seq_len={val_tokens}" in one_line(error) and "validation shards" in one_line(error)
    train_windows = reference[1].tokens("train") // (SEQ_LEN + 1)
    with pytest.raises(ConfigError) as error:
        make_module(workdir, reference[0], batch_size=train_windows + 1)
    assert "train shards" in one_line(error)


def test_prepare_of_a_corpus_shorter_than_a_window_fails_at_prepare(workdir: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "tiny" / "t.jsonl", make_docs(30, seed=4))
    args = {"source": TextSource(path=str(tmp_path / "tiny"), val_fraction=0.05), "vocab_size": VOCAB,
            "shard_dir": str(tmp_path / "shards"), "seq_len": 2000, "cache_dir": str(workdir / "cache")}
    with pytest.raises(ConfigError) as error:
        prepare_from_config(args, progress=False)
    assert "data.seq_len=2000" in one_line(error)
    assert Manifest.load(tmp_path / "shards").complete() and not leftovers(tmp_path / "shards")  # whole, not half


@pytest.mark.parametrize("problem", ["empty file", "not UTF-8", "no text field"])
def test_bad_source_files_fail_in_one_line_and_write_nothing(problem: str, workdir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    good = write_jsonl(corpus / "a.jsonl", make_docs(20, seed=6))
    if problem == "empty file":
        bad, field = corpus / "b.jsonl", "b.jsonl is empty"
        bad.write_bytes(b"")
    elif problem == "not UTF-8":
        bad, field = corpus / "b.jsonl", "b.jsonl is not UTF-8"
        bad.write_bytes(good.read_bytes()[:200] + b"\xff\xfe caf\xe9\n" + good.read_bytes()[200:])
    else:
        bad, field = write_jsonl(corpus / "b.jsonl", make_docs(20, seed=7), field="body"), "text_field"
        good.unlink()
    shard_dir = tmp_path / "shards"
    with pytest.raises(ConfigError) as error:
        prepare(shard_dir, TextSource(path=str(corpus)), None, VOCAB, cache_dir=str(tmp_path / "cache"),
                progress=False)
    assert field in one_line(error)
    assert not list(shard_dir.glob("*.bin")) and not leftovers(shard_dir)
    assert not leftovers(tmp_path / "cache")


def test_default_shard_directory_follows_the_settings(workdir: Path) -> None:
    source = source_of(workdir)
    base = default_shard_dir(source, None, VOCAB, SHARD_TOKENS, None, 100, "c")
    assert base == default_shard_dir(source_of(workdir), None, VOCAB, SHARD_TOKENS, None, 100, "c")
    assert base.parent == Path("c/shards") and base.name.startswith(f"files-bpe{VOCAB}-")
    assert base != default_shard_dir(source, None, VOCAB + 1, SHARD_TOKENS, None, 100, "c")
    assert base != default_shard_dir(TextSource(), None, VOCAB, SHARD_TOKENS, None, 100, "c")
