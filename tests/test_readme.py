"""README.md's examples run as written: a Trainer with the precision plugin and the update callback, and the path of a
trained model out of the app (transformers, llama.cpp, eval; an interop test)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## In Python"


def readme_python_block() -> str:
    """The first ```python block under the heading "## In Python", before the next second-level heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert HEADING in text, f"README.md has no '{HEADING}' heading"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, f"no ```python block under '{HEADING}' in README.md"
    return match.group(1)


def test_the_readme_example_trains_and_keeps_integer_weights(tmp_path: Path) -> None:
    code = readme_python_block()
    # The example itself asserts what matters: int8 ternary levels after training, five updates, a finite loss.
    assert "assert" in code and "torch.int8" in code
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "DQTLinear(" in result.stdout and "levels=[-1, 1]" in result.stdout, result.stdout
    assert re.search(r"train loss \d+\.\d+, flip rate \d\.\d+", result.stdout), result.stdout


ELSEWHERE = "## Using a trained model elsewhere"
# The block's training, cut to a few steps of a one-layer model; every other line runs as written.
FEW_STEPS = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
             "--trainer.enable_progress_bar", "false", "--model.init_args.config.n_layer", "1",
             "--data.init_args.vocab_size", "512", "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4"]


def readme_bash_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert heading in text, f"README.md has no '{heading}' heading"
    match = re.search(r"```bash\n(.*?)```", text.split(heading, 1)[1].split("\n## ", 1)[0], re.DOTALL)
    assert match, f"no ```bash block under '{heading}' in README.md"
    return match.group(1)


@pytest.mark.interop
def test_the_readme_path_out_of_the_app_runs_as_written(tmp_path: Path, data_cache: str) -> None:
    block = readme_bash_block(ELSEWHERE)
    lines = [line for line in block.splitlines() if "pip install" not in line]  # the test environment has the extras
    fit = next(i for i, line in enumerate(lines) if " fit " in line)
    lines[fit] += " " + " ".join([*FEW_STEPS, "--data.init_args.cache_dir", data_cache])
    script = "set -euo pipefail\n" + "\n".join(lines).replace(".venv/bin/python", sys.executable) + "\n"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "notes.txt").write_text((ROOT / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    run = tmp_path / "runs" / "ternary+llama-cpp" / "version_0"
    assert (run / "export-hf" / "model.safetensors").is_file() and (run / "model-tq2_0.gguf").is_file()
    # Both loaders continued the prompt, and eval printed its perplexity and the two tasks' accuracy.
    assert result.stdout.count("The model") >= 1, result.stdout[-3000:]
    assert re.search(r"perplexity: \d", result.stdout) and "| copy |" in result.stdout, result.stdout[-3000:]


def test_the_readme_memory_plan_runs_as_written(tmp_path: Path) -> None:
    # The first command of the large-model block: the plan of the 7B lean run, which fits the machine it names.
    block = readme_bash_block("## Large models")
    command = block.split("\n.venv/bin/python", 1)[0].replace("\\\n", " ").split("#", 1)[0].split()
    assert command[:4] == [".venv/bin/python", "-m", "dqt_lightning", "plan"], command
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    peak = re.search(r"^peak +([\d.]+) GiB", result.stdout, re.MULTILINE)
    assert peak and 16.0 < float(peak.group(1)) < 19.6, result.stdout  # within 10% of the 17.8 GiB measured
