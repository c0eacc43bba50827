"""``python -m dqt_lightning eval MODEL``: perplexity on local text and accuracy on multiple-choice tasks, offline.

``MODEL`` is a checkpoint written by ``fit`` (or its run directory) or a directory written by ``export``; ``--ternary``
evaluates it with its quantized weights re-quantized to ternary, as ``generate --ternary`` does.

- ``--text PATH`` (a ``.txt`` / ``.jsonl`` / ``.parquet`` file, directory or glob, read as the data modules read it):
  perplexity per token of the model's tokenizer. The documents are tokenized and joined with the end-of-text id
  between them, as for training; windows of ``--context`` input tokens start every ``--stride`` tokens (the last one
  moved back to end at the last token), each predicts the token after every one of its positions and scores only
  the tokens no earlier window scored. Every token but the very first is scored once: perplexity =
  exp(-sum log p / (tokens - 1)).
- ``--tasks FILE.jsonl ...`` (or the name of a task shipped in ``dqt_lightning/tools/tasks``): one JSON object per
  line, ``{"context": str, "choices": [str, ...], "label": int}`` (optional ``"id"``). Each choice is scored by the
  summed log-likelihood of its tokens after the context, tokenized as lm-evaluation-harness does (context and choice
  tokenized together, the choice's tokens being those after the context's own); ``acc`` takes the highest,
  ``acc_norm`` the highest per character of the choice (lm-eval's ``acc_norm``).
- ``--lm-eval-tasks NAME ...``: any lm-evaluation-harness task, through :mod:`dqt_lightning.tools.lm_eval_adapter`
  (needs the ``eval`` extra).

A Markdown table goes to stdout, and every number to ``eval.json`` in the run directory (``<stem>-eval.json`` beside
a checkpoint outside a run, ``eval.json`` in an export), where ``compare`` picks it up.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from dqt_lightning.errors import ConfigError, require_extra
from dqt_lightning.files import atomic_write
from dqt_lightning.model import LLaMA
from dqt_lightning.data.tokenizer import TextTokenizer
from dqt_lightning.tools.scoring import load_model, loglikelihoods, score_windows, sliding_windows

TASKS_DIR = Path(__file__).with_name("tasks")
MAX_DEFAULT_CONTEXT = 1024
EVAL_FILE = "eval.json"


# --- loading -------------------------------------------------------------------------------------------------------

def default_output(model_path: str | Path) -> Path:
    """``eval.json`` in the run directory of a checkpoint under ``checkpoints/`` (or of a run directory), in an
    export directory; ``<stem>-eval.json`` beside any other checkpoint."""
    from dqt_lightning.tools.loading import resolve_checkpoint  # noqa: PLC0415

    path = Path(model_path)
    if path.is_dir() and (path / "config.json").is_file():
        return path / EVAL_FILE
    ckpt = resolve_checkpoint(path)
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / EVAL_FILE
    return ckpt.with_name(f"{ckpt.stem}-{EVAL_FILE}")


# --- multiple-choice tasks -----------------------------------------------------------------------------------------

@dataclass
class Item:
    context: str
    choices: list[str]
    label: int
    id: Any = None


def task_file(spec: str) -> Path:
    """A task file, or the name of one shipped in ``dqt_lightning/tools/tasks``."""
    path = Path(spec)
    if not path.is_file() and not path.suffix and (TASKS_DIR / f"{spec}.jsonl").is_file():
        return TASKS_DIR / f"{spec}.jsonl"
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in TASKS_DIR.glob("*.jsonl")))
        raise ConfigError(f"--tasks: {spec} does not exist (a .jsonl file, or a shipped task: {shipped})")
    if not path.is_file():
        raise ConfigError(f"--tasks: {spec} is not a file")
    return path


def read_task(path: Path) -> list[Item]:
    """The items of a task file; a malformed line is a one-line error naming ``file:line`` and the field."""
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--tasks: {path} cannot be read as UTF-8 text ({error})") from error
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}: not a JSON object ({error.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: not a JSON object (got {type(row).__name__})")
        for field in ("context", "choices", "label"):
            if field not in row:
                raise ConfigError(f"{where}: missing field '{field}'")
        context, choices, label = row["context"], row["choices"], row["label"]
        if not isinstance(context, str):
            raise ConfigError(f"{where}: field 'context' must be a string, got {type(context).__name__}")
        if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
            raise ConfigError(f"{where}: field 'choices' must be a list of non-empty strings")
        if not choices:
            raise ConfigError(f"{where}: field 'choices' is empty")
        if isinstance(label, bool) or not isinstance(label, int):
            raise ConfigError(f"{where}: field 'label' must be an integer, got {label!r}")
        if not 0 <= label < len(choices):
            raise ConfigError(f"{where}: field 'label' is {label}, out of range for {len(choices)} choices")
        items.append(Item(context, choices, label, row.get("id")))
    if not items:
        raise ConfigError(f"--tasks: {path} holds no items")
    return items


def evaluate_task(model: LLaMA, tokenizer: TextTokenizer, items: Sequence[Item], batch_size: int = 8,
                  progress: Any = None) -> dict[str, float]:
    """``acc`` (the most likely choice is the label) and ``acc_norm`` (the most likely per character) of a task."""
    pairs = [(item.context, choice) for item in items for choice in item.choices]
    lls = iter(ll for ll, _ in loglikelihoods(model, tokenizer, pairs, batch_size, progress))
    acc = acc_norm = 0
    for item in items:
        scores = np.array([next(lls) for _ in item.choices])
        lengths = np.array([len(choice) for choice in item.choices], dtype=np.float64)
        acc += int(np.argmax(scores)) == item.label
        acc_norm += int(np.argmax(scores / lengths)) == item.label
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


# --- text ----------------------------------------------------------------------------------------------------------

def read_documents(spec: str, text_field: str = "text") -> list[str]:
    """The documents of a ``.txt`` (blank-line separated) / ``.jsonl`` / ``.json`` / ``.parquet`` file, directory or
    glob, read by the data modules' reader (:class:`~dqt_lightning.data.text_source.TextSource`)."""
    from dqt_lightning.data.text_source import TextSource  # noqa: PLC0415 - imports datasets

    source = TextSource(path=spec, text_field=text_field)
    source.files(spec, "--text")
    try:
        docs = [text for _, text in source._texts("train")]
    except ConfigError as error:  # the reader names its config fields; here they are options
        message = str(error).replace("data.source.path", "--text").replace("data.source.text_field", "--text-field")
        raise ConfigError(message) from None
    if not docs:
        raise ConfigError(f"--text: {spec} holds no text")
    return docs


