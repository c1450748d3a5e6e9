"""ckptcore plugin for Amazon S3 and S3-compatible stores: ``s3://bucket/path``.

Small files (the index, the commit markers) and listings go through s3fs; array data
through the array format, to which the plugin hands an ``s3`` storage address that always
carries the configured endpoint (resolved here from ``AWS_ENDPOINT_URL`` too: TensorStore,
behind the zarr3 formats, ignores that variable). Checkpoints become visible through a
commit marker written last (:class:`ckptcore.storage.object_store.CommitMarker`).

Credentials: the standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, shared config files), or ``storage_options`` ``key``/``secret``/``token``,
``profile``, ``anon``. Endpoint: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) or
``storage_options={"endpoint": ...}``; region: ``AWS_REGION``/``AWS_DEFAULT_REGION`` or
``{"region": ...}``. Retry bounds: ``retries``, ``retry_delay``, ``retry_max_delay``,
``timeout``; ``request_concurrency`` limits TensorStore's parallel requests.
"""

from __future__ import annotations

from ckptcore.plugins.hookspecs import hookimpl
from ckptcore.plugins.registrations import AtomicityRegistration, StorageRegistration
from ckptcore.storage.object_store import CommitMarker
from ckptcore_s3.backend import CREDENTIALS_HINT, S3Backend

SCHEMES = ("s3",)

__all__ = ["SCHEMES", "S3Backend"]


@hookimpl
def ckptcore_storage_backends() -> list[StorageRegistration]:
    return [StorageRegistration(schemes=SCHEMES, backend=S3Backend())]


@hookimpl
def ckptcore_atomicity_strategies() -> list[AtomicityRegistration]:
    return [
        AtomicityRegistration(
            schemes=SCHEMES, strategy=CommitMarker(credentials_hint=CREDENTIALS_HINT), name="commit-marker"
        )
    ]
