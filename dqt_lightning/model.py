"""A LLaMA-structured decoder in one file: RMSNorm, RoPE, SwiGLU, no biases, untied embeddings.

Nothing here knows about quantization. Every projection is a plain ``nn.Linear`` named as in Hugging Face's
``LlamaForCausalLM`` (``q_proj`` ... ``down_proj``), so the precision plugin can find and swap them in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

NORM_LAYOUTS = ("llama", "subln", "bitlinear")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class Config:
    """Sizes of a LLaMA model.

    Args:
        name: Name of the size preset this config started from.
        vocab_size: Rows of the embedding and the output head (linked from the data module).
        block_size: Longest sequence the rotary tables are built for.
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block.
        n_embd: Width of the residual stream.
        intermediate_size: Hidden width of the SwiGLU feed-forward.
        norm_eps: Epsilon of every RMSNorm.
        rope_base: Base of the rotary frequencies.
        init_std: Standard deviation of the normal init of every weight matrix.
        norm_layout: Where the RMSNorms sit. ``llama``: one pre-norm per sub-block. ``subln`` (1bitLLM and the
            official DQT code): the pre-norms plus one more before ``o_proj`` and before ``down_proj``.
            ``bitlinear`` (Microsoft's BitNet): an RMSNorm on the input of every projection, block pre-norms removed.
        n_kv_head: Key and value heads (grouped-query attention: each serves ``n_head / n_kv_head`` query heads);
            ``None``: as many as query heads.
        head_dim: Width of each attention head; ``None``: ``n_embd / n_head``.
        tie_word_embeddings: The output head is the token embedding itself (one matrix), as in SmolLM and Llama 3.2.
        rope_type: How the rotary frequencies are scaled for long contexts, as Hugging Face names it: ``default``
            (not at all), ``linear`` (every frequency divided by ``rope_factor``) or ``llama3`` (Llama 3.1's: low
            frequencies divided by ``rope_factor``, high ones kept, a smooth blend between, set by
            ``rope_low_freq_factor``, ``rope_high_freq_factor`` and ``rope_original_max_position``).
        rope_factor: The scaling factor of ``linear`` and ``llama3``.
        rope_low_freq_factor: ``llama3``'s low-frequency factor.
        rope_high_freq_factor: ``llama3``'s high-frequency factor.
        rope_original_max_position: ``llama3``'s original context length.
    """

    name: str = "tiny"
    vocab_size: int = 4096
    block_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    intermediate_size: int = 384
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    init_std: float = 0.02
    norm_layout: str = "subln"
    n_kv_head: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // max(self.n_head, 1)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: object) -> Config:
        if name not in SIZES:
            raise ValueError(f"'{name}' is not a supported model size; choose one of {', '.join(SIZES)}")
        return replace(SIZES[name], **overrides)

    def problems(self) -> list[str]:
        """Every inconsistency in this config, as messages that name the field."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and value <= 0:
                out.append(f"{f.name} must be > 0, got {value}")
        for name in ("n_kv_head", "head_dim"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                out.append(f"{name} must be > 0 (or null), got {getattr(self, name)}")
        if self.head_dim is None and (self.n_embd % max(self.n_head, 1) or self.head_size % 2):
            out.append(f"n_embd ({self.n_embd}) must split into n_head ({self.n_head}) heads of even size")
        elif self.head_size % 2:
            out.append(f"head_dim must be even (rotary pairs), got {self.head_size}")
        if self.kv_heads > 0 and self.n_head % self.kv_heads:
            out.append(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        if self.norm_layout not in NORM_LAYOUTS:
            out.append(f"norm_layout must be one of {', '.join(NORM_LAYOUTS)}; got '{self.norm_layout}'")
        if self.rope_type not in ROPE_TYPES:
            out.append(f"rope_type must be one of {', '.join(ROPE_TYPES)}; got '{self.rope_type}'")
        return out


SIZES = {
    # Trains to a meaningful loss on 2 CPU cores in minutes.
    "tiny": Config("tiny", n_layer=4, n_head=4, n_embd=128, intermediate_size=384),
    # The DQT paper's 130M recipe (as the official code: d 768, 12 layers, 12 heads, FFN 2048).
    "130m": Config("130m", n_layer=12, n_head=12, n_embd=768, intermediate_size=2048),
    "320m": Config("320m", n_layer=24, n_head=16, n_embd=1024, intermediate_size=2816),
    # LLaMA 1B-class shape (d 2048, 24 layers, 16 heads, FFN 5632), the 1.36B model peers measure memory on.
    "1b": Config("1b", n_layer=24, n_head=16, n_embd=2048, intermediate_size=5632),
    # LLaMA-7B (d 4096, 32 layers, 32 heads, FFN 11008), the model published memory figures are measured on.
    "7b": Config("7b", n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the autocast dtype: bf16 sums of squares lose too much.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def _projection(config: Config, n_in: int, n_out: int) -> nn.Module:
    linear = nn.Linear(n_in, n_out, bias=False)
    if config.norm_layout != "bitlinear":
        return linear
    return nn.Sequential(RMSNorm(n_in, config.norm_eps), linear)


def rope_frequencies(config: Config, device: torch.device | None = None) -> torch.Tensor:
    """The rotary frequencies of one head, ``1 / base^(2i / head_size)``, scaled as ``config.rope_type`` says (in the
    arithmetic of Hugging Face's ``ROPE_INIT_FUNCTIONS``, so that an imported model rotates as it was trained)."""
    half = config.head_size // 2
    inv_freq = 1.0 / config.rope_base ** (torch.arange(half, device=device, dtype=torch.float32) / half)
    if config.rope_type == "linear":
        return inv_freq / config.rope_factor
    if config.rope_type != "llama3":
        return inv_freq
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    original = config.rope_original_max_position
    wavelen = 2 * math.pi / inv_freq
    # Wavelengths longer than the original context at low_freq_factor: divided by the factor; shorter than it at
    # high_freq_factor: kept; between: blended.
    scaled = torch.where(wavelen > original / low, inv_freq / config.rope_factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return torch.where(medium, blended, scaled)


def rope_tables(config: Config, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(config.block_size, device=device, dtype=torch.float32),
                         rope_frequencies(config, device))
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotate-half convention (as HF LLaMA): pairs are (i, i + head_size/2).
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class KVCache(nn.Module):
    """The keys and values of one attention layer for every position so far, preallocated to the block size: a new
    token attends to the cached ones instead of recomputing the whole context (as litgpt's ``KVCache``).

    Args:
        batch: Sequences decoded together.
        config: Model sizes (heads, head size, block size).
        device: Where the buffers live.
        dtype: Their dtype (the model's compute dtype).
    """

    def __init__(self, batch: int, config: Config, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        shape = (batch, config.kv_heads, config.block_size, config.head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` (``[batch, heads, T, head_size]``) at positions ``pos .. pos+T-1`` and return the keys
        and values of every position up to there."""
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        d, inner, kv = config.n_embd, config.n_head * config.head_size, config.kv_heads * config.head_size
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.q_proj = _projection(config, d, inner)
        self.k_proj = _projection(config, d, kv)
        self.v_proj = _projection(config, d, kv)
        self.sub_norm = RMSNorm(inner, config.norm_eps) if config.norm_layout == "subln" else nn.Identity()
        self.o_proj = _projection(config, inner, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k, v = (p(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cached = cache.update(pos, k, v)
            k, v = cached if pos > 0 else (k, v)  # the first chunk attends to itself only
        if self.n_kv_head != self.n_head:  # grouped-query attention: each key and value head serves a group
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
        if cache is None or pos == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Query i (at position pos + i) sees keys 0 .. pos + i: all cached ones, and the new ones up to itself.
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)
        return self.o_proj(self.sub_norm(y))


class SwiGLU(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        d, h = config.n_embd, config.intermediate_size
        self.gate_proj = _projection(config, d, h)
        self.up_proj = _projection(config, d, h)
        self.sub_norm = RMSNorm(h, config.norm_eps) if config.norm_layout == "subln" else nn.Identity()
        self.down_proj = _projection(config, h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.sub_norm(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        # Microsoft's layout normalises inside each projection, so the block pre-norms go away.
        pre_norm = config.norm_layout != "bitlinear"
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps) if pre_norm else nn.Identity()
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps) if pre_norm else nn.Identity()
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, pos)
        return x + self.mlp(self.mlp_norm(x))


class LLaMA(nn.Module):
    # Activation checkpointing: keep only each block's input for backward and recompute the block there (set by
    # the precision plugin's execution.activation_checkpointing).
    checkpoint_blocks = False
    # Where materialize() reads the weights from instead of drawing them: a pretrained checkpoint's tensors by our
    # state-dict key (None for one it lacks), set by the LightningModule that imports one.
    weights_source: Callable[[str], torch.Tensor | None] | None = None

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config)
        # Derived from the config, so kept out of checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    @classmethod
    def empty(cls, config: Config) -> LLaMA:
        """The model with no weights yet (on the meta device): no memory, no random draws. :meth:`materialize`
        gives it weights one layer at a time, drawn from the random state of this moment (kept in ``rng_state``):
        the very weights ``LLaMA(config)`` would draw here. The global generator moves on as if they had been drawn,
        so that the next model gets other weights."""
        with torch.device("meta"):
            model = cls(config)
        model.rng_state = torch.get_rng_state()
        torch.default_generator.manual_seed(int(torch.randint(2**62, ())))
        return model

    @property
    def is_empty(self) -> bool:
        """Whether the model still waits for :meth:`materialize`."""
        return self.rope_cos.is_meta

    def _init_generator(self, device: torch.device) -> torch.Generator:
        """The generator :meth:`materialize` draws from when the weights are built on ``device`` (the default device:
        Lightning's ``configure_model`` runs under its root device). On the CPU, and on the meta device (no draws), the
        random state :meth:`empty` kept: the eager model's values. A GPU tensor draws only from a generator of its own
        device: one seeded from that state, so a seed still fixes the weights there, though not to the CPU's values
        (another algorithm draws them). Building on the GPU keeps a 7B model's thirteen billion draws off the CPU.
        """
        generator = torch.Generator().set_state(self.rng_state)
        if device.type in ("cpu", "meta"):
            return generator
        # device="cpu": under Lightning's device context a plain factory call would make a tensor of that device.
        seed = int(torch.randint(2**62, (), generator=generator, device="cpu"))
        return torch.Generator(device).manual_seed(seed)

    @torch.no_grad()
    def materialize(self, convert: Callable[[str, nn.Module], nn.Module | None] | None = None,
                    initialize: bool = True,
                    weights: Callable[[str], torch.Tensor | None] | None = None) -> None:
        """Give a model built by :meth:`empty` its weights, one matrix at a time, on the default device.

        Each weight is the one ``LLaMA(config)`` draws when built from the random state :meth:`empty` kept (on the
        CPU; on a GPU, see :meth:`_init_generator`): the same draws in the same order (first those of each layer's
        own constructor, then the normal init of ``_init_weights``), one layer at a time. With ``initialize=False``
        the weights are left uninitialized, for a checkpoint to fill, and nothing is drawn. With ``weights`` (our
        state-dict key to a float tensor, or ``None`` for one it lacks: a norm gain then starts at one) each weight
        is read from there instead, one at a time: how a pretrained checkpoint comes in
        (:mod:`dqt_lightning.pretrained`; ``weights_source`` is the default).

        ``convert(name, layer)`` may replace each projection, embedding and head as soon as it holds its float weight
        (the precision plugin quantizes it there): the float weight is then dropped, so the process never holds more
        than one layer's float weight beyond those that stay float.
        """
        weights = weights if weights is not None or not initialize else self.weights_source
        generator = self._init_generator(torch.get_default_device()) if initialize and weights is None else None
        # Names, not modules: a list of the float layers would keep every replaced one's weight alive to the end.
        names = [name for name, m in self.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        if generator is not None:
            # What building eagerly draws first: each layer's reset_parameters() in its constructor.
            for name in names:
                scratch = torch.empty(self.get_submodule(name).weight.shape)
                if isinstance(self.get_submodule(name), nn.Embedding):
                    nn.init.normal_(scratch, generator=generator)
                else:
                    nn.init.kaiming_uniform_(scratch, a=math.sqrt(5), generator=generator)
        for name in names:
            layer = self.get_submodule(name)
            if name == "lm_head" and self.config.tie_word_embeddings:
                # The embedding itself; building eagerly draws its init a second time, into the same tensor.
                if generator is not None:
                    self.embed_tokens.weight.data.normal_(mean=0.0, std=self.config.init_std, generator=generator)
                layer.weight = self.embed_tokens.weight
                continue
            weight = weights(f"{name}.weight") if weights is not None else torch.empty(layer.weight.shape)
            if generator is not None:
                weight.normal_(mean=0.0, std=self.config.init_std, generator=generator)
            layer.weight = nn.Parameter(weight)
            del weight
            replacement = convert(name, layer) if convert is not None else None
            if replacement is not None:
                parent, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent), child, replacement)
            del layer, replacement
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                gain = weights(f"{name}.weight") if weights is not None else None
                module.weight = nn.Parameter(gain if gain is not None else torch.ones(module.weight.shape))
        self.rope_cos, self.rope_sin = rope_tables(self.config)

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None, pos: int = 0) -> torch.Tensor:
        """Logits for every position of ``idx``. With ``caches`` (one per layer, :meth:`kv_caches`), ``idx`` holds
        the tokens at positions ``pos .. pos+T-1`` and attends to the cached keys and values of the ones before."""
        T = idx.shape[1]
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size={self.config.block_size}")
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.embed_tokens(idx)
        recompute = self.checkpoint_blocks and caches is None and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if recompute:
                # Only each block's input is kept for backward; its inside is computed again there, one block at a time.
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, caches[i] if caches is not None else None, pos)
        return self.lm_head(self.norm(x))

    def kv_caches(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> list[KVCache]:
        """One empty :class:`KVCache` per layer, on the model's device."""
        device = self.rope_cos.device
        return [KVCache(batch, self.config, device, dtype) for _ in self.layers]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

