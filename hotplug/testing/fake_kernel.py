"""A fake kernel for tests and benchmarks: a sysfs tree plus a process that
plays the kernel's part behind its control files.

Reads need nothing special: the real `UsbipHost` and `Vhci` code reads the
fake tree under a different root. Writes go to `FakeKernelServer`, a separate
process, exactly as writes to real sysfs go to the kernel: it applies the
kernel's rules (errno for errno), and for `usbip_sockfd` and `attach` it does
what the kernel's sockfd_lookup does — takes its own reference to the writer's
socket (passed with SCM_RIGHTS), which must be a connected stream socket. It
holds those sockets independently of the writer, so a killed daemon does not
take its exports down (as with the real kernel), frees a vhci port when the
far end closes, and drops a stub's connection when its device is unplugged.

Selected with USBIP_HOTPLUG_FAKE_KERNEL=<server socket> and
USBIP_HOTPLUG_SYSFS_ROOT=<tree>. Behaviour was checked against Debian's 6.1
kernel in the VM tests; where it differs, the kernel is right.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hotplug.kernel.autoprobe import UsbBus, device_of_interface, interface_prefix
from hotplug.kernel.stub import UsbipHost
from hotplug.kernel.sysfs import KernelError, SysfsPaths, explain_write_error
from hotplug.kernel.vhci import PortState, Vhci, parse_status
from hotplug.spawn import CHILD_CWD, child_env, python_module
from hotplug.usb import Speed, interfaces_from_descriptors

STATUS_HEADER = "hub port sta spd dev      sockfd local_busid"
RX_CAP = 1 << 20
VHCI_RX_DIR = ".fake-kernel-vhci-rx"
SERVER_SOCKET = ".fake-kernel.sock"
TABLE_FILE = ".fake-kernel-busids.json"
OOPS_FILE = ".fake-kernel-oops"
TRACE_FILE = ".fake-kernel-trace"
MAX_BUSID = 16  # usbip-host's busid_table (stub_main.c)


# --------------------------------------------------------------------------- client side


def _send_write(server: Path, path: Path, text: str, fd: int | None) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.settimeout(10)
        conn.connect(str(server))
        payload = json.dumps({"path": str(path), "text": text}).encode()
        fds = [fd] if fd is not None else []
        conn.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        reply = json.loads(conn.recv(4096) or b'{"errno": 5}')
    code = int(reply["errno"])
    if code:
        raise KernelError(explain_write_error(path, text, OSError(code, os.strerror(code))))


def _fd_in_write(path: Path, text: str) -> int | None:
    """The fd number a kernel control file would look up in the writing process."""
    fields = text.split()
    if path.name == "usbip_sockfd" and fields and fields[0] != "-1":
        return _checked_fd(int(fields[0]))
    if path.name == "attach" and len(fields) == 4:
        return _checked_fd(int(fields[1]))
    return None


def _checked_fd(number: int) -> int:
    try:
        os.fstat(number)
    except OSError as exc:
        raise KernelError(f"fd {number} is not open in the writing process") from exc
    return number


class _FakeWriter:
    server: Path

    def write(self, path: Path, text: str) -> None:
        if not path.parent.exists():
            raise KernelError(f"{path} does not exist")
        _send_write(self.server, path, text, _fd_in_write(path, text))


class FakeUsbipHost(_FakeWriter, UsbipHost):
    def __init__(self, paths: SysfsPaths, server: Path) -> None:
        UsbipHost.__init__(self, paths)
        self.server = server


class FakeVhci(_FakeWriter, Vhci):
    def __init__(self, paths: SysfsPaths, server: Path) -> None:
        Vhci.__init__(self, paths)
        self.server = server


class FakeUsbBus(_FakeWriter, UsbBus):
    def __init__(self, paths: SysfsPaths, server: Path) -> None:
        UsbBus.__init__(self, paths)
        self.server = server


# The usual interface drivers of the classes the tests use, as the fake kernel
# binds them when an interface is probed (by autoprobe or drivers_probe).
INTERFACE_DRIVERS = {0x02: "cdc_acm", 0x03: "usbhid", 0x08: "usb-storage", 0x09: "hub"}


def descriptors(dev: FakeUsbDevice) -> bytes:
    """What the kernel keeps in a device's `descriptors` file: the device
    descriptor, then its one configuration with an interface descriptor each."""
    device = struct.pack(
        "<BBHBBBBHHHBBBB",
        18, 1, 0x0200, dev.device_class, 0, 0, 64, dev.vendor, dev.product, 0x0100, 1, 2, 3, 1,
    )  # fmt: skip
    body = b"".join(
        struct.pack("<BBBBBBBBB", 9, 4, n, 0, 0, klass, sub, proto, 0)
        for n, (klass, sub, proto) in enumerate(dev.interfaces)
    )
    config = struct.pack("<BBHBBBBB", 9, 2, 9 + len(body), len(dev.interfaces), 1, 0, 0x80, 50)
    return device + config + body


# --------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class FakeUsbDevice:
    busid: str
    vendor: int
    product: int
    serial: str | None = None
    speed: str = "480"
    device_class: int = 0
    interfaces: tuple[tuple[int, int, int], ...] = ((0x08, 0x06, 0x50),)
    manufacturer: str = "Fake Inc."
    product_name: str = "Fake Device"


class FakeTree:
    """Builds and edits a sysfs-shaped tree, as the kernel would lay it out."""

    def __init__(self, root: Path, vhci_controllers: int = 1, ports_per_hub: int = 15) -> None:
        self.root = root
        self.paths = SysfsPaths(root)
        self.vhci_controllers = vhci_controllers
        self.ports_per_hub = ports_per_hub

    @property
    def server_socket(self) -> Path:
        return self.root / SERVER_SOCKET

    def create(self, *, stub: bool = True, vhci: bool = True) -> FakeTree:
        p = self.paths
        p.usb_devices.mkdir(parents=True, exist_ok=True)
        (p.usb_drivers / "usb").mkdir(parents=True, exist_ok=True)
        (p.sys / "bus/usb/drivers_probe").touch()
        (p.sys / "bus/usb/drivers_autoprobe").write_text("1\n")
        (p.sys / "devices/fake").mkdir(parents=True, exist_ok=True)
        if stub:
            self.load_stub()
        if vhci:
            main = p.platform / "vhci_hcd.0"
            for index in range(self.vhci_controllers):
                (p.platform / f"vhci_hcd.{index}").mkdir(parents=True, exist_ok=True)
            for name in ("attach", "detach"):
                (main / name).touch()
            (main / "nports").write_text(f"{self.vhci_controllers * self.ports_per_hub * 2}\n")
            for index in range(self.vhci_controllers):
                lines = [STATUS_HEADER]
                for k in range(2 * self.ports_per_hub):
                    hub = "hs" if k < self.ports_per_hub else "ss"
                    number = index * 2 * self.ports_per_hub + k
                    lines.append(_status_line(hub, number, PortState.NULL, 0, 0, 0, "0-0"))
                name = "status" if index == 0 else f"status.{index}"
                (main / name).write_text("\n".join(lines) + "\n")
        return self

    def load_stub(self) -> None:
        stub = self.paths.stub_driver
        stub.mkdir(parents=True, exist_ok=True)
        for name in ("bind", "unbind", "rebind", "match_busid"):
            (stub / name).touch()

    def unload_stub(self) -> None:
        shutil.rmtree(self.paths.stub_driver, ignore_errors=True)
        (self.root / TABLE_FILE).unlink(missing_ok=True)  # a module reload empties the table

    def kernel_faults(self) -> list[str]:
        """What would have been an oops in the real kernel (see FakeKernelServer._oops)."""
        try:
            return (self.root / OOPS_FILE).read_text().splitlines()
        except FileNotFoundError:
            return []

    def autoprobe(self) -> bool:
        return (self.paths.sys / "bus/usb/drivers_autoprobe").read_text().strip() != "0"

    def vhci_received(self, port: int) -> bytes:
        """What vhci port `port` received from the far end since its last attach."""
        try:
            return (self.root / VHCI_RX_DIR / str(port)).read_bytes()
        except FileNotFoundError:
            return b""

    def add_device(self, dev: FakeUsbDevice, devnum: int | None = None) -> Path:
        """Plug a device in. With drivers_autoprobe 0 it stays as the kernel leaves
        it then: no driver, no configuration chosen, no interfaces (only its
        `descriptors` say what they will be)."""
        autoprobe = self.autoprobe()
        busnum = int(dev.busid.split("-")[0])
        real = self.paths.sys / f"devices/fake/usb{busnum}/{dev.busid}"
        real.mkdir(parents=True)
        attrs = {
            "busnum": str(busnum),
            "devnum": str(devnum if devnum is not None else 2),
            "speed": dev.speed,
            "idVendor": f"{dev.vendor:04x}",
            "idProduct": f"{dev.product:04x}",
            "bcdDevice": "0100",
            "bDeviceClass": f"{dev.device_class:02x}",
            "bDeviceSubClass": "00",
            "bDeviceProtocol": "00",
            "bConfigurationValue": "1" if autoprobe else "",
            "bNumConfigurations": "1",
            "bNumInterfaces": f"{len(dev.interfaces):2d}" if autoprobe else "",
            "manufacturer": dev.manufacturer,
            "product": dev.product_name,
        }
        if dev.serial is not None:
            attrs["serial"] = dev.serial
        for name, value in attrs.items():
            (real / name).write_text(value + "\n")
        (real / "descriptors").write_bytes(descriptors(dev))
        if autoprobe:
            _make_interfaces(real, dev.busid)
        node = self.paths.usbfs_node(busnum, int(attrs["devnum"]))
        node.parent.mkdir(parents=True, exist_ok=True)
        # Who this device is, for usbip-host's table (its `udev` pointer): a token
        # in its usbfs file, readable through an open file even after unplug.
        token = uuid.uuid4().hex
        node.write_text(token + "\n")
        (real / ".fake-udev").write_text(f"{token} {node}\n")
        (self.paths.usb_devices / dev.busid).symlink_to(real)
        # Debian's 6.1 gives a new device to its usual driver even when
        # usbip-host's table holds its busid (seen in the VM). As in the kernel,
        # that probe is serialised with every other driver write and finds the
        # device taken if someone bound it in the moment after it appeared.
        if not autoprobe:
            pass  # held back: it waits for drivers_probe
        elif self.server_socket.exists():
            with contextlib.suppress(KernelError, OSError):
                _send_write(
                    self.server_socket, self.paths.sys / "bus/usb/drivers_probe", dev.busid, None
                )
        else:
            _set_driver(self.paths, dev.busid, "usb")
        if os.environ.get("USBIP_HOTPLUG_FAKE_KERNEL_TRACE"):
            with open(self.root / TRACE_FILE, "a") as f:
                f.write(f"{time.monotonic():.4f} plugged {dev.busid} devnum {attrs['devnum']}\n")
        return real

    def remove_device(self, busid: str) -> None:
        """Unplug: the kernel drops the stub's connection and removes the device.

        The files go first, then the kernel process is told: a write it handles
        after that finds no device, and a link it set up before is dropped here.
        (The other order let a hand-over slip in between and keep a link up.)
        """
        link = self.paths.usb_devices / busid
        real = Path(os.path.realpath(link))
        udev = _read_udev(real)
        if udev is not None:
            Path(udev[1]).unlink(missing_ok=True)
        link.unlink(missing_ok=True)
        shutil.rmtree(real, ignore_errors=True)
        if self.server_socket.exists():
            with contextlib.suppress(KernelError, OSError):
                _send_write(self.server_socket, self.paths.usb_devices / busid / "remove", "", None)
        # The kernel process may have been writing a status file in there while
        # the tree went (a link dropping at that moment). It has answered the
        # "remove" above, so it is done with this device: sweep what it left.
        shutil.rmtree(real, ignore_errors=True)

    def start_server(self) -> subprocess.Popen[bytes]:
        """Run the fake kernel in its own process; returns once it accepts writes."""
        proc = subprocess.Popen(
            python_module("hotplug.testing.fake_kernel", "serve", str(self.root.absolute())),
            cwd=CHILD_CWD,
            env=child_env(),
        )
        deadline = time.monotonic() + 10
        while not self.server_socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("fake kernel server did not start")
            time.sleep(0.01)
        return proc

    def stub(self) -> FakeUsbipHost:
        return FakeUsbipHost(self.paths, self.server_socket)

    def vhci(self) -> FakeVhci:
        return FakeVhci(self.paths, self.server_socket)

    def bus(self) -> FakeUsbBus:
        return FakeUsbBus(self.paths, self.server_socket)

    def env(self) -> dict[str, str]:
        return {
            "USBIP_HOTPLUG_SYSFS_ROOT": str(self.root),
            "USBIP_HOTPLUG_FAKE_KERNEL": str(self.server_socket),
        }


USBIP_CMD_SUBMIT = 0x00000001


def first_urb(devid: int) -> bytes:
    """The 48-byte USBIP_CMD_SUBMIT header vhci sends first: the hub's 64-byte
    GET_DESCRIPTOR(DEVICE) to endpoint 0, direction in, seqnum 1 (devid as the
    kernel keeps it, a __u32)."""
    setup = bytes([0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x40, 0x00])
    return (
        struct.pack(">IIIII", USBIP_CMD_SUBMIT, 1, devid & 0xFFFFFFFF, 1, 0)
        + struct.pack(">IiiiI", 0x200, 64, 0, 0, 0)
        + setup
    )


def _status_line(
    hub: str, port: int, state: int, speed: int, devid: int, sockfd: int, busid: str
) -> str:
    return f"{hub}  {port:04d} {state:03d} {speed:03d} {devid:08x} {sockfd:06d} {busid}"


def _set_driver(paths: SysfsPaths, busid: str, driver: str | None) -> None:
    link = paths.usb_devices / busid / "driver"
    if driver is None:
        link.unlink(missing_ok=True)
        return
    # Made aside and renamed over: the test process (plugging a device) and the
    # kernel process (a bind for the busid's previous device) may both set it.
    tmp = link.with_name(f".driver.{os.getpid()}.{threading.get_ident()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(paths.usb_drivers / driver)
    os.replace(tmp, link)


def _make_interfaces(dev_dir: Path, busid: str) -> list[Path]:
    """The interface directories a configuration makes (from `descriptors`), once."""
    made: list[Path] = []
    try:
        raw = (dev_dir / "descriptors").read_bytes()
    except OSError:
        return made
    for number, iface in enumerate(interfaces_from_descriptors(raw)):
        path = dev_dir / f"{interface_prefix(busid)}1.{number}"
        made.append(path)
        if path.exists():
            continue
        path.mkdir()
        (path / "bInterfaceNumber").write_text(f"{number:02x}\n")
        (path / "bInterfaceClass").write_text(f"{iface.klass:02x}\n")
        (path / "bInterfaceSubClass").write_text(f"{iface.subclass:02x}\n")
        (path / "bInterfaceProtocol").write_text(f"{iface.protocol:02x}\n")
    return made


def _replace_text(path: Path, text: str) -> None:
    """Replace a file whole: a reader in another process sees the old text or the new,
    never a half-written one (a real sysfs read is generated whole by the kernel)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_udev(dev_dir: Path) -> tuple[str, str] | None:
    """(token, usbfs path) of the device in `dev_dir`, if it is (still) there."""
    try:
        token, node = (dev_dir / ".fake-udev").read_text().split()
    except (OSError, ValueError):
        return None
    return token, node


