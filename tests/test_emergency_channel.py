"""The emergency tier's replica channel: real sockets on 127.0.0.1, one process, two ends.

The 4-process jobs of tests/test_emergency.py move real replicas through it; here each way a
connection can be wrong is tried on its own: nothing wrong is ever delivered.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest

from ckptcore.emergency.channel import ACK, MAX_HEADER_BYTES, Channel, ChannelError
from ckptcore.emergency.options import Options
from ckptcore.errors import InvalidOptionError

TOKEN = "t" * 64


@pytest.fixture
def pair() -> Any:
    a, b = Channel(0, TOKEN), Channel(1, TOKEN)
    a.peers = b.peers = [a.address, b.address]
    yield a, b
    a.close()
    b.close()


def _raw(channel: Channel, header: dict[str, Any] | bytes, payload: bytes = b"") -> bytes:
    """Send bytes by hand, as a stranger or a broken sender would; the reply (b"" when dropped)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    with socket.create_connection(channel.address, timeout=5) as sock:
        try:
            sock.sendall(len(text).to_bytes(8, "little") + text + payload)
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(1)
        except OSError:  # the receiver hung up first
            return b""


def test_a_message_arrives_whole(pair: Any) -> None:
    a, b = pair
    w = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)[:, 1:4]  # not contiguous: sent as its values
    a.send(1, "replica", 7, 42, [("w", w), ("files", b"\x00abc")], meta={"fingerprint": "f"}, timeout=5)
    m = b.receive("replica", 7, 0, timeout=5)
    assert m is not None and (m.kind, m.seq, m.source, m.step, m.meta) == ("replica", 7, 0, 42, {"fingerprint": "f"})
    assert np.array_equal(m.parts["w"].view(np.float32).reshape(3, 3), w)
    assert m.parts["files"].tobytes() == b"\x00abc"
    assert b.receive("replica", 7, 0, timeout=0.05) is None  # taken once


def test_receive_waits_for_the_message_of_its_save_only(pair: Any) -> None:
    a, b = pair
    a.send(1, "replica", 1, 10, [("x", b"old")], timeout=5)
    a.send(1, "replica", 2, 11, [("x", b"new")], timeout=5)
    assert b.receive("replica", 3, 0, timeout=0.2) is None  # save 3's replica never came
    late = threading.Timer(0.2, lambda: a.send(1, "replica", 4, 12, [("x", b"late")], timeout=5))
    late.start()
    m = b.receive("replica", 4, 0, timeout=10)  # waits for a replica still on its way
    late.join()
    assert m is not None and m.parts["x"].tobytes() == b"late"
    b.discard("replica", 1)  # the late replica of save 1: nobody will take it
    assert b.receive("replica", 1, 0, timeout=0.05) is None
    m = b.receive("replica", 2, 0, timeout=1)
    assert m is not None and m.parts["x"].tobytes() == b"new"


@pytest.mark.parametrize("case", ["wrong token", "truncated part", "huge header", "not json"])
def test_a_bad_connection_delivers_nothing(pair: Any, case: str, caplog: Any) -> None:
    _, b = pair
    header = {"token": TOKEN, "kind": "replica", "seq": 1, "source": 0, "step": 5, "parts": [["w", 100]]}
    with caplog.at_level(logging.WARNING, logger="ckptcore.emergency"):
        if case == "wrong token":
            reply = _raw(b, {**header, "token": "x" * 64}, b"\x00" * 100)
        elif case == "truncated part":
            reply = _raw(b, header, b"\x00" * 10)
        elif case == "huge header":
            with socket.create_connection(b.address, timeout=5) as sock:
                sock.sendall((MAX_HEADER_BYTES + 1).to_bytes(8, "little"))
                try:
                    reply = sock.recv(1)
                except OSError:
                    reply = b""
        else:
            reply = _raw(b, b"{not json")
        deadline = time.monotonic() + 5
        while "dropped a connection" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert reply == b""  # no acknowledgement
    assert "dropped a connection" in caplog.text
    assert b.receive("replica", 1, 0, timeout=0.1) is None


