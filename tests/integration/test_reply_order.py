"""Issue 16: the EXPORT reply must be on the wire before the kernel can write to the
socket. The fake kernel's vhci, like the real one, sends its first URB header the
moment it is attached, so an application side that attaches before replying puts
that header where the reply belongs, every time."""

from __future__ import annotations

import contextlib
import socket
import struct
from pathlib import Path

import pytest

from hotplug.device.export import ExportError, device_record, export
from hotplug.device.transport import Remote
from hotplug.kernel.sysfs import read_device
from hotplug.testing.fake_kernel import USBIP_CMD_SUBMIT, FakeTree
from hotplug.usb import Speed
from hotplug.wire.address import Endpoint
from hotplug.wire.protocol import (
    DEVICE_RECORD_SIZE,
    HEADER_SIZE,
    ExportReply,
    ExportRequest,
    ExportStatus,
    Op,
    decode_header,
    encode,
)
from hotplug.wire.sockets import Timeouts
from tests.helpers import wait_for
from tests.integration.conftest import DISK
from tests.integration.export_facts import driver, stub_status, used_ports
from tests.integration.raw_peers import fake_peer
from tests.rig import running_usbipa


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def test_usbipa_replies_before_the_kernel_sends_its_first_urb(tree: FakeTree, state: Path) -> None:
    """Issue 16: with attach-then-reply the first 8 bytes were the fake vhci's
    USBIP_CMD_SUBMIT header; now they are OP_REP_EXPORT status 0, then the URB."""
    tree.add_device(DISK)
    record = device_record(read_device(tree.paths, "1-1"))
    with running_usbipa(tree, state) as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(encode(ExportRequest(record)))
            reply = recv_exactly(sock, HEADER_SIZE)
            header = decode_header(reply)  # a CMD_SUBMIT here raised "bad version 0x0000"
            assert (header.code, header.status) == (Op.REP_EXPORT, ExportStatus.ATTACHED)
            urb = recv_exactly(sock, 48)
            assert struct.unpack(">I", urb[:4])[0] == USBIP_CMD_SUBMIT
            assert len(used_ports(tree)) == 1
        wait_for(lambda: used_ports(tree) == [], 5, "vhci to free the port on link loss")


def test_device_side_names_an_application_side_that_attached_before_replying(
    tree: FakeTree,
) -> None:
    """Issue 16, item 2: a peer in the old order (attach on a real (fake-kernel) vhci,
    then reply) gets a precise error, the device is released, and closing the
    connection frees the peer's vhci port."""
    tree.add_device(DISK)
    vhci = tree.vhci()

    def attach_then_reply(conn: socket.socket) -> None:
        conn.settimeout(5)
        request = recv_exactly(conn, HEADER_SIZE + DEVICE_RECORD_SIZE)
        devid = struct.unpack(">II", request[HEADER_SIZE + 288 : HEADER_SIZE + 296])
        free = vhci.find_free_port(Speed.HIGH)
        assert free is not None
        vhci.attach(free.port, conn, devid[0] << 16 | devid[1], Speed.HIGH)
        with contextlib.suppress(OSError):  # the device side may have reset it already
            conn.sendall(encode(ExportReply(ExportStatus.ATTACHED)))

    with fake_peer(attach_then_reply) as port:
        with pytest.raises(ExportError) as caught:
            export(tree.stub(), "1-1", Remote.plain(Endpoint("127.0.0.1", port), Timeouts(2, 2)))
        message = str(caught.value)
        assert "the application side sent data-phase bytes" in message
        assert "USBIP_CMD_SUBMIT 0x00000001" in message
        assert "before its OP_REP_EXPORT: it attached before replying" in message
        assert "bad version" not in message
        assert driver(tree, "1-1") == "usb" and stub_status(tree, "1-1") is None
        wait_for(lambda: used_ports(tree) == [], 5, "the peer's vhci port to be freed")
