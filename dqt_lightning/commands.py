"""The tools beside LightningCLI's ``fit``, ``validate`` and ``test``: one table of plain functions, one parser.

A tool is a function whose signature is its command line, parsed by jsonargparse:

- a parameter without a default is a positional argument; one with a default is a ``--flag``, its underscores
  written as dashes (``max_new_tokens`` is ``--max-new-tokens``);
- ``list[X]`` takes one or more values, and a repeated flag adds to them (``--seeds 0 1 --seeds 2`` is
  ``--seeds 0 1 2``); ``bool`` is a switch (``--pack``, or ``--pack false``);
- jsonargparse checks every value against its annotation (``Literal`` choices, ``int``, ``Path``, ``X | None``);
- each argument's help is the function's docstring entry for it (``Args:``), the command's the docstring's text;
- a parameter named ``fit_args`` receives what follows ``--`` on the command line, unparsed.

A user mistake, in parsing or raised by the tool as :class:`ConfigError`, ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable

import docstring_parser
from jsonargparse import ArgumentParser

from dqt_lightning.errors import ConfigError

PROG = "python -m dqt_lightning"
# name -> "module:function"; imported only when the command line asks for the tools.
TOOLS = {
    "compare": "dqt_lightning.tools.compare:compare",
    "export": "dqt_lightning.tools.export:export",
    "generate": "dqt_lightning.tools.generate:generate",
    "bench": "dqt_lightning.tools.bench:bench",
    "reproduce": "dqt_lightning.tools.reproduce:reproduce",
    "eval": "dqt_lightning.tools.evaluate:evaluate",
}
AFTER_DASHES = "fit_args"

# The command line of the tool running now, as given (after the tool's name): bench and reproduce write it into
# their reports.
invocation: list[str] = []


def tool(name: str) -> Callable[..., int | None]:
    module, function = TOOLS[name].split(":")
    return getattr(importlib.import_module(module), function)


def first_reason(message: str) -> str:
    """The line of a jsonargparse report that says what is wrong, without its layout."""
    lines = [ln.strip().removeprefix("- ").strip() for ln in message.splitlines() if ln.strip()]
    head = lines[0] if lines else message
    given = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Given value:")), None)
    if head.startswith("Parser key") and given is not None:
        # A value no type accepts: name the value and the types, not the report's layout.
        subtypes = next((ln for ln in lines if ln.startswith("Subtypes:")), "")
        found = [name or "one of " + choices.replace("'", "") for name, choices in
                 re.findall(r"<class '([\w.]+)'>|Literal\[([^\]]*)\]", subtypes)]
        found = [name for name in found if name != "NoneType"] or re.findall(r"Expected a <class '([\w.]+)'>", message)
        expected = f" (expected {' or '.join(dict.fromkeys(found))})" if found else ""
        return f"{head.rstrip(':')}: {given!r} is not a valid value{expected}"
    detail = next((ln for ln in lines[1:] if ln.startswith(("Expected", "Does not", "Problem", "No action", "Unable",
                                                            "Not a valid", "Path", "Parser key", "Got value"))), "")
    return f"{head} {detail}".strip()


class OneLineParser(ArgumentParser):
    """jsonargparse prints usage plus a nested report; users get the one line that matters."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes -1e-3 for a flag (its negative numbers are -1 and -.5 only): a value such as --lr-sweep
        # -1e-3 reaches the tool, which says what is wrong with it.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str, ex: Exception | None = None):
        sys.stderr.write(f"error: {_as_typed(first_reason(message))}\n")
        sys.exit(2)


def _as_typed(line: str) -> str:
    """A jsonargparse line in the words of the command line: ``--max-new-tokens``, not ``Parser key "..."``."""
    line = re.sub(r'Parser key "(\w+)"', lambda m: "--" + m[1].replace("_", "-"), line)
    line = re.sub(r"the following arguments are required: \w+\.(\w+)", r"missing the argument \1", line)
    wrong = re.search(r"Expected a (?:<class '(\w+)'>|typing\.Literal\[(.*)\])\. Got value: (.*)$", line)
    if wrong:
        expected = f"an {wrong[1]}" if wrong[1] else f"one of {wrong[2].replace(chr(39), '')}"
        line = f"{line[:wrong.start()].rstrip(': ')}: {wrong[3]!r} is not {expected}"
    return line


