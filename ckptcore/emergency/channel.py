"""Moving bytes between processes over TCP: peer replicas at save, replica hand-over at restore.

Why not through JAX: a collective must be dispatched in the caller's thread (every process
issues collectives in the same order), and JAX's CPU backend runs part of the dispatch there,
so a ``ppermute`` of the shards made every local save block for 3-4 ms more than the snapshot,
and moving 1 GiB took 2.4 s. Here the background writer sends its shards once the snapshot is
taken, so a save blocks for the snapshot alone, and nothing is added to the training
program's collectives.

Every process listens on one port (at the address it reaches the ``jax.distributed``
coordinator from, unless ``Options.replica_address`` names one); the addresses and a random
token are agreed through the coordinator when the manager starts. A *message* is one
connection: an 8-byte little-endian header length, a JSON header (token, kind, sequence
number, source, step, free-form ``meta``, and the names and sizes of its parts), then each
part's raw bytes, read straight into a fresh buffer. The receiver answers one byte once it
holds the whole message, and files it under ``(kind, seq, source)`` until
:meth:`Channel.receive` takes it. (Saves and restores are collective calls, so the n-th save
is the n-th on every process: its number pairs a replica with the save it belongs to.)
A connection with a wrong token, an oversized or malformed header, or fewer bytes than it
announced is dropped (logged) and delivers nothing. Nothing received is ever executed: the
header is JSON, the parts are bytes.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptcore.errors import CheckpointError
from ckptcore.parallel.coordinator import Coordinator, allgather

log = logging.getLogger("ckptcore.emergency")

MAX_HEADER_BYTES = 64 << 20  # a header lists parts, never data: anything larger is not ours
CONNECT_TIMEOUT_S = 10.0
ACK = b"\x01"


class ChannelError(CheckpointError):
    """A message could not be sent to a peer (it is unreachable, or hung up before taking it all)."""


@dataclass
class Message:
    """One received message: who sent it, about which step, its ``meta`` and its parts (raw bytes)."""

    kind: str
    seq: int
    source: int
    step: int
    meta: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> uint8 buffer


class Channel:
    """This process's end: a listening socket, its peers' addresses, and the messages received."""

    def __init__(self, process: int, token: str, host: str = "127.0.0.1", *, idle_timeout: float = 300.0) -> None:
        self.process = process
        self._token = token
        self._idle_timeout = idle_timeout  # a connection silent this long is dropped (its thread freed)
        self._server = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.address: tuple[str, int] = (host, int(self._server.getsockname()[1]))
        self.peers: list[tuple[str, int]] = []
        self._mailbox: dict[tuple[str, int, int], Message] = {}
        self._arrived = threading.Condition()
        self._closed = False
        threading.Thread(target=self._accept, name=f"ckptcore-replicas-{process}", daemon=True).start()

    # -- sending -------------------------------------------------------------------------

    def send(self, destination: int, kind: str, seq: int, step: int, parts: Sequence[tuple[str, Any]],
             meta: dict[str, Any] | None = None, timeout: float | None = None) -> None:
        """Send ``parts`` (name, buffer) to process ``destination``; returns once it holds them all."""
        buffers = [(name, _bytes_of(data)) for name, data in parts]
        header = json.dumps({
            "token": self._token, "kind": kind, "seq": int(seq), "source": self.process, "step": int(step),
            "meta": meta or {}, "parts": [[name, buffer.nbytes] for name, buffer in buffers],
        }).encode()
        host, port = self.peers[destination]
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as sock:
                sock.settimeout(timeout)
                sock.sendall(len(header).to_bytes(8, "little") + header)
                for _, buffer in buffers:
                    sock.sendall(buffer)
                if sock.recv(1) != ACK:
                    raise OSError("it hung up before taking the whole message (it logged why)")
        except OSError as exc:
            raise ChannelError(
                f"process {self.process} could not send {kind} #{seq} (step {step}) to process {destination} at "
                f"{host}:{port}: {exc}"
            ) from exc

    # -- receiving -----------------------------------------------------------------------

    def receive(self, kind: str, seq: int, source: int, timeout: float | None) -> Message | None:
        """The message ``(kind, seq)`` from ``source``, waiting up to ``timeout`` seconds; ``None`` if none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._arrived:
            while (kind, seq, source) not in self._mailbox:
                left = None if deadline is None else deadline - time.monotonic()
                if self._closed or (left is not None and left <= 0):
                    return None
                self._arrived.wait(left)
            return self._mailbox.pop((kind, seq, source))

    def discard(self, kind: str, up_to: int) -> None:
        """Drop the messages of ``kind`` numbered ``up_to`` or less (late ones nobody will take)."""
        with self._arrived:
            for key in [k for k in self._mailbox if k[0] == kind and k[1] <= up_to]:
                del self._mailbox[key]

    def close(self) -> None:
        with self._arrived:
            self._closed = True
            self._mailbox.clear()
            self._arrived.notify_all()
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread: close alone would not
        except OSError:
            pass
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(sock, peer), daemon=True,
                             name=f"ckptcore-replicas-{self.process}-in").start()

    def _serve(self, sock: socket.socket, peer: Any) -> None:
        with sock:
            try:
                sock.settimeout(self._idle_timeout)
                message = self._read(sock)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("process %d: dropped a connection from %s on the replica channel: %s",
                            self.process, peer, exc)
                return
            with self._arrived:
                if self._closed:
                    return
                self._mailbox[(message.kind, message.seq, message.source)] = message
                self._arrived.notify_all()
            try:
                sock.sendall(ACK)
            except OSError:
                pass  # the sender sees it; the message is complete and kept

    def _read(self, sock: socket.socket) -> Message:
        size = int.from_bytes(_exactly(sock, 8), "little")
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"a header of {size} bytes, over the limit of {MAX_HEADER_BYTES}")
        header = json.loads(_exactly(sock, size))
        if not isinstance(header, dict) or not hmac.compare_digest(str(header.get("token", "")), self._token):
            raise ValueError("a wrong token: the sender is not a process of this job")
        message = Message(str(header["kind"]), int(header["seq"]), int(header["source"]), int(header["step"]),
                          dict(header.get("meta") or {}))
        for name, nbytes in header["parts"]:
            buffer = np.empty(int(nbytes), np.uint8)
            _into(sock, buffer.data)
            message.parts[str(name)] = buffer
        return message


