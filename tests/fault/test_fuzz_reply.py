"""The device side's reply parser against a peer that answers anything.

`_exchange` (request out, exactly 8 reply bytes in) is fed by a scripted peer
socket: random and mutated replies, split into arbitrary chunks, ending in
EOF, silence or a reset. Whatever comes, it returns the status of a
well-formed reply of the expected op, or raises ExportError — nothing else —
and never reads one byte past the header (those bytes are the kernel's).

Then the whole `export()` against a real TCP peer sending the same kind of
replies: a success hands every byte after the header to usbip-host, any
failure leaves the device exactly as it was.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotplug.device.export import ExportError, export
from hotplug.device.transport import Remote, _exchange, recv_exactly
from hotplug.wire.address import Endpoint
from hotplug.wire.protocol import HEADER_SIZE, USBIP_VERSION, Op
from hotplug.wire.sockets import Timeouts
from tests.helpers import wait_for
from tests.integration.raw_peers import fake_peer, read_request
from tests.rig import FakeKernel

End = Literal["eof", "silence", "reset"]
ENDPOINT = Endpoint("192.0.2.1", 3240)
FAST = Timeouts(connect=2.0, handshake=0.1)


class ScriptedPeer:
    """Enough of a socket for `_exchange`: the peer's bytes arrive in `chunks`, then `end`."""

    def __init__(self, chunks: list[bytes], end: End, send_fails: bool = False) -> None:
        self.chunks = [c for c in chunks if c]
        self.end = end
        self.send_fails = send_fails
        self.sent = b""
        self.consumed = 0
        self.recv_calls = 0

    def settimeout(self, value: float | None) -> None:
        assert value is None or value > 0

    def sendall(self, data: bytes) -> None:
        if self.send_fails:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        self.sent += data

    def recv(self, size: int) -> bytes:
        self.recv_calls += 1
        assert 0 < size <= HEADER_SIZE, f"asked for {size} bytes"
        if self.chunks:
            piece, rest = self.chunks[0][:size], self.chunks[0][size:]
            if rest:
                self.chunks[0] = rest
            else:
                self.chunks.pop(0)
            self.consumed += len(piece)
            return piece
        if self.end == "eof":
            return b""
        if self.end == "reset":
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        raise TimeoutError("timed out")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def header(code: int, status: int, version: int = USBIP_VERSION) -> bytes:
    return struct.pack(">HHI", version, code, status)


u32 = st.integers(0, 0xFFFF_FFFF)
codes = st.sampled_from([int(op) for op in Op]) | st.integers(0, 0xFFFF)
versions = st.sampled_from([USBIP_VERSION, 0x0110, 0x0100, 0x1101]) | st.integers(0, 0xFFFF)
replies = st.one_of(
    st.builds(header, codes, u32, versions),
    st.builds(header, st.just(int(Op.REP_EXPORT)), st.sampled_from([0, 1, 2, 3]) | u32),
    st.binary(max_size=24),
)
streams = st.builds(lambda head, tail: head + tail, replies, st.binary(max_size=32))


def expected_status(stream: bytes, expected: Op) -> int | None:
    """The oracle: the status `_exchange` returns for this byte stream, None for an error."""
    if len(stream) < HEADER_SIZE:
        return None
    version, code, status = struct.unpack(">HHI", stream[:HEADER_SIZE])
    if version != USBIP_VERSION or code != expected:
        return None
    return int(status)


@settings(max_examples=200, deadline=None, database=None)
@given(
    stream=streams,
    cuts=st.lists(st.integers(0, 64), max_size=6),
    end=st.sampled_from(["eof", "silence", "reset"]),
    expected=st.sampled_from([Op.REP_EXPORT, Op.REP_UNEXPORT]),
)
def test_exchange_returns_status_or_export_error(
    stream: bytes, cuts: list[int], end: End, expected: Op
) -> None:
    peer = ScriptedPeer(split(stream, cuts), end)
    request = b"\x01\x11\x80\x06" + b"\0" * 316
    want = expected_status(stream, expected)
    try:
        got: int | None = _exchange(cast(socket.socket, peer), request, expected, ENDPOINT, FAST)
    except ExportError as exc:
        got = None
        assert str(ENDPOINT) in str(exc) and "\n" not in str(exc)
    assert got == want
    assert peer.sent == request
    assert peer.consumed == min(HEADER_SIZE, len(stream)), "read past the reply header"
    assert peer.recv_calls <= HEADER_SIZE + 1  # bounded: no spinning on short reads


