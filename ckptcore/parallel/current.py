"""Choosing the coordinator of a call: the local one, or JAX's for a multi-process job."""

from __future__ import annotations

from ckptcore.parallel.coordinator import LOCAL, Coordinator
from ckptcore.parallel.jax_state import distributed_state
from ckptcore.parallel.options import MultiprocessOptions, current_options


def current_coordinator(options: MultiprocessOptions | None = None) -> Coordinator:
    """JAX's coordinator when several ``jax.distributed`` processes take part, else the local one.

    Chosen once per call (a save, a restore, a manager). A NumPy-only user never imports JAX,
    and a single process never enters the JAX coordinator.
    """
    state = distributed_state()
    if state is None or int(state.num_processes) <= 1:
        return LOCAL
    from ckptcore.parallel import jax_coordinator

    return jax_coordinator.coordinator(state, options or current_options()) or LOCAL
