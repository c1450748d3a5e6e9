"""Faults between ckptcore and real emulators (through ckptcore_testing.faultproxy).

Transient faults are retried; persistent ones fail a save with a clear StorageError after a
bounded number of tries; nothing half-written ever looks committed; restores return
exactly what was committed.
"""

from __future__ import annotations

import numpy as np
import pytest

import ckptcore
from ckptcore import storage
from ckptcore.errors import CheckpointError, StorageError

FAST = {"retry_delay": 0.02, "retry_max_delay": 0.1}


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((256, 256)).astype(np.float32), "v": rng.standard_normal(4096), "step": seed}


def _same(a, b) -> bool:
    return a["step"] == b["step"] and np.array_equal(a["w"], b["w"]) and np.array_equal(a["v"], b["v"])


def _committed(url: str) -> bool:
    location = storage.resolve(url)
    return storage.atomicity(location).is_committed(location)


# chunk_bytes small: several data objects per array, so faults land mid-save.
FORMAT_OPTIONS = {"chunk_bytes": 64 << 10, "compression": "none"}


@pytest.mark.parametrize("fault", [{"fail_rate": 0.25}, {"drop_rate": 0.25}])
def test_transient_faults_are_retried(cloud, fault):
    proxy = cloud.proxy()
    options = {"endpoint": proxy.endpoint, "retries": 10, **FAST}
    url = cloud.url("transient")
    proxy.configure(seed=3, **fault)
    ckptcore.save(url, _state(1), storage_options=options, format_options=FORMAT_OPTIONS)
    restored = ckptcore.restore(url, storage_options=options)  # faults stay on while reading too
    stats = proxy.stats()
    assert stats.failed + stats.dropped > 0, "faults were injected"
    assert _same(restored, _state(1))
    proxy.heal()
    assert _same(ckptcore.restore(url), _state(1))


def test_persistent_outage_fails_after_bounded_retries(cloud):
    proxy = cloud.proxy()
    url = cloud.url("outage")
    proxy.configure(fail_rate=1.0)
    with pytest.raises(StorageError) as err:
        ckptcore.save(url, _state(2), storage_options={"endpoint": proxy.endpoint, "retries": 2, **FAST})
    assert url in str(err.value)
    stats = proxy.stats()
    # Every request is tried at most 1 + retries times; no client keeps hammering a dead store.
    assert 0 < stats.requests <= 40, stats
    proxy.heal()
    assert not _committed(url)


def test_outage_during_data_upload_leaves_nothing_committed(cloud):
    proxy = cloud.proxy()
    url = cloud.url("midway")
    # Markers and the index get through; array data uploads fail for good.
    proxy.configure(fail_rate=1.0, match=lambda method, path: method in ("PUT", "POST") and _is_data(path))
    with pytest.raises(CheckpointError):
        ckptcore.save(url, _state(3), storage_options={"endpoint": proxy.endpoint, "retries": 1, **FAST},
                      format_options=FORMAT_OPTIONS, format="zarr3")
    assert proxy.stats().failed > 0
    proxy.heal()
    assert not _committed(url)
    with pytest.raises(ckptcore.errors.CheckpointNotFoundError):
        ckptcore.restore(url)
    ckptcore.save(url, _state(4))  # the aborted save left nothing in the way
    assert _same(ckptcore.restore(url), _state(4))


def _is_data(path: str) -> bool:
    # zarr3 array objects (S3: /bucket/key; GCS uploads name the object in the query).
    return "zarr3" in path and "ckptcore_" not in path


def test_connection_cut_mid_upload(cloud):
    proxy = cloud.proxy()
    url = cloud.url("cut")
    options = {"endpoint": proxy.endpoint, "retries": 10, **FAST}
    # zarr3 with 16 KiB chunks: about 20 uploads big enough to be cut, each cut with odds 1/3.
    proxy.configure(cut_rate=0.35, cut_min_bytes=8 << 10, seed=5, match=lambda method, path: method in ("PUT", "POST"))
    ckptcore.save(url, _state(5), storage_options=options, format="zarr3",
                  format_options={"chunk_bytes": 16 << 10, "compression": "none"})
    assert proxy.stats().cut > 0
    proxy.heal()
    assert _same(ckptcore.restore(url), _state(5))


def test_every_upload_cut_never_commits(cloud):
    proxy = cloud.proxy()
    url = cloud.url("always-cut")
    existing = cloud.url("existing")
    ckptcore.save(existing, _state(6))
    proxy.configure(cut_rate=1.0, cut_min_bytes=16 << 10)
    with pytest.raises(CheckpointError):
        ckptcore.save(url, _state(7), storage_options={"endpoint": proxy.endpoint, "retries": 1, **FAST},
                      format_options=FORMAT_OPTIONS)
    assert proxy.stats().cut > 0
    proxy.heal()
    assert not _committed(url)
    assert _same(ckptcore.restore(existing), _state(6))  # other checkpoints untouched


def test_denied_requests_say_access_denied(cloud):
    url = cloud.url("denied")
    ckptcore.save(url, _state(8))
    proxy = cloud.proxy()
    proxy.configure(fail_rate=1.0, fail_status=403)
    options = {"endpoint": proxy.endpoint, "retries": 1, **FAST}
    with pytest.raises(StorageError, match="access denied") as err:
        ckptcore.restore(url, storage_options=options)
    assert url in str(err.value)
    with pytest.raises(StorageError, match="denied"):
        ckptcore.save(cloud.url("denied2"), _state(8), storage_options=options)
    proxy.heal()
    assert _same(ckptcore.restore(url), _state(8))
