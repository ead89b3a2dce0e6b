"""Who owns a session in usbipa, and what an export must be to get and keep one.

Issue 12, findings 2, 3, 6 and 7: the real usbipa on loopback with the fake
kernel, and device sides played by raw sockets (plain or TLS with test
certificates) that send exactly the records a test needs, several of them
from one address.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from hotplug.device.export import bare_record
from hotplug.device.transport import Remote
from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice
from hotplug.usb import Device, Speed
from hotplug.wire.protocol import (
    DeviceRecord,
    ExportStatus,
    UnexportStatus,
)
from tests.helpers import wait_for
from tests.integration.export_facts import used_ports
from tests.integration.raw_peers import Peers, record
from tests.integration.tls_support import log_of, secure_usbipa
from tests.rig import running_usbipa
from tests.tlscerts import Pair, Pki, issue_client


@contextmanager
def tls_usbipa(
    tree: FakeTree, state: Path, pki: Pki, allow: str
) -> Iterator[tuple[Peers, list[str]]]:
    """usbipa with TLS and these allow entries (YAML); yields the peers and, once
    the block is left, its log as the list's only item."""
    config = state / "usbipa.yaml"
    config.write_text(allow)
    logs: list[str] = []
    with (
        secure_usbipa(tree, state, pki, "-c", str(config), allow=None) as (proc, ports),
        ExitStack() as stack,
    ):
        yield Peers(stack, pki, ports["tls"]), logs
        stack.close()
        proc.terminate()
        proc.wait(timeout=10)
        logs.append(log_of(proc))


@pytest.fixture
def certs(pki: Pki, tmp_path: Path) -> dict[str, Pair]:
    made = tmp_path / "certs"
    return {
        "lab-1": issue_client(pki, made, "lab-1", (("CN", "lab-1"), ("O", "Example"))),
        # One CN that renders exactly as the subject above.
        "one-cn": issue_client(pki, made, "one-cn", (("CN", "lab-1,O=Example"),)),
        "intruder": issue_client(pki, made, "intruder", (("CN", "intruder"), ("CN", "lab-1"))),
        "upper": issue_client(pki, made, "upper", (("CN", "LAB-1"),)),
        "san-a": issue_client(pki, made, "san-a", (), ("a.lab.example",)),
        "san-b": issue_client(pki, made, "san-b", (), ("b.lab.example",)),
        "san-x": issue_client(pki, made, "san-x", (), ("x.other.example",)),
        "san-upper": issue_client(pki, made, "san-upper", (), ("C.Lab.Example",)),
    }


def test_colliding_subject_cannot_withdraw_a_device(
    tree: FakeTree, state: Path, pki: Pki, certs: dict[str, Pair]
) -> None:
    """Issue 12, finding 2: a certificate no allow entry admits, whose subject
    renders like an allowed one (CN="lab-1,O=Example" vs CN=lab-1,O=Example),
    withdrew the allowed client's device with UNEXPORT and with a refused
    EXPORT. Ownership is the certificate's fingerprint, and both requests are
    authorized before any session is touched."""
    allow = 'allow:\n  - client: "CN=lab-1,O=Example"\n'
    with tls_usbipa(tree, state, pki, allow) as (peers, logs):
        assert peers.export(record(), certs["lab-1"]) == ExportStatus.ATTACHED
        held = wait_for(lambda: used_ports(tree), 5, "the device attached")
        assert peers.unexport(record(), certs["one-cn"]) == UnexportStatus.NOT_FOUND
        assert peers.export(record(), certs["one-cn"]) == ExportStatus.FAILED
        assert used_ports(tree) == held
        # The owner itself still can.
        assert peers.unexport(record(), certs["lab-1"]) == UnexportStatus.DETACHED
        wait_for(lambda: not used_ports(tree), 5, "the port freed")
    log = logs[0]
    assert "refused unexport from 127.0.0.1 (CN=lab-1,O=Example): client" in log
    assert "not in any allow entry" in log


