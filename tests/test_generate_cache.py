"""Generation with a key-value cache: the same logits and tokens as recomputing the whole context, text streamed as
it is produced, and a prompt plus new tokens beyond the block size refused in one line."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dqt_lightning.data.tokenizer import TextTokenizer, train_bpe
from dqt_lightning.errors import ConfigError
from dqt_lightning.model import LLaMA
from dqt_lightning.tools.generate import TextStream, sample
from dqt_lightning.train.precision import Method, QuantPrecision
from dqt_lightning.commands import run as run_tool
from tests.conftest import SMALL

CONFIG = replace(SMALL, vocab_size=128, block_size=64)


def _model(mode: str) -> LLaMA:
    torch.manual_seed(0)
    model = LLaMA(CONFIG)
    for p in model.parameters():  # larger than the init, so that logits differ from token to token
        p.data.mul_(8)
    if mode != "fp":
        QuantPrecision(Method(mode=mode, bits=8)).convert_module(model)
    return model.eval()


@pytest.mark.parametrize("mode", ["fp", "dqt"])
def test_cached_logits_are_those_of_the_whole_context(mode):
    model = _model(mode)
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)[0]
        caches = model.kv_caches()
        prefill = model(tokens[:, :10], caches, 0)[0]  # a prompt of 10, then one token at a time
        steps = [model(tokens[:, i:i + 1], caches, i)[0, -1] for i in range(10, 24)]
    cached = torch.cat([prefill, torch.stack(steps)])
    assert torch.equal(cached.argmax(-1), full.argmax(-1))
    # Float summation order differs between the two attention calls. For DQT the 8-bit activation rounding can then
    # flip a level now and then, which moves a logit by more: rarely, and by a fraction of the logits' spread.
    gap = (cached - full).abs()
    if mode == "fp":
        assert gap.max() <= 1e-4
    else:
        assert gap.max() <= 0.02 * full.abs().max() and gap.mean() <= 1e-3 * full.abs().mean()


@pytest.mark.parametrize("mode", ["fp", "dqt"])
def test_cached_and_uncached_sampling_give_the_same_tokens(mode):
    model = _model(mode)
    runs = [sample(model, [1, 2, 3], 40, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(7),
                   kv_cache=cached) for cached in (True, False)]
    assert len(runs[0]) == 40 and runs[0] == runs[1]
    assert len(set(runs[0])) > 5  # really sampled, not one token over and over


def test_a_sample_longer_than_the_block_size_is_refused():
    with pytest.raises(ConfigError, match="--max-new-tokens 62 with a prompt of 3 tokens is more than the model's "
                                        "block size of 64 tokens"):
        sample(_model("fp"), [1, 2, 3], 62)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> tuple[Path, TextTokenizer]:
    """An export of a random float model with a small BPE: what `generate` loads, built without training."""
    out = tmp_path_factory.mktemp("export")
    docs = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen liquor jugs " * 20]
    tokenizer = TextTokenizer(train_bpe(docs, CONFIG.vocab_size), "test", CONFIG.vocab_size)
    tokenizer.save(out)
    model = _model("fp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("rope")},
              str(out / "model.safetensors"))
    quantization = {"mode": "fp", "bits": 32, "integer_weights": {}, "packed": {}}
    (out / "config.json").write_text(json.dumps({**asdict(CONFIG), "quantization": quantization}))
    return out, tokenizer


def test_generate_streams_the_text_and_reports_tokens_per_second(export_dir, capsys):
    out, tokenizer = export_dir
    assert run_tool(["generate", str(out), "--prompt", "the", "--max-new-tokens", "20", "--seed", "2",
                     "--top-k", "0"]) == 0
    written = capsys.readouterr()
    prompt = tokenizer.encode_batch(["the"])[0]
    from dqt_lightning.tools.loading import load_exported

    model, _ = load_exported(out)
    new = sample(model, prompt, 20, 0.8, None, torch.Generator().manual_seed(2), stop_id=tokenizer.eot_id)
    assert written.out == "the" + tokenizer.decode(new) + "\n"
    assert written.err.startswith(f"[generate] {len(new)} tokens in ") and "tokens/s)" in written.err
    assert run_tool(["generate", str(out), "--max-new-tokens", "64"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --max-new-tokens 64 with a prompt of 1 tokens is more than "
                                               "the model's block size of 64 tokens")


def test_the_stream_waits_for_a_whole_character(export_dir):
    _, tokenizer = export_dir
    ids = tokenizer.encode_batch(["fox é jugs"])[0]
    out = io.StringIO()
    stream = TextStream(tokenizer, out)
    seen = []
    for i in range(1, len(ids) + 1):
        stream(ids[:i])
        seen.append(out.getvalue())
    stream.finish(ids)
    assert out.getvalue() == "fox é jugs\n"
    assert all("\ufffd" not in text for text in seen)
