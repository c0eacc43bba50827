"""The LightningModule: next-token loss, perplexity, AdamW with warm-up and cosine decay, throughput."""

from __future__ import annotations

import ctypes
import math
import time
from pathlib import Path
from dataclasses import replace

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.text import Perplexity
from typing_extensions import override

from dqt_lightning.train.checkpoint import (GRIDS_KEY, PACKED_KEY, TOKENIZER_KEY, check_checkpoint_fits, dqt_grids,
                                           pack_ternary_weights, tokenizer_record, unpack_ternary_weights)
from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.layers import BitLinear, DQTWeight, quantized_parameters
from dqt_lightning.model import LLaMA, Config
from dqt_lightning.pretrained import Pretrained, pretrained_weights
from dqt_lightning.train.optim import default_adamw
from dqt_lightning.train.schedule import BitWidthSchedule
from dqt_lightning.quant.ternary import TernaryWeights
from dqt_lightning.data.tokenizer import TextTokenizer
from dqt_lightning.train.update import QuantizedUpdate


# Hyper-parameters hold the Config dataclass; allowing it keeps checkpoints loadable with torch's weights_only=True.
torch.serialization.add_safe_globals([Config])


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA's peak allocation on a GPU, the peak resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # POSIX only, and only needed on CPU

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_learning_rate(lr: float, betas: tuple[float, ...] | list[float] = (0.0,)) -> None:
    """A learning rate no step can take is one line here, not a float overflow inside the optimizer's step."""
    lr = float(lr)
    if not math.isfinite(lr):
        raise ConfigError(f"model.init_args.optimizer.init_args.lr must be finite; got {lr:g}")
    if lr < 0:
        raise ConfigError(f"model.init_args.optimizer.init_args.lr must be >= 0; got {lr:g}")
    # Adam's first step moves a weight by up to lr / (1 - beta1), which the update computes in float32.
    largest = lr / (1 - betas[0])
    if largest > torch.finfo(torch.float32).max:
        raise ConfigError(f"model.init_args.optimizer.init_args.lr={lr:g} overflows float32 in the optimizer's "
                          f"first step (a step of up to {largest:.3g}, above 3.4e38)")


def check_window(seq_len: int, block_size: int) -> None:
    """A training window longer than the rotary tables reach is one line, before anything is built or written."""
    if seq_len > block_size:
        raise ConfigError(f"data.seq_len={seq_len} is longer than model.config.block_size={block_size}")


# From this many parameters on, freed memory goes back to the operating system at once (see below).
LARGE_MODEL = 100_000_000
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20  # the threshold a large model fixes; the memory plan counts blocks below it as heap-kept


