"""The typed values that plugins hand to the core through the hooks.

A hook returns *registrations*: frozen dataclasses that name what they provide (URL
schemes, a format name, a layout name) and carry the object that does the work. The core
collects them, fills in which distribution provided each one, and selects among them.

The protocols below are the contracts those worker objects fulfil. They use only NumPy
and fsspec types so that a plugin needs nothing else from the core.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from ckptcore.plugins.address import StorageAddress

if TYPE_CHECKING:
    import fsspec
    import numpy as np

Index = tuple[slice, ...]
"""A rectangular region of an array: one ``slice(start, stop)`` per dimension."""


@dataclass(frozen=True)
class Location:
    """Where a checkpoint (or a directory of checkpoints) lives, as a storage plugin resolved it.

    ``url`` is what users see; ``path`` is what ``fs`` understands (listing, small files,
    deletes); ``address`` is the same directory described for the array formats, which
    each turn it into their own library's address (see :class:`StorageAddress`).
    """

    url: str
    scheme: str
    fs: fsspec.AbstractFileSystem
    path: str
    address: StorageAddress
    options: Mapping[str, Any] = field(default_factory=dict)

    def child(self, name: str) -> Location:
        """The location of ``name`` inside this directory."""
        name = name.strip("/")
        return dataclasses.replace(
            self, url=f"{self.url.rstrip('/')}/{name}", path=f"{self.path.rstrip('/')}/{name}",
            address=self.address.child(name),
        )

    def parent(self) -> Location:
        """The location of the directory that holds this one."""
        return dataclasses.replace(
            self,
            url=self.url.rstrip("/").rpartition("/")[0] or "/",
            path=self.path.rstrip("/").rpartition("/")[0] or "/",
            address=self.address.parent(),
        )

    @property
    def name(self) -> str:
        """The last component of the path."""
        return self.path.rstrip("/").rpartition("/")[2]


@dataclass(frozen=True)
class Shard:
    """One region of an array and its data, as held by this process."""

    index: Index
    data: np.ndarray


@dataclass(frozen=True)
class WriteRequest:
    """Write one array leaf: its global shape and dtype, and the shards this process owns.

    ``key`` is a safe relative storage key (``/``-separated, never ``..``). ``chunk_hint``
    is the shape of one shard when the array is sharded: formats should chunk no larger.
    """

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    shards: tuple[Shard, ...]
    chunk_hint: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ReadRequest:
    """Read regions of one saved array leaf, cast to ``dtype``.

    ``info`` is what the format returned for this leaf when it was written (stored in
    the index). ``regions`` are the parts of the array to read; each is returned as a
    separate C-contiguous NumPy array. ``aligned``: the results go onto JAX CPU devices,
    which adopt a 64-byte aligned buffer as it is and copy any other; a format that can
    read into such buffers at no extra cost should (a hint: any C-contiguous array is valid).
    """

    key: str
    shape: tuple[int, ...]
    saved_dtype: np.dtype
    dtype: np.dtype
    info: Mapping[str, Any]
    regions: tuple[Index, ...]
    aligned: bool = False


@runtime_checkable
class StorageBackend(Protocol):
    """Resolves URLs of its schemes to :class:`Location` objects."""

    def resolve(self, url: str, options: Mapping[str, Any]) -> Location:
        """Return the location of ``url``: a filesystem, its path and the bulk-data address."""
        ...


@runtime_checkable
class AtomicCommit(Protocol):
    """Makes a checkpoint directory visible all at once, and recognises leftovers."""

    def begin(self, final: Location) -> Location:
        """Prepare a save into ``final``; return where the data must be written."""
        ...

    def commit(self, staging: Location, final: Location, *, replace: bool) -> None:
        """Make what was written into ``staging`` durable and visible as ``final``."""
        ...

    def abort(self, staging: Location) -> None:
        """Remove what a failed save wrote into ``staging``; never touch committed data."""
        ...

    def is_committed(self, location: Location) -> bool:
        """Whether ``location`` holds a committed checkpoint."""
        ...

    def is_staging(self, location: Location) -> bool:
        """Whether ``location`` is a leftover of a save that never committed."""
        ...

    def delete(self, location: Location) -> None:
        """Delete a committed checkpoint so that an interruption never leaves it half-visible."""
        ...


@runtime_checkable
class StepLayout(Protocol):
    """Maps step numbers to directory names and back."""

    def step_name(self, step: int, prefix: str | None, fixed_length: int | None) -> str:
        """The directory name of ``step``."""
        ...

    def parse_step(self, name: str, prefix: str | None) -> int | None:
        """The step a directory name stands for, or ``None`` if it is not a step directory."""
        ...


@runtime_checkable
class ArrayFormat(Protocol):
    """Writes and reads batches of array leaves inside a checkpoint directory."""

    def write(
        self, location: Location, requests: Sequence[WriteRequest], options: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """Write every request; return, per request, JSON-able info needed to read it back."""
        ...

    def read(
        self, location: Location, requests: Sequence[ReadRequest], options: Mapping[str, Any]
    ) -> list[list[np.ndarray]]:
        """Read every request; return, per request, one array per region.

        The arrays are handed to the user as restored: writable, and sharing no memory with
        each other or with anything that may still change them. A view of memory the format
        maps (a copy-on-write mapping of an immutable file, as ckptcore-safetensors returns)
        qualifies; a buffer the format reuses does not.
        """
        ...


def missing_methods(worker: object, protocol: type) -> list[str]:
    """The methods of ``protocol`` that ``worker`` lacks (or has as non-callables)."""
    wanted = [n for n, v in vars(protocol).items() if not n.startswith("_") and callable(v)]
    return [n for n in wanted if not callable(getattr(worker, n, None))]


def _check_names(owner: str, field_name: str, names: object) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or not names:
        raise TypeError(f"{owner}.{field_name} must be a non-empty tuple of names, got {names!r}")
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{owner}.{field_name} must hold non-empty strings, got {names!r}")
    return tuple(names)


def _check_name(owner: str, name: object) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{owner}.name must be a non-empty string, got {name!r}")


@runtime_checkable
class CheckpointLayout(Protocol):
    """Recognises checkpoints written by another system and describes them in ckptcore's terms."""

    def recognize(self, location: Location) -> bool:
        """Whether ``location`` holds a checkpoint of this layout; cheap (reads small files only)."""
        ...

    def open(self, location: Location) -> ForeignCheckpoint:
        """The checkpoint at ``location`` as an in-memory ckptcore index and the readers of its arrays."""
        ...