def test_san_only_clients_are_told_apart(
    tree: FakeTree, state: Path, pki: Pki, certs: dict[str, Pair]
) -> None:
    """Issue 12, finding 2: SAN-only certificates were all "(empty subject)": two
    allowed ones shared one max_devices budget and replaced each other's
    devices, and a refused one withdrew theirs."""
    allow = 'allow:\n  - san: "DNS:*.lab.example"\n    max_devices: 1\n'
    with tls_usbipa(tree, state, pki, allow) as (peers, _):
        assert peers.export(record(devnum=2), certs["san-a"]) == ExportStatus.ATTACHED
        assert peers.export(record(devnum=3), certs["san-b"]) == ExportStatus.ATTACHED
        both = wait_for(lambda: len(used_ports(tree)) == 2 and used_ports(tree), 5, "2 ports")
        # A refused SAN-only client withdraws nothing, by EXPORT or UNEXPORT.
        assert peers.unexport(bare_record("1-1"), certs["san-x"]) == UnexportStatus.NOT_FOUND
        assert peers.export(record(devnum=2), certs["san-x"]) == ExportStatus.FAILED
        # Each has a budget of its own: a's second device is over it, b's first is not.
        assert peers.export(record("1-2", devnum=4), certs["san-a"]) == ExportStatus.FAILED
        assert used_ports(tree) == both


def test_one_subject_and_case_rule(
    tree: FakeTree, state: Path, pki: Pki, certs: dict[str, Pair]
) -> None:
    """Issue 12, finding 2: `client: "CN=lab-1"` admitted CN=intruder,CN=lab-1
    (any one CN matching was enough), CN compared case-sensitively while DNS
    SANs were lower-cased. The rule now: each value of a named attribute must
    match, and subject values and DNS names both compare case-insensitively."""
    allow = 'allow:\n  - client: "CN=lab-1"\n  - san: "DNS:c.LAB.example"\n'
    with tls_usbipa(tree, state, pki, allow) as (peers, logs):
        assert peers.export(record(devnum=2), certs["intruder"]) == ExportStatus.FAILED
        assert peers.export(record(devnum=3), certs["upper"]) == ExportStatus.ATTACHED
        assert peers.export(record(devnum=4), certs["san-upper"]) == ExportStatus.ATTACHED
        assert peers.export(record(devnum=5), certs["lab-1"]) == ExportStatus.ATTACHED
        wait_for(lambda: len(used_ports(tree)) == 3, 5, "3 ports")
    assert "refused export from 127.0.0.1 (CN=intruder,CN=lab-1): client" in logs[0]


def test_device_sides_behind_one_address_keep_their_devices(tree: FakeTree, state: Path) -> None:
    """Issue 12, finding 3: two device machines behind one address (NAT, stunnel)
    exporting busid 1-1 replaced each other for ever. Only the same device (its
    record's path, devid and ids) replaces a session; an UNEXPORT with a record
    detaches that device only."""
    one = record(devnum=2, path="/sys/devices/pci0000:00/0000:00:14.0/usb1/1-1")
    other = record(devnum=7, vendor=0x0781, product=0x5583, path="/sys/devices/platform/x/usb1/1-1")
    with running_usbipa(tree, state) as (proc, port), ExitStack() as stack:
        peers = Peers(stack, port=port)
        assert peers.export(one) == ExportStatus.ATTACHED
        assert peers.export(other) == ExportStatus.ATTACHED
        first, second = wait_for(
            lambda: len(used_ports(tree)) == 2 and used_ports(tree), 5, "both attached"
        )
        # The first machine's device side restarts and exports again: its own
        # stale session is replaced, the other machine's stays.
        assert peers.export(one) == ExportStatus.ATTACHED
        # (The replacement takes the lowest free port: the one it freed.)
        assert used_ports(tree) == [first, second]
        assert peers.unexport(other) == UnexportStatus.DETACHED
        wait_for(lambda: used_ports(tree) == [first], 5, "the other machine's port freed")
        stack.close()
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert f"detached port {first}: 1-1 from 127.0.0.1 (replaced by a new export" in log, log
    assert f"detached port {second}: 1-1 from 127.0.0.1 (unexported" in log, log
    assert log.count("usbipa: detached port") == 2, log


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"busnum": 0x10000}, "busnum 65536 out of range (at most 65535)"),
        ({"devnum": 0x1_0000}, "devnum 65536 out of range (at most 65535)"),
        ({"busnum": 0xFFFF_FFFF}, "busnum 4294967295 out of range"),
        ({"speed": Speed.UNKNOWN}, "device speed unknown (0)"),
    ],
)
def test_record_fields_the_kernel_cannot_take_are_refused(
    tree: FakeTree, state: Path, fields: dict[str, int], reason: str
) -> None:
    """Issue 12, finding 6: busnum and devnum were not range-checked, so the devid
    (busnum << 16 | devnum) could exceed the kernel's __u32 and usbipa lost track
    of the port (max_devices bypassed). Refused with a reply and a clear log line;
    usbipa keeps serving."""
    with running_usbipa(tree, state) as (proc, port), ExitStack() as stack:
        peers = Peers(stack, port=port)
        bad = record(**fields)  # type: ignore[arg-type]
        assert peers.export(bad) == ExportStatus.FAILED
        assert used_ports(tree) == []
        assert peers.export(record("1-2")) == ExportStatus.ATTACHED
        stack.close()
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert f"refused export from 127.0.0.1: {reason}" in log, log


