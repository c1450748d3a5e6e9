"""What to install when no plugin provides a URL scheme or an array format: a data table.

Like fsspec's ``known_implementations``, the core keeps a table of the plugins it knows of
by name (those this project publishes) to turn "nothing provides X" into an actionable
message; nothing else in the core refers to them. A third-party plugin is found by the
generic message, or by adding a row here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownPlugin:
    """A published plugin distribution that provides a scheme or a format."""

    distribution: str
    install: str
    """The command that installs it."""
    needs: str = ""
    """How a missing-scheme message opens (``"`gs://` needs the gcs plugin"``)."""


KNOWN_SCHEMES: dict[str, KnownPlugin] = {
    "file": KnownPlugin(
        "ckptcore-posix", "pip install ckptcore-posix",
        "local paths need the posix plugin, part of every ckptcore install",
    ),
    "gs": KnownPlugin("ckptcore-gcs", "pip install 'ckptcore[gcs]'", "`gs://` needs the gcs plugin"),
    "gcs": KnownPlugin("ckptcore-gcs", "pip install 'ckptcore[gcs]'", "`gcs://` needs the gcs plugin"),
    "s3": KnownPlugin("ckptcore-s3", "pip install 'ckptcore[s3]'", "`s3://` needs the s3 plugin"),
}
"""URL scheme -> the distribution that serves it."""

KNOWN_FORMATS: dict[str, KnownPlugin] = {
    "ocdbt": KnownPlugin("ckptcore-zarr3", "pip install ckptcore-zarr3"),
    "zarr3": KnownPlugin("ckptcore-zarr3", "pip install ckptcore-zarr3"),
    "safetensors": KnownPlugin("ckptcore-safetensors", "pip install ckptcore-safetensors"),
}
"""Array format name -> the distribution that reads and writes it."""


def scheme_hint(scheme: str) -> str:
    """What to do when no plugin serves ``scheme://`` URLs."""
    known = KNOWN_SCHEMES.get(scheme)
    if known is None:
        return f"install a ckptcore plugin that serves `{scheme}://` URLs"
    return f"{known.needs}: {known.install}"


def format_hint(name: str) -> str:
    """What to do when no plugin provides the array format ``name``."""
    known = KNOWN_FORMATS.get(name)
    if known is None:
        return f"install the plugin that provides the array format {name!r}"
    return known.install
