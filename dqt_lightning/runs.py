"""Run directories: where the default logger puts a run (``runs/<config names>/version_N``), and which earlier run
``--ckpt_path last`` may continue."""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonargparse import Namespace

RUNS_DIR = "runs"


def run_name(config: Namespace) -> str:
    """The default logger's directory under runs/: the names of the config files, joined."""
    return "+".join(Path(str(c)).stem for c in (config.get("config") or [])) or "default"


# What makes a run the experiment it is: a resumed run must have the same. Everything else may change on resume
# (more max_steps, other devices, logging or validation cadence).
RESUME_MUST_MATCH = ("model", "data", "optimizer", "lr_scheduler", "seed_everything", "trainer.plugins",
                     "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm")


def _flat(config: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(config, dict) or not config:
        return {prefix.rstrip("."): config} if prefix else {}
    flat: dict[str, object] = {}
    for key, value in config.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


def differing_settings(saved: dict, current: dict) -> list[str]:
    """The settings (dotted keys, among :data:`RESUME_MUST_MATCH`) in which a run's saved ``config.yaml`` and the
    config being launched differ."""
    a, b = _flat(saved), _flat(current)
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key)
                  and any(key == k or key.startswith(f"{k}.") for k in RESUME_MUST_MATCH))


def resumable_checkpoint(runs: Path, current: dict) -> tuple[Path | None, list[str]]:
    """``checkpoints/last.ckpt`` of the newest ``version_N`` under ``runs`` whose ``config.yaml`` has the settings
    being launched, and, when none has, the settings in which the newest run with a last.ckpt differs."""
    found = sorted(((int(d.name.removeprefix("version_")), d) for d in runs.glob("version_*")
                    if d.name.removeprefix("version_").isdigit() and (d / "checkpoints" / "last.ckpt").is_file()),
                   reverse=True)
    newest_differs: list[str] = []
    for _, run in found:
        try:
            saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            saved = None
        differs = differing_settings(saved, current) if isinstance(saved, dict) else [f"{run}/config.yaml"]
        if not differs:
            return run / "checkpoints" / "last.ckpt", []
        newest_differs = newest_differs or differs
    return None, newest_differs
