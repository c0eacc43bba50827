"""``export --format hf`` checked against transformers' real loader: ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` on the exported directory, no ``trust_remote_code``.

- Ternary models (DQT at 1.58 bits, BitNet STE at 1.58 bits) in each norm layout go into transformers' BitNet
  layout (packed uint8 levels, ``weight_scale``, ``AutoBitLinear``), and reproduce our logits: with 8-bit activation
  quantization on both sides, the same top-1 token almost everywhere and logits within 2e-2 (an 8-bit rounding that
  lands on .5 can go either way on float noise); with it off on both sides, float noise. ``bitlinear`` keeps
  transformers' Llama pre-norms (written as ones) in front of its per-projection norms: a measured, bounded gap.
- An 8-bit DQT model goes out as a float ``LlamaForCausalLM``, equal to ours with activation quantization off (the
  float model has none); ``--ternary`` on it gives the BitNet layout and equals our ternary evaluation.
- The tokenizer gives our ids through ``AutoTokenizer`` and decodes them back to the text.
- What the layouts cannot hold is refused in one line, and nothing is written.

Activation quantization is switched off by replacing the quantizer with the identity on both sides: ours is
``dqt_lightning.quant.layers.quantize_input`` (DQT layers) and ``dqt_lightning.quant.bitnet.quantize_activations``
(BitNet STE layers), transformers' is ``transformers.integrations.bitnet.ActQuant.apply``, which ``AutoBitLinear``
calls on its input.

Models: one block, n_embd 64, 2 heads, intermediate_size 128, vocabulary 512, four training steps through the CLI.
transformers is imported inside the tests: the plain suite collects this file without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dqt_lightning.cli import main
from dqt_lightning.quant import bitnet, layers
from dqt_lightning.quant.ternary import TernaryWeights
from dqt_lightning.tools.loading import model_from_checkpoint, tokenizer_of_checkpoint
from dqt_lightning.tools.export_hf import pack_ternary_rows
from dqt_lightning.commands import run as run_tool

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("one_thread")]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = ["--model.init_args.config.n_layer", "1", "--model.init_args.config.n_embd", "64",
         "--model.init_args.config.n_head", "2", "--model.init_args.config.intermediate_size", "128",
         "--data.init_args.vocab_size", "512", "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4",
         "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--model.init_args.warmup_steps", "1"]
TOKENS = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
# Largest |logit difference| with activation quantization off on both sides, measured on a 2-core x86_64 CPU (torch
# 2.13.0+cpu, transformers 5.24.0), with room: float noise, except bitlinear. There transformers' Llama pre-norm
# (weight ones) normalises the input before the projection's own RMSNorm sees it, so that norm's epsilon meets a
# mean square of about 1, not ms(x): ours gives the projection x / sqrt(ms(x) + eps), transformers' about
# x / sqrt(ms(x)), larger by sqrt(1 + eps / ms(x)). With eps 1e-6 and the embedding's entries at ~0.02 (ms ~4e-4)
# that is ~1e-3 relative; measured 2.8e-4 on the logits. It shrinks as the residual stream grows.
OFF_BOUND = {"subln": 1e-5, "llama": 1e-5, "bitlinear": 1e-3}


class Runs:
    """Tiny runs trained through the CLI when a test first asks for one, kept for the module."""

    def __init__(self, root: Path, data_cache: str) -> None:
        self.root, self.data_cache, self.done = root, data_cache, {}

    def checkpoint(self, config: str, layout: str = "subln", *extra: str, steps: int = 4) -> Path:
        key = (config, layout, *extra, steps)
        if key not in self.done:
            home = self.root / f"run{len(self.done)}"
            home.mkdir()
            cwd, threads = Path.cwd(), torch.get_num_threads()
            os.chdir(home)  # the CLI writes runs/ under the working directory
            torch.set_num_threads(1)  # as conftest.one_thread: module fixtures are set up before a test's fixtures
            try:
                main(["fit", "--config", str(CONFIGS / config), *SIZES, "--model.init_args.config.norm_layout", layout,
                      "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps), *extra,
                      "--data.init_args.cache_dir", self.data_cache])
            finally:
                os.chdir(cwd)
                torch.set_num_threads(threads)
            (self.done[key],) = (home / "runs").glob("*/version_0/checkpoints/last.ckpt")
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache) -> Runs:
    return Runs(tmp_path_factory.mktemp("hf-runs"), data_cache)


@pytest.fixture(scope="module")
def transformers():
    import transformers  # noqa: PLC0415 - the optional package, imported only by the interop tests

    transformers.logging.set_verbosity_error()  # CPU loading warns that unpacking is slow
    return transformers


def _export(ckpt: Path, out: Path, *flags: str) -> Path:
    assert run_tool(["export", str(ckpt), "--format", "hf", "--output", str(out), *flags]) == 0
    return out


def _load(transformers, out: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _logits(ours, hf, ternary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        if ternary:
            with TernaryWeights(ours):
                mine = ours(TOKENS)
        else:
            mine = ours(TOKENS)
        return mine, hf(TOKENS).logits


def _without_activation_quantization(monkeypatch, transformers):
    """A monkeypatch context in which neither side quantizes activations (see the module's text)."""
    from transformers.integrations import bitnet as hf_bitnet  # noqa: PLC0415

    context = monkeypatch.context()
    m = context.__enter__()
    m.setattr(layers, "quantize_input", lambda x, dtype: x.to(dtype))
    m.setattr(bitnet, "quantize_activations", lambda x, strength=1.0: x)
    m.setattr(hf_bitnet.ActQuant, "apply", staticmethod(lambda x: x))
    return context


def _gaps(ours, hf, monkeypatch, transformers, ternary: bool = False) -> tuple[float, float, float]:
    """(top-1 agreement and max |logit diff| with activation quantization on, max |logit diff| with it off)."""
    mine, theirs = _logits(ours, hf, ternary)
    agree = (mine.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    on = (mine - theirs).abs().max().item()
    context = _without_activation_quantization(monkeypatch, transformers)
    try:
        mine, theirs = _logits(ours, hf, ternary)
    finally:
        context.__exit__(None, None, None)
    off = (mine - theirs).abs().max().item()
    print(f"top-1 {agree:.2%}, max |diff| {on:.2e} with activation quantization, {off:.2e} without")
    return agree, on, off


def test_packing_is_transformers_own(transformers):
    from transformers.integrations.bitnet import pack_weights, unpack_weights  # noqa: PLC0415

    q = torch.randint(-1, 2, (12, 5), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    packed = pack_ternary_rows(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5)
    assert torch.equal(packed, pack_weights(q.clone()))
    assert torch.equal(unpack_weights(packed, dtype=torch.float32), q.float())


@pytest.mark.parametrize("config", ["ternary.yaml", "bitnet.yaml"])
@pytest.mark.parametrize("layout", ["subln", "llama", "bitlinear"])
def test_ternary_models_load_as_transformers_bitnet(runs, transformers, config, layout, tmp_path, monkeypatch):
    ckpt = runs.checkpoint(config, layout)
    out = _export(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["BitNetForCausalLM" if layout == "subln" else "LlamaForCausalLM"]
    assert written["tie_word_embeddings"] is False and written["max_position_embeddings"] == 2048
    assert written["rope_parameters"]["rope_theta"] == written["rope_theta"] == 10000.0
    assert written["dtype"] == written["torch_dtype"] == "float32"
    quant = written["quantization_config"]
    assert {k: quant[k] for k in ("quant_method", "linear_class", "quantization_mode")} == {
        "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
    assert quant["modules_to_not_convert"] == ["lm_head"] and quant["use_rms_norm"] == (layout == "bitlinear")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        down = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert down.dtype == torch.uint8 and down.shape == (16, 128) and scale.shape == (1,)

    hf = _load(transformers, out)
    assert type(hf).__name__ == written["architectures"][0]
    assert type(hf.model.layers[0].mlp.down_proj).__name__ == "AutoBitLinear"
    ours, _ = model_from_checkpoint(ckpt)
    agree, on, off = _gaps(ours, hf, monkeypatch, transformers)
    assert agree >= 0.97 and on <= 2e-2
    assert off <= OFF_BOUND[layout]


def test_tokenizer_round_trips_through_auto_tokenizer(runs, transformers, tmp_path):
    ckpt = runs.checkpoint("ternary.yaml")
    out = _export(ckpt, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = tokenizer_of_checkpoint(ckpt, 512)
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == ours.eot_id
    texts = ["The quick brown fox jumps over the lazy dog.", "  two spaces, a\ttab\nand a newline  ",
             "numbers 12345, émigré café 😀", "a literal <|endoftext|> stays text"]
    for text in texts:
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.encode_batch([text])[0]
        assert hf_tokenizer.decode(ids) == text
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["bos_token_id"] == ours.eot_id


def test_an_8bit_model_is_a_float_llama_equal_to_ours_without_activation_quantization(runs, transformers, tmp_path,
                                                                                        monkeypatch):
    ckpt = runs.checkpoint("ternary.yaml", "llama", "--config", str(CONFIGS / "bits/8.yaml"))
    out = _export(ckpt, tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in written
    hf = _load(transformers, out)
    assert type(hf.model.layers[0].mlp.down_proj) is torch.nn.Linear
    ours, _ = model_from_checkpoint(ckpt)
    # Ours rounds every projection's input to 8 bits per token; the float model does not: equal only without that.
    agree, on, off = _gaps(ours, hf, monkeypatch, transformers)
    assert off <= 1e-5
    assert agree >= 0.97 and on <= 2e-2  # the 8-bit activation rounding itself, measured 2.1e-3

    # bfloat16: every tensor in bf16, the same model up to bf16 rounding.
    out16 = _export(ckpt, tmp_path / "hf16", "--dtype", "bfloat16")
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out16 / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    hf16 = _load(transformers, out16)
    with torch.no_grad():
        logits16 = hf16(TOKENS).logits.float()
        logits32 = hf(TOKENS).logits
    assert (logits16 - logits32).abs().max().item() <= 2e-2  # measured 3.8e-3


def test_ternary_flag_gives_the_bitnet_layout_of_our_ternary_evaluation(runs, transformers, tmp_path, monkeypatch):
    ckpt = runs.checkpoint("ternary.yaml", "llama", "--config", str(CONFIGS / "bits/8.yaml"))
    out = _export(ckpt, tmp_path / "hf", "--ternary")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"]
    assert written["quantization_config"]["quant_method"] == "bitnet"
    hf = _load(transformers, out)
    ours, _ = model_from_checkpoint(ckpt)
    agree, on, off = _gaps(ours, hf, monkeypatch, transformers, ternary=True)
    assert agree >= 0.97 and on <= 2e-2
    assert off <= 1e-5


def _refused(ckpt: Path, out: Path, capsys, *flags: str) -> str:
    assert run_tool(["export", str(ckpt), "--format", "hf", "--output", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())
    return err


def test_refusals_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    per_row = runs.checkpoint("ternary.yaml", "subln", "--config", str(CONFIGS / "ablation/per-row-scale.yaml"),
                              steps=1)
    assert "per_row_scale" in _refused(per_row, out, capsys)
    embeddings = runs.checkpoint("ternary.yaml", "subln", "--config",
                                 str(CONFIGS / "ablation/quantized-embeddings.yaml"), steps=1)
    assert "quantize_embeddings" in _refused(embeddings, out, capsys)
    odd = runs.checkpoint("ternary.yaml", "llama", "--model.init_args.config.intermediate_size", "66", steps=1)
    err = _refused(odd, out, capsys)
    assert "multiple of 4" in err and "intermediate_size" in err
    float_bitlinear = runs.checkpoint("fp.yaml", "bitlinear", steps=1)
    err = _refused(float_bitlinear, out, capsys)
    assert "norm_layout bitlinear" in err and "--ternary" in err
