"""atomic_write: whole files under the target name, with the permissions a plain new file would get."""

from __future__ import annotations

import os
import stat

import pytest

from dqt_lightning.files import atomic_write


def test_the_file_appears_whole_with_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "sub" / "a.bin", lambda f: f.write(b"hello"))
    finally:
        os.umask(old)
    target = tmp_path / "sub" / "a.bin"
    assert target.read_bytes() == b"hello"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's private 0600
    assert os.listdir(tmp_path / "sub") == ["a.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]
