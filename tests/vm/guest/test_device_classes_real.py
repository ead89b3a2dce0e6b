"""Device classes exported by the daemon, working behind vhci_hcd (issue 14, item 1).

Each device is a configfs gadget on dummy_hcd, exported by `usbip-hotplug run`
to usbipa on the same guest, and shown working on the application side, not
just enumerated:

- a CDC ACM serial adapter: bytes both ways between the gadget's /dev/ttyGSn
  and the /dev/ttyACMn that cdc_acm makes for the copy behind vhci_hcd;
- a composite device, mass storage + ACM in one configuration: the disk and
  the serial port at the same time, through the one export;
- a CDC ECM and a CDC NCM network adapter: the two ends (the gadget's
  interface and cdc_ether's / cdc_ncm's behind vhci_hcd) each in a network
  namespace of its own, with test-net addresses, and pings across;
- SuperSpeed: dummy_hcd reloaded with is_super_speed=1, the export lands on a
  port of vhci's SuperSpeed root hub at 5000 Mb/s and a disk's data moves
  intact. The fixture puts the session's dummy_hcd back afterwards, and the
  test runs after every other module of the session (marker
  `reloads_dummy_hcd`, ordered by tests/vm/guest/conftest.py), so nothing
  else ever sees the reload.

One usbipa and one daemon serve the module (test_daemon_real's `Rig`, on a
port of its own). Verdicts come from the kernel (vhci_hcd's status, sysfs
speeds and drivers) and from data: what arrives at the other end of a tty or
a disk, ping's replies.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

import pytest

from hotplug.testing.vm import gadget as gd
from hotplug.testing.vm.kmsg import KmsgReader, kernel_fault_lines
from tests.helpers import disk_policy
from tests.vm.guest.daemon_rig import (
    ENUM,
    KiB,
    MiB,
    Rig,
    assert_disk_works,
    plug_and_export,
    rig_in,
    used_ports,
    vhci_disk,
)

USBIPA_PORT = 3257  # 3240 usbipd, 3250-3256 the other modules (test_claim_real lists them)
TARGET = f"127.0.0.1:{USBIPA_PORT}"
WORK = Path("/run/uhc")  # short: the daemon's control socket lives below it
SERIAL_PREFIX = "CLS"
SERIAL_BYTES = 16 * KiB  # more than u_serial's 8 KiB buffer, many 512-byte packets
# Test-net addresses (RFC 5737): the ends of the USB network link.
DEVICE_ADDR, APP_ADDR = "192.0.2.1", "192.0.2.2"
SPEED_SUPER = 5  # enum usb_device_speed, vhci_hcd's `spd` column
DRIVER = {"ecm": "ether", "ncm": "ncm"}  # the host's driver of each: cdc_<that>

GadgetT = TypeVar("GadgetT", bound=gd.Gadget)
_serials = itertools.count(1)


def new_serial() -> str:
    return f"{SERIAL_PREFIX}{os.getpid()}x{next(_serials)}"


@pytest.fixture(scope="module")
def class_drivers() -> None:
    """The application side's class drivers (udev would load them on demand; loaded
    here so that no wait depends on udev's timing or the guest's blacklist)."""
    for module in ("cdc_acm", "cdc_ether", "cdc_ncm"):
        if not gd.module_loaded(module):
            gd.modprobe(module)


class ClassesRig(Rig):
    """test_daemon_real's rig on a port and a policy of its own."""

    def usbipa_args(self, port: int = USBIPA_PORT) -> list[str]:
        return super().usbipa_args(port)


@pytest.fixture(scope="module")
def rig(
    usbip_modules: None, gadget_modules: list[str], class_drivers: None
) -> Iterator[ClassesRig]:
    with rig_in(WORK, ClassesRig) as r:
        r.write_policy(
            disk_policy(
                TARGET,
                f"{SERIAL_PREFIX}*",
                rule="test-classes",
                connect_timeout="2",
                handshake_timeout="10",
                retry="{initial: 0.5, max: 2}",
            )
        )
        r.ensure(usbipa=True)
        yield r