def text_tokens(tokenizer: TextTokenizer, docs: Iterable[str]) -> np.ndarray:
    """The documents as one stream, the end-of-text id between consecutive ones (as the data modules pack them)."""
    from dqt_lightning.data.text import encode_stream  # noqa: PLC0415

    return encode_stream(tokenizer, docs)


# --- output --------------------------------------------------------------------------------------------------------

def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| task | metric | value | n |", "|---|---|---:|---:|"]
    for row in rows:
        value = row["value"]
        shown = "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {row['task']} | {row['metric']} | {shown} | {row['n'] if row['n'] is not None else '-'} |")
    return "\n".join(lines)


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm  # noqa: PLC0415 - installed with datasets

    return tqdm(total=total, desc=description, unit="window", file=sys.stderr, disable=not enabled, leave=False)


def _positive(flag: str, value: int | None, at_least: int = 1) -> None:
    if value is not None and value < at_least:
        raise ConfigError(f"{flag} must be >= {at_least}; got {value}")


def _run(args: SimpleNamespace) -> dict:
    for flag, value in (("--context", args.context), ("--stride", args.stride), ("--limit-tokens", args.limit_tokens),
                        ("--batch-size", args.batch_size)):
        _positive(flag, value)
    if not (args.text or args.tasks or args.lm_eval_tasks):
        raise ConfigError("nothing to evaluate: give --text PATH, --tasks FILE.jsonl ... or --lm-eval-tasks NAME ...")
    if args.lm_eval_include and not args.lm_eval_tasks:
        raise ConfigError("--lm-eval-include applies to --lm-eval-tasks")
    if args.lm_eval_tasks:
        require_extra("lm_eval", "eval", "eval --lm-eval-tasks")
        if args.lm_eval_include and not Path(args.lm_eval_include).is_dir():
            raise ConfigError(f"--lm-eval-include: {args.lm_eval_include} is not a directory")
    # Everything that can be checked without the model, before loading it.
    tasks = {}
    for spec in args.tasks or []:
        path = task_file(spec)
        if path.stem in tasks:
            raise ConfigError(f"--tasks: two task files are named {path.stem} ({tasks[path.stem][0]} and {path})")
        tasks[path.stem] = (path, read_task(path))
    docs = read_documents(args.text, args.text_field) if args.text else None
    if args.output and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a directory; name the JSON file to write")

    model, tokenizer = load_model(args.model)
    output = Path(args.output) if args.output else default_output(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as error:
        raise ConfigError(f"--device {device} cannot be used: {str(error).splitlines()[0]}") from error
    block = model.config.block_size
    context = args.context or min(block, MAX_DEFAULT_CONTEXT)
    if context > block:
        raise ConfigError(f"--context {context} is more than the model's block size of {block} tokens")
    stride = args.stride or context
    if stride > context:
        raise ConfigError(f"--stride {stride} is more than --context {context}: tokens in between would not be scored")
    show = not args.no_progress and sys.stderr.isatty()
    from dqt_lightning.quant.ternary import TernaryWeights  # noqa: PLC0415

    report: dict[str, Any] = {"model": str(args.model), "ternary": args.ternary, "context": context, "stride": stride,
                              "results": []}
    rows = report["results"]
    with TernaryWeights(model) if args.ternary else contextlib.nullcontext():
        if docs is not None:
            tokens = text_tokens(tokenizer, docs)
            if args.limit_tokens is not None:
                tokens = tokens[:args.limit_tokens + 1]
            if len(tokens) < 2:
                raise ConfigError(f"--text: {args.text} is a single token; there is nothing to score")
            windows = sliding_windows(tokens, context, stride)
            with _progress(len(windows), "perplexity", show) as bar:
                scores = score_windows(model, windows, args.batch_size, bar)
            total, scored = math.fsum(s for s, _, _ in scores), sum(n for _, _, n in scores)
            nll = -total / scored
            report["perplexity"] = {"text": args.text, "documents": len(docs), "tokens": int(len(tokens)),
                                    "tokens_scored": scored, "nll_per_token": nll, "perplexity": math.exp(nll),
                                    "unit": "token", "tokenizer": tokenizer.fingerprint}
            rows.append({"task": "text", "metric": "perplexity", "value": math.exp(nll), "n": scored})
        for name, (path, items) in tasks.items():
            with _progress(sum(len(i.choices) for i in items), name, show) as bar:
                scores = evaluate_task(model, tokenizer, items, args.batch_size, bar)
            report.setdefault("tasks", {})[name] = {"file": str(path), **scores}
            rows += [{"task": name, "metric": m, "value": scores[m], "n": scores["n"]} for m in ("acc", "acc_norm")]
        if args.lm_eval_tasks:
            from dqt_lightning.tools.lm_eval_adapter import run_lm_eval  # noqa: PLC0415 - imports lm_eval

            found, lm_rows = run_lm_eval(model, tokenizer, args.lm_eval_tasks, args.lm_eval_include,
                                         args.batch_size, show, args.lm_eval_limit)
            report["lm_eval"] = found
            rows += lm_rows
    report["output"] = str(output)
    return report


def evaluate(model: str, text: str | None = None, text_field: str = "text", context: int | None = None,
             stride: int | None = None, limit_tokens: int | None = None, tasks: list[str] | None = None,
             lm_eval_tasks: list[str] | None = None, lm_eval_include: str | None = None,
             lm_eval_limit: int | None = None, ternary: bool = False, batch_size: int = 8, device: str | None = None,
             output: str | None = None, no_progress: bool = False) -> int:
    """Perplexity on local text and multiple-choice accuracy of a checkpoint or an export.

    Args:
        model: a checkpoint (runs/<name>/version_N/checkpoints/*.ckpt), a run directory (its checkpoints/last.ckpt)
            or an export directory
        text: perplexity on a .txt/.jsonl/.parquet file, directory or glob (in .txt files a blank line separates
            documents)
        text_field: the field holding the text in .jsonl/.parquet files
        context: input tokens per window (default: the model's block size, at most 1024)
        stride: a window starts every N tokens (default: --context; smaller gives every scored token more context, at
            more windows)
        limit_tokens: score at most N tokens (the first N + 1 of the text)
        tasks: multiple-choice task files, one {"context": ..., "choices": [...], "label": i} per line, or names of
            shipped tasks (the .jsonl files in dqt_lightning/tools/tasks)
        lm_eval_tasks: lm-evaluation-harness tasks (needs the eval extra; its tasks download their datasets unless
            they are cached)
        lm_eval_include: a directory of lm-eval task YAML files to add
        lm_eval_limit: at most N documents per lm-eval task
        ternary: re-quantize the quantized weights to ternary
        batch_size: windows per forward pass
        device: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)
        output: the JSON file to write (default: eval.json in the run or export directory, <stem>-eval.json beside a
            checkpoint outside a run)
        no_progress: no progress bar (none is drawn when stderr is not a terminal)
    """
    settings = SimpleNamespace(**locals())
    _positive("--lm-eval-limit", lm_eval_limit)
    report = _run(settings)
    path = Path(report["output"])
    data = (json.dumps(report, indent=2) + "\n").encode()
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as error:
        raise ConfigError(f"--output {path} cannot be written: {error.strerror or error}") from error
    print(markdown_table(report["results"]))
    if "perplexity" in report:
        ppl = report["perplexity"]
        print(f"\nperplexity: {ppl['perplexity']:.4f} per token of this model's tokenizer (not per word), "
              f"{ppl['tokens_scored']:,} tokens scored of {ppl['tokens']:,} (context {report['context']}, "
              f"stride {report['stride']}{', ternary weights' if ternary else ''})")
    print(f"results: {path}")
    return 0
