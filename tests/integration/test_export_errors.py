"""Every way an export can fail leaves the device as it was and says why in one line."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hotplug.device.export import ExportError, export
from hotplug.device.transport import Remote
from hotplug.kernel.vhci import PortState
from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice
from hotplug.wire.address import Endpoint
from hotplug.wire.protocol import (
    ExportReply,
    ExportStatus,
    encode,
)
from hotplug.wire.sockets import Timeouts
from tests.helpers import wait_for
from tests.integration.conftest import DISK
from tests.integration.export_facts import assert_untouched, driver, stub_status, used_ports
from tests.integration.raw_peers import fake_peer, read_request
from tests.rig import command, env_for, run_cli, running_usbipa


def connect_cli(tree: FakeTree, state: Path, port: int, *extra: str) -> tuple[int, str]:
    result = run_cli(
        tree, state, "connect", "-r", f"127.0.0.1:{port}", "-b", "1-1", "--timeout", "1", *extra
    )
    return result.returncode, result.stderr.strip().splitlines()[-1] if result.stderr else ""


def test_peer_not_allowed(tree: FakeTree, state: Path) -> None:
    """An address no allow entry names is closed on at accept, before a word is
    read (issue 12, finding 4); both sides say why."""
    tree.add_device(DISK)
    with running_usbipa(tree, state, allow="192.0.2.0/24") as (proc, port):
        code, err = connect_cli(tree, state, port)
    assert code == 1
    assert "connection closed before replying (does the application side's allow list" in err
    assert_untouched(tree)
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "refused connection from 127.0.0.1: no allow entry admits this address" in log


def test_device_filtered(tree: FakeTree, state: Path) -> None:
    tree.add_device(DISK)
    with running_usbipa(tree, state, "--device", "0781:*") as (proc, port):
        code, err = connect_cli(tree, state, port)
    assert code == 1 and "refused 1-1" in err
    assert_untouched(tree)
    assert proc.stderr is not None
    assert "device 1d6b:0104 not allowed for this peer" in proc.stderr.read()


def test_no_free_port(tmp_path: Path, state: Path) -> None:
    tree = FakeTree(tmp_path / "small", ports_per_hub=1).create()
    server = tree.start_server()
    try:
        tree.add_device(DISK)
        tree.add_device(FakeUsbDevice("1-2", 0x1D6B, 0x0105, serial="B"))
        with running_usbipa(tree, state) as (_, port):
            assert (
                run_cli(tree, state, "connect", "-r", f"127.0.0.1:{port}", "-b", "1-2").returncode
                == 0
            )
            code, err = connect_cli(tree, state, port)
            assert code == 1
            assert "no free port of the needed speed" in err
            assert driver(tree, "1-1") == "usb" and stub_status(tree, "1-1") is None
            assert len(used_ports(tree)) == 1
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_superspeed_device_gets_superspeed_port(tree: FakeTree, state: Path) -> None:
    tree.add_device(FakeUsbDevice("2-1", 0x0781, 0x5583, serial="SS", speed="5000"))
    with running_usbipa(tree, state) as (_, port):
        result = run_cli(tree, state, "connect", "-r", f"127.0.0.1:{port}", "-b", "2-1")
        assert result.returncode == 0, result.stderr
        (used,) = [p for p in tree.vhci().ports() if p.state == PortState.USED]
        assert used.hub == "ss"


def test_target_refuses_connection(tree: FakeTree, state: Path) -> None:
    tree.add_device(DISK)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    code, err = connect_cli(tree, state, port)
    assert code == 1 and "Connection refused" in err
    assert_untouched(tree)


def test_target_silent(tree: FakeTree, state: Path) -> None:
    tree.add_device(DISK)
    with fake_peer(lambda conn: None) as port:
        code, err = connect_cli(tree, state, port)
    assert code == 1 and "no reply within the handshake timeout" in err
    assert_untouched(tree)


def test_target_closes_mid_reply(tree: FakeTree, state: Path) -> None:
    tree.add_device(DISK)

    def half_reply(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(encode(ExportReply(ExportStatus.ATTACHED))[:4])
        conn.close()

    with fake_peer(half_reply) as port:
        code, err = connect_cli(tree, state, port)
    assert code == 1 and "connection closed after 4 of 8 bytes" in err
    assert_untouched(tree)


def test_target_sends_garbage_reply(tree: FakeTree, state: Path) -> None:
    tree.add_device(DISK)

    def garbage(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1")

    with fake_peer(garbage) as port:
        code, err = connect_cli(tree, state, port)
    assert code == 1 and "bad reply" in err
    assert_untouched(tree)


def test_bytes_after_the_reply_reach_the_kernel_untouched(tree: FakeTree) -> None:
    """The first URBs may share a segment with the reply; usbip-host must get all of them."""
    tree.add_device(DISK)
    urbs = bytes(range(256)) * 4

    def reply_with_urbs(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(encode(ExportReply(ExportStatus.ATTACHED)) + urbs)

    with fake_peer(reply_with_urbs) as port:
        export(tree.stub(), "1-1", Remote.plain(Endpoint("127.0.0.1", port), Timeouts(1, 1)))
        rx = tree.root / ".fake-kernel-rx" / "1-1"
        wait_for(lambda: rx.read_bytes() == urbs, what="URB bytes at the stub")
        assert stub_status(tree, "1-1") == "2"


def test_disconnect_unknown_busid_is_idempotent(tree: FakeTree, state: Path) -> None:
    tree.add_device(DISK)
    with running_usbipa(tree, state) as (_, port):
        result = run_cli(tree, state, "disconnect", "-r", f"127.0.0.1:{port}", "-b", "1-1")
    assert result.returncode == 0, result.stderr
    assert "it was not attached there" in result.stdout
    assert_untouched(tree)


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda t: t.unload_stub(), "usbip-host is not loaded: run 'modprobe usbip-host'"),
        (
            lambda t: t.add_device(FakeUsbDevice("1-3", 0x05E3, 0x0608, device_class=9)),
            "1-3 is a USB hub",
        ),
    ],
)
def test_kernel_refusals(
    tree: FakeTree, state: Path, prepare: Callable[[FakeTree], object], message: str
) -> None:
    prepare(tree)
    busid = "1-3" if "hub" in message else "1-1"
    result = run_cli(tree, state, "connect", "-r", "127.0.0.1:1", "-b", busid)
    assert result.returncode == 1
    assert message in result.stderr


def test_unknown_busid(tree: FakeTree, state: Path) -> None:
    result = run_cli(tree, state, "connect", "-r", "127.0.0.1:1", "-b", "9-9")
    assert result.returncode == 1
    assert "no USB device with busid 9-9" in result.stderr


def test_device_bound_by_another_tool_is_not_taken(tree: FakeTree, state: Path) -> None:
    tree.add_device(DISK)
    stub = tree.stub()
    stub.bind("1-1")  # what `usbip bind` does for usbipd
    with running_usbipa(tree, state) as (_, port):
        code, err = connect_cli(tree, state, port)
        assert code == 1 and "already bound to usbip-host by another tool" in err
        assert stub_status(tree, "1-1") == "1" and used_ports(tree) == []
        code, _ = connect_cli(tree, state, port, "--force")
        assert code == 0 and stub_status(tree, "1-1") == "2"


def test_export_error_is_one_line(tree: FakeTree) -> None:
    tree.add_device(DISK)
    with pytest.raises(ExportError) as info:
        export(tree.stub(), "1-1", Remote.plain(Endpoint("127.0.0.1", 1), Timeouts(1, 1)))
    assert "\n" not in str(info.value)
    assert_untouched(tree)


def test_a_full_busid_table_is_explained(tree: FakeTree, state: Path) -> None:
    """usbip-host holds 16 busids; Linux keeps the entry of a device unplugged while
    exported and `del` does not free it. The 17th busid gets a reason and a way out."""
    stub = tree.stub()
    for n in range(16):
        stub.write(tree.paths.stub_driver / "match_busid", f"add 9-{n + 1}")
    tree.add_device(DISK)
    result = run_cli(tree, state, "connect", "-r", "127.0.0.1:1", "-b", "1-1")
    assert result.returncode == 1
    assert "usbip-host's table of 16 busids is full" in result.stderr
    assert "modprobe -r usbip-host && modprobe usbip-host" in result.stderr
    assert_untouched(tree)


STEPS_OF_EXPORT = [
    "bind.after-match-add",
    "bind.after-driver-unbind",
    "bind.after-stub-bind",
    "export.after-connect",
    "export.after-reply",
    "export.after-hand-over",
]


@pytest.mark.parametrize("point", STEPS_OF_EXPORT)
def test_unplugged_mid_export_says_so(
    tree: FakeTree, state: Path, tmp_path: Path, point: str
) -> None:
    """Issue 11, item 3 (the real-kernel fault matrix): a device pulled out at a
    step of `connect` was reported as whatever kernel write failed next
    ("/sys/.../driver/unbind does not exist", "1-1 is not bound to usbip-host",
    "usbip-host did not take the connection"...). Now one line says what happened."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / f"{point}.pause").touch()
    tree.add_device(DISK)
    with running_usbipa(tree, state) as (_, port):
        proc = subprocess.Popen(
            [
                *command("usbip-hotplug"),
                "connect",
                "-r",
                f"127.0.0.1:{port}",
                "-b",
                "1-1",
            ],
            env=env_for(tree, state, USBIP_HOTPLUG_FAULTPOINTS=str(faults)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(
                lambda: (faults / f"{point}.reached").exists() or proc.poll() is not None,
                timeout=30,
                what=f"connect at {point}",
            )
            tree.remove_device("1-1")
        finally:
            (faults / f"{point}.pause").unlink()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, err
        assert err.strip().splitlines()[-1] == (
            f"usbip-hotplug: 1-1 was unplugged while it was being exported to 127.0.0.1:{port};"
            " plug it in again to retry"
        ), err
        wait_for(lambda: not used_ports(tree), what="the far side's port freed")


@pytest.mark.parametrize("fault", ["unplugged", "refused"])
def test_a_link_abandoned_after_the_reply_answers_the_far_hub_first(
    tree: FakeTree, state: Path, tmp_path: Path, fault: str
) -> None:
    """Issue 16, item 3: after a status-0 reply the far side has attached and its
    hub asks for the device (the fake vhci sends the hub's GET_DESCRIPTOR inside
    `attach`, as the real one does shortly after). An export that fails before
    usbip-host takes the link answers that request with ENODEV before it closes,
    or vhci's root hub waits seconds on it (docs/PROTOCOL.md)."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "export.after-reply.pause").touch()
    tree.add_device(DISK)
    with running_usbipa(tree, state) as (_, port):
        proc = subprocess.Popen(
            [*command("usbip-hotplug"), "connect", "-r", f"127.0.0.1:{port}", "-b", "1-1"],
            env=env_for(tree, state, USBIP_HOTPLUG_FAULTPOINTS=str(faults)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(
                lambda: (faults / "export.after-reply.reached").exists() or proc.poll() is not None,
                timeout=30,
                what="connect after the reply",
            )
            [attached] = used_ports(tree)
            if fault == "unplugged":
                tree.remove_device("1-1")
            else:  # usbip-host refuses the link (here: it is not bound any more)
                tree.stub().write(tree.paths.stub_driver / "unbind", "1-1")
        finally:
            (faults / "export.after-reply.pause").unlink()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, err
        wait_for(lambda: not used_ports(tree), what="the far side's port freed")
    answers = tree.vhci_received(attached)
    assert answers[:8] == (3).to_bytes(4, "big") + (1).to_bytes(4, "big"), answers.hex()
    assert answers[20:24] == (-19 & 0xFFFFFFFF).to_bytes(4, "big"), answers.hex()  # -ENODEV