def made(gadgets: list[gd.Gadget], g: GadgetT) -> GadgetT:
    """`g` created, and removed after the test (the `gadgets` fixture's clean-up)."""
    gadgets.append(g)
    return g.create()


# --------------------------------------------------------------------------- serial


@contextlib.contextmanager
def raw_tty(path: str) -> Iterator[int]:
    """A tty opened non-blocking in raw mode (8 bits through, no echo, no line
    editing, no flow control characters), closed afterwards."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        tty.setraw(fd)
        termios.tcflush(fd, termios.TCIOFLUSH)
        yield fd
    finally:
        os.close(fd)


def pump(src: int, dst: int, data: bytes, *, timeout: float = ENUM) -> bytes:
    """Write `data` to tty `src` and read from tty `dst` at the same time (either
    side may hold only a part of it) until as many bytes arrived or `timeout`."""
    sent, got = 0, bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < len(data) and (left := deadline - time.monotonic()) > 0:
        writers = [src] if sent < len(data) else []
        readable, writable, _ = select.select([dst], writers, [], min(left, 1.0))
        if writable:
            with contextlib.suppress(BlockingIOError):
                sent += os.write(src, data[sent : sent + 4 * KiB])
        if readable:
            with contextlib.suppress(BlockingIOError):
                got += os.read(dst, 64 * KiB)
    assert len(got) == len(data), f"{len(got)} of {len(data)} bytes arrived ({sent} written)"
    return bytes(got)


def serial_both_ways(gadget_tty: str, app_tty: str) -> None:
    with raw_tty(gadget_tty) as dev, raw_tty(app_tty) as app:
        to_app, to_dev = os.urandom(SERIAL_BYTES), os.urandom(SERIAL_BYTES)
        assert pump(dev, app, to_app) == to_app, "device -> application bytes differ"
        assert pump(app, dev, to_dev) == to_dev, "application -> device bytes differ"


# --------------------------------------------------------------------------- cases


def test_acm_serial_moves_bytes_both_ways(
    rig: Rig, gadgets: list[gd.Gadget], record_property: Callable[[str, object], None]
) -> None:
    """A serial adapter: the export's /dev/ttyACMn behind vhci_hcd and the gadget's
    /dev/ttyGSn carry 16 KiB each way, byte for byte."""
    rig.settle()
    g = made(gadgets, gd.AcmGadget(serial=new_serial()))
    _busid, port, took = plug_and_export(g)
    record_property("s_plug_to_exported", f"{took:.2f}")
    assert port.hub == "hs"
    t0 = time.monotonic()
    (app_tty,) = gd.wait_until(g.vhci_ttys, timeout=ENUM, what="/dev/ttyACM* behind vhci_hcd")
    record_property("s_exported_to_tty", f"{time.monotonic() - t0:.2f}")
    remote = g.vhci_devices()[0]
    assert set(gd.interface_drivers(remote.busid).values()) == {"cdc_acm"}
    t0 = time.monotonic()
    serial_both_ways(g.acm.wait_tty(), app_tty)
    record_property("s_serial_both_ways", f"{time.monotonic() - t0:.2f}")


def test_composite_disk_and_serial_through_one_export(
    rig: Rig, gadgets: list[gd.Gadget], record_property: Callable[[str, object], None]
) -> None:
    """Mass storage + ACM in one configuration, one export: usb-storage and cdc_acm
    bind behind vhci_hcd, and the disk and the serial port move data at the same
    time (their URBs share the one link)."""
    rig.settle()
    g = made(gadgets, gd.StorageAcmGadget(size=4 * MiB, serial=new_serial()))
    _busid, port, took = plug_and_export(g)
    record_property("s_plug_to_exported", f"{took:.2f}")
    assert [p.port for p in used_ports()] == [port.port], "one export, one vhci port"
    remote, disk = vhci_disk(g)
    (app_tty,) = gd.wait_until(g.vhci_ttys, timeout=ENUM, what="/dev/ttyACM* behind vhci_hcd")
    drivers = gd.interface_drivers(remote.busid)
    assert sorted(drivers.values()) == ["cdc_acm", "cdc_acm", "usb-storage"], drivers

    disk_error: list[BaseException] = []

    def disk_io() -> None:
        try:
            for i in range(4):
                assert_disk_works(g, disk, offset=i * 256 * KiB)
        except BaseException as e:  # handed to the test thread
            disk_error.append(e)

    t0 = time.monotonic()
    worker = threading.Thread(target=disk_io, name="disk-io")
    worker.start()
    try:
        serial_both_ways(g.acm.wait_tty(), app_tty)
    finally:
        worker.join(timeout=ENUM)
    assert not worker.is_alive(), "the disk I/O did not finish"
    if disk_error:
        raise disk_error[0]
    record_property("s_disk_and_serial", f"{time.monotonic() - t0:.2f}")


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """Two network namespaces, the device side's and the application side's;
    deleted afterwards (an interface still in one goes back to the root one)."""
    names = (f"uhc-dev-{os.getpid()}", f"uhc-app-{os.getpid()}")
    made_ns: list[str] = []
    try:
        for name in names:
            gd.run(["ip", "netns", "add", name])
            made_ns.append(name)
        yield names
    finally:
        for name in made_ns:
            with contextlib.suppress(Exception):
                gd.run(["ip", "netns", "delete", name])


def ip(ns: str, *args: str) -> str:
    return gd.run(["ip", "-n", ns, *args]).stdout


def move_and_address(interface: str, ns: str, address: str) -> None:
    gd.run(["ip", "link", "set", "dev", interface, "netns", ns])
    ip(ns, "address", "add", f"{address}/24", "dev", interface)
    ip(ns, "link", "set", "dev", interface, "up")


def carrier(ns: str, interface: str) -> bool:
    return "LOWER_UP" in ip(ns, "-o", "link", "show", "dev", interface)


def ping(ns: str, address: str) -> tuple[int, int]:
    """(sent, received) of three pings from namespace `ns` (busybox's ping: a
    package the VM needs anyway; bounded by -w)."""
    out = gd.run(
        ["ip", "netns", "exec", ns, "busybox", "ping", "-c", "3", "-i", "0.2", "-w", "30", address],
        timeout=60,
    ).stdout
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    assert m, out
    return int(m[1]), int(m[2])


@pytest.mark.parametrize("protocol", ["ecm", "ncm"])
def test_network_ping_across_namespaces(
    rig: Rig,
    gadgets: list[gd.Gadget],
    netns: tuple[str, str],
    protocol: Literal["ecm", "ncm"],
    record_property: Callable[[str, object], None],
) -> None:
    """A CDC ECM (NCM) adapter: the gadget's interface in one namespace
    (192.0.2.1), the one cdc_ether (cdc_ncm) makes behind vhci_hcd in another
    (192.0.2.2); the only way between them is the USB link through USB/IP, and
    pings cross it both ways."""
    dev_ns, app_ns = netns
    rig.settle()
    g = made(gadgets, gd.NetworkGadget(protocol=protocol, serial=new_serial()))
    _busid, port, took = plug_and_export(g)
    record_property("s_plug_to_exported", f"{took:.2f}")
    assert port.hub == "hs"
    t0 = time.monotonic()
    (app_if,) = gd.wait_until(
        g.vhci_interfaces, timeout=ENUM, what="a network interface behind vhci_hcd"
    )
    record_property("s_exported_to_interface", f"{time.monotonic() - t0:.2f}")
    address = (Path("/sys/class/net") / app_if / "address").read_text().strip()
    assert address == g.net.host_addr, "not the gadget's host_addr: another interface?"
    remote = g.vhci_devices()[0]
    assert set(gd.interface_drivers(remote.busid).values()) == {f"cdc_{DRIVER[protocol]}"}
    dev_if = g.net.wait_interface(timeout=ENUM)

    move_and_address(dev_if, dev_ns, DEVICE_ADDR)
    move_and_address(app_if, app_ns, APP_ADDR)
    t0 = time.monotonic()
    gd.wait_until(
        lambda: carrier(dev_ns, dev_if) and carrier(app_ns, app_if),
        timeout=ENUM,
        what="carrier on both ends of the USB network link",
    )
    record_property("s_up_to_carrier", f"{time.monotonic() - t0:.2f}")
    t0 = time.monotonic()
    assert ping(dev_ns, APP_ADDR) == (3, 3)
    assert ping(app_ns, DEVICE_ADDR) == (3, 3)
    record_property("s_pings", f"{time.monotonic() - t0:.2f}")


# --------------------------------------------------------------------------- SuperSpeed


def dummy_root_hubs() -> dict[str, str | None]:
    """{root hub busid (usbN): speed} of dummy_hcd's controllers."""
    return {
        d.busid: d.speed
        for d in gd.usb_devices()
        if d.busid.startswith("usb") and "/dummy_hcd." in str(d.path)
    }


