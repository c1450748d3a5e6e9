"""The ``ckptcore`` command."""

from ckptcore.cli.main import main

__all__ = ["main"]
