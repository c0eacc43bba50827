"""User-facing errors: the CLI prints these as one line, never as a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in a config value or input file; the message names the field or path."""

    # jsonargparse turns an exception raised while it instantiates a class into text of its own; remembering the
    # last message lets the CLI find it again in that text and print it alone.
    _latest: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        ConfigError._latest = message

    @classmethod
    def latest_in(cls, text: str) -> ConfigError | None:
        if cls._latest and cls._latest in text:
            return cls(cls._latest)
        return None


class TrainingStopped(RuntimeError):
    """The run stopped itself on purpose (diverged replicas, non-finite values); the message says where and why."""


def require_extra(module: str, extra: str, what: str) -> None:
    """Refuse in one line when an optional dependency is missing, naming the extra that installs it.

    Args:
        module: The import name (``transformers``, ``gguf``, ``llama_cpp``, ``lm_eval``).
        extra: The ``pyproject.toml`` extra that brings it (``hf``, ``gguf``, ``eval``).
        what: The command or option that needs it, as the user typed it.
    """
    import importlib.util  # noqa: PLC0415 - only this check needs it

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs the optional package '{module}': pip install -e '.[{extra}]' "
                          f"(or pip install {module.replace('_', '-')})")