@pytest.fixture
def superspeed_udc(rig: Rig, gadgets: list[gd.Gadget]) -> Iterator[str]:
    """dummy_hcd reloaded with one SuperSpeed controller; yields its UDC. Afterwards
    the test's gadgets are removed (they must be unbound for the reload) and
    dummy_hcd is loaded as the session had it: the same parameters, the same
    root hubs on the same bus numbers, and not a fault in the kernel's log from
    the first unload to the end of the restore."""
    session = gd.dummy_hcd_params()
    assert session is not None, "gadget_modules loads dummy_hcd for the session"
    hubs = dummy_root_hubs()
    with KmsgReader() as kmsg:
        try:
            udcs = gd.reload_dummy_hcd(gd.DummyHcdParams(num=1, is_super_speed=True))
            yield udcs[0]
        finally:
            for g in reversed(gadgets):  # the `gadgets` fixture's clean-up finds them gone
                g.remove()
            gd.reload_dummy_hcd(session)
            log = kmsg.read()
        fault = kernel_fault_lines(log)
        assert not fault, "the kernel faulted across the reload of dummy_hcd:\n" + "\n".join(fault)
        assert gd.dummy_hcd_params() == session
        assert gd.wait_until(
            lambda: dummy_root_hubs() == hubs, timeout=30, what="dummy_hcd's root hubs as before"
        )


