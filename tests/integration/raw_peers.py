"""Peers played by raw sockets on loopback, for the tests that need exact bytes on
the wire: `fake_peer`, an application side that does what a test says with each
connection (`read_request` reads the device side's export request from it); and
`Peers`, device sides that send exactly the records a test makes (`record`),
several from one address, plain or TLS.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack

from hotplug.usb import Speed
from hotplug.wire.protocol import (
    DEVICE_RECORD_SIZE,
    HEADER_SIZE,
    DeviceRecord,
    ExportRequest,
    UnexportRequest,
    encode,
)
from tests.helpers import disk_record, loopback_server
from tests.integration.tls_support import raw_tls_client
from tests.tlscerts import Pair, Pki

REQUEST_SIZE = HEADER_SIZE + DEVICE_RECORD_SIZE


def fake_peer(behaviour: Callable[[socket.socket], None]) -> AbstractContextManager[int]:
    """A hand-rolled application side on loopback that does `behaviour` per connection."""
    return loopback_server(behaviour)


def read_request(conn: socket.socket) -> bytes:
    data = b""
    conn.settimeout(5)
    while len(data) < REQUEST_SIZE:
        chunk = conn.recv(REQUEST_SIZE - len(data))
        if not chunk:
            break
        data += chunk
    return data


def record(
    busid: str = "1-1",
    *,
    busnum: int = 1,
    devnum: int = 2,
    vendor: int = 0x1D6B,
    product: int = 0x0104,
    path: str | None = None,
    speed: Speed = Speed.HIGH,
) -> DeviceRecord:
    where = {"path": path} if path is not None else {}
    return disk_record(
        busid,
        busnum=busnum,
        devnum=devnum,
        speed=speed,
        id_vendor=vendor,
        id_product=product,
        **where,
    )


def ask(sock: socket.socket, request: bytes) -> int:
    """Send one request, return the status of its 8-byte reply."""
    sock.sendall(request)
    reply = b""
    while len(reply) < 8:
        chunk = sock.recv(8 - len(reply))
        if not chunk:
            raise AssertionError(f"usbipa closed the connection after {len(reply)} reply bytes")
        reply += chunk
    status: int = struct.unpack(">HHI", reply)[2]
    return status


class Peers:
    """Device sides as raw sockets; an attached one keeps its socket open (its link)."""

    def __init__(self, stack: ExitStack, pki: Pki | None = None, port: int = 0) -> None:
        self.stack = stack
        self.pki = pki
        self.port = port

    def open(self, pair: Pair | None = None) -> socket.socket:
        if pair is not None:
            assert self.pki is not None
            sock: socket.socket = raw_tls_client(self.pki, self.port, pair)
        else:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return self.stack.enter_context(sock)

    def export(self, rec: DeviceRecord, pair: Pair | None = None) -> int:
        return ask(self.open(pair), encode(ExportRequest(rec)))

    def unexport(self, rec: DeviceRecord, pair: Pair | None = None) -> int:
        with self.open(pair) as sock:
            return ask(sock, encode(UnexportRequest(rec)))
