"""ckptcore plugin for Google Cloud Storage: ``gs://bucket/path`` (and ``gcs://``).

Small files (the index, the commit markers) and listings go through gcsfs; array data
through the array format, to which the plugin hands a ``gs`` storage address (bucket, key
prefix, endpoint, retry bounds; the zarr3 formats turn it into TensorStore's ``gcs``
kvstore). Checkpoints become visible through a commit marker written last
(:class:`ckptcore.storage.object_store.CommitMarker`).

Credentials: application default credentials, ``GOOGLE_APPLICATION_CREDENTIALS``, or
``storage_options={"token": ...}``. Emulators: ``STORAGE_EMULATOR_HOST`` or
``storage_options={"endpoint": "http://127.0.0.1:4443"}``. Other options: ``project``,
``user_project`` (requester pays), ``request_concurrency``, and the retry bounds
``retries``, ``retry_delay``, ``retry_max_delay``, ``timeout``.
"""

from __future__ import annotations

from ckptcore.plugins.hookspecs import hookimpl
from ckptcore.plugins.registrations import AtomicityRegistration, StorageRegistration
from ckptcore.storage.object_store import CommitMarker
from ckptcore_gcs.backend import CREDENTIALS_HINT, GCSBackend

SCHEMES = ("gs", "gcs")

__all__ = ["SCHEMES", "GCSBackend"]


@hookimpl
def ckptcore_storage_backends() -> list[StorageRegistration]:
    return [StorageRegistration(schemes=SCHEMES, backend=GCSBackend())]


@hookimpl
def ckptcore_atomicity_strategies() -> list[AtomicityRegistration]:
    return [
        AtomicityRegistration(
            schemes=SCHEMES, strategy=CommitMarker(credentials_hint=CREDENTIALS_HINT), name="commit-marker"
        )
    ]
