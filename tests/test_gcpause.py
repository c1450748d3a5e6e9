"""ckptcore.gcpause: the collector is paused inside save/restore and restored after, even on errors."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import ckptcore
from ckptcore.io import gcpause


def test_nested_pause_restores_the_previous_state():
    assert gc.isenabled()
    with gcpause.paused():
        assert not gc.isenabled()
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still runs
    assert gc.isenabled()
    gc.disable()
    try:
        with gcpause.paused():
            pass
        assert not gc.isenabled()  # a caller that disabled the GC keeps it disabled
    finally:
        gc.enable()


def test_overlapping_pauses_from_threads_reenable_once_all_end():
    inside, release = threading.Event(), threading.Event()

    def other():
        with gcpause.paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(10)
    with gcpause.paused():
        pass
    assert not gc.isenabled()  # the other thread's pause is still running
    release.set()
    thread.join(10)
    assert gc.isenabled()


def test_save_and_restore_leave_the_collector_enabled_even_when_they_fail(tmp_path):
    seen = []

    ckptcore.save(tmp_path / "ck", {"a": np.arange(3), "b": [np.ones(2)] * 3})
    assert gc.isenabled()
    seen.append(ckptcore.restore(tmp_path / "ck"))
    assert gc.isenabled()
    with pytest.raises(ckptcore.CheckpointError):
        ckptcore.save(tmp_path / "bad", {"x": object()})
    assert gc.isenabled()
    with pytest.raises(ckptcore.CheckpointError):
        ckptcore.restore(tmp_path / "missing")
    assert gc.isenabled()
    np.testing.assert_array_equal(seen[0]["a"], np.arange(3))
