"""A Hugging Face LLaMA-family checkpoint as the start of a run: its sizes, its weights read one tensor at a time,
its tokenizer.

A local directory as ``save_pretrained`` writes it: ``config.json``, ``model.safetensors`` (or shards named by
``model.safetensors.index.json``) and ``tokenizer.json``. Keys are transformers' Llama names
(``model.layers.N.self_attn.q_proj.weight`` ...), which apply RoPE in the rotate-half form as our model does: no
permutation. :class:`Pretrained` reads the sizes from ``config.json`` (transformers 5's ``rope_parameters`` or 4.x's
``rope_theta`` and ``rope_scaling``), checks every tensor's name and shape against the model they describe before
anything is read, and hands out one float32 tensor at a time, so that a model quantized as it is built
(:meth:`~dqt_lightning.model.LLaMA.materialize`) never holds the whole float model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import nn

from dqt_lightning.errors import ConfigError
from dqt_lightning.model import ROPE_TYPES, Config

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# The sizes a checkpoint fixes; a config that sets one of them to other than its default must agree. (The vocabulary
# is the checkpoint's too; the data's tokenizer, the checkpoint's, may have fewer tokens than its embedding rows.)
SIZE_FIELDS = ("n_layer", "n_head", "n_embd", "intermediate_size", "n_kv_head", "head_dim",
               "tie_word_embeddings", "norm_eps", "rope_base", "rope_type", "rope_factor", "rope_low_freq_factor",
               "rope_high_freq_factor", "rope_original_max_position")


def hf_name(name: str, layout: str) -> str:
    """transformers' name of one of our state-dict keys (``layers.0.attn.q_proj.weight`` is
    ``model.layers.0.self_attn.q_proj.weight``; the ``subln`` sub-norms are BitNet's ``attn_sub_norm`` and
    ``ffn_sub_norm``; the ``bitlinear`` layout's per-projection norms its ``rms_norm``)."""
    if name.startswith("lm_head."):
        return name
    name = name.replace(".attn_norm.", ".input_layernorm.").replace(".mlp_norm.", ".post_attention_layernorm.")
    name = name.replace(".attn.sub_norm.", ".self_attn.attn_sub_norm.").replace(".mlp.sub_norm.", ".mlp.ffn_sub_norm.")
    name = name.replace(".attn.", ".self_attn.")
    if layout == "bitlinear":  # our (RMSNorm, Linear) pairs: transformers' AutoBitLinear with its own rms_norm
        for proj in (*ATTENTION, *MLP):
            name = name.replace(f".{proj}.0.", f".{proj}.rms_norm.").replace(f".{proj}.1.", f".{proj}.")
    return f"model.{name}"


def _rope(settings: dict, where: str) -> dict:
    """Our rope fields from transformers 5's ``rope_parameters`` or 4.x's ``rope_theta`` + ``rope_scaling``."""
    parameters = settings.get("rope_parameters")
    if not isinstance(parameters, dict):
        parameters = {**(settings.get("rope_scaling") or {}), "rope_theta": settings.get("rope_theta", 10000.0)}
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{where}: rope scaling {kind!r} is not supported ({', '.join(ROPE_TYPES)} are)")
    rope = {"rope_base": float(parameters.get("rope_theta", 10000.0)), "rope_type": kind}
    if kind != "default":
        rope["rope_factor"] = float(parameters["factor"])
    if kind == "llama3":
        rope.update(rope_low_freq_factor=float(parameters["low_freq_factor"]),
                    rope_high_freq_factor=float(parameters["high_freq_factor"]),
                    rope_original_max_position=int(parameters["original_max_position_embeddings"]))
    return rope


