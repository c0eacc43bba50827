"""`eval`: perplexity equals an independent sliding-window computation, task accuracy is 1 for a model forced to the
answer and near chance for a random one, bad input is one line and writes nothing, compare shows eval.json's numbers,
and --lm-eval-tasks without lm-eval names the extra."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dqt_lightning.model import LLaMA, Config
from dqt_lightning.tools.evaluate import TASKS_DIR, read_task
from dqt_lightning.tools.scoring import encode_pair, loglikelihoods
from dqt_lightning.tools.loading import model_from_checkpoint, tokenizer_of_checkpoint
from dqt_lightning.commands import run as run_tool
from tests.trained import trained_runs  # noqa: F401 - trained_runs is a fixture

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["The quick brown fox jumps over the lazy dog. " * 6,
        "Python's standard library is very extensive, offering a wide range of facilities. " * 4,
        "A short third document."]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_tool(["eval", *argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tokenizer(trained_runs):
    return tokenizer_of_checkpoint(trained_runs.checkpoint("ternary"), 512)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text" / "docs.txt"
    path.parent.mkdir()
    path.write_text("\n\n".join(DOCS) + "\n")
    return path


def hand_export(directory: Path, tokenizer, favourite: int | None = None, seed: int = 0) -> Path:
    """An export of a one-layer float model: random (std 0.02, near-uniform predictions), or, with ``favourite``, one
    whose blocks add nothing to the residual stream and whose head always predicts ``favourite``."""
    config = Config(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, intermediate_size=32,
                    block_size=64)
    torch.manual_seed(seed)
    model = LLaMA(config)
    if favourite is not None:
        with torch.no_grad():
            for block in model.layers:
                block.attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
            model.embed_tokens.weight.fill_(1.0)  # every position: the same vector, normalised to ones
            model.lm_head.weight.zero_()
            model.lm_head.weight[favourite] = 10.0  # logit 160 for the favourite, 0 for every other token
    directory.mkdir(parents=True)
    quantization = {"mode": "fp", "bits": 32.0, "quantize_embeddings": False, "per_row_scale": False,
                    "integer_weights": {}, "packed": {}}
    (directory / "config.json").write_text(json.dumps({**asdict(config), "quantization": quantization}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    tokenizer.save(directory)
    return directory


def write_task(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


# --- perplexity ----------------------------------------------------------------------------------------------------

def independent_perplexity(model, tokens: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """HF's sliding-window recipe with windows of context + 1 tokens (context inputs and the token after the last),
    each masking the targets an earlier window scored; the last window starts early enough to be full."""
    total, count, prev_end, n = 0.0, 0, 0, len(tokens)
    for begin in range(0, n, stride):
        end = min(begin + context + 1, n)
        ids = tokens[max(0, end - context - 1):end]
        labels = ids.clone()
        labels[:-(end - prev_end)] = -100  # scored by an earlier window
        with torch.no_grad():
            logits = model(ids[None, :-1])[0]
        total += float(F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum"))
        count += int((labels[1:] != -100).sum())
        prev_end = end
        if end == n:
            break
    return math.exp(total / count), count


@pytest.mark.parametrize(("context", "stride"), [(16, 5), (24, None)])
def test_perplexity_equals_a_sliding_window_computed_here(trained_runs, tokenizer, text_file, tmp_path, capsys,
                                                         context, stride):
    ckpt = trained_runs.checkpoint("ternary")
    output = tmp_path / "out.json"
    code, out, err = run([str(ckpt), "--text", str(text_file), "--context", str(context), "--output", str(output),
                          *(["--stride", str(stride)] if stride else [])], capsys)
    assert code == 0, err
    report = json.loads(output.read_text())
    model, _ = model_from_checkpoint(ckpt)
    pieces = [[tokenizer.eot_id] * (i > 0) + tokenizer.encode_batch([doc])[0] for i, doc in enumerate(DOCS)]
    tokens = torch.tensor([t for piece in pieces for t in piece])
    expected, scored = independent_perplexity(model, tokens, context, stride or context)
    ppl = report["perplexity"]
    assert ppl["documents"] == 3 and ppl["tokens"] == len(tokens) > 3 * context
    assert ppl["tokens_scored"] == scored == len(tokens) - 1
    assert ppl["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert (report["context"], report["stride"], report["ternary"]) == (context, stride or context, False)
    assert f"perplexity: {ppl['perplexity']:.4f} per token" in out and "(not per word)" in out
    assert f"| text | perplexity | {ppl['perplexity']:.4f} | {len(tokens) - 1} |" in out


def test_limit_tokens_and_ternary(trained_runs, text_file, tmp_path, capsys):
    output = tmp_path / "out.json"
    code, _, err = run([str(trained_runs.checkpoint("ternary")), "--text", str(text_file), "--context", "8",
                        "--limit-tokens", "20", "--ternary", "--output", str(output)], capsys)
    assert code == 0, err
    report = json.loads(output.read_text())
    assert report["perplexity"]["tokens_scored"] == 20 and report["ternary"] is True
    assert math.isfinite(report["perplexity"]["perplexity"])


# --- multiple choice -----------------------------------------------------------------------------------------------

def test_a_model_forced_to_the_answer_scores_1_and_a_random_one_near_chance(tokenizer, tmp_path, capsys):
    (favourite,) = tokenizer.encode_batch(["~"])[0]
    rng = random.Random(0)
    forced, chance = [], []
    for i in range(40):
        wrong = rng.sample("abcdefghijklmnopqrstuvwxyz", 3)
        label = rng.randrange(4)
        forced.append({"context": f"item {i} =", "choices": [*wrong[:label], "~", *wrong[label:]], "label": label})
        # Four different random words, the label independent of them: a model without knowledge is right 1 time in 4.
        words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=3)) for _ in range(4)]
        chance.append({"context": f"word {i}:", "choices": [" " + w for w in words], "label": rng.randrange(4)})
    for item in forced:  # the answer is the favourite token alone, the wrong choices never it
        assert encode_pair(tokenizer, item["context"], "~")[1] == [favourite]
    forced_file, chance_file = write_task(tmp_path / "forced.jsonl", forced), write_task(tmp_path / "chance.jsonl",
                                                                                          chance)
    right = hand_export(tmp_path / "right", tokenizer, favourite)
    code, out, err = run([str(right), "--tasks", str(forced_file)], capsys)
    assert code == 0, err
    report = json.loads((right / "eval.json").read_text())
    assert report["tasks"]["forced"]["acc"] == report["tasks"]["forced"]["acc_norm"] == 1.0
    assert "| forced | acc | 1.0000 | 40 |" in out
    randomly = hand_export(tmp_path / "random", tokenizer)
    code, _, err = run([str(randomly), "--tasks", str(chance_file), str(forced_file)], capsys)
    assert code == 0, err
    tasks = json.loads((randomly / "eval.json").read_text())["tasks"]
    # Binomial(40, 1/4): mean 10 right, sd 2.7; [2, 20] right holds it with probability > 0.999.
    assert 0.05 <= tasks["chance"]["acc"] <= 0.5
    assert 0.05 <= tasks["forced"]["acc"] <= 0.5  # the same model on the forced task: no better than chance


def test_choice_loglikelihood_is_the_sum_over_its_tokens(tokenizer, tmp_path):
    from dqt_lightning.tools.loading import load_exported

    model, _ = load_exported(hand_export(tmp_path / "m", tokenizer, seed=3))
    context, choice = "The answer is", " forty two"
    ctx, cont = encode_pair(tokenizer, context, choice)
    assert ctx + cont == tokenizer.encode_batch([context + choice])[0] and len(cont) >= 2
    with torch.no_grad():
        logprobs = model(torch.tensor([ctx + cont[:-1]]))[0].log_softmax(-1)
    expected = sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    ((ll, _),) = loglikelihoods(model, tokenizer, [(context, choice)])
    assert ll == pytest.approx(expected, abs=1e-4)


def test_shipped_tasks_are_read_and_named(tokenizer, tmp_path, capsys):
    names = sorted(p.stem for p in TASKS_DIR.glob("*.jsonl"))
    assert names == ["arithmetic", "copy", "counting"]
    for name in names:
        items = read_task(TASKS_DIR / f"{name}.jsonl")
        assert len(items) >= 9 and all(0 <= i.label < len(i.choices) for i in items)
    export = hand_export(tmp_path / "m", tokenizer)
    code, out, err = run([str(export), "--tasks", "copy", "counting"], capsys)
    assert code == 0, err
    assert "| copy | acc_norm |" in out and "| counting | acc |" in out


# --- bad input -----------------------------------------------------------------------------------------------------

BAD_LINES = [
    ('{"context": "a", "choices": [" b", " c"], "label": 0}\nnot json\n', "bad.jsonl:2: not a JSON object"),
    ('{"context": "a", "choices": [" b", " c"]}\n', "bad.jsonl:1: missing field 'label'"),
    ('{"context": "a", "choices": [" b", " c"], "label": 2}\n',
     "bad.jsonl:1: field 'label' is 2, out of range for 2 choices"),
    ('{"context": "a", "choices": [], "label": 0}\n', "bad.jsonl:1: field 'choices' is empty"),
    ('{"context": 3, "choices": [" b"], "label": 0}\n', "bad.jsonl:1: field 'context' must be a string"),
]


@pytest.mark.parametrize(("content", "message"), BAD_LINES)
def test_a_bad_task_line_is_one_line_naming_file_line_and_field(tokenizer, tmp_path, capsys, content, message):
    export = hand_export(tmp_path / "m", tokenizer)
    (tmp_path / "bad.jsonl").write_text(content)
    code, out, err = run([str(export), "--tasks", str(tmp_path / "bad.jsonl")], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (export / "eval.json").exists()


def test_bad_options_and_models_are_one_line_and_write_nothing(tokenizer, text_file, tmp_path, capsys):
    export = hand_export(tmp_path / "m", tokenizer)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 512}))
    output = tmp_path / "out.json"
    cases = [
        ([str(export), "--tasks", str(tmp_path / "nope.jsonl")], "--tasks: "),
        ([str(export), "--text", str(tmp_path / "missing.txt")], "--text: "),
        ([str(export)], "nothing to evaluate"),
        ([str(export), "--text", str(text_file), "--context", "65"], "--context 65 is more than the model's block "
                                                                     "size of 64"),
        ([str(export), "--text", str(text_file), "--context", "8", "--stride", "9"], "--stride 9 is more than"),
        ([str(export), "--text", str(text_file), "--context", "0"], "--context must be >= 1"),
        ([str(hf), "--text", str(text_file)], "lm_eval --model hf --model_args pretrained="),
        ([str(tmp_path / "none.ckpt"), "--text", str(text_file)], "does not exist"),
    ]
    for argv, message in cases:
        code, out, err = run([*argv, "--output", str(output)], capsys)
        assert code == 2 and out == "", argv
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)
    assert not output.exists() and not (export / "eval.json").exists()


def test_lm_eval_tasks_without_lm_eval_names_the_extra(tokenizer, tmp_path, capsys, monkeypatch):
    before = "lm_eval" in sys.modules
    import dqt_lightning.tools.evaluate  # noqa: F401

    assert ("lm_eval" in sys.modules) == before  # importing eval never imports lm_eval
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args, **kwargs: None if name == "lm_eval" else find_spec(name, *args, **kwargs))
    export = hand_export(tmp_path / "m", tokenizer)
    code, out, err = run([str(export), "--lm-eval-tasks", "hellaswag"], capsys)
    assert code == 2 and out == ""
    assert err == ("error: eval --lm-eval-tasks needs the optional package 'lm_eval': pip install -e '.[eval]' "
                   "(or pip install lm-eval)\n")
    assert not (export / "eval.json").exists()


# --- compare -------------------------------------------------------------------------------------------------------

def test_eval_json_lands_in_the_run_directory_and_compare_shows_it(trained_runs, text_file, tmp_path, capsys):
    run_dir = trained_runs.copy("ternary", tmp_path)
    code, _, err = run([str(run_dir), "--text", str(text_file), "--context", "32", "--tasks", "copy"], capsys)
    assert code == 0, err
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["model"] == str(run_dir)
    assert run_tool(["compare", str(run_dir), "--plot", str(tmp_path / "plot.png")]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    columns = [c.strip() for c in header.strip("|").split("|")]
    values = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
    assert values["eval ppl"] == f"{report['perplexity']['perplexity']:.2f}"
    assert values["copy acc"] == f"{report['tasks']['copy']['acc']:.3f}"
    # A checkpoint outside a run directory: <stem>-eval.json beside it.
    lone = tmp_path / "lone" / "model.ckpt"
    lone.parent.mkdir()
    lone.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    code, _, err = run([str(lone), "--tasks", "counting"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "lone" / "model-eval.json").read_text())["tasks"]["counting"]["n"] == 9
    # An export's scores live in its directory, and a new export there replaces them with the weights they describe.
    export = tmp_path / "export"
    assert run_tool(["export", str(run_dir), "--output", str(export)]) == 0
    code, _, err = run([str(export), "--tasks", "counting"], capsys)
    assert code == 0, err
    assert (export / "eval.json").is_file()
    assert run_tool(["export", str(run_dir), "--output", str(export)]) == 0
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
