"""device/operations.py: cutting a handshake short from the loop."""

from __future__ import annotations

import socket
import threading

import pytest

from hotplug.device.export import ExportError
from hotplug.device.operations import Canceller


def test_canceller_wakes_a_blocked_handshake() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    client.settimeout(10)
    canceller = Canceller()
    canceller.watch(client)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(client.recv(8)))
    reader.start()
    canceller.fire()
    reader.join(5)
    assert got == [b""]  # woken with EOF long before the 10 s timeout
    client.close()
    canceller.fire()  # after the export closed its socket: harmless
    listener.close()


def test_canceller_fired_before_connect() -> None:
    canceller = Canceller()
    canceller.fire()
    with socket.socket() as sock, pytest.raises(ExportError):
        canceller.watch(sock)
