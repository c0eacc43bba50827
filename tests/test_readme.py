"""The Python example of README.md runs as written: a Trainer with the precision plugin and the update callback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
