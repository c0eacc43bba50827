"""``export --format gguf`` checked against the real readers: gguf's own GGUFReader (the TQ blocks give back
``alpha * q``) and llama.cpp through llama-cpp-python (it loads the file, tokenizes as we do, and its next-token
log-probabilities are within a measured distance of ours).

Models: one block, n_embd 256 (rows of one TQ block), 4 heads, intermediate_size 256, vocabulary 512, trained three
steps through the CLI with norm_layout llama. gguf and llama_cpp are imported inside the tests: the plain suite
collects this file without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dqt_lightning.cli import main
from dqt_lightning.model import LLaMA
from dqt_lightning.quant.ternary import TernaryWeights
from dqt_lightning.tools.loading import integer_state, model_from_checkpoint, tokenizer_of_checkpoint
from dqt_lightning.tools.export_gguf import unpermute_rope_rows
from tests.trained import CONFIGS, trained_runs  # noqa: F401 - the fixture, for the subln refusal

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("one_thread")]

WIDE = ["--model.init_args.config.n_layer", "1", "--model.init_args.config.n_embd", "256",
        "--model.init_args.config.n_head", "4", "--model.init_args.config.intermediate_size", "256",
        "--model.init_args.config.block_size", "256"]
NARROW = ["--model.init_args.config.n_layer", "1", "--model.init_args.config.n_embd", "64",
          "--model.init_args.config.n_head", "2", "--model.init_args.config.intermediate_size", "128"]
STEPS = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--model.init_args.warmup_steps", "1", "--data.init_args.vocab_size", "512",
         "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4",
         "--model.init_args.config.norm_layout", "llama"]
# A fixed prompt (token ids below the trained BPE's 512) and sentences for the tokenizer check.
PROMPT = [0, 84, 72, 69, 220, 100, 101, 300, 301, 17, 260, 400, 33, 2, 87, 88, 450, 451, 12, 0, 70, 71, 272, 19]
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "  leading spaces, and\ttabs\nand newlines  ",
             "Numbers 12345 and 3.14, émigré café, 😀 emoji", "it's they're we've I'm you'll he'd"]
# Largest |log-probability difference| over the prompt and the whole vocabulary, ours against llama.cpp's. Measured
# (2-core x86_64, torch 2.13.0+cpu, gguf 0.19.0, llama-cpp-python 0.3.36): f16 0.0099, tq2_0 0.0062, tq1_0 0.0062,
# an 8-bit model exported with --ternary 0.0067. The f16 gap is our 8-bit activations, which llama.cpp's F16 matmul
# does not have: against our model without activation quantization it is 0.0006. The TQ types quantize activations
# as we do (per block of 256 = per token at these widths); what is left is 8-bit rounding flipped by float noise.
BOUNDS = {"f16": 0.015, "tq2_0": 0.01, "tq1_0": 0.01, "8bit-ternary": 0.01}
F16_WITHOUT_ACTIVATION_QUANTIZATION = 0.002  # measured 0.0006


def _fit(home: Path, data_cache: str, config: str, sizes: list[str]) -> Path:
    home.mkdir(parents=True)
    cwd, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(home)  # the CLI writes runs/ under the working directory
    torch.set_num_threads(1)
    try:
        main(["fit", "--config", str(CONFIGS / config), *STEPS, *sizes, "--data.init_args.cache_dir", data_cache])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    (ckpt,) = (home / "runs").glob("*/version_0/checkpoints/last.ckpt")
    return ckpt


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-runs")
    return {"ternary": _fit(root / "ternary", data_cache, "ternary.yaml", WIDE),
            "8bit": _fit(root / "8bit", data_cache, "ternary.yaml", [*WIDE, "--config", str(CONFIGS / "bits/8.yaml")])}


def _export(ckpt: Path, out: Path, *flags: str) -> Path:
    with pytest.raises(SystemExit) as done:
        main(["export", str(ckpt), "--format", "gguf", "--output", str(out), *flags])
    assert done.value.code == 0
    return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    files = {t: _export(runs["ternary"], out / f"ternary-{t}.gguf", "--type", t) for t in ("tq2_0", "tq1_0", "f16")}
    files["8bit-ternary"] = _export(runs["8bit"], out / "8bit-ternary-tq2_0.gguf", "--ternary")
    return files


def _weights(ckpt: Path, ternary: bool = False) -> tuple[LLaMA, dict[str, torch.Tensor]]:
    model, _ = model_from_checkpoint(ckpt)
    with torch.no_grad():
        if ternary:
            with TernaryWeights(model):
                return model, integer_state(model)[0]
        return model, integer_state(model)[0]


def _dequantized(tensors: dict[str, torch.Tensor], name: str) -> np.ndarray:
    w = tensors[f"{name}.weight"]
    if w.is_floating_point():
        return w.numpy()
    alpha = tensors[f"{name}.scale"].float()
    return (w.float() * alpha.reshape(-1, 1)).numpy()


PROJECTIONS = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


@pytest.mark.parametrize("kind", ["tq2_0", "tq1_0", "f16", "8bit-ternary"])
def test_gguf_reader_gives_back_alpha_times_q(runs, exports, kind):
    import gguf

    model, tensors = _weights(runs["8bit" if kind == "8bit-ternary" else "ternary"], ternary=kind == "8bit-ternary")
    reader = gguf.GGUFReader(exports[kind])
    fields = {name: field.contents() for name, field in reader.fields.items()}
    config = model.config
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == config.n_layer
    assert fields["llama.embedding_length"] == 256 and fields["llama.feed_forward_length"] == 256
    assert fields["llama.attention.head_count"] == fields["llama.attention.head_count_kv"] == 4
    assert fields["llama.rope.dimension_count"] == 64 and fields["llama.context_length"] == 256
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size == 512
    assert fields["tokenizer.ggml.tokens"][0] == "<|endoftext|>" and fields["tokenizer.ggml.eos_token_id"] == 0
    assert fields["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL
    qtype = {"tq2_0": "TQ2_0", "tq1_0": "TQ1_0", "f16": "F16", "8bit-ternary": "TQ2_0"}[kind]
    read = {t.name: t for t in reader.tensors}
    assert read["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert read["token_embd.weight"].tensor_type.name == read["output.weight"].tensor_type.name == "F16"
    np.testing.assert_array_equal(read["blk.0.ffn_norm.weight"].data, tensors["layers.0.mlp_norm.weight"].numpy())
    for name, short in PROJECTIONS.items():
        t = read[f"blk.0.{short}.weight"]
        assert t.tensor_type.name == qtype
        stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(256, 256)
        w = unpermute_rope_rows(stored, 4) if short in ("attn_q", "attn_k") else stored
        levels, alpha = tensors[f"layers.0.{name}.weight"], tensors[f"layers.0.{name}.scale"]
        assert set(levels.unique().tolist()) <= {-1, 0, 1} and alpha.dim() == 0
        if qtype == "F16":
            np.testing.assert_array_equal(w, _dequantized(tensors, f"layers.0.{name}").astype(np.float16))
            continue
        np.testing.assert_array_equal(w, np.float32(np.float16(alpha.item())) * levels.numpy().astype(np.float32))
        # Each block's own fp16 scale (its last two bytes) is alpha wherever the block holds a non-zero level.
        scales = t.data.reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])[:, -2:].copy().view(np.float16)[:, 0]
        nonzero = (stored.reshape(-1, 256) != 0).any(axis=1)
        assert nonzero.all() and (scales[nonzero] == np.float16(alpha.item())).all()


def _llama(path: Path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=1, n_batch=64, verbose=False)


def _llama_cpp_logprobs(path: Path, ids: list[int]) -> np.ndarray:
    llm = _llama(path)
    llm.eval(ids)
    logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return torch.log_softmax(logits, -1).numpy()


def _our_logprobs(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float()[0], -1).numpy()


def _float_twin(model: LLaMA, tensors: dict[str, torch.Tensor]) -> LLaMA:
    """Our model with the same (dequantized) weights as plain float layers: no activation quantization."""
    twin = LLaMA(model.config)
    twin.load_state_dict({name: torch.from_numpy(_dequantized(tensors, name.removesuffix(".weight")))
                          for name in twin.state_dict()})
    return twin.eval()


def measured_gaps(runs, exports) -> dict[str, tuple[float, float]]:
    """``{type: (max |logprob diff| against ours, against ours without activation quantization)}``."""
    gaps = {}
    for kind in ("f16", "tq2_0", "tq1_0", "8bit-ternary"):
        ckpt = runs["8bit" if kind == "8bit-ternary" else "ternary"]
        model, tensors = _weights(ckpt, ternary=kind == "8bit-ternary")
        theirs = _llama_cpp_logprobs(exports[kind], PROMPT)
        if kind == "8bit-ternary":
            with TernaryWeights(model):
                ours = _our_logprobs(model, PROMPT)
        else:
            ours = _our_logprobs(model, PROMPT)
        plain = _our_logprobs(_float_twin(model, tensors), PROMPT)
        gaps[kind] = (float(np.abs(ours - theirs).max()), float(np.abs(plain - theirs).max()))
    return gaps


def test_llama_cpp_runs_the_file_close_to_our_model(runs, exports):
    gaps = measured_gaps(runs, exports)
    print("\nmax |log-prob diff| vs ours, vs ours without activation quantization:",
          {k: (round(a, 5), round(b, 5)) for k, (a, b) in gaps.items()})
    for kind, (gap, _) in gaps.items():
        assert gap < BOUNDS[kind], (kind, gap)
    assert gaps["f16"][1] < F16_WITHOUT_ACTIVATION_QUANTIZATION


def test_llama_cpp_tokenizes_as_we_do(runs, exports):
    ours = tokenizer_of_checkpoint(runs["ternary"], 512)
    llm = _llama(exports["tq2_0"])
    for text in SENTENCES:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours.encode_batch([text])[0], text
    assert llm.token_eos() == ours.eot_id


@pytest.fixture(scope="module")
def narrow_run(tmp_path_factory, data_cache) -> Path:
    return _fit(tmp_path_factory.mktemp("gguf-narrow") / "ternary", data_cache, "ternary.yaml", NARROW)


def _refused(ckpt: Path, out: Path, capsys, *flags: str) -> str:
    with pytest.raises(SystemExit) as done:
        main(["export", str(ckpt), "--format", "gguf", "--output", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert list(out.parent.iterdir()) == []  # nothing written, not even a temp file
    return err


def test_refusals_are_one_line_and_write_nothing(runs, narrow_run, trained_runs, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    subln = trained_runs.checkpoint("ternary")  # the shared runs keep the default norm_layout, subln
    err = _refused(subln, out, capsys)
    assert "norm_layout llama" in err and "norm_layout subln" in err and "ties the output head" in err
    err = _refused(runs["8bit"], out, capsys)
    assert "--ternary" in err and "--type f16" in err and "8-bit dqt model" in err
    err = _refused(runs["8bit"], out, capsys, "--type", "tq1_0")
    assert err.startswith("error: --type tq1_0")
    err = _refused(narrow_run, out, capsys)
    assert "layers.0.attn.q_proj has rows of 64" in err and "--type f16" in err
