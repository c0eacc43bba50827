"""lm-evaluation-harness adapter: this package's models as an ``lm_eval`` model named ``dqt_lightning``.

Importing this module imports ``lm_eval`` (the ``eval`` extra) and registers the model, so either::

    import dqt_lightning.tools.lm_eval_adapter
    lm_eval.simple_evaluate(model="dqt_lightning", model_args="path=runs/ternary/version_0", tasks=[...])

or ``python -m dqt_lightning eval MODEL --lm-eval-tasks NAME ...``. Scoring is the ``eval`` command's own
(:mod:`dqt_lightning.tools.evaluate`): ``loglikelihood`` splits context and continuation as lm-eval's ``TemplateLM``
does, ``loglikelihood_rolling`` scores a whole document after an end-of-text token in windows of the model's context
(disjoint windows: each predicts the ``max_length`` tokens after the previous one's), and ``generate_until`` decodes
greedily with the key-value cache until a stop string, the end-of-text token or ``max_gen_toks``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dqt_lightning.errors import ConfigError
from dqt_lightning.model import LLaMA
from dqt_lightning.data.tokenizer import TextTokenizer
from dqt_lightning.tools.evaluate import load_model, loglikelihoods, score_windows, sliding_windows


class _Stop(Exception):
    """Raised from the sampler's callback once a stop string appears."""


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


@register_model("dqt_lightning")
class DQTLightningLM(LM):
    """A checkpoint, run directory or export (``path=``; ``pretrained=`` is taken too), or a model and tokenizer
    already loaded, as an lm-eval model.

    Args:
        path: What to load, as ``eval MODEL`` takes it.
        model: A loaded model (with ``tokenizer``) instead of ``path``.
        tokenizer: Its tokenizer.
        ternary: Re-quantize the quantized weights to ternary for the adapter's whole life.
        batch_size: Windows per forward pass.
        device: Where the model runs (default: where it is, or cuda when available for a loaded path).
        max_length: Context of ``loglikelihood`` and ``loglikelihood_rolling`` (default: the model's block size).
        show_progress: Draw a progress bar on stderr for each request type.
    """

    def __init__(self, path: str | Path | None = None, model: LLaMA | None = None,
                 tokenizer: TextTokenizer | None = None, ternary: bool = False, batch_size: int | str | None = 8,
                 device: str | None = None, max_length: int | None = None, show_progress: bool = False,
                 pretrained: str | None = None, **_ignored: Any) -> None:
        super().__init__()
        import torch  # noqa: PLC0415

        if model is None:
            if path is None and pretrained is None:
                raise ConfigError("dqt_lightning lm-eval model: give path=<checkpoint, run or export directory>")
            model, tokenizer = load_model(path or pretrained)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        elif tokenizer is None:
            raise ConfigError("dqt_lightning lm-eval model: a model given directly needs its tokenizer")
        self.model = model.to(device) if device else model
        self.model.eval()
        self.tokenizer = tokenizer
        self._ternary = contextlib.ExitStack()
        if _flag(ternary):
            from dqt_lightning.quant.ternary import TernaryWeights  # noqa: PLC0415

            self._ternary.enter_context(TernaryWeights(self.model))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 8
        self.max_length = int(max_length or model.config.block_size)
        if not 1 <= self.max_length <= model.config.block_size:
            raise ConfigError(f"dqt_lightning lm-eval model: max_length {self.max_length} is outside [1, block size "
                              f"{model.config.block_size}]")
        self.show_progress = _flag(show_progress)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    def _bar(self, total: int, description: str):
        from tqdm.auto import tqdm  # noqa: PLC0415

        return tqdm(total=total, desc=description, disable=not self.show_progress, leave=False)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(request.args) for request in requests]
        with self._bar(len(pairs), "loglikelihood") as bar:
            results = loglikelihoods(self.model, self.tokenizer, pairs, self.batch_size, bar, self.max_length)
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def rolling_tokens(self, text: str) -> list[int]:
        """The token stream ``loglikelihood_rolling`` scores: the end-of-text token, then the document's tokens."""
        return [self.tokenizer.eot_id, *self.tokenizer.encode_batch([text])[0]]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for number, request in enumerate(requests):
            found = sliding_windows(self.rolling_tokens(request.args[0]), self.max_length, self.max_length)
            windows += found
            owner += [number] * len(found)
        totals = [0.0] * len(requests)
        with self._bar(len(windows), "loglikelihood_rolling") as bar:
            scores = score_windows(self.model, windows, self.batch_size, bar)
        parts: list[list[float]] = [[] for _ in requests]
        for number, (logprob, _, _) in zip(owner, scores):
            parts[number].append(logprob)
        for number, request in enumerate(requests):
            totals[number] = math.fsum(parts[number])
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), totals[number])
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from dqt_lightning.tools.generate import sample  # noqa: PLC0415

        block = self.model.config.block_size
        outputs = []
        with self._bar(len(requests), "generate_until") as bar:
            for request in requests:
                context, kwargs = request.args[0], dict(request.args[1] or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = max(1, min(int(kwargs.get("max_gen_toks", 256)), block - 1))
                prompt = (self.tokenizer.encode_batch([context])[0] if context else [])[-(block - max_new):]
                prompt = prompt or [self.tokenizer.eot_id]
                produced: list[int] = []

                def watch(ids: list[int]) -> None:
                    produced[:] = ids
                    if until and any(stop in self.tokenizer.decode(ids) for stop in until):
                        raise _Stop

                with contextlib.suppress(_Stop):
                    produced[:] = sample(self.model, prompt, max_new, temperature=0, top_k=None,
                                         stop_id=self.tokenizer.eot_id, on_token=watch)
                text = self.tokenizer.decode(produced)
                for stop in until:
                    text = text.split(stop, 1)[0]
                self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
                outputs.append(text)
                bar.update(1)
        return outputs


def run_lm_eval(model: LLaMA, tokenizer: TextTokenizer, tasks: list[str], include: str | None = None,
                batch_size: int = 8, show_progress: bool = False,
                limit: int | None = None) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Run lm-eval tasks on a loaded model.

    Returns:
        ``{task: {metric: value}}`` (lm-eval's metric names without the ``,none`` filter suffix, standard errors
        left out), and the rows of ``eval``'s table.
    """
    import lm_eval  # noqa: PLC0415
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    manager = TaskManager(include_path=include) if include else TaskManager()
    known = set(manager.all_tasks)
    unknown = [name for name in tasks if name not in known]
    if unknown:
        raise ConfigError(f"--lm-eval-tasks: lm-eval has no task {unknown[0]!r} (lm_eval --tasks list names them; "
                          "--lm-eval-include DIR adds task YAML files of your own)")
    adapter = DQTLightningLM(model=model, tokenizer=tokenizer, batch_size=batch_size, show_progress=show_progress)
    try:
        results = lm_eval.simple_evaluate(model=adapter, tasks=list(tasks), task_manager=manager, limit=limit,
                                          bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - a task's dataset that cannot be loaded (offline), a bad YAML, ...
        line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"--lm-eval-tasks: lm-eval failed: {type(error).__name__}: {line}") from error
    found: dict[str, dict[str, float]] = {}
    rows = []
    for task, metrics in (results or {}).get("results", {}).items():
        n = ((results.get("n-samples") or {}).get(task) or {}).get("effective")
        for key, value in metrics.items():
            metric = key.split(",", 1)[0]
            if key == "alias" or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            found.setdefault(task, {})[metric] = float(value)
            rows.append({"task": task, "metric": metric, "value": float(value), "n": n})
    return found, rows