@dataclass(frozen=True)
class ForeignCheckpoint:
    """A checkpoint of another layout, described so that ckptcore's one restore planner reads it.

    ``index`` is a ckptcore index document (what ``ckptcore_index.json`` holds) built in
    memory: at least ``tree`` (ckptcore tree nodes; array leaves are records with ``kind``,
    ``shape``, ``dtype``, ``nbytes``, ``format``, ``key`` and ``format_info``), and optionally
    ``created``, ``metadata`` and ``total_bytes``. ``formats`` maps each format name the
    records use to the object that reads them: its ``read(location, requests, options)``
    gets the checkpoint's location and each record's ``format_info`` as ``request.info``
    (the same contract as :class:`ArrayFormat`, reading only). Records without a checksum
    are read unverified. ``description`` is what ``ckptcore inspect`` says about it.
    """

    index: Mapping[str, Any]
    formats: Mapping[str, Any]
    description: str


@dataclass(frozen=True)
class ForeignStep:
    """One step directory of a manager root written by another system (e.g. orbax's ``<root>/1000/``).

    Returned by the optional ``open_step(location)`` of a :class:`CheckpointLayout` (see
    :class:`StepReader`). ``items`` maps each item name (a subdirectory of the step) to
    ``{"kind": "pytree"}`` (a checkpoint this layout's ``open`` reads) or ``{"kind": "json",
    "file": <file name inside the item>}`` (a JSON document). ``metrics`` (numbers, or
    ``None``) and ``commit_time`` (seconds since the epoch, or ``None``) come from the step's
    own metadata. ``committed`` is false for a step whose save never finished (no commit
    marker): the manager never lists it, and restoring it raises ``NotCommittedError``.
    """

    items: Mapping[str, Mapping[str, Any]]
    metrics: Mapping[str, Any] | None = None
    commit_time: float | None = None
    committed: bool = True
    description: str = ""


@runtime_checkable
class StepReader(Protocol):
    """A checkpoint layout that also reads the step directories of another system's manager roots.

    Optional: a :class:`CheckpointLayout` offering this method lets ``CheckpointManager``
    list, rank, restore and delete those steps beside its own.
    """

    def open_step(self, location: Location) -> ForeignStep | None:
        """The step at ``location`` (cheap: small files only), or ``None`` if it is not a step of this layout."""
        ...


@dataclass(frozen=True)
class ExportLeaf:
    """One leaf of the checkpoint being exported (see :class:`CheckpointExporter`), in tree order.

    ``path`` is the leaf's key path (dict keys and field names as strings, list and tuple
    positions as integers). Array leaves (``kind`` ``"ndarray"``, ``"jax_array"`` or
    ``"jax_prng_key"``) have ``shape`` and ``dtype``; any other leaf (``"int"``, ``"float"``,
    ``"str"``, ``"numpy_scalar"``...) has its decoded ``value``.
    """

    path: tuple[str | int, ...]
    kind: str
    shape: tuple[int, ...] | None = None
    dtype: np.dtype | None = None
    value: Any = None