class Pretrained:
    """A local Hugging Face checkpoint directory of a LLaMA-family model.

    Args:
        path: The directory (``config.json``, ``model.safetensors`` or its sharded index, ``tokenizer.json``).

    Raises:
        ConfigError: one line naming the file or key, for a directory that is not such a checkpoint: no
            ``config.json`` or weights, another architecture, biases, an activation other than SiLU.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        where = f"model.init_args.init_from {self.path}"
        self.where = where
        config_file = self.path / "config.json"
        if not self.path.is_dir() or not config_file.is_file():
            raise ConfigError(f"{where}: not a Hugging Face model directory (no config.json"
                              + (")" if self.path.exists() else "; no such directory)"))
        try:
            settings = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{where}: config.json is not JSON ({error})") from error
        kind = settings.get("model_type")
        if kind != "llama":
            raise ConfigError(f"{where}: model_type {kind!r} is not supported; LLaMA-family checkpoints (model_type "
                              "llama: Llama, SmolLM, TinyLlama) are")
        for bias in ("attention_bias", "mlp_bias"):
            if settings.get(bias):
                raise ConfigError(f"{where}: config.json sets {bias}: true; projections with biases are not supported")
        if settings.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act {settings['hidden_act']!r} is not supported (silu is)")
        heads = settings["num_attention_heads"]
        head_dim = settings.get("head_dim")
        self.sizes = {
            "vocab_size": settings["vocab_size"], "n_layer": settings["num_hidden_layers"], "n_head": heads,
            "n_embd": settings["hidden_size"], "intermediate_size": settings["intermediate_size"],
            "n_kv_head": settings.get("num_key_value_heads") or heads,
            "head_dim": head_dim if head_dim and head_dim != settings["hidden_size"] // heads else None,
            "tie_word_embeddings": bool(settings.get("tie_word_embeddings", False)),
            "norm_eps": float(settings.get("rms_norm_eps", 1e-6)), **_rope(settings, where)}
        if self.sizes["n_kv_head"] == heads:
            self.sizes["n_kv_head"] = None
        self.max_positions = int(settings.get("max_position_embeddings", 2048))
        self.files = self._weight_files()

    def _weight_files(self) -> dict[str, Path]:
        """transformers' key of every tensor, and the file holding it."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ConfigError(f"{self.where}: {index.name} has no weight_map ({error!r})") from error
            files = {key: self.path / name for key, name in weight_map.items()}
        elif (self.path / "model.safetensors").is_file():
            from safetensors import safe_open  # noqa: PLC0415 - only imports read weights

            with safe_open(self.path / "model.safetensors", "pt") as handle:
                files = {key: self.path / "model.safetensors" for key in handle.keys()}
        else:
            raise ConfigError(f"{self.where}: no model.safetensors or model.safetensors.index.json (a PyTorch .bin "
                              "checkpoint can be converted with save_pretrained(safe_serialization=True))")
        for file in set(files.values()):
            if not file.is_file():
                raise ConfigError(f"{self.where}: {file.name}, named by the index, does not exist")
        return files

    def config(self, given: Config | None) -> Config:
        """The model's config: the checkpoint's sizes, and what ``given`` chooses beyond them (``norm_layout``,
        ``block_size``, the name).

        Raises:
            ConfigError: naming both values, where ``given`` sets a size to other than its default and other than
                the checkpoint's; or a ``bitlinear`` layout, which drops the block pre-norms every checkpoint has.
        """
        given = given or Config(name=self.path.name)
        default = Config()
        for name in SIZE_FIELDS:
            mine, theirs = getattr(given, name), self.sizes.get(name, getattr(default, name))
            if mine != getattr(default, name) and mine != theirs:
                raise ConfigError(f"model.init_args.config.{name} is {mine} but the checkpoint {self.path} has "
                                  f"{theirs}; leave it out, or set it as the checkpoint has it")
        if given.norm_layout == "bitlinear":
            raise ConfigError(f"model.init_args.config.norm_layout bitlinear drops the block pre-norms the checkpoint "
                              f"{self.path} has; use llama (as trained) or subln (sub-norms added, starting at one)")
        name = given.name if given.name != default.name else self.path.name
        block = given.block_size if given.block_size != default.block_size else self.max_positions
        known = {f.name for f in fields(Config)}
        return replace(given, name=name, block_size=block, **{k: v for k, v in self.sizes.items() if k in known})

    def check(self, expected: dict[str, torch.Size], layout: str) -> None:
        """Every tensor the model needs is in the checkpoint with its shape, and the checkpoint holds nothing else.

        Args:
            expected: Our state-dict key of every weight the checkpoint must provide, with its shape (the ``subln``
                sub-norms are not among them: they start at one).
            layout: The model's norm layout (for the names).
        """
        from safetensors import safe_open  # noqa: PLC0415 - only imports read weights

        wanted = {hf_name(name, layout): (name, shape) for name, shape in expected.items()}
        # A tied head written out anyway (some exports do) is the embedding again: nothing to read.
        tied = {"lm_head.weight"} if self.sizes["tie_word_embeddings"] else set()
        extra = sorted(set(self.files) - set(wanted) - tied)
        if extra:
            raise ConfigError(f"{self.where}: the checkpoint holds {extra[0]}"
                              + (f" and {len(extra) - 1} more tensors" if len(extra) > 1 else "")
                              + ", which this model has no place for")
        missing = [key for key in wanted if key not in self.files]
        if missing:
            raise ConfigError(f"{self.where}: {missing[0]} is missing from the checkpoint"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        for file in sorted(set(self.files.values())):
            with safe_open(file, "pt") as handle:
                for key in handle.keys():
                    shape = torch.Size(handle.get_slice(key).get_shape())
                    if key in wanted and shape != wanted[key][1]:
                        raise ConfigError(f"{self.where}: {key} has shape {tuple(shape)}, the model needs "
                                          f"{tuple(wanted[key][1])}")

    def tensor(self, name: str, layout: str) -> torch.Tensor:
        """One weight, by our state-dict key, read from its file alone, as float32."""
        from safetensors import safe_open  # noqa: PLC0415 - only imports read weights

        key = hf_name(name, layout)
        with safe_open(self.files[key], "pt") as handle:
            return handle.get_tensor(key).float()

    def reader(self, layout: str) -> Callable[[str], torch.Tensor | None]:
        """Our state-dict key to that weight as float32, read from its file alone; ``None`` for one the checkpoint
        has not (a ``subln`` sub-norm, which then starts at one): what
        :meth:`~dqt_lightning.model.LLaMA.materialize` reads."""
        def read(name: str) -> torch.Tensor | None:
            return self.tensor(name, layout) if hf_name(name, layout) in self.files else None

        return read

    @property
    def tokenizer(self) -> Path:
        """The checkpoint's tokenizer (``tokenizer.json``, or a SentencePiece ``tokenizer.model``)."""
        for file in ("tokenizer.json", "tokenizer.model"):
            if (self.path / file).is_file():
                return self.path / file
        raise ConfigError(f"{self.where}: no tokenizer.json (or tokenizer.model) beside the weights")


def pretrained_weights(model: nn.Module) -> dict[str, torch.Size]:
    """Our state-dict key and shape of every weight a checkpoint provides for ``model`` (built empty, every layer
    float): the embedding, projections, head (unless tied) and norm gains; not the ``subln`` sub-norms, which a
    LLaMA checkpoint has not."""
    tied = getattr(model, "config", None) is not None and model.config.tie_word_embeddings
    return {key: tensor.shape for key, tensor in model.state_dict().items()
            if key.endswith(".weight") and ".sub_norm." not in key and not (tied and key == "lm_head.weight")}


def settle_data_tokenizer(config) -> None:
    """The data module's tokenizer in a parsed run config (LightningCLI's namespace), settled before anything is built.

    With ``model.init_args.init_from`` the data module tokenizes with the checkpoint's tokenizer (and the model's
    vocabulary is its size): a BPE trained here would give the pretrained embedding rows other meanings; another
    tokenizer is refused. A data module given a tokenizer file has that tokenizer's vocabulary, whatever its
    ``vocab_size`` says (the size of a BPE to train): the config says so too, so that the run's config.yaml and the
    hyperparameters Lightning logs agree with the model's (Lightning refuses a data module and a model whose logged
    ``vocab_size`` differ).
    """
    from dqt_lightning.data.tokenizer import BPE_SPECS, tokenizer_vocab_size  # noqa: PLC0415 - tokenizers, lazily

    data = config.get("data.init_args")
    if data is None:
        return
    init_from = config.get("model.init_args.init_from")
    if init_from:
        theirs = Pretrained(init_from).tokenizer
        mine = data.get("tokenizer")
        if mine in BPE_SPECS:
            data.tokenizer = str(theirs)
        elif Path(mine).resolve() not in (theirs.resolve(), theirs.parent.resolve()):
            raise ConfigError(f"data.init_args.tokenizer is {mine}, but model.init_args.init_from {init_from} brings "
                              f"its own ({theirs}); leave data.init_args.tokenizer out")
    if data.get("tokenizer") not in BPE_SPECS and data.get("vocab_size") is not None:
        data.vocab_size = tokenizer_vocab_size(data.tokenizer, data.vocab_size)
