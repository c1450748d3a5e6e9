"""Whether an installed plugin distribution declares that it works with the running core.

A plugin says which cores it works with the way every distribution does: a ``Requires-Dist``
on ``ckptcore`` with a version range (``ckptcore>=0.2,<0.3``). A plugin built for another
core series is skipped with a warning instead of failing somewhere in the middle of a save.
"""

from __future__ import annotations

import re
from importlib import metadata as importlib_metadata

CORE_DISTRIBUTION = "ckptcore"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def core_range_excludes(dist: importlib_metadata.Distribution, core_version: str) -> str | None:
    """Why ``dist`` cannot work with ckptcore ``core_version``, or ``None`` when it can.

    Only the unconditional requirements on ``ckptcore`` count (those whose environment
    marker holds here, not those behind one of the plugin's own extras). A plugin that
    declares no range, a core version that is unknown (``"0+unknown"``) and metadata that
    does not parse are all given the benefit of the doubt: ``None``. Pre-releases and
    development builds of the core count as inside a range (``0.3.0.dev1`` satisfies
    ``>=0.3``), so a checkout just after a version bump keeps its plugins.

    >>> core_range_excludes(importlib_metadata.distribution("ckptcore-posix"), "9.0")  # doctest: +SKIP
    'ckptcore-posix 0.2.0 requires ckptcore>=0.2,<0.3; this is ckptcore 9.0'
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version

    try:
        running = Version(core_version)
    except InvalidVersion:
        return None
    if running.local == "unknown":
        return None
    for line in dist.requires or ():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if _normalize(req.name) != CORE_DISTRIBUTION:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if not req.specifier.contains(running, prereleases=True):
            name = dist.metadata["Name"] if "Name" in dist.metadata else "?"
            return f"{name} {dist.version} requires {CORE_DISTRIBUTION}{req.specifier}; this is {CORE_DISTRIBUTION} {core_version}"
    return None