@dataclass(frozen=True)
class ExportPiece:
    """Data of one array leaf: ``leaf`` is its position in the exporter's ``leaves``.

    ``region`` is the whole array or a block of whole rows (``slice``s on the first dimension,
    the other dimensions whole); ``data`` is a C-contiguous array of the region's shape, in
    the leaf's dtype.
    """

    leaf: int
    region: Index
    data: np.ndarray


@runtime_checkable
class CheckpointExporter(Protocol):
    """Writes a checkpoint in another system's layout (``ckptcore.convert(src, dst, to=name)``)."""

    def export(
        self, location: Location, leaves: Sequence[ExportLeaf], pieces: Iterable[ExportPiece], options: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """Write ``leaves`` into the directory ``location``, the data arriving as ``pieces``.

        ``pieces`` streams every array leaf's data in leaf order (each leaf's row blocks in
        order), at most a bounded batch of it held at a time: write each piece before taking
        the next. Raise a :class:`~ckptcore.errors.CheckpointError` (naming the leaf) for
        what the layout cannot hold, before writing anything. Returns a JSON-able summary.
        """
        ...


@dataclass(frozen=True, kw_only=True)
class _Provided:
    """Who provided a registration: filled in by the core from the plugin's distribution."""

    distribution: str = ""
    version: str = ""


@dataclass(frozen=True)
class StorageRegistration(_Provided):
    """A storage backend for the URL ``schemes`` it lists (``"file"`` for local paths)."""

    WORKER: ClassVar[tuple[str, type]] = ("backend", StorageBackend)

    schemes: tuple[str, ...]
    backend: StorageBackend

    def __post_init__(self) -> None:
        object.__setattr__(self, "schemes", _check_names("StorageRegistration", "schemes", self.schemes))


@dataclass(frozen=True)
class AtomicityRegistration(_Provided):
    """How checkpoints on the URL ``schemes`` become visible all at once."""

    WORKER: ClassVar[tuple[str, type]] = ("strategy", AtomicCommit)

    schemes: tuple[str, ...]
    strategy: AtomicCommit
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "schemes", _check_names("AtomicityRegistration", "schemes", self.schemes))
        _check_name("AtomicityRegistration", self.name)


@dataclass(frozen=True)
class StepLayoutRegistration(_Provided):
    """A named way to name step directories (the core's own is ``"prefixed"``)."""

    WORKER: ClassVar[tuple[str, type]] = ("layout", StepLayout)

    name: str
    layout: StepLayout

    def __post_init__(self) -> None:
        _check_name("StepLayoutRegistration", self.name)


@dataclass(frozen=True)
class CheckpointLayoutRegistration(_Provided):
    """A named layout of checkpoints written by another system (``"orbax"``, ``"huggingface"``...)."""

    WORKER: ClassVar[tuple[str, type]] = ("layout", CheckpointLayout)

    name: str
    layout: CheckpointLayout

    def __post_init__(self) -> None:
        _check_name("CheckpointLayoutRegistration", self.name)


@dataclass(frozen=True)
class CheckpointExporterRegistration(_Provided):
    """A named layout ``ckptcore convert --to NAME`` writes (``"safetensors"``: Hugging Face files...)."""

    WORKER: ClassVar[tuple[str, type]] = ("exporter", CheckpointExporter)

    name: str
    exporter: CheckpointExporter

    def __post_init__(self) -> None:
        _check_name("CheckpointExporterRegistration", self.name)
        if self.name == "ckptcore":
            raise TypeError("CheckpointExporterRegistration.name 'ckptcore' is ckptcore's own layout; choose another")


@dataclass(frozen=True)
class ArrayFormatRegistration:
    """A named array format. ``version`` is the newest on-disk version it writes and reads."""

    WORKER: ClassVar[tuple[str, type]] = ("format", ArrayFormat)

    name: str
    format: ArrayFormat
    version: int = 1
    distribution: str = ""
    plugin_version: str = ""

    def __post_init__(self) -> None:
        _check_name("ArrayFormatRegistration", self.name)
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise TypeError(f"ArrayFormatRegistration.version must be an integer >= 1, got {self.version!r}")


@dataclass(frozen=True)
class SaveContext:
    """What a metadata hook learns about the save in progress."""

    url: str
    formats: tuple[str, ...]
    user_metadata: Mapping[str, Any]


ProgressCallback = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as a long save or restore progresses."""
