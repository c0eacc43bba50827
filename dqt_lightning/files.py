"""Whole-or-nothing writes of files and directories, shared by the data caches, the checkpoints and the exports."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from dqt_lightning.errors import ConfigError


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temp file in the same directory, fsync it, then ``os.replace``: readers see a whole file or
    none, and a process killed mid-write leaves at most a hidden ``.tmp`` file, never a truncated ``path``.

    The temp file's name carries the writer's process id; the next write of the same ``path`` removes the ones whose
    writer is dead (a run killed while saving a checkpoint), and never a live writer's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_files(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); a checkpoint or cache should get the permissions any new file gets.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_dead_writers_files(path: Path) -> list[Path]:
    """Remove the temp files :func:`atomic_write` left beside ``path`` in processes that are gone; returns them."""
    removed = []
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's, alive
    return True


@contextlib.contextmanager
def atomic_directory(path: Path, field: str) -> Iterator[Path]:
    """A directory written whole or not at all: yields a hidden staging directory beside ``path`` to fill, which
    then replaces ``path`` (an earlier one is removed only after the new one is in place). On an error, or when
    ``path`` cannot be written at all, nothing at ``path`` changes; the latter is a ``ConfigError`` naming
    ``field``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    except OSError as error:
        raise ConfigError(f"{field} {path} cannot be written: {error.strerror or error}") from error
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's directory is private, as mkstemp's file
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def check_replaceable_directory(out: Path, own_files: Iterable[str], kind: str) -> None:
    """Refuse, naming ``--output``, a directory that a new ``kind`` cannot replace whole: a file in its place, or a
    directory holding anything but ``own_files`` (an earlier one's files are replaced; anything else is the user's)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file; give a directory to write the {kind} into")
    own = set(own_files)
    others = sorted(p.name for p in out.iterdir() if p.name not in own) if out.is_dir() else []
    if others:
        raise ConfigError(f"--output {out} holds files that are not an {kind}'s ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); give a new directory or an earlier {kind}")
