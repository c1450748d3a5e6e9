"""Steps of a manager root written by another system (e.g. orbax-checkpoint's ``<root>/1000/``).

A checkpoint-layout plugin whose layout object offers ``open_step(location)`` (see
:class:`ckptcore.plugins.registrations.StepReader`) describes such a step: its items, metrics,
commit time and whether it was committed. The manager lists, ranks, restores and deletes
those steps beside its own; it never writes one.
"""

from __future__ import annotations

from ckptcore.errors import CheckpointError, PluginError
from ckptcore.plugins.manager import registry
from ckptcore.plugins.registrations import ForeignStep, Location


def open_foreign_step(location: Location) -> tuple[str, ForeignStep] | None:
    """(layout name, step) from the first layout that reads ``location`` as one of its steps, else ``None``."""
    for reg in registry().checkpoint_layouts():
        open_step = getattr(reg.layout, "open_step", None)
        if not callable(open_step):
            continue
        try:
            step = open_step(location)
        except CheckpointError:
            raise
        except Exception as exc:
            raise PluginError(
                f"the {reg.name!r} checkpoint layout ({reg.distribution or 'registered in process'}) failed to read "
                f"the step at {location.url}: {type(exc).__name__}: {exc}"
            ) from exc
        if step is None:
            continue
        if not isinstance(step, ForeignStep):
            raise PluginError(
                f"the {reg.name!r} checkpoint layout ({reg.distribution or 'registered in process'}) returned a "
                f"{type(step).__name__} from open_step, where a ForeignStep (or None) belongs"
            )
        return reg.name, step
    return None


def is_committed_foreign_step(location: Location) -> bool:
    """Whether ``location`` is a committed step of another system's layout."""
    found = open_foreign_step(location)
    return found is not None and found[1].committed
