"""``python -m dqt_lightning export CKPT --format hf``: a model directory that Hugging Face transformers loads with
``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``, no custom code.

Two layouts, chosen from what the checkpoint holds:

- **ternary** (a DQT model whose every projection holds only the levels -1, 0 and 1 times one scale, a BitNet STE
  model at 1.58 bits, or any model with ``--ternary``): transformers' own BitNet layout, as Microsoft's
  ``bitnet-b1.58-2B-4T`` uses it. ``config.json`` carries ``quantization_config = {"quant_method": "bitnet",
  "linear_class": "autobitlinear", "quantization_mode": "offline"}``; each projection's ``weight`` is ``uint8``, four
  levels per byte (level + 1 in two bits, planar along the output rows: byte row ``j`` holds rows ``j, j+R, j+2R,
  j+3R`` in bits 0-1, 2-3, 4-5, 6-7, ``R = out/4``, as ``transformers.integrations.bitnet.unpack_weights`` reads
  them) and ``weight_scale`` of shape ``(1,)`` is our ``alpha`` (``AutoBitLinear`` computes ``linear(actquant(x), q)
  * weight_scale``, and quantizes ``x`` per token to 8 bits as we do). The embedding, the norms and the head stay
  float (``modules_to_not_convert: ["lm_head"]``). The architecture follows ``norm_layout``: ``subln`` is
  ``BitNetForCausalLM`` (its ``attn_sub_norm`` and ``ffn_sub_norm``, ``hidden_act: silu``), ``llama`` is
  ``LlamaForCausalLM``, ``bitlinear`` is ``LlamaForCausalLM`` with ``use_rms_norm`` (an RMSNorm with weights inside
  every quantized projection, ``<proj>.rms_norm.weight``). Llama keeps its block pre-norms, which our ``bitlinear``
  layout has not: they are written as ones, and the only difference left is where the epsilon enters. The
  projection's norm sees an input the pre-norm already normalised (mean square about 1), so it computes about
  ``x / sqrt(ms(x))`` where ours computes ``x / sqrt(ms(x) + eps)``: larger by ``sqrt(1 + eps / ms(x))``, about
  1e-3 relative for a tiny model's embedding (entries ~0.02), less once the residual stream grows.
- **float** (n-bit DQT, BitNet STE at other bit widths, full precision): a plain float ``LlamaForCausalLM``
  (``llama`` layout) or ``BitNetForCausalLM`` without quantization (``subln``), weights dequantized to ``alpha * q``
  in ``--dtype``. transformers has no 8-bit activation quantizer outside its BitNet layers, so this model equals ours
  with activation quantization switched off; our own forward of an n-bit model rounds activations to 8 bits.

Refused, in one line each: per-row scales in the ternary layout (``weight_scale`` is one number), projections whose
output width is not a multiple of 4 (the packing), quantized embeddings and head (transformers keeps both float and
does not quantize the head's input, so the export would not be the trained model), ``bitlinear`` without
``--ternary`` unless the model is ternary (no float transformers architecture normalises inside each projection),
and a SentencePiece tokenizer (its conversion to transformers' tokenizers is not checked here; the weights would be
fine, so export without it is not offered either).

The tokenizer goes in as ``tokenizer.json`` with a ``tokenizer_config.json`` (``PreTrainedTokenizerFast``, the
end-of-text token as bos, eos and unk, ``split_special_tokens`` as our tokenizer encodes a literal
``<|endoftext|>`` as text), so ``AutoTokenizer`` gives our ids. ``generation_config.json`` sets the end-of-text id
as bos, eos and pad.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from dqt_lightning.errors import ConfigError, require_extra
from dqt_lightning.files import atomic_directory, check_replaceable_directory
from dqt_lightning.model import LLaMA
from dqt_lightning.pretrained import hf_name
from dqt_lightning.quant.ternary import TernaryWeights
from dqt_lightning.tools.loading import (integer_state, model_from_checkpoint, resolve_checkpoint,
                                         tokenizer_of_checkpoint)

HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def export_hf(ckpt: Path, out: Path, dtype: str = "float32", ternary: bool = False) -> Path:
    """Write a transformers model directory for checkpoint ``ckpt`` to ``out`` (whole, or not at all).

    Args:
        ckpt: A checkpoint written by ``fit``, or a run directory for its ``checkpoints/last.ckpt``.
        out: The directory to write; an earlier export there is replaced whole.
        dtype: ``float32`` or ``bfloat16``: the dtype of every float tensor (all of them in the float layout; the
            embedding, norms, head and scales in the ternary one, whose packed levels are ``uint8`` either way).
        ternary: Re-quantize every projection to ternary first (as validation's ternary evaluation,
            :class:`~dqt_lightning.quant.ternary.TernaryWeights`), so that any model goes into the ternary layout.

    Returns:
        The output directory.
    """
    require_extra("transformers", "hf", "export --format hf")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got '{dtype}'")
    out = Path(out)
    check_replaceable_directory(out, HF_FILES, "hf export")
    ckpt = resolve_checkpoint(ckpt)
    model, settings = model_from_checkpoint(ckpt)
    config = model.config
    if settings["quantize_embeddings"]:
        raise ConfigError(f"checkpoint {ckpt} has quantized embeddings (trainer.plugins.method.quantize_embeddings): "
                          "transformers keeps the embedding and head float and does not quantize the head's input; "
                          "use --format dqt")
    levels = _ternary_levels(model, settings, ternary, ckpt)
    if levels is None and config.norm_layout == "bitlinear":
        raise ConfigError(f"checkpoint {ckpt} has norm_layout bitlinear and {_describe(settings)} weights: "
                          "transformers has it only as its ternary BitNet layout (use_rms_norm); add --ternary")
    tensors = _hf_tensors(model, levels, DTYPES[dtype])
    tokenizer = tokenizer_of_checkpoint(ckpt, config.vocab_size)
    if tokenizer is not None and tokenizer.is_sentencepiece:
        raise ConfigError(f"checkpoint {ckpt} has a SentencePiece tokenizer: --format hf writes tokenizer.json "
                          "tokenizers only; use --format dqt")
    eot = tokenizer.eot_id if tokenizer is not None else None
    hf_config = _hf_config(model, levels is not None, dtype, eot)
    with atomic_directory(out, "--output") as staging:
        (staging / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
        written = json.loads(hf_config.to_json_string(use_diff=False))
        # transformers 5 reads rope_parameters and dtype; 4.x read these two (5 ignores them, checked on 5.24).
        written.update(rope_theta=config.rope_base, torch_dtype=dtype)
        if config.rope_type != "default":
            written["rope_scaling"] = {k: v for k, v in written["rope_parameters"].items() if k != "rope_theta"}
        (staging / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            from transformers import GenerationConfig  # noqa: PLC0415 - the optional dependency

            generation = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
            (staging / "generation_config.json").write_text(generation.to_json_string())
            name, data = tokenizer.definition()
            (staging / name).write_bytes(data)
            token = tokenizer.backend.id_to_token(eot)
            (staging / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token, "eos_token": token,
                "unk_token": token, "pad_token": token, "model_max_length": config.block_size,
                "clean_up_tokenization_spaces": False, "split_special_tokens": True}, indent=2))
    return out


def _describe(settings: dict) -> str:
    if settings["mode"] == "fp":
        return "full-precision"
    bits = settings["bits"]
    return f"{settings['mode']} {'1.58' if bits < 2 else int(bits)}-bit"


def projections(model: LLaMA) -> dict[str, nn.Module]:
    """The seven projections of every block, by our module name (``layers.N.attn.q_proj``; in the ``bitlinear``
    layout the ``Linear`` inside the pair, ``layers.N.attn.q_proj.1``)."""
    inner = ".1" if model.config.norm_layout == "bitlinear" else ""
    names = [f"layers.{i}.{part}.{p}{inner}" for i in range(model.config.n_layer)
             for part, ps in (("attn", ATTENTION), ("mlp", MLP)) for p in ps]
    modules = dict(model.named_modules())
    return {name: modules[name] for name in names}


def _ternary_levels(model: LLaMA, settings: dict, ternary: bool,
                    ckpt: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """``{projection name: (int8 levels in {-1, 0, 1}, scale)}`` when the export takes the ternary layout, else None.

    With ``ternary``, the levels are those validation's ternary evaluation runs (least-squares scales for DQT
    weights, BitNet's absmean rule for STE masters and float weights). Without it, a DQT model goes ternary when every
    projection already holds only -1, 0 and 1 (by value: a bit-width schedule may have ended an 8-bit run there),
    and a BitNet STE model when it was trained at 1.58 bits; any other model takes the float layout.
    """
    names = projections(model)
    if ternary:
        with TernaryWeights(model):
            tensors, _ = integer_state(model)
    elif settings["mode"] == "fp" or (settings["mode"] == "ste" and settings["bits"] >= 2):
        return None
    else:
        tensors, _ = integer_state(model)
        if any(int(tensors[f"{name}.weight"].abs().max()) > 1 for name in names):
            return None
    levels = {name: (tensors[f"{name}.weight"], tensors[f"{name}.scale"]) for name in names}
    if any(alpha.numel() != 1 for _, alpha in levels.values()):
        raise ConfigError(f"checkpoint {ckpt} has per-row scales (trainer.plugins.method.per_row_scale): transformers' "
                          "BitNet layout holds one scale per weight (weight_scale of shape (1,)); use --format dqt")
    for name, (q, _) in levels.items():
        if q.shape[0] % 4:
            raise ConfigError(f"{name} has {q.shape[0]} output rows: transformers' packed ternary weights need a "
                              "multiple of 4 (model.init_args.config.n_embd and intermediate_size)")
    return levels


def pack_ternary_rows(q: torch.Tensor) -> torch.Tensor:
    """Levels in {-1, 0, 1} of shape ``(out, in)`` as transformers' BitNet ``uint8`` of shape ``(out/4, in)``: level
    + 1 in two bits, row ``j + k*out/4`` in bits ``2k, 2k+1`` of byte row ``j`` (``out`` a multiple of 4)."""
    rows = q.shape[0] // 4
    codes = (q.to(torch.int16) + 1).to(torch.uint8).reshape(4, rows, *q.shape[1:])
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


def _hf_tensors(model: LLaMA, levels: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The safetensors content under transformers' names: float tensors in ``dtype``, and packed levels with their
    ``weight_scale`` in the ternary layout (else the projections dequantized to ``alpha * q``)."""
    layout = model.config.norm_layout
    tensors, integer = integer_state(model)
    out = {}
    for name, tensor in tensors.items():
        module = name.rsplit(".", 1)[0]
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # transformers ties it to the embedding (tie_word_embeddings), as it came
        if name.endswith(".scale") and module in integer:
            continue  # folded into its weight, or written as weight_scale
        if levels is not None and module in levels:
            q, alpha = levels[module]
            out[hf_name(name, layout)] = pack_ternary_rows(q)
            out[hf_name(f"{module}.weight_scale", layout)] = alpha.reshape(1).to(dtype)
        elif module in integer:
            out[hf_name(name, layout)] = (tensor.float() * tensors[f"{module}.scale"].float()).to(dtype)
        else:
            out[hf_name(name, layout)] = tensor.to(dtype)
    if layout == "bitlinear":  # transformers' Llama blocks keep their pre-norms; ours are identities
        for i in range(model.config.n_layer):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                out[f"model.layers.{i}.{norm}.weight"] = torch.ones(model.config.n_embd, dtype=dtype)
    return {k: v.contiguous() for k, v in out.items()}