def test_fake_vhci_cuts_devid_to_32_bits_and_refuses_unknown_speed(tree: FakeTree) -> None:
    """Issue 12, finding 6: the fake kernel does what vhci_hcd's attach_store does
    with such values (sscanf %u into __u32: cut to 32 bits; valid_args: EINVAL
    for USB_SPEED_UNKNOWN), instead of keeping a devid no kernel could hold."""
    from hotplug.kernel.sysfs import KernelError

    vhci = tree.vhci()
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as link:
        with pytest.raises(KernelError):
            vhci.attach(0, link, (1 << 16) | 2, Speed.UNKNOWN)
        vhci.attach(0, link, (0x1_0001 << 16) | 2, Speed.HIGH)
        port = vhci.port(0)
        assert port is not None and port.devid == (0x0001 << 16) | 2
        vhci.detach(0)


def test_identity_is_the_certificate_not_its_name() -> None:
    """Issue 12, finding 2: the identity is the certificate (its SHA-256), never
    the rendered name, whenever the certificate is known."""
    from hotplug.wire.peercert import PeerCert

    one = PeerCert.from_ssl({"subject": ((("commonName", "lab-1,O=Example"),),)}, b"a")
    two = PeerCert.from_ssl(
        {"subject": ((("commonName", "lab-1"),), (("organizationName", "Example"),))}, b"b"
    )
    assert one.name == two.name
    assert one.identity != two.identity
    assert one.identity.startswith("sha256:")


def test_device_that_is_not_what_its_export_claims_is_detached(
    tree: FakeTree, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12, finding 7: `devices:` filtered only the vid:pid the peer claims in
    OP_EXPORT. Once the device enumerates behind vhci, usbipa compares its
    idVendor/idProduct with the record's and detaches on a mismatch, saying why.
    Here the device side lies: it exports a 0bad:0001 as an allowed 1d6b:0104."""
    import hotplug.device.export as export_module
    from hotplug.wire.address import Endpoint
    from hotplug.wire.sockets import Timeouts

    tree.add_device(FakeUsbDevice(busid="1-1", vendor=0x0BAD, product=0x0001), devnum=3)
    tree.add_device(FakeUsbDevice(busid="1-2", vendor=0x1D6B, product=0x0104), devnum=4)
    honest = export_module.device_record

    def lying(device: Device) -> DeviceRecord:
        rec = honest(device)
        if device.busid != "1-1":
            return rec
        return dataclasses.replace(rec, id_vendor=0x1D6B, id_product=0x0104)

    with running_usbipa(tree, state, "--device", "1d6b:0104") as (proc, port):
        endpoint = Endpoint("127.0.0.1", port)
        export_module.export(tree.stub(), "1-2", Remote.plain(endpoint, Timeouts(3, 3)))
        honest_port = wait_for(lambda: used_ports(tree), 5, "the honest device attached")
        monkeypatch.setattr(export_module, "device_record", lying)
        export_module.export(tree.stub(), "1-1", Remote.plain(endpoint, Timeouts(3, 3)))
        wait_for(lambda: len(used_ports(tree)) == 2, 5, "the lying export attached")
        # usbipa's poll (every 2 s) finds what enumerated; the honest one stays.
        wait_for(lambda: used_ports(tree) == honest_port, 10, "the lying device detached")
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert "the device that enumerated is 0bad:0001, not the 1d6b:0104 its export claimed" in log, (
        log
    )
    assert log.count("usbipa: detached port") == 1, log
