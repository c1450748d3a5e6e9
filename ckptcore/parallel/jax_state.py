"""Whether this process is part of a running ``jax.distributed`` job, without importing JAX.

A NumPy-only user never imports JAX, and a user who blocked it (``sys.modules["jax"] =
None``) must not have it imported either: both see "no job".
"""

from __future__ import annotations

import sys
from typing import Any


def distributed_state() -> Any:
    """JAX's distributed runtime state, or ``None`` when JAX is not in use or not initialised."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    distributed = getattr(jax, "distributed", None)
    is_initialized = getattr(distributed, "is_initialized", None)
    if is_initialized is not None and not is_initialized():
        return None
    # The key-value client lives in JAX's runtime state; JAX has no public accessor for it.
    from jax._src import distributed as runtime

    state = runtime.global_state
    return state if state.client is not None else None
