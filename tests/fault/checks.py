"""What every fault test checks afterwards, and the raw client the fuzzers use."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from hotplug.wire.protocol import (
    HEADER_SIZE,
    USBIP_VERSION,
    Decoder,
    DevlistRequest,
    ExportRequest,
    ImportRequest,
    NeedData,
    Op,
    Pdu,
    ProtocolError,
    UnexportRequest,
)
from tests.helpers import wait_for
from tests.rig import FakeKernel, Usbipa, run_cli

REQUESTS = (Op.REQ_EXPORT, Op.REQ_UNEXPORT, Op.REQ_DEVLIST, Op.REQ_IMPORT)


def is_attached_reply(data: bytes) -> bool:
    return len(data) >= HEADER_SIZE and struct.unpack(">HHI", data[:HEADER_SIZE]) == (
        USBIP_VERSION,
        Op.REP_EXPORT,
        0,
    )


def talk(
    port: int,
    payload: bytes,
    source: str = "127.0.0.1",
    timeout: float = 5.0,
    pieces: Sequence[int] = (),
) -> bytes:
    """Send `payload`, end the stream, return all the server sent until it closed.

    With `pieces`, the first bytes go out in writes of those sizes (TCP_NODELAY,
    so each is its own segment). After a status-0 EXPORT reply the server does
    not close (the vhci holds the link): then the reply alone is returned and
    our end closed, which is the device side going away.
    """
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):  # it may have closed on a bad header already
            rest = payload
            for size in pieces:
                sock.sendall(rest[:size])
                rest = rest[size:]
            sock.sendall(rest)
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while not is_attached_reply(data):
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        if is_attached_reply(data):
            # What follows the reply is the data phase: the (fake) vhci's first URB.
            return data[:HEADER_SIZE]
        return data


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """The server closed (or reset) `sock` within `within` seconds, without a byte."""
    readable, _, _ = select.select([sock], [], [], within)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def expected_request(payload: bytes) -> Pdu | None:
    """The request usbipa must answer when `payload` is followed by end of stream."""
    decoder = Decoder(accept=REQUESTS)
    try:
        if payload:
            decoder.receive_data(payload)
        pdu = decoder.next_pdu()
        if isinstance(pdu, NeedData):
            decoder.receive_data(b"")
            pdu = decoder.next_pdu()  # a PDU, or ProtocolError: cut short
    except ProtocolError:
        return None
    assert not isinstance(pdu, NeedData)
    return pdu


def check_reply(payload: bytes, reply: bytes) -> None:
    """usbipa answered `payload` (then end of stream) exactly as the protocol says."""
    request = expected_request(payload)
    if request is None:
        assert reply == b"", f"answered a malformed request with {reply.hex()}"
        return
    if isinstance(request, DevlistRequest):
        assert reply == struct.pack(">HHII", USBIP_VERSION, Op.REP_DEVLIST, 0, 0), reply.hex()
        return
    assert len(reply) == HEADER_SIZE, f"{type(request).__name__}: reply {reply.hex()}"
    version, code, status = struct.unpack(">HHI", reply)
    assert version == USBIP_VERSION
    if isinstance(request, ExportRequest):
        assert code == Op.REP_EXPORT and status in (0, 1, 2), reply.hex()
    elif isinstance(request, UnexportRequest):
        assert code == Op.REP_UNEXPORT and status in (0, 3), reply.hex()
    else:
        assert isinstance(request, ImportRequest)
        assert (code, status) == (Op.REP_IMPORT, 1), reply.hex()  # NA: usbipa exports nothing


def assert_no_leaks(usbipa: Usbipa, fds_before: int, timeout: float = 10.0) -> None:
    """usbipa lives, holds the fds it started with, and no vhci port or record is left."""
    assert usbipa.alive(), usbipa.log()
    wait_for(lambda: not usbipa.kernel.used_ports(), timeout, "every vhci port to be free")
    wait_for(lambda: usbipa.fds() == fds_before, timeout, f"usbipa back to {fds_before} fds")
    # Sessions whose link died are reaped on the next poll (every 2 s).
    wait_for(lambda: not usbipa.session_records(), timeout, "usbipa's port records to go")


def assert_serves(device: FakeKernel, usbipa: Usbipa, state: Path, busid: str = "1-1") -> None:
    """A real `usbip-hotplug connect` then `disconnect` works against this usbipa."""
    if not (device.tree.paths.usb_devices / busid).exists():
        device.plug(busid)
    result = run_cli(device.tree, state, "connect", "-r", str(usbipa.endpoint), "-b", busid)
    assert result.returncode == 0, result.stderr + usbipa.log()
    assert device.stub_status(busid) == "2"
    assert len(usbipa.kernel.used_ports()) == 1
    result = run_cli(device.tree, state, "disconnect", "-b", busid)
    assert result.returncode == 0, result.stderr
    assert device.driver(busid) == "usb"
    wait_for(lambda: not usbipa.kernel.used_ports(), 10, "the port to be free after disconnect")


def dribble(
    senders: dict[str, tuple[socket.socket, bytes]], every: float, limit: float
) -> dict[str, float | None]:
    """Send each socket its data one byte per `every` seconds, all at once, until the
    server closes each; return the seconds each stayed open (None: still open).

    Bounded in time by `limit` and in rounds by the longest data.
    """
    start = time.monotonic()
    closed: dict[str, float | None] = dict.fromkeys(senders)
    sent = dict.fromkeys(senders, 0)
    while time.monotonic() - start < limit and any(v is None for v in closed.values()):
        open_socks = {sock: name for name, (sock, _) in senders.items() if closed[name] is None}
        readable, _, _ = select.select(list(open_socks), [], [], every)
        for sock in readable:
            try:
                data = sock.recv(1)
            except ConnectionResetError:
                data = b""
            assert data == b"", f"{open_socks[sock]}: answered a request it cannot have read"
            closed[open_socks[sock]] = time.monotonic() - start
        for name, (sock, data) in senders.items():
            if closed[name] is None and sent[name] < len(data):
                try:
                    sock.send(data[sent[name] : sent[name] + 1])
                except OSError:
                    closed[name] = time.monotonic() - start
                sent[name] += 1
    return closed
