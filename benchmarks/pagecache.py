"""Page-cache control shared by the benchmarks (imported as a sibling module by the scripts)."""

from __future__ import annotations

import os


def drop_page_cache() -> bool:
    """Drop the page cache so that the next restore reads from disk; False when not permitted (not root)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False