def test_a_sender_with_the_wrong_token_is_told_it_failed(pair: Any) -> None:
    _, b = pair
    stranger = Channel(0, "s" * 64)
    stranger.peers = [stranger.address, b.address]
    try:
        with pytest.raises(ChannelError, match=r"could not send replica #1 \(step 5\) to process 1"):
            stranger.send(1, "replica", 1, 5, [("w", b"x")], timeout=5)
    finally:
        stranger.close()
    assert b.receive("replica", 1, 0, timeout=0.1) is None


def test_an_ipv6_address_works() -> None:
    if not socket.has_ipv6:
        pytest.skip("this machine has no IPv6")  # only where the kernel has no IPv6 at all
    try:
        a, b = Channel(0, TOKEN, "::1"), Channel(1, TOKEN, "::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        a.peers = b.peers = [a.address, b.address]
        a.send(1, "replica", 1, 3, [("x", b"v6")], timeout=5)
        m = b.receive("replica", 1, 0, timeout=5)
        assert m is not None and m.parts["x"].tobytes() == b"v6"
    finally:
        a.close()
        b.close()


def test_an_unreachable_peer_is_a_channel_error_naming_it(pair: Any) -> None:
    a, b = pair
    b.close()
    with pytest.raises(ChannelError, match=r"to process 1 at 127\.0\.0\.1"):
        a.send(1, "replica", 1, 5, [("w", b"x")], timeout=5)


def test_a_silent_connection_is_dropped_after_the_idle_timeout(caplog: Any) -> None:
    quiet = Channel(1, TOKEN, idle_timeout=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="ckptcore.emergency"), \
                socket.create_connection(quiet.address, timeout=5) as sock:
            sock.sendall((10).to_bytes(8, "little") + b"{")  # then nothing more
            sock.settimeout(5)
            try:
                reply = sock.recv(1)  # the channel hangs up
            except OSError:
                reply = b""
        assert reply == b""
        deadline = time.monotonic() + 5
        while "timed out" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "dropped a connection" in caplog.text and "timed out" in caplog.text
    finally:
        quiet.close()


def test_the_acknowledgement_comes_after_the_whole_message(pair: Any) -> None:
    _, b = pair
    header = {"token": TOKEN, "kind": "handover", "seq": 1, "source": 0, "step": 5, "parts": [["f", 3]]}
    assert _raw(b, header, b"abc") == ACK
    m = b.receive("handover", 1, 0, timeout=1)
    assert m is not None and m.parts["f"].tobytes() == b"abc"


def test_replica_rows_refuses_parts_that_are_no_region_of_the_state() -> None:
    import jax

    from ckptcore.emergency import views

    view = views.prepare_view({"w": jax.numpy.zeros((4, 2), np.float32)}, None, 1)
    write = view.jax_leaves[0].write
    good = json.dumps([write, [[0, 4], [0, 2]]])
    rows = views.replica_rows(view, {good: np.zeros(32, np.uint8)})
    assert rows[write][((0, 4), (0, 2))].shape == (4, 2)
    with pytest.raises(ValueError, match="holds 31 bytes"):
        views.replica_rows(view, {good: np.zeros(31, np.uint8)})
    with pytest.raises(ValueError, match="no region"):
        views.replica_rows(view, {json.dumps([write + 5, [[0, 4], [0, 2]]]): np.zeros(32, np.uint8)})
    with pytest.raises(ValueError, match="no region"):
        views.replica_rows(view, {json.dumps([write, [[0, 4]]]): np.zeros(16, np.uint8)})


def test_replica_timeout_must_be_positive() -> None:
    with pytest.raises(InvalidOptionError, match="replica_timeout"):
        Options(replica_timeout=0)