def _element(annotation: object) -> object | None:
    """``X`` for ``list[X]`` or ``list[X] | None``; None for anything else."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    lists = [a for a in options if typing.get_origin(a) is list]
    return typing.get_args(lists[0])[0] if lists else None


def add_function(parser: ArgumentParser, function: Callable) -> None:
    """One argument per parameter of ``function``, by the rules in this module's docstring."""
    docs = docstring_parser.parse(function.__doc__ or "")
    helps = {p.arg_name: " ".join(p.description.split()) for p in docs.params if p.description}
    hints = typing.get_type_hints(function)
    for name, parameter in inspect.signature(function).parameters.items():
        if name == AFTER_DASHES:
            continue
        annotation = hints.get(name, str)
        positional = parameter.default is inspect.Parameter.empty
        kwargs: dict = {"help": helps.get(name, "")}
        element = _element(annotation)
        if element is not None:
            kwargs.update(type=element, nargs="+")
        elif annotation is bool:
            kwargs.update(type=bool, nargs="?", const=True)
        else:
            kwargs["type"] = annotation
        if positional:
            parser.add_argument(name, **kwargs)
        else:
            parser.add_argument("--" + name.replace("_", "-"), dest=name, default=parameter.default, **kwargs)


def _lists_joined(function: Callable, argv: list[str]) -> list[str]:
    """``--config a --config b`` as ``--config a b``: argparse would keep only the last of a flag given twice."""
    hints = typing.get_type_hints(function)
    lists = {"--" + name.replace("_", "-") for name in hints if _element(hints[name]) is not None}
    groups: list[list[str]] = []  # each flag with the values after it (and first, any positionals)
    for token in argv:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    first: dict[str, list[str]] = {}
    kept = []
    for group in groups:
        if group[0] in first:
            first[group[0]] += group[1:]
            continue
        kept.append(group)
        if group[0] in lists:
            first[group[0]] = group
    return [token for group in kept for token in group]


def _description(function: Callable) -> tuple[str, str]:
    docs = docstring_parser.parse(function.__doc__ or "")
    return docs.short_description or "", "\n\n".join(filter(None, [docs.short_description, docs.long_description]))


def parser() -> ArgumentParser:
    """The one parser of every tool, a subcommand each."""
    main = OneLineParser(prog=PROG, description="Tools that work on the runs of fit (which has its own --help).")
    subcommands = main.add_subcommands(required=True, dest="command")
    for name in TOOLS:
        function = tool(name)
        summary, description = _description(function)
        sub = OneLineParser(prog=f"{PROG} {name}", description=description)
        add_function(sub, function)
        subcommands.add_subcommand(name, sub, help=summary)
    return main


def summaries() -> str:
    """One line per tool, for the help of the whole program."""
    return "; ".join(f"{name} ({_description(tool(name))[0].rstrip('.')})" for name in TOOLS)


def run(argv: list[str]) -> int:
    """Parse ``argv`` (a tool's name first) and run that tool; returns the exit code."""
    given, after = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    if given and given[0] in TOOLS:
        given = given[:1] + _lists_joined(tool(given[0]), given[1:])
    config = parser().parse_args(given)
    name = config.command
    function = tool(name)
    values = config[name].as_dict()
    if after:
        if AFTER_DASHES not in inspect.signature(function).parameters:
            sys.stderr.write(f"error: {name} takes no arguments after --; got {' '.join(after)}\n")
            return 2
        values[AFTER_DASHES] = after
    invocation[:] = argv[1:]
    return _call(function, values)


def script(function: Callable, argv: list[str] | None = None) -> int:
    """A benchmark run as ``python -m dqt_lightning.tools.NAME``: one function's command line, by the same rules."""
    description = _description(function)[1]
    module = function.__module__
    if module == "__main__":  # run with -m: the module's own name is in its spec
        module = getattr(sys.modules["__main__"].__spec__, "name", module)
    parser = OneLineParser(prog=f"python -m {module}", description=description)
    add_function(parser, function)
    argv = sys.argv[1:] if argv is None else argv
    return _call(function, parser.parse_args(_lists_joined(function, argv)).as_dict())


def _call(function: Callable, values: dict) -> int:
    try:
        return function(**values) or 0
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