def _tokens_held_by(pid: int) -> set[str]:
    """Tokens of the fake usbfs files process `pid` has open (unplugged ones too)."""
    held: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for entry in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if "/dev/bus/usb/" not in os.readlink(entry):
                    continue
                with open(entry) as f:
                    held.add(f.read().strip())
    return held


def _driver(paths: SysfsPaths, busid: str) -> str | None:
    try:
        return os.path.basename(os.readlink(paths.usb_devices / busid / "driver"))
    except OSError:
        return None


# --------------------------------------------------------------------------- the "kernel"


class _Fail(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class FakeKernelServer:
    """The kernel's side of the control files, in one single-threaded loop."""

    def __init__(self, root: Path) -> None:
        self.tree = FakeTree(root)
        self.paths = self.tree.paths
        self.selector = selectors.DefaultSelector()
        self.stub_socks: dict[str, socket.socket] = {}
        self.vhci_socks: dict[int, socket.socket] = {}
        self.rx_dir = root / ".fake-kernel-rx"
        self.rx_dir.mkdir(exist_ok=True)
        # What each vhci port received from the device side (the answers to its
        # URBs), per port number: RX_CAP bytes at most.
        self.vhci_rx_dir = root / VHCI_RX_DIR
        self.vhci_rx_dir.mkdir(exist_ok=True)
        self.table_file = root / TABLE_FILE
        self.oops_file = root / OOPS_FILE
        # USBIP_HOTPLUG_FAKE_KERNEL_TRACE=1: every write, its answer and the busid's table
        # slot after it, one line each, for reading a soak's failure afterwards.
        self.trace = (
            root / TRACE_FILE if os.environ.get("USBIP_HOTPLUG_FAKE_KERNEL_TRACE") else None
        )

    # -- stub

    # usbip-host's busid_table (stub_main.c), slot for slot: a name, a status and
    # `udev`, the device its probe last bound (a token, see FakeTree.add_device).
    # Only `rebind` (or a module reload) frees a slot; `rebind` uses `udev`
    # without a check, which is where the real kernel oopses.

    def _slots(self) -> list[dict[str, str | None]]:
        try:
            data = json.loads(self.table_file.read_text())
        except (OSError, ValueError):
            data = None
        if not isinstance(data, list) or len(data) != MAX_BUSID:
            data = [{"name": "", "status": "other", "udev": None} for _ in range(MAX_BUSID)]
        return data

    def _save_slots(self, slots: list[dict[str, str | None]]) -> None:
        _replace_text(self.table_file, json.dumps(slots))
        names = " ".join(str(s["name"]) for s in slots if s["name"])
        # As match_busid_show prints it: each name and a space, then a newline.
        _replace_text(self.paths.stub_driver / "match_busid", (names + " " if names else "") + "\n")

    @staticmethod
    def _slot(slots: list[dict[str, str | None]], busid: str) -> dict[str, str | None] | None:
        return next((s for s in slots if s["name"] == busid), None)

    def _match_table(self) -> list[str]:
        return [str(s["name"]) for s in self._slots() if s["name"]]

    def _require_device(self, busid: str) -> None:
        if not (self.paths.usb_devices / busid).exists():
            raise _Fail(errno.ENODEV)

    def _oops(self, message: str) -> None:
        """What the real kernel does here is crash: record it for the tests' judge."""
        with open(self.oops_file, "a") as f:
            f.write(message + "\n")
        raise _Fail(errno.EFAULT)

    def _stub_bind(self, busid: str) -> None:
        """The driver core's bind: usbip-host's probe takes the device if its busid's
        entry is ADDED (or ALLOC), and records the device in the entry."""
        self._require_device(busid)
        if _driver(self.paths, busid) is not None:
            raise _Fail(errno.EBUSY)
        slots = self._slots()
        slot = self._slot(slots, busid)
        dev_dir = self.paths.usb_devices / busid
        udev = _read_udev(dev_dir)
        if slot is None or slot["status"] in ("remov", "other") or udev is None:
            raise _Fail(errno.ENODEV)
        slot["udev"], slot["status"] = udev[0], "alloc"
        self._save_slots(slots)
        _set_driver(self.paths, busid, "usbip-host")
        _replace_text(dev_dir / "usbip_status", "1\n")
        (dev_dir / "usbip_sockfd").touch()
        (dev_dir / "usbip_debug").touch()

    def _autoprobe(self) -> bool:
        return self.tree.autoprobe()

    def _drivers_probe(self, name: str) -> None:
        """A device gets the generic driver, which configures it; an interface gets
        its class's driver, unless usbip-host holds its device (which claims the
        device's port: interface drivers refuse an owned device)."""
        device = device_of_interface(name)
        if device is None:
            self._require_device(name)
            if _driver(self.paths, name) is None:
                # The generic driver: usbip-host does not get a device this way
                # even when its busid is in the table (seen on 6.1 in the VM).
                _set_driver(self.paths, name, "usb")
                self._configure(name)
            return
        iface = self.paths.usb_devices / device / name
        if not iface.is_dir():
            raise _Fail(errno.ENODEV)
        if _driver(self.paths, device) != "usbip-host" and not (iface / "driver").exists():
            self._bind_interface(iface)

    def _configure(self, busid: str) -> None:
        """The generic driver chose the configuration: the interfaces appear, and
        get their drivers at once only while autoprobe is on."""
        dev_dir = self.paths.usb_devices / busid
        interfaces = _make_interfaces(dev_dir, busid)
        _replace_text(dev_dir / "bConfigurationValue", "1\n")
        _replace_text(dev_dir / "bNumInterfaces", f"{len(interfaces):2d}\n")
        if self._autoprobe():
            for iface in interfaces:
                self._bind_interface(iface)

    def _bind_interface(self, iface: Path) -> None:
        try:
            klass = int((iface / "bInterfaceClass").read_text(), 16)
        except (OSError, ValueError):
            return
        driver = INTERFACE_DRIVERS.get(klass)
        if driver is not None:
            (self.paths.usb_drivers / driver).mkdir(parents=True, exist_ok=True)
            link = iface / "driver"
            link.unlink(missing_ok=True)
            link.symlink_to(self.paths.usb_drivers / driver)

    def _stub_disconnect(self, busid: str) -> None:
        slots = self._slots()
        slot = self._slot(slots, busid)
        if slot is not None and slot["status"] == "alloc":
            slot["status"] = "added"
            self._save_slots(slots)

    def _stub_unbind(self, busid: str) -> None:
        self._require_device(busid)
        if _driver(self.paths, busid) != "usbip-host":
            raise _Fail(errno.ENODEV)
        self._stub_drop(busid)
        dev_dir = self.paths.usb_devices / busid
        for name in ("usbip_status", "usbip_sockfd", "usbip_debug"):
            (dev_dir / name).unlink(missing_ok=True)
        _set_driver(self.paths, busid, None)
        self._stub_disconnect(busid)

    def _match_busid(self, value: str) -> None:
        op, _, busid = value.partition(" ")
        slots = self._slots()
        slot = self._slot(slots, busid)
        if op == "add":
            if slot is None:
                free = next((s for s in slots if not s["name"]), None)
                if free is None:
                    raise _Fail(errno.EIO)  # no free slot: EIO on Debian's 6.1 (VM)
                # The slot keeps its previous occupant's `udev`, as the kernel's does.
                free["name"], free["status"] = busid, "added"
        elif op == "del":
            if slot is None:
                raise _Fail(errno.ENODEV)
            # del_match_busid: frees only an entry `rebind` left; marks a bound one
            # for removal; leaves an ADDED one as it is (all seen on 6.1 in the VM).
            if slot["status"] == "other":
                slot["name"] = ""
            elif slot["status"] != "added":
                slot["status"] = "remov"
        else:
            raise _Fail(errno.EINVAL)
        self._save_slots(slots)

    def _rebind(self, busid: str, writer: int | None) -> None:
        slots = self._slots()
        slot = self._slot(slots, busid)
        if slot is None:
            raise _Fail(errno.ENODEV)
        slot["status"] = "other"
        self._save_slots(slots)
        udev = slot["udev"]
        if udev is None:
            self._oops(
                f"BUG: kernel NULL pointer dereference in do_rebind [usbip_host]: rebind {busid}:"
                " no device was ever bound through this entry"
            )
        dev_dir = self.paths.usb_devices / busid
        present = _read_udev(dev_dir)
        if present is not None and present[0] == udev:
            if _driver(self.paths, busid) is None:
                _set_driver(self.paths, busid, "usb")
                self._configure(busid)
        elif writer is None or udev not in _tokens_held_by(writer):
            self._oops(
                f"general protection fault in __mutex_lock, do_rebind [usbip_host]: rebind {busid}:"
                " the entry's device was freed (unplugged, not held open by the writer)"
            )
        slot["name"] = ""
        self._save_slots(slots)

    def _stub_drop(self, busid: str) -> None:
        sock = self.stub_socks.pop(busid, None)
        if sock is not None:
            self.selector.unregister(sock)
            sock.close()
        status = self.paths.usb_devices / busid / "usbip_status"
        # The device may be going at this very moment (unplug): nothing to update.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            if status.exists():
                _replace_text(status, "1\n")

    def _stub_sockfd(self, busid: str, text: str, sock: socket.socket | None) -> None:
        status_file = self.paths.usb_devices / busid / "usbip_status"
        if not status_file.exists():
            raise _Fail(errno.ENODEV)
        if text.strip() == "-1":
            if busid not in self.stub_socks:
                raise _Fail(errno.EINVAL)
            self._stub_drop(busid)
            return
        if sock is None:
            raise _Fail(errno.EINVAL)
        if status_file.read_text().strip() != "1":
            sock.close()
            raise _Fail(errno.EINVAL)
        self._check_stream(sock)
        self.stub_socks[busid] = sock
        (self.rx_dir / busid).write_bytes(b"")
        self.selector.register(sock, selectors.EVENT_READ, ("stub", busid))
        _replace_text(status_file, "2\n")
        self._describe_links()

    # -- vhci

    def _status_files(self) -> list[Path]:
        main = self.paths.platform / "vhci_hcd.0"
        return sorted(main.glob("status*"))

    def _set_port(
        self, number: int, state: int, speed: int = 0, devid: int = 0, sockfd: int = 0
    ) -> None:
        for path in self._status_files():
            ports = parse_status(path.read_text())
            if not any(p.port == number for p in ports):
                continue
            lines = [STATUS_HEADER]
            for p in ports:
                if p.port == number:
                    busid = f"{3 if p.superspeed else 2}-{number + 1}" if state == 6 else "0-0"
                    lines.append(_status_line(p.hub, p.port, state, speed, devid, sockfd, busid))
                    self._enumerate(path, p.local_busid, busid)
                else:
                    lines.append(
                        _status_line(
                            p.hub, p.port, p.state, p.speed, p.devid, p.sockfd, p.local_busid
                        )
                    )
            _replace_text(path, "\n".join(lines) + "\n")
            return
        raise _Fail(errno.EINVAL)

    def _enumerate(self, status: Path, old_busid: str, new_busid: str) -> None:
        """The USB device behind a vhci port, below its controller's root hub: the
        kernel registers it once the hub has enumerated it (here: at once), and
        removes it with the port. Only the directory: the device side never sees
        it, as it is not in /sys/bus/usb/devices."""
        suffix = status.name.partition(".")[2]
        controller = self.paths.platform / f"vhci_hcd.{suffix or 0}"
        for busid, present in ((old_busid, False), (new_busid, True)):
            if "-" not in busid or busid == "0-0":
                continue
            device = controller / f"usb{busid.split('-')[0]}" / busid
            if present:
                (device / "power").mkdir(parents=True, exist_ok=True)
                # The kernel's default for a non-hub device; udev may set "auto".
                (device / "power/control").write_text("on\n")
            else:
                shutil.rmtree(device, ignore_errors=True)

    def _port(self, number: int) -> tuple[bool, int]:
        for path in self._status_files():
            for p in parse_status(path.read_text()):
                if p.port == number:
                    return p.superspeed, p.state
        raise _Fail(errno.EINVAL)

    def _vhci_attach(self, text: str, sock: socket.socket | None) -> None:
        fields = text.split()
        if len(fields) != 4 or sock is None:
            raise _Fail(errno.EINVAL)
        try:
            # sscanf's %u into a __u32 (vhci_sysfs.c attach_store): wider values
            # are cut to 32 bits, not refused.
            number, devid, speed = (int(fields[i]) & 0xFFFFFFFF for i in (0, 2, 3))
        except ValueError:
            raise _Fail(errno.EINVAL) from None
        # valid_args() accepts the speeds of enum usb_device_speed from LOW up.
        if speed not in {int(s) for s in Speed} - {Speed.UNKNOWN}:
            raise _Fail(errno.EINVAL)
        superspeed, state = self._port(number)
        if superspeed != Speed(speed).needs_superspeed_port:
            raise _Fail(errno.EINVAL)
        if state != PortState.NULL:
            raise _Fail(errno.EBUSY)
        self._check_stream(sock)
        self.vhci_socks[number] = sock
        self.selector.register(sock, selectors.EVENT_READ, ("vhci", number))
        (self.vhci_rx_dir / str(number)).write_bytes(b"")
        self._set_port(number, PortState.USED, speed, devid, sock.fileno())
        # The real vhci starts its tx thread in attach and sends the hub's first
        # URB (GET_DESCRIPTOR to address 0) 100-280 ms later; here before the
        # write even returns, so whatever the writer sends after `attach`
        # deterministically comes second (issue 16).
        with contextlib.suppress(OSError):
            sock.send(first_urb(devid), socket.MSG_DONTWAIT)
        self._describe_links()

    def _describe_links(self) -> None:
        """Give each vhci-side device the ids of the device at the far end of its
        link, as the kernel learns them from the descriptors the stub sends.
        Known only when that end is a usbip-host socket of this same fake kernel
        (one machine exporting to itself); otherwise the device has no ids here."""
        ends: dict[object, str] = {}
        for stub_busid, stub_sock in self.stub_socks.items():
            with contextlib.suppress(OSError):
                ends[stub_sock.getsockname()] = stub_busid
        for number, vhci_sock in self.vhci_socks.items():
            try:
                far = ends.get(vhci_sock.getpeername())
            except OSError:
                continue
            device = self._vhci_device(number)
            if far is None or device is None or (device / "idVendor").exists():
                continue
            source = self.paths.usb_devices / far
            with contextlib.suppress(OSError):
                for name in ("idVendor", "idProduct", "bDeviceClass"):
                    (device / name).write_text((source / name).read_text())

    def _vhci_device(self, number: int) -> Path | None:
        for status in self._status_files():
            for p in parse_status(status.read_text()):
                if p.port == number and p.state == PortState.USED:
                    suffix = status.name.partition(".")[2]
                    controller = self.paths.platform / f"vhci_hcd.{suffix or 0}"
                    device = controller / f"usb{p.local_busid.split('-')[0]}" / p.local_busid
                    return device if device.is_dir() else None
        return None

    def _vhci_detach(self, text: str) -> None:
        number = int(text.strip())
        _, state = self._port(number)
        if state == PortState.NULL:
            raise _Fail(errno.EINVAL)
        self._vhci_drop(number)

    def _vhci_drop(self, number: int) -> None:
        sock = self.vhci_socks.pop(number, None)
        if sock is not None:
            self.selector.unregister(sock)
            sock.close()
        self._set_port(number, PortState.NULL)

    @staticmethod
    def _check_stream(sock: socket.socket) -> None:
        # What sockfd_lookup + the drivers' checks require of the fd.
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
            sock.close()
            raise _Fail(errno.EINVAL)
        try:
            sock.getpeername()
        except OSError as exc:
            sock.close()
            raise _Fail(errno.EINVAL) from exc

    # -- dispatch

    def apply(
        self, path: Path, text: str, sock: socket.socket | None, writer: int | None = None
    ) -> None:
        p = self.paths
        stub = p.stub_driver
        name = path.name
        value = text.strip()
        if path.parent == stub and not stub.exists():
            raise _Fail(errno.ENOENT)
        if path == stub / "match_busid":
            self._match_busid(value)
        elif path == stub / "bind":
            self._stub_bind(value)
        elif path == stub / "unbind":
            self._stub_unbind(value)
        elif path == stub / "rebind":
            self._rebind(value, writer)
        elif path == p.sys / "bus/usb/drivers_probe":
            self._drivers_probe(value)
        elif path == p.sys / "bus/usb/drivers_autoprobe":
            if value not in ("0", "1"):
                raise _Fail(errno.EINVAL)
            _replace_text(path, value + "\n")
        elif name == "unbind" and path.parent.name == "driver":
            busid = path.parent.parent.name
            self._require_device(busid)
            if _driver(p, busid) == "usbip-host":
                self._stub_unbind(busid)
            else:
                _set_driver(p, busid, None)
        elif name == "usbip_sockfd":
            self._stub_sockfd(path.parent.name, text, sock)
            sock = None
        elif name == "remove" and path.parent.parent == p.usb_devices:
            busid = path.parent.name
            if busid in self.stub_socks:
                self._stub_drop(busid)
            # Unplugged while bound: stub_disconnect runs; the entry keeps its name
            # and its `udev`, which now points at a freed device.
            self._stub_disconnect(busid)
        elif path == p.platform / "vhci_hcd.0/attach":
            self._vhci_attach(text, sock)
            sock = None
        elif path == p.platform / "vhci_hcd.0/detach":
            self._vhci_detach(text)
        elif name == "control" and path.parent.name == "power" and p.platform in path.parents:
            if value not in ("on", "auto") or not path.exists():
                raise _Fail(errno.EINVAL)
            _replace_text(path, value + "\n")
        else:
            raise _Fail(errno.EACCES)
        if sock is not None:
            sock.close()

    def _on_request(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            try:
                msg, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            except OSError:
                return  # the writer went away before writing
            fds: list[int] = []
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
            if not msg:
                for fd in fds:
                    os.close(fd)
                return  # the writer died before writing: nothing to apply
            request = json.loads(msg)
            sock = socket.socket(fileno=fds[0]) if fds else None
            code = 0
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            writer = struct.unpack("3i", creds)[0] or None
            try:
                self.apply(Path(request["path"]), request["text"], sock, writer)
            except _Fail as fail:
                code = fail.code
                if sock is not None and sock.fileno() >= 0 and sock not in self._held():
                    sock.close()
            except (FileNotFoundError, NotADirectoryError):
                # Unplugged while we worked on it (remove_device edits the tree from
                # another process): the kernel answers ENODEV for a vanishing device.
                code = errno.ENODEV
                if sock is not None and sock.fileno() >= 0 and sock not in self._held():
                    sock.close()
            # As the kernel, the write is applied even if the writer died meanwhile.
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"errno": code}).encode())
            if self.trace is not None:
                self._trace(request, writer, code)

    def _trace(self, request: dict[str, str], writer: int | None, code: int) -> None:
        assert self.trace is not None
        path = Path(request["path"])
        text = request["text"].strip()
        busid = text.split()[-1] if text and path.parent == self.paths.stub_driver else ""
        slot = self._slot(self._slots(), busid) if busid else None
        where = os.path.relpath(path, self.paths.sys)
        answer = errno.errorcode.get(code, code)
        line = f"{time.monotonic():.4f} pid={writer} {where} {text!r} -> {answer}"
        if slot is not None:
            line += f" slot={slot['status']}"
        with open(self.trace, "a") as f:
            f.write(line + "\n")

    def _held(self) -> list[socket.socket]:
        return [*self.stub_socks.values(), *self.vhci_socks.values()]

    def _on_data(self, sock: socket.socket, owner: tuple[str, object]) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        kind, key = owner
        if kind == "stub":
            busid = str(key)
            if not data:
                self._stub_drop(busid)
                return
            rx = self.rx_dir / busid
            if rx.stat().st_size < RX_CAP:
                with rx.open("ab") as f:
                    f.write(data)
        else:
            assert isinstance(key, int)
            if not data:
                self._vhci_drop(key)
                return
            rx = self.vhci_rx_dir / str(key)
            if rx.stat().st_size < RX_CAP:
                with rx.open("ab") as f:
                    f.write(data)

    def serve(self) -> None:
        path = self.tree.server_socket
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        listener.bind(str(tmp))
        listener.listen(128)
        os.replace(tmp, path)  # appears only once it accepts
        self.selector.register(listener, selectors.EVENT_READ, None)
        stop = False

        def on_term(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        while not stop:
            for key, _ in self.selector.select(timeout=0.5):
                if key.data is None:
                    self._on_request(listener)
                else:
                    # A link's device may be unplugged under us: its files vanish.
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        self._on_data(key.fileobj, key.data)  # type: ignore[arg-type]
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hotplug.testing.fake_kernel")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="play the kernel behind a fake sysfs tree")
    serve.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    if args.command == "serve":
        FakeKernelServer(args.root).serve()


if __name__ == "__main__":
    main()
