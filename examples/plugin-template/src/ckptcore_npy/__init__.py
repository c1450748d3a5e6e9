"""ckptcore-npy: the ``npy`` array format, one ``.npy`` file per array shard.

The format writes into ``<checkpoint>/npy/`` (the directory the core gives it), one file
per shard that this process holds, named after the leaf's storage key and the shard's
position. What ``write`` returns per leaf is stored in the checkpoint index and handed back
to ``read``: here, the files and the region of the array each one holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import ckptcore

__version__ = "0.1.0"

FORMAT_NAME = "npy"
FORMAT_VERSION = 1  # the on-disk version this code writes; bump when the files change


class NpyFormat:
    """Array shards as ``.npy`` files, written and read with the location's fsspec filesystem."""

    def write(self, location: Any, requests: Sequence[Any], options: Mapping[str, Any]) -> list[dict[str, Any]]:
        fs = location.fs
        fs.makedirs(location.path, exist_ok=True)
        infos = []
        for request in requests:
            files = []
            for shard in request.shards:
                start = [s.start or 0 for s in shard.index]
                stop = [s.stop if s.stop is not None else n for s, n in zip(shard.index, request.shape, strict=True)]
                # Storage keys are safe relative paths; "/" becomes "~" to keep one flat directory.
                name = request.key.replace("/", "~") + "".join(f".{i}" for i in start) + ".npy"
                with fs.open(f"{location.path}/{name}", "wb") as f:
                    np.lib.format.write_array(f, _portable(np.ascontiguousarray(shard.data)), allow_pickle=False)
                files.append({"file": name, "start": start, "stop": stop})
            infos.append({"files": files})
        return infos

    def read(self, location: Any, requests: Sequence[Any], options: Mapping[str, Any]) -> list[list[np.ndarray]]:
        out = []
        for request in requests:
            shards = [(f, _load(location, f["file"], request.saved_dtype)) for f in request.info["files"]]
            pieces = []
            for region in request.regions:
                bounds = [_bounds(s, n) for s, n in zip(region, request.shape, strict=True)]
                result = np.empty([b - a for a, b in bounds], dtype=request.dtype)
                for f, data in shards:
                    overlap = [(max(a, s), min(b, e)) for (a, b), s, e in zip(bounds, f["start"], f["stop"], strict=True)]
                    if any(lo >= hi for lo, hi in overlap):
                        continue
                    dst = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(overlap, bounds, strict=True))
                    src = tuple(slice(lo - s, hi - s) for (lo, hi), s in zip(overlap, f["start"], strict=True))
                    result[dst] = data[src].astype(request.dtype, copy=False)
                pieces.append(result)
            out.append(pieces)
        return out


def _bounds(s: slice, n: int) -> tuple[int, int]:
    return (s.start or 0, s.stop if s.stop is not None else n)


def _portable(data: np.ndarray) -> np.ndarray:
    # .npy headers describe NumPy's own dtypes only; ml_dtypes (bfloat16, float8...) are
    # stored as raw bytes of the same width and viewed back as the saved dtype on read.
    return data if data.dtype.isbuiltin else data.view(f"V{data.dtype.itemsize}")


def _load(location: Any, name: str, saved_dtype: np.dtype) -> np.ndarray:
    with location.fs.open(f"{location.path}/{name}", "rb") as f:
        data = np.lib.format.read_array(f, allow_pickle=False)
    return data if data.dtype == saved_dtype else data.view(saved_dtype)


@ckptcore.hookimpl
def ckptcore_array_formats() -> list[Any]:
    """The ``npy`` format (``ckptcore.save(..., format="npy")``)."""
    return [ckptcore.ArrayFormatRegistration(name=FORMAT_NAME, format=NpyFormat(), version=FORMAT_VERSION)]
