"""Malformed requests cost the sender its connection, are logged with the peer, and
usbipa keeps serving everyone else."""

from __future__ import annotations

import errno
import socket
import struct
from pathlib import Path

import pytest

from hotplug.testing.fake_kernel import FakeTree
from tests.helpers import wait_for
from tests.integration.conftest import DISK
from tests.integration.export_facts import used_ports
from tests.rig import run_cli, running_usbipa

EXPORT_HEAD = struct.pack(">HHI", 0x0111, 0x8006, 0)

CASES = {
    "garbage": (b"GET / HTTP/1.1\r\n\r\n", "malformed request"),
    "wrong version": (struct.pack(">HHI", 0x0110, 0x8006, 0), "malformed request: bad version"),
    "unknown code": (struct.pack(">HHI", 0x0111, 0x8009, 0), "malformed request: unknown op"),
    "reply as request": (struct.pack(">HHI", 0x0111, 0x0006, 0), "malformed request: "),
    "truncated record": (EXPORT_HEAD + b"\0" * 100, "malformed request: connection closed"),
}


def send_and_half_close(port: int, data: bytes) -> bytes:
    """What usbipa answers to `data` before it closes. It may close (with a reset,
    our bytes unread) before we half-close or read: that is an answer of none."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        chunks = b""
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(4096):
                chunks += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # shut down by a reset already
                raise
        return chunks


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_request(tree: FakeTree, state: Path, case: str) -> None:
    data, expected = CASES[case]
    tree.add_device(DISK)
    with running_usbipa(tree, state) as (proc, port):
        assert send_and_half_close(port, data) == b""  # closed without an answer
        result = run_cli(tree, state, "connect", "-r", f"127.0.0.1:{port}", "-b", "1-1")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: len(used_ports(tree)) == 1, 10, "usbipa to attach (it replies first)")
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "127.0.0.1" in log
    assert expected in log, log


def test_export_record_with_hostile_busid_is_rejected(tree: FakeTree, state: Path) -> None:
    """A busid with a space or newline would corrupt the vhci port record: refuse it."""
    body = bytearray(312)
    body[256 : 256 + 9] = b"1-1\nevil "
    with running_usbipa(tree, state) as (proc, port):
        assert send_and_half_close(port, EXPORT_HEAD + bytes(body)) == b""
        wait_for(lambda: used_ports(tree) == [], what="no port used")
    assert proc.stderr is not None
    assert "malformed request" in proc.stderr.read()


def test_connection_closed_before_any_byte_is_not_a_malformed_request(
    tree: FakeTree, state: Path
) -> None:
    """Issue 15, item 5: a port probe or health check (connect, then close) was
    logged as "malformed request: connection closed during header: got 0 of 8
    bytes" at WARNING; the demo's own readiness probe showed it. It is no error."""
    tree.add_device(DISK)
    with running_usbipa(tree, state) as (proc, port):
        for _ in range(3):
            assert send_and_half_close(port, b"") == b""
        assert send_and_half_close(port, b"\x01") == b""  # one byte is a cut request
        result = run_cli(tree, state, "connect", "-r", f"127.0.0.1:{port}", "-b", "1-1")
        assert result.returncode == 0, result.stderr
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert log.count("malformed request") == 1, log
    assert "got 1 of 8 bytes" in log, log
