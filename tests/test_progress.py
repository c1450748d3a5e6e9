"""Progress callbacks and the rich progress bar (issue 5, item 7)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

import ckptcore
from ckptcore import progress
from ckptcore.errors import InvalidOptionError


def _console(buffer: io.StringIO) -> Console:
    return Console(file=buffer, force_terminal=True, width=120, color_system=None)


def test_bar_shows_description_and_bytes():
    out = io.StringIO()
    with progress.bar("saving /ckpt/7", console=_console(out)) as update:
        update(0, 4 << 20)
        update(2 << 20, 4 << 20)
        update(4 << 20, 4 << 20)
    text = out.getvalue()
    assert "saving /ckpt/7" in text
    assert "4.0 MiB" in text or "4.2 MB" in text or "4.0/4.0" in text, text


def test_a_second_bar_at_once_is_silent_not_an_error():
    out = io.StringIO()
    with progress.bar("outer", console=_console(out)) as outer:
        with progress.bar("inner", console=_console(out)) as inner:
            inner(1, 2)  # rich allows one live display: the second degrades to a no-op
        outer(2, 2)
    assert "outer" in out.getvalue() and "inner" not in out.getvalue()


def test_resolve_accepts_true_a_callable_or_nothing():
    recorder = progress.Recorder()
    with progress.resolve(recorder, "x") as callback:
        assert callback is recorder
    with progress.resolve(None, "x") as callback:
        assert callback is None
    with pytest.raises(InvalidOptionError, match="progress must be"):
        progress.resolve("yes", "x")


@pytest.mark.parametrize("cls", [ckptcore.Checkpointer, ckptcore.AsyncCheckpointer])
def test_progress_true_draws_a_bar_for_save_and_restore(tmp_path, capsys, cls):
    state = {"w": np.arange(1 << 18, dtype=np.float32)}
    with cls(progress=True) as ck:
        ck.save(tmp_path / "a", state)
        ck.wait_until_finished()
        np.testing.assert_array_equal(ck.restore(tmp_path / "a")["w"], state["w"])
    out = capsys.readouterr().out
    assert "saving" in out and "restoring" in out


def test_recorder_sees_sync_save_reach_the_total(tmp_path):
    recorder = progress.Recorder()
    state = {"a": np.ones(1000), "b": np.zeros((10, 10), np.int32)}
    ckptcore.Checkpointer().save(tmp_path / "a", state, progress=recorder)
    assert recorder.last == (8000 + 400, 8400)
    assert recorder.calls[0][0] == 0


def test_module_level_save_and_restore_take_progress_true(tmp_path):
    state = {"w": np.arange(1000, dtype=np.float32)}
    ckptcore.save(tmp_path / "ck", state, progress=True)
    back = ckptcore.restore(tmp_path / "ck", progress=True)
    assert np.array_equal(back["w"], state["w"])
    with pytest.raises(InvalidOptionError):
        ckptcore.restore(tmp_path / "ck", progress="yes")