def _hf_config(model: LLaMA, ternary: bool, dtype: str, eot: int | None):
    """transformers' config object (``BitNetConfig`` for ``subln``, ``LlamaConfig`` otherwise)."""
    from transformers import BitNetConfig, BitNetQuantConfig, LlamaConfig  # noqa: PLC0415 - the optional dependency

    c = model.config
    subln = c.norm_layout == "subln"
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_base}
    if c.rope_type != "default":
        rope["factor"] = c.rope_factor
    if c.rope_type == "llama3":
        rope.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_position)
    if subln and c.n_head * c.head_size != c.n_embd:
        raise ConfigError(f"transformers' BitNet architecture (norm_layout subln) has heads that fill the width; "
                          f"this model's {c.n_head} heads of {c.head_size} do not fill {c.n_embd}")
    head_dim = {"head_dim": c.head_size} if not subln else {}
    config = (BitNetConfig if subln else LlamaConfig)(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads, **head_dim,
        hidden_act="silu", max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=eot, eos_token_id=eot, attention_bias=False,
        rope_parameters=rope)
    config.architectures = ["BitNetForCausalLM" if subln else "LlamaForCausalLM"]
    config.dtype = dtype
    if ternary:
        config.quantization_config = BitNetQuantConfig(
            modules_to_not_convert=["lm_head"], linear_class=QUANTIZATION_CONFIG["linear_class"],
            quantization_mode=QUANTIZATION_CONFIG["quantization_mode"], use_rms_norm=c.norm_layout == "bitlinear",
            rms_norm_eps=c.norm_eps).to_dict()
    return config
