"""The package's shape: every module imports on its own, no import cycle, no oversized module, configs found through
the package (any install, not only a checkout)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from dqt_lightning.tools import reproduce

PACKAGE = Path(__file__).resolve().parents[1] / "dqt_lightning"
MAX_LINES = 450


# The modules that subclass an optional package's class, and that package (the others import theirs on use).
NEEDS_OPTIONAL_PACKAGE = {"dqt_lightning.tools.lm_eval_adapter": "lm_eval"}


def _module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("dqt_lightning", *path.relative_to(PACKAGE).with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _imports(name: str) -> set[str]:
    """The package's own modules that ``name`` imports, at any depth of its code."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    known = set(_module_names())
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dqt_lightning"):
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
            found |= {node.module} & known
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & known
    return found - {name}


def test_every_module_imports_on_its_own():
    # One interpreter for all of them, each import in a fresh module table: an import that only works after another
    # module happened to be loaded first fails here.
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {_module_names()!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('dqt_lightning')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        failed.append(f'{name}: {error!r}')\n"
        "print('\\n'.join(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # A module that exists to plug into an optional package may miss exactly that package, and nothing else.
    allowed = {f"{name}: ModuleNotFoundError(\"No module named '{package}'\")"
               for name, package in NEEDS_OPTIONAL_PACKAGE.items() if importlib.util.find_spec(package) is None}
    assert set(filter(None, done.stdout.splitlines())) <= allowed, done.stdout


def test_no_import_cycle():
    graph = {name: _imports(name) for name in _module_names()}
    # The top-level package re-exports the public API; a module that imports the package itself would close a cycle
    # through it, which the graph shows as an edge to "dqt_lightning".
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_subpackages_by_role_and_no_oversized_module():
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} >= {"quant", "train", "data", "tools"}
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) >
            MAX_LINES}
    assert long == {}


def test_reproduce_finds_every_arm_config_through_the_package():
    assert reproduce.CONFIGS.is_dir()
    for base, overlays in [*reproduce.ARMS.values(), *reproduce.OPTIONAL_ARMS.values()]:
        for name in (base, *overlays):
            assert (reproduce.CONFIGS / name).is_file(), name
