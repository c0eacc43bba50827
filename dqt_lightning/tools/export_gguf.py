"""``python -m dqt_lightning export CKPT --format gguf``: a trained model as one GGUF file that llama.cpp runs.

The file is llama.cpp's plain ``llama`` architecture, with the tensor names and metadata keys its converter
(``convert_hf_to_gguf.py``) writes for a Hugging Face ``LlamaForCausalLM``:

- The seven projections of every block as ``TQ2_0`` (2.06 bits per weight) or ``TQ1_0`` (1.69 bits per weight) when
  they are ternary, or as ``F16`` with ``--type f16`` (any bit width, or full precision). A ternary weight ``alpha *
  q`` goes into TQ blocks losslessly: each block of 256 weights keeps one fp16 scale, its absmax, which is ``alpha``
  in every block holding a non-zero level, and the levels come back exactly (checked on every tensor as it is
  written). ``--ternary`` re-quantizes any model to ternary first, by the rules of ternary validation
  (:class:`~dqt_lightning.quant.ternary.TernaryWeights`: least-squares scales for DQT weights, BitNet's absmean for
  BitNet and full-precision ones).
- The token embedding and the output head in ``F16`` (dequantized where they are quantized), the RMSNorm gains in
  ``F32``.
- The query and key rows permuted from the rotate-half RoPE layout (ours, and Hugging Face LLaMA's) to the
  interleaved-pairs layout llama.cpp's ``llama`` graph rotates, as its converter does: a permutation of whole rows,
  so ternary levels and their scales move with them.
- The byte-level BPE tokenizer as ``tokenizer.ggml.model = gpt2`` with the GPT-2 pre-tokenizer (``gpt-2``), its
  tokens in id order (padded with unused ``[PAD<i>]`` tokens up to the model's vocabulary), merges, and the
  end-of-text token as both BOS and EOS, never added by the tokenizer.

Only the ``llama`` norm layout fits that graph: llama.cpp's ``bitnet`` architecture has the ``subln`` sub-norms but
ties the output head to the token embedding (our head is a separate matrix), and the ``bitlinear`` layout's RMSNorm
inside every projection has no place in either graph. Those are refused in one line, as are a SentencePiece
tokenizer, a non-ternary model with a TQ type, and rows that are not a multiple of 256 weights with a TQ type.

llama.cpp quantizes a TQ matmul's activations to 8 bits per block of 256 values (``q8_K``), ours per token: the same
thing when a row is 256 wide, close otherwise. docs/interop.md lists the measured differences.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dqt_lightning.errors import ConfigError, require_extra
from dqt_lightning.files import atomic_write
from dqt_lightning.quant.ternary import TernaryWeights
from dqt_lightning.tools.loading import (integer_state, model_from_checkpoint, resolve_checkpoint,
                                         tokenizer_of_checkpoint)

QK_K = 256  # weights per TQ1_0 / TQ2_0 block, and per block of llama.cpp's 8-bit activations
# Our module names (llama layout) -> llama.cpp's tensor names in block N (gguf's MODEL_TENSOR names for LLAMA).
PROJECTIONS = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
NORMS = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm"}
LAYOUT_REFUSALS = {
    "subln": "llama.cpp's bitnet architecture has the subln sub-norms but ties the output head to the token embedding, "
             "and this model's head is a separate matrix",
    "bitlinear": "the RMSNorm inside every projection has no place in llama.cpp's llama or bitnet graphs",
}


def export_gguf(ckpt: Path, out: Path, gguf_type: str = "tq2_0", ternary: bool = False) -> Path:
    """Write the model of checkpoint ``ckpt`` as one GGUF file at ``out`` (whole or not at all).

    Args:
        ckpt: A checkpoint written by ``fit``, or a run directory standing for its ``checkpoints/last.ckpt``.
        out: The ``.gguf`` file to write; replaced when it exists.
        gguf_type: ``tq2_0``, ``tq1_0`` (ternary projections) or ``f16`` (every projection in fp16).
        ternary: Re-quantize every projection to ternary first, as ternary validation does.

    Returns:
        ``out``.
    """
    require_extra("gguf", "gguf", "export --format gguf")
    import gguf  # noqa: PLC0415 - the optional dependency, checked just above

    if gguf_type not in ("tq2_0", "tq1_0", "f16"):
        raise ConfigError(f"--type must be tq2_0, tq1_0 or f16; got '{gguf_type}'")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--output {out} is a directory; give the .gguf file to write")
    ckpt = resolve_checkpoint(ckpt)
    model, settings = model_from_checkpoint(ckpt)
    config = model.config
    if config.norm_layout != "llama":
        raise ConfigError(f"--format gguf needs norm_layout llama (llama.cpp's llama architecture); this model has "
                          f"norm_layout {config.norm_layout}: {LAYOUT_REFUSALS[config.norm_layout]}")
    if config.rope_type != "default":
        raise ConfigError(f"--format gguf writes unscaled rotary frequencies; this model has rope_type "
                          f"{config.rope_type} (use --format hf)")
    tokenizer = tokenizer_of_checkpoint(ckpt, config.vocab_size)
    vocab = _gpt2_vocab(tokenizer, config.vocab_size, ckpt)
    qtype = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0,
             "f16": gguf.GGMLQuantizationType.F16}[gguf_type]
    file_type = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                 "f16": gguf.LlamaFileType.MOSTLY_F16}[gguf_type]

    with torch.no_grad():
        if ternary:
            with TernaryWeights(model):
                tensors, _ = integer_state(model)
        else:
            tensors, _ = integer_state(model)
        projections = {f"layers.{i}.{name}": f"blk.{i}.{short}"
                       for i in range(config.n_layer) for name, short in PROJECTIONS.items()}
        if qtype != gguf.GGMLQuantizationType.F16:
            _check_ternary_fits(tensors, projections, gguf_type, settings, config)

        writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _add_metadata(writer, gguf, config, file_type, ckpt)
        _add_vocab(writer, gguf, vocab)
        writer.add_tensor("token_embd.weight", _float(tensors, "embed_tokens").astype(np.float16))
        for i in range(config.n_layer):
            for name, short in NORMS.items():
                writer.add_tensor(f"blk.{i}.{short}.weight", _float(tensors, f"layers.{i}.{name}"))
        for name, gguf_name in projections.items():
            weight, levels, alpha = _projection(tensors, name)
            if name.endswith(("q_proj", "k_proj")):  # rotate-half -> llama.cpp's interleaved pairs
                heads = config.n_head if name.endswith("q_proj") else config.kv_heads
                weight, levels, alpha = (permute_rope_rows(t, heads) for t in (weight, levels, alpha))
            if qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(f"{gguf_name}.weight", weight.astype(np.float16))
            else:
                blocks = gguf.quants.quantize(weight, qtype)
                _check_lossless(gguf, blocks, qtype, levels, alpha, gguf_name)
                writer.add_tensor(f"{gguf_name}.weight", blocks, raw_dtype=qtype)
        writer.add_tensor("output_norm.weight", _float(tensors, "norm"))
        if not config.tie_word_embeddings:  # without an output tensor llama.cpp ties the head to token_embd
            writer.add_tensor("output.weight", _float(tensors, "lm_head").astype(np.float16))
        _write_whole(writer, gguf, out)
    return out


def permute_rope_rows(w: np.ndarray | None, n_head: int) -> np.ndarray | None:
    """Rows of a query or key projection (or their per-row scales) reordered from the rotate-half RoPE layout, which
    pairs dimension ``i`` of a head with ``i + head_size/2``, to the interleaved one, which pairs ``2i`` with
    ``2i + 1`` (``LlamaModel.permute`` in llama.cpp's converter)."""
    if w is None or w.ndim == 0 or w.shape[0] == 1:
        return w  # no levels (a float weight), or one scale for the whole tensor
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_rope_rows`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _float(tensors: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """A float32 weight (``alpha * q`` where the module is quantized)."""
    weight = tensors[f"{name}.weight"]
    if weight.is_floating_point():
        return weight.float().numpy()
    alpha = tensors[f"{name}.scale"].float()
    return (weight.float() * (alpha if alpha.dim() == 0 else alpha.reshape(-1, 1))).numpy()


def _projection(tensors: dict[str, torch.Tensor], name: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(float32 weight, integer levels or None, scales as a column or None)`` of one projection."""
    weight = tensors[f"{name}.weight"]
    if weight.is_floating_point():
        return weight.float().numpy(), None, None
    alpha = tensors[f"{name}.scale"].float().reshape(-1, 1).numpy()
    return _float(tensors, name), weight.numpy().astype(np.int8), alpha


def _check_ternary_fits(tensors: dict[str, torch.Tensor], projections: dict[str, str], gguf_type: str,
                        settings: dict, config) -> None:
    for name in projections:
        weight = tensors[f"{name}.weight"]
        if weight.is_floating_point() or int(weight.abs().max()) > 1:
            what = "full-precision" if settings["mode"] == "fp" else f"{settings['bits']:g}-bit {settings['mode']}"
            raise ConfigError(f"--type {gguf_type} holds ternary weights, but {name} of this {what} model is not "
                              f"ternary; add --ternary to re-quantize it as ternary validation does, or use --type f16")
        if weight.shape[1] % QK_K:
            raise ConfigError(f"--type {gguf_type} packs rows in blocks of {QK_K} weights, but {name} has rows of "
                              f"{weight.shape[1]} (n_embd {config.n_embd}, intermediate_size "
                              f"{config.intermediate_size}); use --type f16")


def _check_lossless(gguf, blocks: np.ndarray, qtype, levels: np.ndarray, alpha: np.ndarray, name: str) -> None:
    """The TQ blocks give back ``fp16(alpha) * q`` exactly: every block holding a non-zero level has ``alpha`` as its
    scale and the levels unchanged."""
    expected = alpha.astype(np.float16).astype(np.float32) * levels.astype(np.float32)
    if not np.array_equal(gguf.quants.dequantize(blocks, qtype), expected):
        raise RuntimeError(f"{name}: the {qtype.name} blocks do not reproduce alpha * q (a block scale is not alpha)")


def _gpt2_vocab(tokenizer, vocab_size: int, ckpt: Path) -> dict:
    """Tokens in id order, their types, the merges and the end-of-text id of a byte-level BPE tokenizer."""
    import gguf  # noqa: PLC0415

    if tokenizer is None:
        raise ConfigError(f"checkpoint {ckpt} has no tokenizer (neither inside it nor beside its run's config.yaml); "
                          "a GGUF file needs one")
    if tokenizer.is_sentencepiece:
        raise ConfigError(f"--format gguf supports byte-level BPE tokenizers (tokenizer.json); {tokenizer.origin} is "
                          "a SentencePiece model")
    spec = json.loads(tokenizer.definition()[1])
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    gpt2_like = (model.get("type") == "BPE" and not spec.get("normalizer") and pre.get("type") == "ByteLevel"
                 and not pre.get("add_prefix_space") and pre.get("use_regex", True)
                 and not model.get("byte_fallback") and not model.get("ignore_merges"))
    if not gpt2_like:
        raise ConfigError(f"--format gguf supports GPT-2-style byte-level BPE tokenizers (ByteLevel pre-tokenizer, "
                          f"no normalizer); {tokenizer.origin} is not one")
    ids = {token: int(i) for token, i in model["vocab"].items()}
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    ids.update({t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])})
    by_id = {i: token for token, i in ids.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "eot": tokenizer.eot_id}


def _add_metadata(writer, gguf, config, file_type, ckpt: Path) -> None:
    # A run's checkpoint is named after its run (runs/<name>/version_N), any other after its file.
    path = ckpt.resolve()
    run = f"{path.parents[2].name}/{path.parents[1].name}" if path.parent.name == "checkpoints" else path.stem
    writer.add_name(f"dqt_lightning {run}")
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    if config.head_size * config.n_head != config.n_embd:
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer, gguf, vocab: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's pre-tokenizer whose regex is GPT-2's, as ByteLevel's default
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["eot"])
    writer.add_eos_token_id(vocab["eot"])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _write_whole(writer, gguf, out: Path) -> None:
    """The GGUF file through :func:`~dqt_lightning.files.atomic_write`: a reader finds all of it or none."""

    def write(f) -> None:
        # The writer normally opens its own path; handing it the temp file keeps the whole-or-nothing rename.
        writer.fout, writer.state = [f], gguf.gguf_writer.WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.fout = None  # the file is atomic_write's to close

    try:
        atomic_write(out, write)
    except OSError as error:
        raise ConfigError(f"--output {out} cannot be written: {error.strerror or error}") from error