@settings(max_examples=100, deadline=None, database=None)
@given(stream=st.binary(max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8))
def test_recv_exactly_takes_no_byte_more(stream: bytes, cuts: list[int]) -> None:
    for size in (1, 4, HEADER_SIZE):
        peer = ScriptedPeer(split(stream, cuts), "eof")
        sock = cast(socket.socket, peer)
        if len(stream) >= size:
            assert recv_exactly(sock, size, _far_deadline(), ENDPOINT) == stream[:size]
        else:
            with pytest.raises(ExportError, match="connection closed"):
                recv_exactly(sock, size, _far_deadline(), ENDPOINT)
        assert peer.consumed == min(size, len(stream))


def test_send_failure_is_an_export_error() -> None:
    peer = ScriptedPeer([header(Op.REP_EXPORT, 0)], "eof", send_fails=True)
    with pytest.raises(ExportError, match="sending request failed"):
        _exchange(cast(socket.socket, peer), b"x", Op.REP_EXPORT, ENDPOINT, FAST)
    assert peer.consumed == 0


def _far_deadline() -> float:
    return time.monotonic() + 5


# --------------------------------------------------------------------------- whole export


@dataclass
class Script:
    reply: bytes = b""
    close: bool = True
    conns: list[socket.socket] = field(default_factory=list)


@pytest.fixture
def scripted_target() -> Iterator[tuple[int, Script]]:
    """A TCP peer that reads the 320-byte request and sends `script.reply`."""
    script = Script()

    def answer(conn: socket.socket) -> None:
        read_request(conn)
        with contextlib.suppress(OSError):
            conn.sendall(script.reply)
        if script.close:
            conn.close()
        else:
            script.conns.append(conn)

    with fake_peer(answer) as port:
        yield port, script


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[FakeKernel]:
    with FakeKernel(tmp_path / "k", vhci=False) as k:
        yield k


def test_export_against_any_reply(kernel: FakeKernel, scripted_target: tuple[int, Script]) -> None:
    port, script = scripted_target
    stub = kernel.stub()
    rx = kernel.tree.root / ".fake-kernel-rx" / "1-1"
    outcomes = {"exported": 0, "refused": 0}

    @settings(max_examples=80, deadline=None, database=None)
    @given(stream=streams, close=st.booleans())
    def one(stream: bytes, close: bool) -> None:
        kernel.plug("1-1")
        script.reply, script.close = stream, close
        success = expected_status(stream, Op.REP_EXPORT) == 0
        try:
            export(stub, "1-1", Remote.plain(Endpoint("127.0.0.1", port), FAST))
        except ExportError as exc:
            # A peer that hangs up right after "attached" may kill the link before
            # usbip_status is read back: then the export fails, and says so.
            assert not success or (close and "did not take the connection" in str(exc)), exc
            outcomes["refused"] += 1
            assert kernel.driver("1-1") == "usb" and kernel.stub_status("1-1") is None
        else:
            assert success, f"exported on reply {stream[:8].hex()}"
            outcomes["exported"] += 1
            if not close:
                assert kernel.stub_status("1-1") == "2"
            # Every byte after the header belongs to usbip-host, in order.
            tail = stream[HEADER_SIZE:]
            wait_for(lambda: rx.read_bytes() == tail, 5, "the bytes after the reply at the stub")
        finally:
            for conn in script.conns:
                conn.close()
            script.conns.clear()
            kernel.unplug("1-1")  # the kernel drops the link; our books are checked below
            stub.release("1-1")
        assert kernel.live_match_table() == []

    one()
    assert outcomes["exported"] and outcomes["refused"], outcomes


def test_failed_export_leaves_the_device_as_it_was(
    kernel: FakeKernel, scripted_target: tuple[int, Script]
) -> None:
    port, script = scripted_target
    stub = kernel.stub()
    kernel.plug("1-1")

    @settings(max_examples=40, deadline=None, database=None)
    @given(stream=streams.filter(lambda s: expected_status(s, Op.REP_EXPORT) != 0))
    def one(stream: bytes) -> None:
        script.reply, script.close = stream, True
        with pytest.raises(ExportError):
            export(stub, "1-1", Remote.plain(Endpoint("127.0.0.1", port), FAST))
        assert kernel.driver("1-1") == "usb"
        assert kernel.stub_status("1-1") is None
        assert kernel.live_match_table() == []

    one()