def _bytes_of(data: Any) -> memoryview:
    if isinstance(data, bytes | bytearray | memoryview):
        return memoryview(data).cast("B")
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8).data


def _exactly(sock: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    _into(sock, memoryview(buffer))
    return bytes(buffer)


def _into(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        got = sock.recv_into(view)
        if not got:
            raise ValueError("the sender hung up before the end of its message")
        view = view[got:]


def open_channel(coordinator: Coordinator, name: str, host: str | None, timeout: float) -> Channel:
    """Every process's channel, each knowing the others' addresses (a collective call)."""
    token = coordinator.agree(f"{name}:channel-token", lambda: secrets.token_hex(32))
    channel = Channel(coordinator.process, token, host or reachable_host(), idle_timeout=timeout)
    op = coordinator.operation(f"{name}:channel", "the replica channel's addresses")
    channel.peers = [(str(h), int(p)) for h, p in allgather(op, "address", list(channel.address))]
    return channel


def reachable_host() -> str:
    """This host's address on the route to the ``jax.distributed`` coordinator (the peers reach that one)."""
    from ckptcore.parallel.jax_state import distributed_state

    state = distributed_state()
    address = getattr(state, "coordinator_address", None) or "127.0.0.1:0"
    host = address.rpartition(":")[0].strip("[]") or "127.0.0.1"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP: picks the route, sends nothing
            return str(probe.getsockname()[0])
    except OSError:
        return host
