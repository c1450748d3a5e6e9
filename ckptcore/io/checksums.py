"""Per-leaf checksums: CRC-32C over the C-order bytes of every shard, computed beside the writes."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

from ckptcore.errors import CorruptCheckpointError
from ckptcore.plugins.registrations import WriteRequest

BATCH_BYTES = 8 << 20
"""Shards are checksummed in runs of about this many bytes: one pool job per small leaf would cost more than its checksum."""


def checksum(data: np.ndarray, algorithm: str = "crc32c") -> str:
    """The checksum stored per leaf: ``<algorithm>:<hex>`` over the C-order bytes.

    CRC-32C (hardware-accelerated, ~15 GB/s, GIL released) is written; plain CRC-32 (zlib)
    is still understood.
    """
    return f"{algorithm}:{_extender(algorithm)(_c_order_bytes(data)):08x}"


def matches(data: np.ndarray, expected: str) -> bool:
    """Whether ``data`` has the checksum ``expected`` (computed with the algorithm it names)."""
    algorithm = expected.partition(":")[0]
    return checksum(data, algorithm) == expected


class Running:
    """A checksum over consecutive pieces of one byte string: blocks of rows, in order, give the whole's.

    Splitting a C-order region along its first axis splits its bytes into consecutive runs,
    so a region read back block by block checks against the checksum of the whole.
    """

    def __init__(self, algorithm: str = "crc32c") -> None:
        self.algorithm = algorithm
        self._extend = _extender(algorithm)
        self._crc = 0

    def update(self, data: np.ndarray) -> None:
        self._crc = self._extend(_c_order_bytes(data), self._crc)

    def value(self) -> str:
        return f"{self.algorithm}:{self._crc:08x}"


def _extender(algorithm: str) -> Callable[..., int]:
    """``f(bytes, crc_so_far) -> crc`` of ``algorithm`` (``crc_so_far`` 0 to start)."""
    if algorithm == "crc32c":
        import crc32c

        return crc32c.crc32c
    if algorithm == "crc32":
        return zlib.crc32
    raise CorruptCheckpointError(f"unknown checksum algorithm {algorithm!r} in the checkpoint index")


def _c_order_bytes(data: np.ndarray) -> memoryview:
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8).data.toreadonly()


def batches(requests: Sequence[WriteRequest]) -> list[list[WriteRequest]]:
    """Consecutive requests grouped into runs of about :data:`BATCH_BYTES`."""
    out: list[list[WriteRequest]] = []
    size = BATCH_BYTES
    for request in requests:
        if size >= BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(request)
        shards = request.shards
        size += shards[0].data.nbytes if len(shards) == 1 else sum(shard.data.nbytes for shard in shards)
    return out


def of_shards(batch: list[WriteRequest]) -> list[list[str]]:
    """Per request of ``batch``, the checksum of each of its shards."""
    return [[checksum(shard.data) for shard in request.shards] for request in batch]


__all__ = ["BATCH_BYTES", "Running", "batches", "checksum", "matches", "of_shards"]
