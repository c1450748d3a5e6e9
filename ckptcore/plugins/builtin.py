"""Hook implementations that ship with the core itself (registered before any entry point)."""

from __future__ import annotations

import platform
import re
from collections.abc import Mapping
from typing import Any

from ckptcore.plugins.hookspecs import hookimpl
from ckptcore.plugins.registrations import SaveContext, StepLayoutRegistration


class PrefixedStepLayout:
    """``<prefix>_<step>`` (or bare ``<step>`` without prefix), zero-padded when asked.

    This is also orbax-checkpoint's naming, so its step directories are read as they are.
    """

    def step_name(self, step: int, prefix: str | None, fixed_length: int | None) -> str:
        if step < 0:
            raise ValueError(f"steps are non-negative integers, got {step}")
        digits = str(step).zfill(fixed_length or 0)
        return f"{prefix}_{digits}" if prefix else digits

    def parse_step(self, name: str, prefix: str | None) -> int | None:
        pattern = rf"{re.escape(prefix)}_(\d+)" if prefix else r"(\d+)"
        match = re.fullmatch(pattern, name)
        return int(match.group(1)) if match else None


@hookimpl
def ckptcore_step_layouts() -> list[StepLayoutRegistration]:
    return [StepLayoutRegistration(name="prefixed", layout=PrefixedStepLayout())]


@hookimpl
def ckptcore_index_metadata(context: SaveContext) -> Mapping[str, Any] | None:
    return {"python": platform.python_version(), "host": platform.node()}
