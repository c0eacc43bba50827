import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dqt_lightning.quant.grid as grid_module  # where the shared input quantizer lives
from dqt_lightning import Method, QuantizedUpdate, QuantPrecision
from dqt_lightning.tools.bench import state_bytes
from dqt_lightning.errors import ConfigError
from dqt_lightning.quant.layers import (
    BitEmbedding,
    BitLinear,
    DQTEmbedding,
    DQTLinear,
    DQTWeight,
    dqt_layers,
    quantized_parameters,
)
from dqt_lightning.tools.memory import StateAtUpdate, quantized_state_bytes
from dqt_lightning.model import LLaMA, Config
from dqt_lightning.quant.grid import Grid, absmean_quantize
from tests.conftest import TokenWindows, fit, make_model


def _linear(n_in=24, n_out=16, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=False)
    nn.init.normal_(layer.weight, std=0.02)
    return layer


def _act_quant64(x):
    s = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return torch.round(x * s).clamp(-128, 127) / s


@pytest.mark.parametrize("bits", [1.58, 4, 8])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_dqt_linear_gradients_match_float64_reference(bits, lead):
    grid = Grid.from_bits(bits)
    layer = DQTLinear.from_linear(_linear(), grid, "stochastic")
    x = torch.randn(*lead, 24, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    # Reference in float64: y = x_q @ (alpha q)^T; grad_x passes the activation STE; grad_W = g^T x_q (no weight STE).
    w64 = layer.weight.double() * layer.scale.double()
    x64 = x.detach().double()
    xq = _act_quant64(x64)
    assert torch.allclose(y.double(), xq @ w64.t(), atol=1e-5)
    assert torch.allclose(x.grad.double(), g.double() @ w64, atol=1e-5)
    grad_w = g.double().reshape(-1, 16).t() @ xq.reshape(-1, 24)
    assert torch.allclose(layer.update_param.grad.double(), grad_w, atol=1e-5)


def test_dqt_linear_stores_only_integers():
    layer = DQTLinear.from_linear(_linear(), Grid.from_bits(8), "stochastic")
    state = layer.state_dict()
    assert state["weight"].dtype == torch.int8
    assert not any(t.is_floating_point() and t.shape == layer.weight.shape for t in state.values())
    assert list(layer.parameters()) == []  # DDP, .parameters() and checkpoints see integer storage only
    assert layer.update_param.untyped_storage().nbytes() == 4
    assert quantized_parameters(nn.Sequential(layer)) == [layer.update_param]


def test_dqt_linear_init_is_absmean_of_the_float_weight():
    linear = _linear()
    layer = DQTLinear.from_linear(linear, Grid.from_bits(1.58), "nearest")
    q, alpha = absmean_quantize(linear.weight, Grid.from_bits(1.58))
    assert torch.equal(layer.weight, q) and torch.allclose(layer.scale, alpha)


def test_materialize_and_release_round_trip():
    layer = DQTLinear.from_linear(_linear(), Grid.from_bits(4), "stochastic")
    layer.materialize()
    assert layer.update_param.is_contiguous() and torch.equal(layer.update_param.data, layer.dequantize())
    layer.release()
    assert layer.update_param.untyped_storage().nbytes() == 4


def test_bitlinear_matches_float64_reference_with_ste():
    grid = Grid.from_bits(1.58)
    layer = BitLinear.from_linear(_linear(), grid)
    x = torch.randn(4, 24, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    w = layer.weight.detach().double()
    alpha = w.abs().mean()
    wq = torch.round(w / alpha).clamp(-1, 1) * alpha
    xq = _act_quant64(x.detach().double())
    assert torch.allclose(y.double(), xq @ wq.t(), atol=1e-5)
    assert torch.allclose(x.grad.double(), g.double() @ wq, atol=1e-5)
    # The straight-through estimator hands the float master weight the gradient of the quantized one.
    assert torch.allclose(layer.weight.grad.double(), g.double().t() @ xq, atol=1e-5)


def test_dqt_linear_under_bf16_autocast_keeps_float32_gradient_buffer():
    layer = DQTLinear.from_linear(_linear(), Grid.from_bits(8), "stochastic")
    x = torch.randn(3, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.update_param.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = _act_quant64(x.detach().double()) @ (layer.weight.double() * layer.scale.double()).t()
    assert torch.allclose(y.double(), ref, rtol=0.05, atol=0.02)


# Quantized embeddings and head (Method(quantize_embeddings=True)) and bf16 gradient buffers.


def _embedding(vocab=10, width=6, seed=0):
    torch.manual_seed(seed)
    embedding = nn.Embedding(vocab, width)
    nn.init.normal_(embedding.weight, std=0.02)
    return embedding


@pytest.mark.parametrize("per_row", [False, True])
def test_dqt_embedding_gathers_then_scales_and_gets_the_true_gradient(per_row):
    layer = DQTEmbedding.from_embedding(_embedding(), Grid.from_bits(4), "stochastic", per_row_scale=per_row)
    idx = torch.tensor([[1, 3, 3], [9, 1, 1]])
    y = layer(idx)
    g = torch.randn_like(y)
    y.backward(g)

    w64 = layer.weight.double() * layer.scale.double()
    assert y.dtype == torch.float32 and torch.allclose(y.double(), w64[idx], atol=1e-8)
    # d loss / d W[row] is the sum of the output gradients of every position that looked the row up.
    expected = torch.zeros(10, 6, dtype=torch.float64)
    for position, row in enumerate(idx.reshape(-1).tolist()):
        expected[row] += g.reshape(-1, 6)[position].double()
    assert torch.allclose(layer.update_param.grad.double(), expected, atol=1e-6)
    assert layer.update_param.grad[[0, 2, 4, 5, 6, 7, 8]].abs().sum() == 0  # rows nobody looked up


def test_dqt_embedding_stores_only_integers_and_starts_from_absmean():
    embedding = _embedding()
    layer = DQTEmbedding.from_embedding(embedding, Grid.from_bits(1.58), "stochastic")
    q, alpha = absmean_quantize(embedding.weight, Grid.from_bits(1.58))
    assert torch.equal(layer.weight, q) and torch.allclose(layer.scale, alpha)
    state = layer.state_dict()
    assert set(state) == {"weight", "scale"} and state["weight"].dtype == torch.int8
    assert list(layer.parameters()) == []
    assert layer.update_param.untyped_storage().nbytes() == 4
    assert isinstance(layer, DQTWeight) and quantized_parameters(nn.Sequential(layer)) == [layer.update_param]


def test_bit_embedding_looks_up_the_quantized_table_and_passes_the_gradient_straight_through():
    layer = BitEmbedding.from_embedding(_embedding(), Grid.from_bits(1.58))
    idx = torch.tensor([2, 2, 7])
    y = layer(idx)
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.weight.detach().double()
    alpha = w.abs().mean()
    assert torch.allclose(y.double(), (torch.round(w / alpha).clamp(-1, 1) * alpha)[idx], atol=1e-7)
    expected = torch.zeros(10, 6, dtype=torch.float64)
    expected[2] = g[0].double() + g[1].double()
    expected[7] = g[2].double()
    assert torch.allclose(layer.weight.grad.double(), expected, atol=1e-6)


def test_quantize_embeddings_converts_embedding_and_head_in_every_quantized_mode():
    dqt = QuantPrecision(Method(mode="dqt", quantize_embeddings=True)).convert_module(LLaMA(Config(vocab_size=64,
                                                                                                   n_layer=1)))
    assert isinstance(dqt.embed_tokens, DQTEmbedding) and isinstance(dqt.lm_head, DQTLinear)
    layers = list(dqt_layers(dqt))
    assert len(layers) == 9 and layers[0] is dqt.embed_tokens and layers[-1] is dqt.lm_head
    assert not any(p.dim() == 2 for p in dqt.parameters())  # only norm gains stay float
    ignored = set(dqt._ddp_params_and_buffers_to_ignore)
    assert {"embed_tokens.weight", "embed_tokens.scale", "lm_head.weight", "lm_head.scale"} <= ignored

    ste = QuantPrecision(Method(mode="ste", quantize_embeddings=True)).convert_module(LLaMA(Config(vocab_size=64,
                                                                                                   n_layer=1)))
    assert type(ste.embed_tokens) is BitEmbedding and type(ste.lm_head) is BitLinear

    default = QuantPrecision(Method(mode="dqt")).convert_module(LLaMA(Config(vocab_size=64, n_layer=1)))
    assert type(default.embed_tokens) is nn.Embedding and type(default.lm_head) is nn.Linear


@pytest.mark.parametrize(("args", "field"), [
    (dict(mode="fp", quantize_embeddings=True), "method.quantize_embeddings"),
    (dict(mode="ste", grad_dtype="bfloat16"), "execution.grad_dtype"),
    (dict(mode="dqt", grad_dtype="float16"), "execution.grad_dtype"),
])
def test_plugin_refuses_options_that_do_not_apply(args, field):
    with pytest.raises(ConfigError, match=f"trainer.plugins.{field}"):
        QuantPrecision.from_settings(**args)


def _initial_integers(**plugin):
    fresh = make_model()
    QuantPrecision.from_settings(mode="dqt", **plugin).convert_module(fresh)
    return [layer.weight.clone() for layer in dqt_layers(fresh)]


@pytest.mark.usefixtures("one_thread")
def test_quantized_embeddings_keep_the_invariants_in_training(rounding_calls):
    calls = rounding_calls
    model = make_model()
    trainer = fit(model, steps=3, accumulate=2, batch_size=4, quantize_embeddings=True)
    layers = list(dqt_layers(model))
    assert len(layers) == 2 * 7 + 2
    # One rounding per weight per optimizer step, embedding and head included.
    assert len(calls) == 3 * 16 and sum(calls) == 3 * sum(layer.weight.numel() for layer in layers)
    # Integer storage only: no float tensor of the table's shape survives the step anywhere in the model.
    table = model.model.embed_tokens
    floats = [*model.state_dict().values(), *model.parameters(), *model.buffers(),
              *(layer.update_param.data for layer in layers)]
    assert not [t for t in floats if t.is_floating_point() and t.shape == table.weight.shape
                and t.untyped_storage().nbytes() > 4]
    assert table.weight.dtype == torch.int8 and model.model.lm_head.weight.dtype == torch.int8
    # Both moved; and the rounding noise follows the layer order, embedding first and head last.
    start = _initial_integers(quantize_embeddings=True)
    assert not torch.equal(layers[0].weight, start[0]) and not torch.equal(layers[-1].weight, start[-1])
    update = next(c for c in trainer.callbacks if isinstance(c, QuantizedUpdate))
    assert [name for name, _ in update._layers][::15] == ["model.embed_tokens", "model.lm_head"]


@pytest.fixture
def one_thread():
    # The test model gains nothing from more threads, and when other processes share the cores, spinning OpenMP
    # workers make these short runs many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_quantized_embeddings_train_deterministically_and_the_loss_falls():
    runs = []
    for _ in range(2):
        runs.append(make_model())
        fit(runs[-1], steps=4, quantize_embeddings=True)
    for a, b in zip(dqt_layers(runs[0]), dqt_layers(runs[1])):
        assert torch.equal(a.weight, b.weight)  # same seed, same noise for every layer

    model = make_model(optimizer=partial(torch.optim.AdamW, lr=3e-2, betas=(0.9, 0.95), weight_decay=0.01))
    fit(model, steps=60, quantize_embeddings=True)
    # The test model learns slowly with a DQT head: its fixed absmean scale caps the logits at alpha * sum|x|
    # (~0.4 at width 32) until the final norm gain grows, so only a clear fall is asked for.
    assert _loss_on_windows(model) < math.log(128) - 0.4


def _loss_on_windows(model) -> float:
    with torch.no_grad():
        return float(model._loss(TokenWindows().windows)[0])


@pytest.mark.usefixtures("one_thread")
def test_bf16_gradient_buffers_take_two_bytes_per_weight():
    model = make_model()
    buffers = StateAtUpdate(lambda module, _: [(m.update_param.grad.dtype, m.update_param.dtype,
                                                 m.update_param.untyped_storage().nbytes())
                                                for m in dqt_layers(module)])
    accounted, everything = StateAtUpdate(quantized_state_bytes), StateAtUpdate(state_bytes)
    fit(model, steps=2, grad_dtype="bfloat16", quantize_embeddings=True, callbacks=[buffers, accounted, everything])
    assert buffers.last and set(buffers.last) == {(torch.bfloat16, torch.bfloat16, 2)}
    per_param = accounted.last.per_param()
    assert per_param["grads"] == 2.0
    assert 1.0 < per_param["weights"] < 1.01
    assert per_param["optimizer_states"] == pytest.approx(8.0, rel=1e-3)  # the step itself ran in float32
    # The benchmark's accounting of all parameters sees the embedding and head as integers with bf16 gradients too.
    n_int = sum(layer.weight.numel() for layer in dqt_layers(model))
    n_float = sum(p.numel() for p in model.parameters())
    weights, grads, _ = everything.last
    assert weights == n_int + 16 * (4 + 2) + 4 * n_float  # levels, a scale and a placeholder per layer, norm gains
    assert grads == 2 * n_int + 4 * n_float


class RecordingSGD(torch.optim.SGD):
    """SGD that records the dtypes of what it steps, i.e. after QuantizedUpdate prepared the quantized weights: the
    run's optimizer the float parameters, and the one-parameter instances each quantized weight, all in ``seen``."""

    seen: set = set()

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        RecordingSGD.seen |= {(p.dtype, p.grad.dtype) for g in self.param_groups for p in g["params"]
                              if p.grad is not None}
        super().step()
        return loss


@pytest.mark.usefixtures("one_thread")
def test_bf16_gradient_buffers_step_in_float32_and_train_like_float32():
    model = make_model(optimizer=lambda params: RecordingSGD(params, lr=0.1))
    RecordingSGD.seen = set()
    fit(model, steps=1, grad_dtype="bfloat16")
    assert RecordingSGD.seen == {(torch.float32, torch.float32)}

    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = make_model(optimizer=partial(torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01))
        fit(model, steps=30, grad_dtype=dtype)
        losses[dtype] = _loss_on_windows(model)
    assert losses["float32"] < math.log(128) - 1.0
    assert losses["bfloat16"] == pytest.approx(losses["float32"], abs=0.25)


def _three_projections(bits: float = 4):
    return [DQTLinear.from_linear(_linear(seed=seed), Grid.from_bits(bits), "stochastic") for seed in (1, 2, 3)]


def _run(layers, inputs):
    outs = [layer(x) for layer, x in zip(layers, inputs)]
    sum((out * (i + 1)).sum() for i, out in enumerate(outs)).backward()
    return outs, [layer.update_param.grad for layer in layers]


@pytest.mark.parametrize("autocast", [False, True])
def test_projections_reading_one_input_share_its_quantization_bit_for_bit(monkeypatch, autocast):
    calls = []
    original = grid_module.fake_quantize_activations
    monkeypatch.setattr(grid_module, "fake_quantize_activations", lambda x: calls.append(1) or original(x))
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    base = torch.randn(2, 5, 24)
    # Shared: q, k and v read one tensor. Separate: three tensors with the same values.
    x = base.clone().requires_grad_()
    with context:
        shared, shared_grads = _run(_three_projections(), [x] * 3)
    assert len(calls) == 1
    separate_inputs = [base.clone().requires_grad_() for _ in range(3)]
    with context:
        separate, separate_grads = _run(_three_projections(), separate_inputs)
    assert len(calls) == 4
    for a, b in zip(shared + shared_grads, separate + separate_grads):
        assert torch.equal(a, b)
    # The shared input collects the three straight-through gradients (summed in the engine's order).
    assert torch.allclose(x.grad, sum(inp.grad for inp in separate_inputs), rtol=1e-6, atol=1e-6)


def test_a_changed_input_is_quantized_again(monkeypatch):
    calls = []
    original = grid_module.fake_quantize_activations
    monkeypatch.setattr(grid_module, "fake_quantize_activations", lambda x: calls.append(1) or original(x))
    first, second = _three_projections()[:2]
    x = torch.randn(3, 24)
    before = first(x)
    x.mul_(2)  # in place: same object, new version
    after = second(x)
    assert len(calls) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first(x)  # same tensor, other compute dtype
    assert len(calls) == 3
    assert torch.equal(after, F.linear(_textbook_quantize(x), second.dequantize()))
    assert not torch.equal(before, first(x))


def test_each_block_quantizes_four_inputs_for_seven_projections(monkeypatch):
    calls = []
    original = grid_module.fake_quantize_activations
    monkeypatch.setattr(grid_module, "fake_quantize_activations", lambda x: calls.append(1) or original(x))
    model = make_model()
    QuantPrecision(Method(mode="dqt")).convert_module(model)
    model(torch.randint(0, 128, (2, 8))).sum().backward()
    assert len(calls) == 4 * model.config.n_layer


def _textbook_quantize(x: torch.Tensor) -> torch.Tensor:
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return torch.round(x * s).clamp(-128, 127) / s


@pytest.mark.parametrize("scale_policy", ["fixed", "absmax"])
def test_the_layer_owns_its_float_view_for_one_step(scale_policy):
    """materialize: a float32 alpha * q (and float32 gradient) for the optimizer; round_step: one rounding of the
    stepped view back onto the grid (quant.step), the flip count returned; the placeholder again afterwards."""
    from dqt_lightning.quant.rounding import WEIGHTS, noise_keys
    from dqt_lightning.quant.step import dqt_step, rescaled_step

    layer = DQTLinear.from_linear(_linear(), Grid.from_bits(8), "stochastic", per_row_scale=True,
                                  grad_dtype=torch.bfloat16, scale_policy=scale_policy)
    q, alpha = layer.weight.clone(), layer.scale.clone()
    assert not layer.materialized
    layer.update_param.grad = torch.randn(layer.shape).to(torch.bfloat16)
    layer.materialize()
    assert layer.materialized and torch.equal(layer.update_param.data, q.float() * alpha)
    assert layer.update_param.grad.dtype == torch.float32
    layer.update_param.data.sub_(alpha * 0.3)  # what an optimizer's step would do
    stepped = layer.update_param.data.clone()
    key = noise_keys(4)[WEIGHTS]
    flips = layer.round_step(key)
    if scale_policy == "fixed":
        expected = dqt_step(q, alpha, stepped, layer.grid, "stochastic", key)
    else:
        expected, new_alpha = rescaled_step(stepped, layer.grid, True, "stochastic", key)
        assert torch.equal(layer.scale, new_alpha)
    assert torch.equal(layer.weight, expected) and int(flips) == int((expected != q).sum()) > 0
    assert not layer.materialized and layer.update_param.grad.dtype == torch.bfloat16


def test_the_plugin_takes_the_method_and_how_it_runs_as_two_groups():
    from dqt_lightning import Execution, Method
    from dqt_lightning.tools.compare import plugin_args

    plugin = QuantPrecision(Method(mode="dqt", bits=8, rounding="nearest"), Execution(fused_update=True))
    record = plugin.state_dict()
    assert record["method"]["bits"] == 8 and record["method"]["rounding"] == "nearest"
    assert record["execution"]["fused_update"] and record["execution"]["precision"] == "32-true"
    # Flat settings go each to its group; a name neither group has is refused by name.
    flat = QuantPrecision.from_settings(mode="dqt", bits=8, rounding="nearest", fused_update=True)
    assert flat.state_dict() == record
    with pytest.raises(TypeError, match="'bitz'"):
        QuantPrecision.from_settings(bitz=8)
    # A run's config.yaml, with the two blocks or from before them (flat), reads the same.
    nested = {"trainer": {"plugins": {"class_path": "dqt_lightning.QuantPrecision", "init_args": {
        "method": {"mode": "dqt", "bits": 8}, "execution": {"precision": "bf16-mixed"}}}}}
    before = {"trainer": {"plugins": {"class_path": "dqt_lightning.QuantPrecision", "init_args": {
        "mode": "dqt", "bits": 8, "precision": "bf16-mixed"}}}}
    assert plugin_args(nested) == plugin_args(before) == {"mode": "dqt", "bits": 8, "precision": "bf16-mixed"}


@pytest.mark.parametrize("per_row", [False, True])
def test_the_rounding_in_parts_draws_what_the_whole_draws(per_row, monkeypatch):
    import dqt_lightning.quant.layers as layers_module
    from dqt_lightning.quant.rounding import noise_keys

    results = []
    for chunk in (1 << 20, 100):  # 100 elements: four rows of 24 at a time, the last part shorter
        monkeypatch.setattr(layers_module, "ROUNDING_CHUNK", chunk)
        layer = DQTLinear.from_linear(_linear(), Grid.from_bits(4), "stochastic", per_row_scale=per_row)
        layer.materialize()
        layer.update_param.data.add_(torch.linspace(-0.05, 0.05, layer.shape.numel()).reshape(layer.shape))
        flips = layer.round_step(noise_keys(7)[0])
        results.append((layer.weight.clone(), int(flips)))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1] > 0


def test_a_gpu_rounds_and_steps_in_parts_far_larger_than_a_cpu():
    # A CPU pass stays a few hundred KiB for malloc to reuse; on a GPU each pass is a few dozen kernel launches, so a
    # 7B layer (45M elements) must take a handful, not hundreds.
    from dqt_lightning.quant.layers import ROUNDING_CHUNK, elements_per_pass

    assert elements_per_pass(torch.device("cpu"), ROUNDING_CHUNK) == ROUNDING_CHUNK
    assert elements_per_pass(torch.device("cuda", 0), ROUNDING_CHUNK) >= 4096 * 11008 // 4


class StrengthRecorder(pl.Callback):
    """The first training loss, and BitNet's quantizer strength (lambda) at every step."""

    def __init__(self) -> None:
        self.strengths, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.strengths += [{m.strength for m in pl_module.modules() if isinstance(m, BitLinear)}]
        self.losses.append(float(outputs["loss"]))


def test_the_ste_warmup_starts_from_the_float_model_and_reaches_bitnet():
    warm, plain, float_run = StrengthRecorder(), StrengthRecorder(), StrengthRecorder()
    fit(make_model(), mode="ste", steps=6, ste_warmup_steps=4, callbacks=[warm])
    fit(make_model(), mode="ste", steps=2, callbacks=[plain])
    fit(make_model(), mode="fp", steps=1, callbacks=[float_run])
    assert warm.strengths == [{0.0}, {0.25}, {0.5}, {0.75}, {1.0}, {1.0}]
    assert warm.losses[0] == float_run.losses[0]  # lambda 0: the float model exactly
    assert plain.strengths == [{1.0}, {1.0}] and plain.losses[0] != float_run.losses[0]
    with pytest.raises(ConfigError, match="ste_warmup_steps applies to BitNet STE"):
        Method(mode="dqt", ste_warmup_steps=10).grid()
