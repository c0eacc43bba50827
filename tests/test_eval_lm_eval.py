"""The lm-evaluation-harness adapter, through lm-eval itself and offline: a local multiple-choice task scores the same
acc and acc_norm as ``eval --tasks`` on the same items, and ``loglikelihood_rolling`` is the total log-likelihood of
``eval``'s window machinery, on lm-eval's own rolling windows."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from dqt_lightning.tools.evaluate import TASKS_DIR
from dqt_lightning.tools.scoring import stream_logprob
from dqt_lightning.commands import run as run_tool
from tests.trained import trained_runs  # noqa: F401 - trained_runs is a fixture

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("one_thread")]

DOCUMENT = ("The standard library contains built-in modules that provide access to system functionality such as "
            "file I/O that would otherwise be inaccessible to Python programmers, as well as modules written in "
            "Python that provide standardized solutions for many problems that occur in everyday programming.")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def instance(kind: str, args: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_lm_eval_multiple_choice_matches_eval_tasks(trained_runs, tmp_path, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dqt_lightning.tools.lm_eval_adapter import DQTLightningLM

    ckpt = trained_runs.checkpoint("ternary")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    items = tmp_path / "items.jsonl"  # two shipped tasks in one file: 40 items of four choices
    items.write_text((TASKS_DIR / "copy.jsonl").read_text() + (TASKS_DIR / "arithmetic.jsonl").read_text())
    # The choice follows the context directly (target_delimiter ""), as eval --tasks scores it.
    (tasks / "dqt_items.yaml").write_text(
        "task: dqt_items\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(items))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: label\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    model = DQTLightningLM(path=str(ckpt), device="cpu", batch_size=4)
    results = lm_eval.simple_evaluate(model=model, tasks=["dqt_items"],
                                      task_manager=TaskManager(include_path=str(tasks)), bootstrap_iters=0,
                                      log_samples=False)
    theirs = results["results"]["dqt_items"]
    assert results["n-samples"]["dqt_items"]["effective"] == 40

    output = tmp_path / "ours.json"
    assert run_tool(["eval", str(ckpt), "--tasks", str(items), "--output", str(output), "--no-progress"]) == 0
    ours = json.loads(output.read_text())["tasks"]["items"]
    assert (ours["acc"], ours["acc_norm"]) == (theirs["acc,none"], theirs["acc_norm,none"])
    capsys.readouterr()

    # The same through the command: --lm-eval-tasks with --lm-eval-include.
    output = tmp_path / "theirs.json"
    assert run_tool(["eval", str(ckpt), "--lm-eval-tasks", "dqt_items", "--lm-eval-include", str(tasks),
                     "--output", str(output), "--no-progress"]) == 0
    report = json.loads(output.read_text())
    assert report["lm_eval"]["dqt_items"]["acc"] == ours["acc"]
    assert f"| dqt_items | acc | {ours['acc']:.4f} | 40 |" in capsys.readouterr().out


def test_loglikelihood_rolling_is_eval_windows_total_on_lm_evals_windows(trained_runs):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from dqt_lightning.tools.lm_eval_adapter import DQTLightningLM

    adapter = DQTLightningLM(path=str(trained_runs.checkpoint("ternary")), device="cpu", max_length=16)
    (rolling,) = adapter.loglikelihood_rolling([instance("loglikelihood_rolling", (DOCUMENT,))])
    ids = adapter.tokenizer.encode_batch([DOCUMENT])[0]
    assert len(ids) > 3 * 16 and len(ids) % 16  # several windows, the last one partly scored
    total, scored = stream_logprob(adapter.model, [adapter.tokenizer.eot_id, *ids], 16, 16)
    assert scored == len(ids)
    assert rolling == pytest.approx(total, rel=1e-6)
    # lm-eval's own windows (what its hf model scores), each run separately here.
    expected = 0.0
    for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
            ids, prefix_token=adapter.tokenizer.eot_id, max_seq_len=16, context_len=1)):
        inputs = (context + predicted)[:-1]
        with torch.no_grad():
            logprobs = adapter.model(torch.tensor([inputs]))[0].log_softmax(-1)[-len(predicted):]
        expected += float(logprobs.gather(1, torch.tensor(predicted)[:, None]).sum())
    assert rolling == pytest.approx(expected, rel=1e-5)


def test_a_rolling_task_reports_word_perplexity_of_that_loglikelihood(trained_runs, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dqt_lightning.tools.lm_eval_adapter import DQTLightningLM

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": DOCUMENT}) + "\n")
    (tasks / "dqt_rolling.yaml").write_text(
        "task: dqt_rolling\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(tmp_path / 'docs.jsonl'))}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: text\n"
        "metric_list:\n  - metric: word_perplexity\n")
    adapter = DQTLightningLM(path=str(trained_runs.checkpoint("ternary")), device="cpu", max_length=16)
    results = lm_eval.simple_evaluate(model=adapter, tasks=["dqt_rolling"],
                                      task_manager=TaskManager(include_path=str(tasks)), bootstrap_iters=0)
    (rolling,) = adapter.loglikelihood_rolling([instance("loglikelihood_rolling", (DOCUMENT,))])
    words = len(re.split(r"\s+", DOCUMENT))
    assert results["results"]["dqt_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-rolling / words))


def test_generate_until_is_greedy_and_stops_at_a_stop_string(trained_runs):
    from dqt_lightning.tools.generate import sample
    from dqt_lightning.tools.lm_eval_adapter import DQTLightningLM

    adapter = DQTLightningLM(path=str(trained_runs.checkpoint("ternary")), device="cpu")
    prompt = "The library"
    (free,) = adapter.generate_until([instance("generate_until", (prompt, {"until": [], "max_gen_toks": 12}))])
    ids = sample(adapter.model, adapter.tokenizer.encode_batch([prompt])[0], 12, temperature=0, top_k=None,
                 stop_id=adapter.tokenizer.eot_id)
    assert free == adapter.tokenizer.decode(ids)
    stop = free.strip()[:1]  # a string the greedy text is known to contain
    (cut,) = adapter.generate_until([instance("generate_until", (prompt, {"until": [stop], "max_gen_toks": 12}))])
    assert cut == free.split(stop, 1)[0]
