"""``python -m dqt_lightning fit ...`` several times over in the same two DDP processes, for tests/test_ddp.py.

    python -m tests.ddp_runs PLAN.json

PLAN.json lists runs as ``{"name": ..., "dir": ..., "args": [...]}``; each is ``dqt_lightning.cli.main(["fit",
*args])`` in its own directory (absolute: rank 1 runs this same module, from where rank 0 was when it started it).
The first run's Trainer starts rank 1 as usual (Lightning runs this command line again); the later ones find
LOCAL_RANK set and reuse both processes and their process group, which main() would otherwise close after each run.
Every process pays its imports and the embedded corpus once instead of once per run. A run that fails ends the
command there, with main()'s exit code and one line: put a run that is meant to fail last.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dqt_lightning import cli


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    close = cli._close_process_group
    cli._close_process_group = lambda: None  # one process group for all the runs, closed after the last
    try:
        for run in plan:
            os.chdir(run["dir"])
            for stream in (sys.stdout, sys.stderr):
                print(f"=== run {run['name']} ===", file=stream, flush=True)
            cli.main(["fit", *run["args"]])
    finally:
        close()


if __name__ == "__main__":
    main(sys.argv[1])
