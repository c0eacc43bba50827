"""Starting from a Hugging Face LLaMA-family checkpoint (``model.init_args.init_from``): the model family (GQA, a
head size of its own, tied embeddings, scaled RoPE), the import read one tensor at a time, and its refusals.

The checkpoints here are written by the test itself in the layout ``save_pretrained`` writes (transformers' names,
``config.json``, ``model.safetensors`` or shards with their index), so these tests need no transformers; the interop
step checks the same imports against transformers' own models (tests/test_interop_pretrained.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from dqt_lightning import Method, QuantPrecision
from dqt_lightning.errors import ConfigError
from dqt_lightning.model import LLaMA, Config
from dqt_lightning.module import LanguageModel
from dqt_lightning.pretrained import hf_name, pretrained_weights
from dqt_lightning.quant.grid import absmean_quantize
from dqt_lightning.quant.layers import DQTWeight
from tests.conftest import fit

FAMILY = Config(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96, block_size=64,
                norm_layout="llama", tie_word_embeddings=True, norm_eps=1e-5, rope_base=50000.0, rope_type="llama3",
                rope_factor=8.0, rope_original_max_position=32)


def write_checkpoint(model: LLaMA, path: Path, shards: int = 1, extra: dict | None = None,
                     drop: str | None = None, **config_changes) -> Path:
    """``model`` as a Hugging Face directory: config.json with transformers' keys, weights under transformers' names
    (in ``shards`` files with their index), the tied head left out as ``save_pretrained`` does."""
    c = model.config
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_base}
    if c.rope_type == "llama3":
        rope.update(factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                    high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_position)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size,
              "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
              "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_size,
              "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu",
              "max_position_embeddings": c.block_size, "rope_parameters": rope, **config_changes}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    tensors = {hf_name(k, "llama"): v.contiguous() for k, v in model.state_dict().items()
               if not (c.tie_word_embeddings and k == "lm_head.weight")}
    tensors.update(extra or {})
    tensors.pop(drop, None)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, path / file)
        weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _source(config: Config = FAMILY, seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA(config).eval()


@pytest.mark.parametrize("shards", [1, 3])
def test_a_float_import_computes_what_the_checkpoint_computes(tmp_path, shards):
    source = _source()
    model = LanguageModel(Config(norm_layout="llama"), vocab_size=128,
                          init_from=str(write_checkpoint(source, tmp_path / "hf", shards)))
    model.configure_model()
    assert model.config == replace(FAMILY, name="hf")  # every size from config.json, the block from its positions
    assert model.model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    tokens = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert torch.equal(model.model.eval()(tokens), source(tokens))


def test_a_dqt_import_quantizes_each_projection_as_it_arrives(tmp_path):
    source = _source()
    model = LanguageModel(Config(norm_layout="llama"), vocab_size=128,
                          init_from=str(write_checkpoint(source, tmp_path / "hf")))
    QuantPrecision(Method(mode="dqt", bits=1.58)).convert_module(model)
    layers = {name: m for name, m in model.model.named_modules() if isinstance(m, DQTWeight)}
    assert len(layers) == 14
    for name, layer in layers.items():
        q, alpha = absmean_quantize(source.get_submodule(name).weight, layer.grid)
        assert torch.equal(layer.weight, q) and torch.equal(layer.scale, alpha)
    assert torch.equal(model.model.embed_tokens.weight, source.embed_tokens.weight)


def test_subln_adds_sub_norms_that_start_at_one(tmp_path):
    model = LanguageModel(Config(norm_layout="subln"), vocab_size=128,
                          init_from=str(write_checkpoint(_source(), tmp_path / "hf")))
    model.configure_model()
    gains = [m.weight for name, m in model.model.named_modules() if name.endswith("sub_norm")]
    assert len(gains) == 4 and all(torch.equal(g, torch.ones_like(g)) for g in gains)


@pytest.mark.parametrize(("change", "says"), [
    (dict(config_changes={"model_type": "qwen2"}), "model_type 'qwen2' is not supported"),
    (dict(config_changes={"attention_bias": True}), "config.json sets attention_bias: true"),
    (dict(config_changes={"hidden_act": "gelu"}), "hidden_act 'gelu' is not supported"),
    (dict(config_changes={"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}),
     "rope scaling 'yarn' is not supported"),
    (dict(extra={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     "the checkpoint holds model.layers.0.self_attn.q_proj.bias, which this model has no place for"),
    (dict(drop="model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight is missing from the checkpoint"),
    (dict(extra={"model.norm.weight": torch.ones(65)}), "model.norm.weight has shape (65,), the model needs (64,)"),
])
def test_what_the_import_cannot_take_is_one_line_naming_it(tmp_path, change, says):
    path = write_checkpoint(_source(), tmp_path / "hf", extra=change.get("extra"), drop=change.get("drop"),
                            **change.get("config_changes", {}))
    with pytest.raises(ConfigError) as error:
        LanguageModel(Config(norm_layout="llama"), vocab_size=128, init_from=str(path))
    assert str(error.value).startswith(f"model.init_args.init_from {path}: ") and says in str(error.value)
    assert "\n" not in str(error.value)


def test_a_size_given_otherwise_is_refused_naming_both(tmp_path):
    path = write_checkpoint(_source(), tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"^model.init_args.config.n_layer is 12 but the checkpoint .* has 2; "):
        LanguageModel(Config(n_layer=12, norm_layout="llama"), vocab_size=128, init_from=str(path))
    with pytest.raises(ConfigError, match="norm_layout bitlinear drops the block pre-norms"):
        LanguageModel(Config(norm_layout="bitlinear"), vocab_size=128, init_from=str(path))
    with pytest.raises(ConfigError, match="has 300 tokens, more than .* 128"):
        LanguageModel(Config(norm_layout="llama"), vocab_size=300, init_from=str(path))
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        LanguageModel(init_from=str(tmp_path / "nowhere"))


def test_the_expected_weights_leave_out_the_tied_head_and_the_sub_norms():
    expected = pretrained_weights(LLaMA.empty(replace(FAMILY, norm_layout="subln")))
    assert "lm_head.weight" not in expected and not any("sub_norm" in k for k in expected)
    assert expected["layers.0.attn.k_proj.weight"] == torch.Size([2 * 16, 64])  # two key heads of 16


@pytest.mark.parametrize("mode", ["fp", "ste", "dqt"])
@pytest.mark.parametrize("layout", ["llama", "subln", "bitlinear"])
def test_gqa_tied_and_scaled_models_train_in_every_mode(mode, layout, one_thread):
    config = replace(FAMILY, norm_layout=layout, vocab_size=128)
    torch.manual_seed(0)
    model = LanguageModel(config=config, vocab_size=128, warmup_steps=0)
    trainer = fit(model, mode=mode, steps=3)
    assert trainer.global_step == 3
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
    assert model.model.lm_head.weight is model.model.embed_tokens.weight


def test_quantized_embeddings_refuse_a_tied_head():
    model = LanguageModel(config=replace(FAMILY, norm_layout="llama"), vocab_size=128)
    with pytest.raises(ConfigError, match="this model ties them"):
        QuantPrecision(Method(mode="dqt", quantize_embeddings=True)).convert_module(model)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHRINK = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
          "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--data.init_args.seq_len", "16",
          "--data.init_args.batch_size", "2"]


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory) -> Path:
    from dqt_lightning.data.embedded import build_corpus
    from dqt_lightning.data.tokenizer import train_bpe

    tokenizer = train_bpe(build_corpus()[:300], 300)
    path = write_checkpoint(_source(replace(FAMILY, vocab_size=tokenizer.get_vocab_size())),
                            tmp_path_factory.mktemp("ckpt") / "hf")
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def _parsed_cli(checkpoint: Path, *args: str):
    """The CLI of a ternary run from ``checkpoint``, parsed and built, not run."""
    from dqt_lightning.cli import DQTLightningCLI
    from lightning.pytorch import LightningDataModule, LightningModule

    return DQTLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           run=False, args=["--config", str(CONFIGS / "ternary.yaml"), "--model.init_args.init_from",
                                            str(checkpoint), *args, *SHRINK])


def test_fit_starts_from_a_checkpoint_with_its_tokenizer(checkpoint_with_tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _parsed_cli(checkpoint_with_tokenizer)
    assert cli.datamodule.hparams.tokenizer == str(checkpoint_with_tokenizer / "tokenizer.json")
    assert cli.model.config.n_kv_head == 2 and cli.model.config.vocab_size == cli.datamodule.vocab_size == 300
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2


@pytest.mark.parametrize("bpe_spec", ["bpe", ""])
def test_every_spelling_of_a_bpe_to_train_gives_way_to_the_checkpoint_s_tokenizer(bpe_spec, checkpoint_with_tokenizer,
                                                                                 tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _parsed_cli(checkpoint_with_tokenizer, "--data.init_args.tokenizer", bpe_spec)
    assert cli.datamodule.hparams.tokenizer == str(checkpoint_with_tokenizer / "tokenizer.json")
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size == 300


def test_validate_from_a_checkpoint_logs_one_vocabulary(checkpoint_with_tokenizer, tmp_path, monkeypatch):
    # With the default logger Lightning logs the model's and the data module's hyperparameters side by side and
    # refuses a vocab_size that differs: the data module's must be its tokenizer's, not the BPE size it would train.
    from dqt_lightning import cli

    monkeypatch.chdir(tmp_path)
    at = SHRINK.index("--trainer.logger")
    without_logger = SHRINK[:at] + SHRINK[at + 2:]
    assert cli.main(["validate", "--config", str(CONFIGS / "ternary.yaml"), "--model.init_args.init_from",
                     str(checkpoint_with_tokenizer), *without_logger]) in (0, None)
    saved = yaml.safe_load(next(tmp_path.glob("runs/*/version_0/config.yaml")).read_text())
    assert saved["data"]["init_args"]["vocab_size"] == 300


def test_a_tokenizer_other_than_the_checkpoint_s_is_refused(checkpoint_with_tokenizer, tmp_path, monkeypatch, capsys):
    from dqt_lightning import cli

    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.json"
    other.write_text((checkpoint_with_tokenizer / "tokenizer.json").read_text())
    with pytest.raises(SystemExit) as done:
        cli.main(["fit", "--config", str(CONFIGS / "ternary.yaml"), "--model.init_args.init_from",
                  str(checkpoint_with_tokenizer), "--data.init_args.tokenizer", str(other), *SHRINK])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: data.init_args.tokenizer is {other}, but model.init_args.init_from ")
    assert not any(tmp_path.glob("runs"))


def test_eval_and_generate_take_a_hugging_face_directory(checkpoint_with_tokenizer, tmp_path, capsys):
    from dqt_lightning import cli

    text = tmp_path / "notes.txt"
    text.write_text("The model reads this text and scores every token of it.\n")
    printed = []
    for args in (["eval", str(checkpoint_with_tokenizer), "--text", str(text), "--no-progress"],
                 ["generate", str(checkpoint_with_tokenizer), "--prompt", "The model", "--max-new-tokens", "4",
                  "--temperature", "0"]):
        try:
            code = cli.main(args)
        except SystemExit as done:
            code = done.code
        captured = capsys.readouterr()
        assert code in (0, None), captured.err
        printed.append(captured.out)
    assert "perplexity: " in printed[0]
    assert printed[1].startswith("The model")