def return_freed_memory_to_the_os(threshold: int = MMAP_THRESHOLD) -> None:
    """Have glibc's malloc return every freed block of ``threshold`` bytes or more to the operating system at once.

    glibc serves blocks above its mmap threshold with their own mappings, unmapped when freed, but raises that
    threshold each time it frees one, up to 32 MiB: afterwards every block below it comes from the heap, which keeps
    its freed pages. A large model's activations, gradients and per-layer float values are such blocks: freed, they
    stayed resident, and the peak of a step became their sum instead of their maximum (1b model, seq 256: 20.2 GiB
    instead of 15.9 GiB; docs/benchmarks.md). A fixed threshold (which also stops the raising) costs a page fault per
    fresh page: nothing at 1b, 35% of a tiny model's speed, which is why only large models set it. Does nothing
    where the C library has no ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, threshold)


NEEDS_THE_CALLBACK = ("trainer.plugins.method.mode=dqt needs the callback that updates the integer weights: add "
                      "'- class_path: dqt_lightning.QuantizedUpdate' to trainer.callbacks")


class LanguageModel(pl.LightningModule):
    """A LLaMA language model trained on next-token prediction in any of the three modes.

    The training mode (fp, BitNet STE, DQT) is not chosen here: the precision plugin converts the projections of
    ``self.model``, so this module reads the same for every run.

    Args:
        config: Model sizes (see ``configs/model/``).
        vocab_size: Vocabulary size; linked from the data module, never set by hand.
        optimizer: Optimizer for every parameter, quantized ones included (e.g. ``torch.optim.AdamW``).
        warmup_steps: Linear warm-up from 0 to the optimizer's learning rate.
        min_lr_ratio: Cosine decay ends at this fraction of the peak learning rate, at the last training step.
        ternary_eval: Validation and test also run the model with its quantized weights re-quantized to ternary
            (:class:`~dqt_lightning.quant.ternary.TernaryWeights`) and log ``val/loss_ternary`` beside ``val/loss``
            (DQT weights with the least-squares scale), and for a DQT model ``val/loss_ternary_absmean`` (BitNet's
            absmean scale) too.
        init_from: A local Hugging Face LLaMA-family checkpoint directory to start from
            (:mod:`dqt_lightning.pretrained`): its sizes replace the config's (a size set otherwise is refused), its
            weights are read one tensor at a time and quantized as each arrives, and its tokenizer is the data's.
    """

    def __init__(self, config: Config | None = None, vocab_size: int = 4096, optimizer: OptimizerCallable | None = None,
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, ternary_eval: bool = False,
                 init_from: str | None = None) -> None:
        super().__init__()
        # ternary_eval is a choice of how to evaluate, not part of the model: LightningCLI would otherwise let a
        # checkpoint's saved value override the flag given to `validate --ckpt_path`.
        self.save_hyperparameters(ignore=["optimizer", "ternary_eval"])
        self.pretrained = Pretrained(init_from) if init_from is not None else None
        if self.pretrained is not None:
            if vocab_size > self.pretrained.sizes["vocab_size"]:
                raise ConfigError(f"the data's tokenizer has {vocab_size} tokens, more than the {init_from} model's "
                                  f"{self.pretrained.sizes['vocab_size']}; its data must use the checkpoint's tokenizer")
            config = self.pretrained.config(config)
            vocab_size = config.vocab_size
            # Checkpoints of this run name the real sizes, for the tools that rebuild a model from one.
            self.hparams.update(config=config, vocab_size=vocab_size)
        config = replace(config or Config(), vocab_size=vocab_size)
        problems = [f"model.config.{p}" for p in config.problems()]
        if warmup_steps < 0:
            problems.append(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            problems.append(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if problems:
            raise ConfigError("; ".join(problems))
        self.config = config
        # Built empty: configure_model gives it weights once the trainer's precision plugin says which layers become
        # integers, so that a model whose float copy would not fit in memory never has one. The weights are drawn
        # from the random state of this moment: the very ones building the model here would have drawn.
        self.model = LLaMA.empty(config)
        if self.pretrained is not None:  # names and shapes, from the files' headers: refused before anything is read
            self.pretrained.check(pretrained_weights(self.model), config.norm_layout)
            self.model.weights_source = self.pretrained.reader(config.norm_layout)
        self.weights_from_checkpoint = False  # set where a checkpoint will fill the weights: no random init then
        self._restored = False
        self.optimizer_factory = optimizer or default_adamw()
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.ternary_eval = ternary_eval
        self._ternary: dict[str, TernaryWeights] = {}  # metric name: the weights it is measured with
        self.val_perplexity = Perplexity()
        self._step_started = 0.0
        self.tokens_seen = 0  # all ranks together; saved in checkpoints so a resumed run keeps counting

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    @override
    def configure_model(self) -> None:
        """Build the model's weights, layer by layer, in the form the precision plugin trains them: each projection
        is drawn in float32, quantized and its float copy dropped before the next is drawn (Lightning's large-model
        hook; also called by ``load_from_checkpoint``, and without a trainer it builds the float model).

        Lightning restores checkpoint weights right after this hook and converts the model only later, in strategy
        setup: converting here lets an integer-weight checkpoint load into integer layers. With
        ``weights_from_checkpoint`` the weights are left for the checkpoint to fill, with no random init first.
        """
        plugin = self._trainer.precision_plugin if self._trainer is not None else None
        if self.model.num_parameters() >= LARGE_MODEL:
            return_freed_memory_to_the_os()
        if self.model.is_empty:
            convert = getattr(plugin, "convert_layer", None)
            initialize = not self.weights_from_checkpoint
            self.model.materialize(None if convert is None else lambda name, layer: convert(name, layer, initialize),
                                   initialize)
        if plugin is not None:
            plugin.convert_module(self)

    def _check_weights_set(self) -> None:
        if self.weights_from_checkpoint and not self._restored:
            raise ConfigError("the model was built to take its weights from a checkpoint, and none was loaded")

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint[GRIDS_KEY] = dqt_grids(self)
        tokenizer = self._training_tokenizer()
        if tokenizer is not None:  # so that the checkpoint alone decodes: no run directory needed beside it
            checkpoint[TOKENIZER_KEY] = tokenizer_record(tokenizer)
        plugin = self.trainer.precision_plugin
        execution = getattr(plugin, "execution", None)
        if execution is not None and (execution.pack_ternary or execution.pack_in_memory):
            checkpoint[PACKED_KEY] = pack_ternary_weights(self, checkpoint["state_dict"])

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before the state dict is loaded into the (already converted) layers.
        self._restored = True
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        unpack_ternary_weights(checkpoint["state_dict"], checkpoint.pop(PACKED_KEY, {}))
        trainer = self._trainer  # None when loaded outside a Trainer
        source = f"ckpt_path {trainer.ckpt_path}" if trainer is not None and trainer.ckpt_path else "the checkpoint"
        first = next((m for m in self.modules() if isinstance(m, DQTWeight)), None)
        schedules = [c for c in trainer.callbacks if isinstance(c, BitWidthSchedule)] if trainer is not None else []
        grids = [grid for schedule in schedules for grid in schedule.grids(first.grid)] if first is not None else []
        check_checkpoint_fits(checkpoint, self, source, grids, strict=self.strict_loading)

    @override
    def on_validation_start(self) -> None:
        self._check_weights_set()

    @override
    def on_test_start(self) -> None:
        self._check_weights_set()

    @override
    def on_fit_start(self) -> None:
        self._check_weights_set()
        # Without the callback the optimizer would step the layers' placeholder parameters and the integer weights
        # would never move: a traceback from inside torch.optim at the first step, or worse, a run that learns nothing.
        if any(isinstance(m, DQTWeight) for m in self.modules()) and not any(
                isinstance(c, QuantizedUpdate) for c in self.trainer.callbacks):
            raise ConfigError(NEEDS_THE_CALLBACK)
        # The run directory keeps the tokenizer beside config.yaml, for people and for tools that read a run.
        tokenizer = self._training_tokenizer()
        if self.trainer.logger is None or tokenizer is None:
            return
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks, rank 0 writes
        if log_dir and self.trainer.is_global_zero:
            tokenizer.save(Path(log_dir))

    def _training_tokenizer(self) -> TextTokenizer | None:
        trainer = self._trainer
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer is not None else None
        if tokenizer is None or isinstance(tokenizer, TextTokenizer):
            return tokenizer
        return TextTokenizer(tokenizer, origin="the training data module")

    @override
    def setup(self, stage: str) -> None:
        seq_len = getattr(self.trainer.datamodule, "seq_len", None)
        if seq_len is not None:
            check_window(seq_len, self.config.block_size)

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Each window holds seq_len + 1 tokens: inputs are the first seq_len, targets the last seq_len.
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return loss, logits

    def _batch_tokens(self, batch: torch.Tensor) -> int:
        return (batch.shape[1] - 1) * batch.shape[0] * self.trainer.world_size  # every rank's batch together

    @override
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_started = time.perf_counter()
        warmup = getattr(getattr(self.trainer.precision_plugin, "method", None), "ste_warmup_steps", 0)
        if warmup:  # BitNet's quantizers blended in over the warm-up: lambda from 0 at the first step to 1
            strength = min(self.trainer.global_step / warmup, 1.0)
            for layer in self.model.modules():
                if isinstance(layer, BitLinear):
                    layer.strength = strength

    @override
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # Counted here, not in on_train_batch_end: ModelCheckpoint saves in its own on_train_batch_end, which runs
        # before the module's, so a checkpoint would hold one batch fewer than the run had trained.
        self.tokens_seen += self._batch_tokens(batch)
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        return loss

    @override
    def on_train_batch_end(self, outputs, batch: torch.Tensor, batch_idx: int) -> None:
        elapsed = max(time.perf_counter() - self._step_started, 1e-9)
        self.log("train/tokens_per_sec", self._batch_tokens(batch) / elapsed)
        # Runs of different batch sizes or device counts compare at equal tokens, not equal steps (see `compare`).
        self.log("train/tokens_seen", float(self.tokens_seen))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/peak_memory_mb", peak_memory_mb(batch.device))

    def _start_ternary_eval(self) -> None:
        # Ternary levels are computed once per evaluation pass, from the weights as they are now: with the
        # least-squares scale, and for a DQT model also with BitNet's absmean scale (the two differ only there).
        self._ternary = {}
        if self.ternary_eval:
            self._ternary["loss_ternary"] = TernaryWeights(self.model)
            if any(isinstance(m, DQTWeight) for m in self.model.modules()):
                self._ternary["loss_ternary_absmean"] = TernaryWeights(self.model, scale="absmean")

    def _log_ternary_loss(self, stage: str, batch: torch.Tensor) -> None:
        for name, weights in self._ternary.items():
            with weights:
                loss, _ = self._loss(batch)
            self.log(f"{stage}/{name}", loss, sync_dist=True)

    @override
    def on_validation_epoch_start(self) -> None:
        self._start_ternary_eval()

    @override
    def on_test_epoch_start(self) -> None:
        self._start_ternary_eval()

    @override
    def on_validation_epoch_end(self) -> None:
        self._ternary = {}  # training resumes after validation: no ternary copy stays allocated

    @override
    def on_test_epoch_end(self) -> None:
        self._ternary = {}

    @override
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.val_perplexity(logits.float(), batch[:, 1:])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", self.val_perplexity)
        self._log_ternary_loss("val", batch)

    @override
    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, _ = self._loss(batch)
        self.log("test/loss", loss, sync_dist=True)
        self._log_ternary_loss("test", batch)

    @override
    def configure_optimizers(self):
        quantized = quantized_parameters(self.model)
        float_params = [p for p in self.parameters() if p.requires_grad]
        # Matrices decay (quantized projections included), vectors (norm gains) do not, as in LLaMA and BitNet.
        decay = quantized + [p for p in float_params if p.dim() >= 2]
        no_decay = [p for p in float_params if p.dim() < 2]
        try:
            optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        except ValueError as error:
            raise ConfigError(f"model.optimizer: {error}") from error
        for group in optimizer.param_groups:
            check_learning_rate(group["lr"], group.get("betas", (0.0,)))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if self.warmup_steps > total:
            # Easy to miss when a short run stacks a long recipe (the 130m overlay warms up over 2000 steps).
            rank_zero_warn(f"model.warmup_steps ({self.warmup_steps}) is more than this run's {total} optimizer steps: "
                           "the learning rate never leaves its linear warm-up nor reaches its peak")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor_fn(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor_fn(self, total_steps: int):
        warmup, floor = self.warmup_steps, self.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return factor
