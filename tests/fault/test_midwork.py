"""Faults in the middle of an export: the target dies mid-handshake, the device is
unplugged between bind and hand-over, usbipa restarts with ports attached.

Each converges (a retry or a restart gets back to a clean, working state),
leaks nothing (no vhci port, no half-bound device, no record), and leaves a
log line that says what happened.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import Any

import pytest

import hotplug.device.transport as transport_mod
from hotplug.device.export import ExportError, export, unexport
from hotplug.device.transport import Remote
from hotplug.kernel.sysfs import KernelError
from hotplug.usb import Device
from hotplug.wire.protocol import UnexportStatus
from hotplug.wire.sockets import Timeouts
from tests.fault.checks import assert_no_leaks
from tests.helpers import wait_for
from tests.rig import FakeKernel, Usbipa

FAST = Timeouts(connect=2.0, handshake=2.0)


def assert_released(device: FakeKernel, busid: str = "1-1") -> None:
    """The device is back with its usual driver, usbip-host has forgotten it."""
    if (device.tree.paths.usb_devices / busid).exists():
        assert device.driver(busid) == "usb"
        assert device.stub_status(busid) is None
    assert busid not in device.live_match_table()


# --------------------------------------------------------------------------- target dies


def test_target_killed_during_handshake(
    device: FakeKernel, usbipa: Usbipa, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """usbipa dies after the request is sent and before it replies."""
    device.plug("1-1")
    real_connect, real_recv = transport_mod.connect, transport_mod.recv_exactly

    def connect_to_frozen(*args: Any) -> socket.socket:
        usbipa.signal(signal.SIGSTOP)  # the kernel still completes the TCP handshake
        return real_connect(*args)

    def recv_after_kill(*args: Any) -> bytes:
        usbipa.kill()  # the request sits unread in its queue
        return real_recv(*args)

    monkeypatch.setattr(transport_mod, "connect", connect_to_frozen)
    monkeypatch.setattr(transport_mod, "recv_exactly", recv_after_kill)
    with caplog.at_level(logging.INFO, "hotplug.export"), pytest.raises(ExportError) as info:
        export(device.stub(), "1-1", Remote.plain(usbipa.endpoint, FAST))
    assert "reset" in str(info.value) or "closed" in str(info.value)
    assert_released(device)
    assert not usbipa.kernel.used_ports()
    assert any(f"export failed: {usbipa.endpoint}" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    # Converges: the target comes back and the next attempt (the daemon's retry) works.
    usbipa.start()  # on the same port and state directory, as systemd would
    export(device.stub(), "1-1", Remote.plain(usbipa.endpoint, FAST))
    assert device.stub_status("1-1") == "2" and len(usbipa.kernel.used_ports()) == 1


def test_usbipa_killed_while_its_attach_is_in_flight(
    device: FakeKernel, app: FakeKernel, usbipa: Usbipa
) -> None:
    """usbipa dies with its `attach` write queued at a (paused) kernel: the kernel
    attaches the port with nobody left to record it; whether the device side got
    the reply (queued first) or not, the port is freed once the link ends."""
    device.plug("1-1")
    base = usbipa.fds()
    app.signal(signal.SIGSTOP)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            export(
                device.stub(),
                "1-1",
                Remote.plain(usbipa.endpoint, Timeouts(connect=2, handshake=1)),
            )
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        # The accepted connection, and the socket to the kernel carrying `attach`.
        wait_for(lambda: usbipa.fds() >= base + 2, 10, "usbipa to be writing attach")
        usbipa.kill()
    finally:
        app.signal(signal.SIGCONT)
        thread.join(timeout=15)
    assert not thread.is_alive()
    assert app.proc is not None and app.proc.poll() is None, "the fake kernel died with usbipa"
    if outcome[0] is None:
        # Reply, then attach (issue 16): the status-0 reply was queued before the
        # `attach` write, so the dying usbipa's socket still delivered it, and the
        # kernel applied the attach: a working link, unknown to the next usbipa.
        # The device side ending it frees the port, as any link loss does.
        assert device.stub_status("1-1") == "2" and len(app.used_ports()) == 1
        device.stub().release("1-1")
    else:
        assert isinstance(outcome[0], ExportError), outcome
        message = str(outcome[0])
        assert "no reply within the handshake timeout" in message or "closed" in message
    assert_released(device)
    wait_for(lambda: not app.used_ports(), 10, "the orphaned port to be freed with its link")
    usbipa.start()  # on the same port and state directory, as systemd would
    assert usbipa.status_json() == []
    export(device.stub(), "1-1", Remote.plain(usbipa.endpoint, FAST))
    wait_for(lambda: len(app.used_ports()) == 1, 10, "usbipa to attach (it replies first)")


# --------------------------------------------------------------------------- unplug


def test_unplug_between_bind_and_export(device: FakeKernel, usbipa: Usbipa, caplog: Any) -> None:
    device.plug("1-1")
    stub = device.stub()
    real_bind = stub.bind

    def bind_then_unplug(busid: str, before: Device | None = None) -> None:
        real_bind(busid, before)
        device.unplug(busid)

    stub.bind = bind_then_unplug  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, "hotplug.export"), pytest.raises(KernelError):
        export(stub, "1-1", Remote.plain(usbipa.endpoint, FAST))
    assert_released(device)
    assert not usbipa.kernel.used_ports()
    assert any(
        "export failed: 1-1 was unplugged while it was being exported" in r.getMessage()
        for r in caplog.records
    )
    # Plugged in again, it exports.
    device.plug("1-1")
    export(device.stub(), "1-1", Remote.plain(usbipa.endpoint, FAST))
    assert device.stub_status("1-1") == "2"


def test_unplug_between_handshake_and_hand_over(
    device: FakeKernel, usbipa: Usbipa, caplog: Any
) -> None:
    """usbipa has attached a port; the device vanishes before usbip-host gets the link."""
    device.plug("1-1")
    base = usbipa.fds()
    stub = device.stub()
    real_hand_over = stub.hand_over

    def unplug_then_hand_over(busid: str, sock: socket.socket) -> None:
        assert len(usbipa.kernel.used_ports()) == 1  # attached on the far side
        device.unplug(busid)
        real_hand_over(busid, sock)

    stub.hand_over = unplug_then_hand_over  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, "hotplug.export"), pytest.raises(KernelError):
        export(stub, "1-1", Remote.plain(usbipa.endpoint, FAST))
    assert_released(device)
    assert any("export failed: 1-1 was unplugged while" in r.getMessage() for r in caplog.records)
    # Our end closed; the far kernel frees the port and usbipa drops the session.
    assert_no_leaks(usbipa, base)
    wait_for(lambda: "released by the kernel: 1-1" in usbipa.log(), 10, "usbipa's log line")


# --------------------------------------------------------------------------- restarts


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_usbipa_restart_adopts_attached_ports(
    device: FakeKernel, app: FakeKernel, usbipa: Usbipa, how: str
) -> None:
    stub = device.stub()
    for busid in ("1-1", "1-2", "1-3"):
        device.plug(busid)
        export(stub, busid, Remote.plain(usbipa.endpoint, FAST))
    ports = {row["busid"]: row["port"] for row in usbipa.status_json()}
    assert sorted(ports) == ["1-1", "1-2", "1-3"]
    if how == "SIGKILL":
        usbipa.kill()
    else:
        assert usbipa.stop() == 0
    # While it is down: the links stay up (the kernel holds them) but 1-3 is unplugged.
    assert len(app.used_ports()) == 3
    device.unplug("1-3")
    wait_for(lambda: len(app.used_ports()) == 2, 10, "1-3's port to be freed by its kernel")
    usbipa.start()  # on the same port and state directory, as systemd would
    # Its open files when idle; measured at the end, the count could catch an
    # unexport connection not yet closed and wait for a number that never comes.
    base = usbipa.fds()
    log = usbipa.log()
    assert f"adopted port {ports['1-1']}: 1-1 from 127.0.0.1" in log
    assert f"adopted port {ports['1-2']}: 1-2 from 127.0.0.1" in log
    assert f"forgot port {ports['1-3']}: 1-3 from 127.0.0.1" in log
    rows = usbipa.status_json()
    assert sorted((r["busid"], r["state"]) for r in rows) == [
        ("1-1", "attached"),
        ("1-2", "attached"),
    ]
    # Adopted for real: the unexports find their ports.
    for busid in ("1-1", "1-2"):
        assert unexport(stub, busid, Remote.plain(usbipa.endpoint, FAST)) == UnexportStatus.DETACHED
    assert unexport(stub, "1-3", Remote.plain(usbipa.endpoint, FAST)) == UnexportStatus.NOT_FOUND
    assert_no_leaks(usbipa, base)
    assert device.live_match_table() == []