@pytest.mark.reloads_dummy_hcd
def test_superspeed_disk_lands_on_the_ss_hub(
    rig: Rig,
    superspeed_udc: str,
    gadgets: list[gd.Gadget],
    record_property: Callable[[str, object], None],
) -> None:
    """dummy_hcd with is_super_speed=1: the disk enumerates at 5000 Mb/s, the export
    lands on a port of vhci's SuperSpeed root hub (`ss`, spd 5), its copy behind
    vhci_hcd is a 5000 Mb/s USB 3.2 device, and 1 MiB moves intact both ways."""
    rig.settle()
    g = made(gadgets, gd.MassStorageGadget(size=4 * MiB, serial=new_serial()))
    busid, port, took = plug_and_export(g, superspeed_udc)
    record_property("s_plug_to_exported", f"{took:.2f}")
    assert gd.usb_attr(busid, "speed") == "5000"
    assert (port.hub, port.speed) == ("ss", SPEED_SUPER), port
    remote, disk = vhci_disk(g)
    root_hub = remote.path.parent
    assert "/vhci_hcd." in str(root_hub) and (root_hub / "speed").read_text().strip() == "5000"
    assert (remote.speed, remote.attr("version")) == ("5000", "3.20")
    t0 = time.monotonic()
    data = os.urandom(MiB)
    assert gd.odirect_write_read(disk.dev, MiB, data) == data
    assert g.read_backing(MiB, MiB) == data, "the gadget's backing file differs"
    record_property("s_1mib_write_read", f"{time.monotonic() - t0:.2f}")
