"""glibc's allocator: ``ckptcore convert`` keeps freed buffers for reuse in its own process, and only there."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import ckptcore
from ckptcore.io import memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

_FREED = """
import numpy as np
from ckptcore.io.memory import keep_freed_memory
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) << 10
kept = keep_freed_memory() if {keep} else None
a = np.ones(256 << 20, np.uint8)
before = rss()
del a
print(kept, before - rss())
"""


def _returned_on_free(keep: bool, **env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FREED.format(keep=keep)], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


def test_by_default_a_freed_large_buffer_goes_back_to_the_system():
    _, returned = _returned_on_free(False)
    assert returned > 200 << 20


def test_keep_freed_memory_keeps_a_freed_buffer_for_reuse():
    kept, returned = _returned_on_free(True)
    assert kept == "True" and returned < 16 << 20


def test_keep_freed_memory_can_be_turned_off():
    kept, returned = _returned_on_free(True, **{memory.KEEP_FREED_MEMORY_ENV: "0"})
    assert kept == "False" and returned > 200 << 20


def test_only_the_command_line_convert_sets_the_allocator(tmp_path, monkeypatch):
    import numpy as np

    from ckptcore.cli.main import main

    calls: list[None] = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(None) or True)
    ckptcore.save(tmp_path / "src", {"a": np.arange(10)})
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "called"), "--no-progress"]) == 0
    assert calls == []  # called from a program: its allocator is left alone
    monkeypatch.setattr(sys, "argv", ["ckptcore", "convert", str(tmp_path / "src"), str(tmp_path / "cli"), "--no-progress"])
    assert main() == 0
    assert calls == [None]
    np.testing.assert_array_equal(ckptcore.restore(tmp_path / "cli")["a"], np.arange(10))
