"""Real USB devices without hardware, for tests inside the test VM (as root).

`dummy_hcd` gives pairs of a host controller and a UDC (`dummy_udc.N`); a
configfs gadget bound to a UDC is enumerated by the kernel as a real USB
device behind the matching `dummy_hcd.N` controller. A `Gadget` is one
configuration of configfs functions (`Function`: mass storage, CDC ACM
serial, CDC ECM/NCM network, HID keyboard) with its own ids and serial;
`MassStorageGadget`, `AcmGadget`, `NetworkGadget`, `StorageAcmGadget` (a
composite) and `HidKeyboardGadget` are ready-made ones. `plug()` / `unplug()`
write the UDC name / an empty line to the gadget's `UDC` file, which makes
udev emit add / remove.

Binding a gadget to `usbip-vudc.N` instead (`load_vudc()` then
`gadget.plug("usbip-vudc.0")`) exports it through the vUDC, for the `--device`
mode. `reload_dummy_hcd()` loads dummy_hcd anew with other parameters (e.g.
SuperSpeed), `dummy_hcd_params()` tells the ones in force.

Every wait here is a bounded poll of sysfs (`wait_until`) that raises
`WaitTimeout` naming what it waited for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import mmap
import os
import re
import select
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self, TypedDict, TypeVar, Unpack

__all__ = [
    "AcmFunction",
    "AcmGadget",
    "BlockDevice",
    "DummyHcdParams",
    "EcmFunction",
    "Function",
    "Gadget",
    "GadgetIds",
    "HidKeyboardFunction",
    "HidKeyboardGadget",
    "MassStorageFunction",
    "MassStorageGadget",
    "NcmFunction",
    "NetworkFunction",
    "NetworkGadget",
    "SetConfigurationCounter",
    "StorageAcmGadget",
    "UdevWatcher",
    "UsbDevice",
    "WaitTimeout",
    "block_devices",
    "busid_driver",
    "dummy_hcd_params",
    "free_udcs",
    "load_gadget_modules",
    "load_usbip_modules",
    "load_vudc",
    "modprobe",
    "reload_dummy_hcd",
    "remove_all_gadgets",
    "udcs",
    "udev_named",
    "unplug_all",
    "usb_devices",
    "wait_until",
]

SYS = Path("/sys")
CONFIGFS = SYS / "kernel" / "config"
GADGETS = CONFIGFS / "usb_gadget"
USB_DEVICES = SYS / "bus" / "usb" / "devices"
UDC_CLASS = SYS / "class" / "udc"
VHCI0 = SYS / "devices" / "platform" / "vhci_hcd.0"
UDEV_DATA = Path("/run/udev/data")  # udev's database: n<ifindex> once it handled a netdev
# Every gadget this module makes has a name with this prefix, so that
# `remove_all_gadgets()` can clean up after a crashed test.
NAME_PREFIX = "usbiptest_"
BACKING_DIR_PREFIX = "usbip-gadget-"  # /run/usbip-gadget-*: a mass-storage function's file
DEFAULT_TIMEOUT = 60.0  # emulated guests on busy CI machines are slow
POLL_INTERVAL = 0.05

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """A bounded wait ran out."""


def wait_until(
    condition: Callable[[], T | None],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    what: str,
    interval: float = POLL_INTERVAL,
) -> T:
    """Poll `condition` until it returns something truthy; return that.

    Raises `WaitTimeout("timed out after Ns waiting for <what>")`. Exceptions
    from `condition` propagate (return a falsy value for "not yet").
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _write(path: Path, value: str) -> None:
    # One write() per value: sysfs/configfs attributes want it whole.
    with open(path, "w") as f:
        f.write(value)


# ---------------------------------------------------------------------------
# modules


def modprobe(module: str, *params: str, timeout: float = 60.0) -> None:
    """`modprobe module [param=value ...]`; raises with modprobe's message."""
    r = subprocess.run(
        ["modprobe", module, *params], capture_output=True, text=True, timeout=timeout, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(f"modprobe {module} {' '.join(params)} failed: {r.stderr.strip()}")


def module_loaded(module: str) -> bool:
    return (SYS / "module" / module.replace("-", "_")).is_dir()


def ensure_configfs() -> None:
    """Mount configfs at /sys/kernel/config unless it is there already."""
    if not GADGETS.is_dir():
        modprobe("libcomposite")
    if not GADGETS.is_dir():
        subprocess.run(
            ["mount", "-t", "configfs", "none", str(CONFIGFS)],
            capture_output=True,
            check=False,
            timeout=30,
        )
    wait_until(GADGETS.is_dir, timeout=10, what=f"{GADGETS} (configfs + libcomposite)")


def load_gadget_modules(dummy_udcs: int = 4) -> list[str]:
    """Load dummy_hcd (with `dummy_udcs` UDCs), libcomposite, usb_f_mass_storage.

    Returns the dummy UDC names. If dummy_hcd is already loaded its UDC count
    is kept (module parameters only apply at load time).
    """
    if not module_loaded("dummy_hcd"):
        modprobe("dummy_hcd", f"num={dummy_udcs}")
    modprobe("libcomposite")
    modprobe("usb_f_mass_storage")
    ensure_configfs()
    return wait_until(lambda: udcs("dummy_udc."), timeout=10, what="dummy_udc.* in /sys/class/udc")


def load_usbip_modules() -> None:
    """Load usbip-host and vhci-hcd and wait for their sysfs files."""
    modprobe("usbip-host")
    modprobe("vhci-hcd")
    wait_until(
        lambda: (SYS / "bus/usb/drivers/usbip-host").is_dir() and (VHCI0 / "status").is_file(),
        timeout=10,
        what="usbip-host driver and vhci_hcd.0/status",
    )


def load_vudc(count: int = 1) -> list[str]:
    """Load usbip-vudc (with `count` UDCs if not loaded yet); return their names."""
    if not module_loaded("usbip_vudc"):
        modprobe("usbip-vudc", f"num={count}")
    return wait_until(
        lambda: udcs("usbip-vudc."), timeout=10, what="usbip-vudc.* in /sys/class/udc"
    )


@dataclass(frozen=True)
class DummyHcdParams:
    """dummy_hcd's module parameters; they apply at load time only. With
    `is_super_speed`, each controller has a SuperSpeed root hub next to its
    high-speed one, and a gadget that can do SuperSpeed connects there."""

    num: int = 1
    is_high_speed: bool = True
    is_super_speed: bool = False

    def args(self) -> list[str]:
        return [
            f"num={self.num}",
            f"is_high_speed={int(self.is_high_speed)}",
            f"is_super_speed={int(self.is_super_speed)}",
        ]


def dummy_hcd_params() -> DummyHcdParams | None:
    """The parameters dummy_hcd is loaded with; None if it is not loaded."""
    params = SYS / "module/dummy_hcd/parameters"
    num = _read(params / "num")
    if num is None:
        return None
    return DummyHcdParams(
        num=int(num),
        is_high_speed=_read(params / "is_high_speed") == "Y",
        is_super_speed=_read(params / "is_super_speed") == "Y",
    )


def reload_dummy_hcd(params: DummyHcdParams, *, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Unload dummy_hcd and load it with `params`; return the dummy UDC names.

    Refuses while a gadget is bound to a dummy UDC: unloading would pull its
    device mid-use, and its configfs `UDC` would go on naming the UDC that
    vanished (seen on 6.1). Bus numbers are taken lowest-free, so the same
    `num` gets the same buses back.
    """
    bound = sorted(u for u in bound_udcs() if u.startswith("dummy_udc."))
    if bound:
        raise RuntimeError(
            f"gadgets are bound to {', '.join(bound)}: unplug them before reloading dummy_hcd"
        )
    if module_loaded("dummy_hcd"):
        run(["rmmod", "dummy_hcd"], timeout=timeout)
    modprobe("dummy_hcd", *params.args(), timeout=timeout)

    def all_there() -> list[str] | None:
        names = udcs("dummy_udc.")
        return names if len(names) == params.num else None

    return wait_until(all_there, timeout=timeout, what=f"{params.num} dummy_udc.* after reload")


# ---------------------------------------------------------------------------
# UDCs and USB devices


def udcs(prefix: str = "") -> list[str]:
    """UDC names in /sys/class/udc starting with `prefix`, in numeric order."""
    if not UDC_CLASS.is_dir():
        return []
    names = [p.name for p in UDC_CLASS.iterdir() if p.name.startswith(prefix)]
    return sorted(
        names, key=lambda n: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", n)]
    )


def bound_udcs() -> set[str]:
    """UDCs some configfs gadget is bound to."""
    out: set[str] = set()
    if GADGETS.is_dir():
        for g in GADGETS.iterdir():
            name = _read(g / "UDC")
            if name:
                out.add(name)
    return out


def free_udcs(prefix: str = "dummy_udc.") -> list[str]:
    """UDCs with that prefix no gadget is bound to."""
    used = bound_udcs()
    return [u for u in udcs(prefix) if u not in used]


@dataclass(frozen=True)
class UsbDevice:
    """A USB device in /sys/bus/usb/devices (not an interface)."""

    busid: str
    path: Path  # resolved sysfs path

    def attr(self, name: str) -> str | None:
        return _read(self.path / name)

    @property
    def serial(self) -> str | None:
        return self.attr("serial")

    @property
    def driver(self) -> str | None:
        return busid_driver(self.busid)

    @property
    def speed(self) -> str | None:
        """Mb/s as the kernel reports it: "480" high speed, "5000" SuperSpeed."""
        return self.attr("speed")

    @property
    def on_vhci(self) -> bool:
        """Attached through a vhci_hcd controller (the import side)."""
        return "/vhci_hcd." in str(self.path)

    @property
    def interfaces(self) -> list[str]:
        return sorted(p.name for p in self.path.glob(f"{self.busid}:*"))


def _resolve(link: Path) -> Path | None:
    """Where a sysfs link points, or None if it went away meanwhile.

    Python 3.11's realpath lstat()s and then readlink()s; a device that is
    unplugged between the two raises FileNotFoundError even with strict=False.
    """
    try:
        return link.resolve()
    except OSError:
        return None


def usb_devices(*, serial: str | None = None) -> list[UsbDevice]:
    """USB devices (root hubs included), optionally only those with `serial`."""
    out: list[UsbDevice] = []
    if not USB_DEVICES.is_dir():
        return out
    for link in USB_DEVICES.iterdir():
        if ":" in link.name:
            continue  # an interface
        real = _resolve(link)
        if real is None:
            continue  # unplugged while we listed
        dev = UsbDevice(link.name, real)
        if serial is None or dev.serial == serial:
            out.append(dev)
    return sorted(out, key=lambda d: d.busid)


def usb_attr(busid: str, name: str) -> str | None:
    """An attribute of USB device `busid` in sysfs, stripped; None if unreadable."""
    try:
        return (USB_DEVICES / busid / name).read_text().strip()
    except OSError:
        return None


def devid_of(busid: str) -> int | None:
    """busnum << 16 | devnum, as USB/IP and vhci's status name the device."""
    busnum, devnum = usb_attr(busid, "busnum"), usb_attr(busid, "devnum")
    if not busnum or not devnum:
        return None
    return (int(busnum) << 16) | int(devnum)


def exported_port(busid: str) -> VhciPort | None:
    """The vhci port that holds `busid`, if the kernel says it is exported there:
    usbip-host has it, its status is "used", and a used port carries its devid."""
    if usb_attr(busid, "usbip_status") != "2" or busid_driver(busid) != "usbip-host":
        return None
    devid = devid_of(busid)
    return next((p for p in vhci_ports() if p.status == 6 and p.devid == devid), None)


def busid_driver(busid: str) -> str | None:
    """Name of the driver bound to a USB device (e.g. `usb`, `usbip-host`)."""
    link = USB_DEVICES / busid / "driver"
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


def interface_drivers(busid: str) -> dict[str, str | None]:
    """{interface name: driver name or None} for a USB device."""
    out: dict[str, str | None] = {}
    for p in sorted(USB_DEVICES.glob(f"{busid}:*")):
        try:
            out[p.name] = os.path.basename(os.readlink(p / "driver"))
        except OSError:
            out[p.name] = None
    return out


@dataclass(frozen=True)
class BlockDevice:
    name: str  # e.g. "sda"
    sysfs: Path  # resolved /sys/block/<name>

    @property
    def dev(self) -> str:
        return f"/dev/{self.name}"

    @property
    def size_bytes(self) -> int:
        sectors = _read(self.sysfs / "size")
        return int(sectors) * 512 if sectors and sectors.isdigit() else 0


def block_devices(busid: str) -> list[BlockDevice]:
    """Whole-disk block devices below the USB device `busid`."""
    out: list[BlockDevice] = []
    block = SYS / "block"
    if not block.is_dir():
        return out
    for link in block.iterdir():
        real = _resolve(link)
        if real is not None and busid in real.parts:
            out.append(BlockDevice(link.name, real))
    return sorted(out, key=lambda b: b.name)


def _opens(dev: str) -> bool:
    """The block device node can be opened now (it exists and its disk is live).

    The kernel (6.1's device_add_disk) adds the disk to sysfs and devtmpfs makes
    its node before the disk is live: an open in between fails with ENXIO. Seen
    by a test that found the node and opened it at once. O_NONBLOCK: a
    removable disk opens without asking for its medium.
    """
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENOENT, errno.ENODEV):
            return False
        raise
    os.close(fd)
    return True


def wait_block_device(busid: str, *, timeout: float = DEFAULT_TIMEOUT) -> BlockDevice:
    """The disk of the USB device `busid`, once it has a size and its node opens."""

    def ready() -> BlockDevice | None:
        for b in block_devices(busid):
            if b.size_bytes > 0 and _opens(b.dev):
                return b
        return None

    return wait_until(ready, timeout=timeout, what=f"a block device on USB device {busid}")


# ---------------------------------------------------------------------------
# gadget functions

_counter = itertools.count(1)


def _new_serial() -> str:
    return f"UT{os.getpid():06d}{next(_counter):04d}"


def _ensure_modules(modules: Iterable[str]) -> None:
    # Loaded by name, not left to configfs's request_module("usbfunc:...") or
    # udev: an alias load is what the guest's modprobe.blacklist stops.
    for module in modules:
        if not module_loaded(module):
            modprobe(module)


def _mac(first_octet: int, seed: str) -> str:
    """A locally administered unicast MAC address derived from `seed`."""
    tail = hashlib.blake2b(seed.encode(), digest_size=5).digest()
    return ":".join(f"{b:02x}" for b in (first_octet, *tail))


class Function:
    """One function of a configfs gadget: the directory `functions/<KIND>.<instance>`
    that the gadget links into its configuration.

    A subclass names its kind and the module that provides it, writes its
    attributes in `configure`, and makes / deletes what lives outside configfs
    (a backing file) in `prepare` / `cleanup`. An instance belongs to one gadget.
    """

    KIND: ClassVar[str] = ""
    MODULES: ClassVar[tuple[str, ...]] = ()
    # CDC functions group their interfaces with an Interface Association
    # Descriptor; a device that has one says so in its class (0xEF/2/1).
    USES_IAD: ClassVar[bool] = False

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.path: Path | None = None  # its configfs directory, once the gadget made it

    @property
    def name(self) -> str:
        return f"{self.KIND}.{self.instance}"

    @property
    def dir(self) -> Path:
        if self.path is None:
            raise RuntimeError(f"function {self.name} belongs to no created gadget yet")
        return self.path

    def prepare(self, gadget: str) -> None:
        """Before the tree of the gadget (configfs name `gadget`) exists."""
        _ensure_modules(self.MODULES)

    def configure(self, fn: Path) -> None:
        """Write the function's attributes into its new directory `fn`."""

    def cleanup(self) -> None:
        """After the gadget's tree is gone: delete what `prepare` made."""


class MassStorageFunction(Function):
    """`usb_f_mass_storage` with one LUN backed by a file of `size` bytes."""

    KIND = "mass_storage"
    MODULES = ("usb_f_mass_storage",)

    def __init__(
        self,
        *,
        size: int = 4 << 20,
        removable: bool = True,
        backing_dir: str | Path | None = None,
        instance: str = "0",
    ) -> None:
        super().__init__(instance)
        self.size = size
        self.removable = removable
        self._backing_dir = Path(backing_dir) if backing_dir else None
        self._own_dir: str | None = None
        self.backing_file: Path | None = None

    def prepare(self, gadget: str) -> None:
        super().prepare(gadget)
        if self._backing_dir is None:
            # /run is a tmpfs in the guest: no 9p or overlay below the disk.
            self._own_dir = tempfile.mkdtemp(prefix=BACKING_DIR_PREFIX, dir="/run")
            self._backing_dir = Path(self._own_dir)
        self.backing_file = self._backing_dir / f"{gadget}.img"
        with open(self.backing_file, "wb") as f:
            f.truncate(self.size)

    def configure(self, fn: Path) -> None:
        assert self.backing_file is not None
        _write(fn / "stall", "1")
        _write(fn / "lun.0/removable", "1" if self.removable else "0")
        _write(fn / "lun.0/file", str(self.backing_file))

    def cleanup(self) -> None:
        if self.backing_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.backing_file.unlink()
        if self._own_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._own_dir)
            self._own_dir = self._backing_dir = None

    def read_backing(self, offset: int, length: int) -> bytes:
        """Bytes of the backing file, as the gadget stored them."""
        assert self.backing_file is not None
        with open(self.backing_file, "rb") as f:
            f.seek(offset)
            return f.read(length)


class AcmFunction(Function):
    """`usb_f_acm`: a CDC ACM serial port. Its device-side end is the tty
    /dev/ttyGS<port_num>, there from the moment the function exists; the host's
    cdc_acm makes the other end, a /dev/ttyACM<n>."""

    KIND = "acm"
    MODULES = ("usb_f_acm",)
    USES_IAD = True

    def __init__(self, instance: str = "usb0") -> None:
        super().__init__(instance)

    def tty(self) -> str | None:
        """/dev/ttyGSn of this function, once its node exists."""
        num = _read(self.dir / "port_num")
        node = f"/dev/ttyGS{num}"
        return node if num and os.path.exists(node) else None

    def wait_tty(self, *, timeout: float = DEFAULT_TIMEOUT) -> str:
        return wait_until(self.tty, timeout=timeout, what=f"/dev/ttyGS* of {self.dir}")


class NetworkFunction(Function):
    """A USB Ethernet function: `dev_addr` is the MAC of the device side's network
    interface, `host_addr` the one the host's driver gives its end (from the
    iMACAddress string). Subclasses name the protocol (ECM, NCM)."""

    USES_IAD = True

    def __init__(self, *, dev_addr: str, host_addr: str, instance: str = "usb0") -> None:
        super().__init__(instance)
        self.dev_addr = dev_addr
        self.host_addr = host_addr

    def configure(self, fn: Path) -> None:
        _write(fn / "dev_addr", self.dev_addr)
        _write(fn / "host_addr", self.host_addr)

    def interface(self) -> str | None:
        """The device side's network interface, once registered (the gadget is
        bound) and named by udev. It keeps its name in other namespaces."""
        name = _read(self.dir / "ifname")  # "(unnamed net_device)" until bound
        if not name or name.startswith("("):
            return None
        net = SYS / "class/net" / name
        if net.exists():  # still in this namespace: wait until udev is done with it
            return name if udev_named(net) else None
        return name

    def wait_interface(self, *, timeout: float = DEFAULT_TIMEOUT) -> str:
        return wait_until(
            self.interface, timeout=timeout, what=f"the network interface of {self.dir}"
        )


class EcmFunction(NetworkFunction):
    """`usb_f_ecm`: CDC Ethernet (ECM); the host's driver is cdc_ether."""

    KIND = "ecm"
    MODULES = ("usb_f_ecm",)


class NcmFunction(NetworkFunction):
    """`usb_f_ncm`: CDC NCM; the host's driver is cdc_ncm."""

    KIND = "ncm"
    MODULES = ("usb_f_ncm",)


# A boot keyboard (HID 1.11, appendix B.1): an 8-byte input report (modifier
# bits, a reserved byte, six key codes) and a 1-byte LED output report.
BOOT_KEYBOARD_REPORT_DESC = bytes.fromhex(
    "05010906a101"  # Generic Desktop / Keyboard, Collection (Application)
    "050719e029e71500250175019508 8102"  # 8 modifier bits
    "95017508 8103"  # reserved byte
    "95057501050819012905 9102"  # 5 LED bits (output)
    "95017503 9103"  # LED padding
    "9506750815002565050719002965 8100"  # 6 key codes (array)
    "c0"
)
HID_KEY_A = 0x04  # usage of "a" on the keyboard page; Linux calls it KEY_A (30)


class HidKeyboardFunction(Function):
    """`usb_f_hid` as a boot keyboard; reports are written to /dev/hidgN."""

    KIND = "hid"
    MODULES = ("usb_f_hid",)

    def __init__(self, instance: str = "usb0") -> None:
        super().__init__(instance)

    def configure(self, fn: Path) -> None:
        _write(fn / "protocol", "1")  # keyboard
        _write(fn / "subclass", "1")  # boot interface
        _write(fn / "report_length", "8")
        with open(fn / "report_desc", "wb") as f:  # binary: one write, as configfs wants
            f.write(BOOT_KEYBOARD_REPORT_DESC)

    def hidg_device(self) -> str | None:
        """/dev/hidgN of this function while plugged, once its node exists."""
        dev = _read(self.dir / "dev")  # "major:minor"
        hidg = SYS / "class" / "hidg"
        if not dev or not hidg.is_dir():
            return None
        for entry in hidg.iterdir():
            node = Path("/dev") / entry.name
            if _read(entry / "dev") == dev and node.exists():
                return str(node)
        return None


# ---------------------------------------------------------------------------
# gadgets

FunctionT = TypeVar("FunctionT", bound=Function)


class GadgetIds(TypedDict, total=False):
    """What the host reads in a gadget's device descriptor and strings, and the
    configfs name (default: from the serial)."""

    serial: str | None
    id_vendor: int
    id_product: int
    bcd_device: int
    manufacturer: str
    product: str
    name: str | None


def _dirs(path: Path) -> list[Path]:
    """Subdirectories (not links) of a configfs directory; none if it is gone."""
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []


def _remove_gadget_tree(g: Path) -> None:
    """Delete an unbound gadget's configfs tree in the order configfs requires:
    the links into each configuration, its strings, the configuration, then the
    functions (their default groups go with them), the strings, the gadget."""
    steps: list[Callable[[], None]] = []
    for config in _dirs(g / "configs"):
        steps += [link.unlink for link in sorted(config.iterdir()) if link.is_symlink()]
        steps += [s.rmdir for s in _dirs(config / "strings")]
        steps.append(config.rmdir)
    steps += [fn.rmdir for fn in _dirs(g / "functions")]
    steps += [s.rmdir for s in _dirs(g / "strings")]
    steps.append(g.rmdir)
    for step in steps:
        with contextlib.suppress(FileNotFoundError):
            step()


class Gadget:
    """A configfs gadget with one configuration holding `functions`; a context manager.

    The plumbing every kind shares: ids, strings, the configuration, plugging
    into a UDC and finding what the kernel made of it (the device on
    dummy_hcd, its copies behind vhci_hcd and their ttys and network
    interfaces). The subclasses below are ready-made sets of functions;
    `Gadget([MassStorageFunction(), AcmFunction()])` makes any other set.

    Leaving the context unplugs it and removes the configfs tree and what its
    functions made outside configfs.
    """

    CONFIGURATION = "test"
    # bmAttributes of the configuration: bus powered (0x80 is required).
    BM_ATTRIBUTES = 0x80

    def __init__(
        self,
        functions: Sequence[Function] = (),
        *,
        serial: str | None = None,
        id_vendor: int = 0x1D6B,  # Linux Foundation
        id_product: int = 0x0104,  # Multifunction Composite Gadget
        bcd_device: int = 0x0100,
        manufacturer: str = "usbip-hotplug",
        product: str = "Test Gadget",
        name: str | None = None,
    ) -> None:
        self.functions = list(functions)
        self.serial = serial or _new_serial()
        self.id_vendor = id_vendor
        self.id_product = id_product
        self.bcd_device = bcd_device
        self.manufacturer = manufacturer
        self.product = product
        self.name = name or f"{NAME_PREFIX}{re.sub(r'[^A-Za-z0-9_]', '_', self.serial)}"
        self.path = GADGETS / self.name
        self.created = False

    # -- configfs tree -------------------------------------------------------

    @property
    def function_dir(self) -> Path:
        """The configfs directory of the first function (the only one of most gadgets)."""
        return self.functions[0].dir

    def function(self, kind: type[FunctionT]) -> FunctionT:
        """The first function of that class."""
        for fn in self.functions:
            if isinstance(fn, kind):
                return fn
        raise LookupError(f"gadget {self.name} has no {kind.__name__}")

    def create(self) -> Self:
        """Make the configfs tree (not plugged yet)."""
        ensure_configfs()
        for fn in self.functions:
            fn.prepare(self.name)
        g = self.path
        g.mkdir()
        self.created = True
        _write(g / "idVendor", f"0x{self.id_vendor:04x}")
        _write(g / "idProduct", f"0x{self.id_product:04x}")
        _write(g / "bcdDevice", f"0x{self.bcd_device:04x}")
        _write(g / "bcdUSB", "0x0200")  # the composite layer sets 0x0320 at SuperSpeed
        if any(fn.USES_IAD for fn in self.functions):
            _write(g / "bDeviceClass", "0xef")  # Miscellaneous
            _write(g / "bDeviceSubClass", "0x02")  # Common Class
            _write(g / "bDeviceProtocol", "0x01")  # Interface Association Descriptor
        (g / "strings/0x409").mkdir()
        _write(g / "strings/0x409/serialnumber", self.serial)
        _write(g / "strings/0x409/manufacturer", self.manufacturer)
        _write(g / "strings/0x409/product", self.product)
        config = g / "configs/c.1"
        config.mkdir()
        (config / "strings/0x409").mkdir()
        _write(config / "strings/0x409/configuration", self.CONFIGURATION)
        _write(config / "MaxPower", "100")
        _write(config / "bmAttributes", f"0x{self.BM_ATTRIBUTES:02x}")
        for fn in self.functions:
            fn.path = g / "functions" / fn.name
            fn.path.mkdir()
            fn.configure(fn.path)
            (config / fn.name).symlink_to(fn.path)
        return self

    def remove(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Unplug and delete the gadget tree and its functions' files (idempotent)."""
        if self.path.is_dir():
            if self.udc:
                self.unplug(timeout=timeout)
            _remove_gadget_tree(self.path)
        self.created = False
        for fn in self.functions:
            fn.cleanup()

    def __enter__(self) -> Self:
        if not self.created:
            self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def set_product(self, id_product: int) -> None:
        """Change idProduct while unplugged: the next plug enumerates as another
        device (a bootloader, a firmware update) at the same busid."""
        if self.udc:
            raise RuntimeError(f"{self.name} is plugged into {self.udc}: unplug it first")
        _write(self.path / "idProduct", f"0x{id_product:04x}")
        self.id_product = id_product

    # -- plug / unplug -------------------------------------------------------

    @property
    def udc(self) -> str | None:
        """The UDC this gadget is bound to, or None."""
        return _read(self.path / "UDC") or None

    def plug(self, udc: str | None = None) -> str:
        """Bind to `udc` (default: the first free dummy UDC); return its name.

        On a `dummy_udc.N` the guest kernel then enumerates the device; on a
        `usbip-vudc.N` it becomes exportable through the vUDC.
        """
        if not self.created:
            self.create()
        if udc is None:
            free = free_udcs("dummy_udc.")
            if not free:
                raise RuntimeError("no free dummy_udc: load dummy_hcd with a larger num=")
            udc = free[0]
        _write(self.path / "UDC", udc)
        return udc

    def plug_vudc(self, index: int = 0) -> str:
        """Load usbip-vudc if needed and bind to `usbip-vudc.<index>`.

        The gadget is then not enumerated locally: it waits to be exported
        through the vUDC's `usbip_sockfd` (see `vudc_platform_dir`).
        """
        names = load_vudc(index + 1)
        udc = f"usbip-vudc.{index}"
        if udc not in names:
            raise RuntimeError(f"{udc} does not exist (have {names}); reload usbip-vudc num=")
        return self.plug(udc)

    def unplug(self, *, timeout: float = DEFAULT_TIMEOUT, wait: bool = True) -> None:
        """Unbind from the UDC; with `wait`, until the local device is gone."""
        udc = self.udc
        if not udc:
            return
        if not (wait and udc.startswith("dummy_udc.")):
            _write(self.path / "UDC", "\n")
            return
        # As a cable pull does: the host side loses the device while the gadget
        # still runs, and only then is the gadget unbound. Unbinding first makes
        # both sides tear down at once, and under load that once held bus 17's
        # root hub lock for minutes in the test VM.
        self._let_local_disks_settle()
        try:
            with contextlib.suppress(OSError):  # no soft_connect: unbinding disconnects too
                _write(UDC_CLASS / udc / "soft_connect", "disconnect")
            self.wait_gone(timeout=timeout)
        finally:
            _write(self.path / "UDC", "\n")

    def _let_local_disks_settle(self, timeout: float = 10.0) -> None:
        """Before a pull: let udev finish with this gadget's local disks and let
        their requests complete (bounded; goes on regardless after `timeout`).

        Seen once in CI (Debian's 6.1): a disk given back to usb-storage was
        pulled 0.35 s after it appeared, while udev's probe read its last
        sectors; the read failed with the pull, and the unbind that followed
        (UDC "") hung for good in fsg_unbind, waiting for f_mass_storage's
        thread. A cable pulled under a busy host is what some tests do on
        purpose, on the vhci side; a teardown's pull need not race udev.
        """
        device = self.find_device()
        disks = block_devices(device.busid) if device is not None else []
        if not disks:
            return
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["udevadm", "settle", f"--timeout={int(timeout)}"],
                timeout=timeout + 5,
                check=False,
                capture_output=True,
            )

        def idle() -> bool:
            return all((_read(d.sysfs / "inflight") or "0 0").split() == ["0", "0"] for d in disks)

        with contextlib.suppress(WaitTimeout):
            wait_until(idle, timeout=max(0.1, deadline - time.monotonic()), what="disks idle")

    # -- what the kernel made of it -------------------------------------------

    def find_device(self) -> UsbDevice | None:
        """This gadget as a USB device behind its dummy_hcd (not a vhci copy)."""
        for d in usb_devices(serial=self.serial):
            if not d.on_vhci:
                return d
        return None

    def find_busid(self) -> str | None:
        d = self.find_device()
        return d.busid if d else None

    def wait_busid(self, *, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Busid the guest kernel gave this gadget (by its serial)."""
        return wait_until(
            self.find_busid, timeout=timeout, what=f"a USB device with serial {self.serial}"
        )

    def wait_gone(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        wait_until(
            lambda: self.find_device() is None,
            timeout=timeout,
            what=f"USB device with serial {self.serial} to disappear",
        )

    def vhci_devices(self) -> list[UsbDevice]:
        """Copies of this device attached through vhci_hcd (import side)."""
        return [d for d in usb_devices(serial=self.serial) if d.on_vhci]

    def vudc_platform_dir(self) -> Path | None:
        """/sys/devices/platform/usbip-vudc.N when bound to a vUDC."""
        udc = self.udc
        if udc and udc.startswith("usbip-vudc."):
            return SYS / "devices" / "platform" / udc
        return None

    def vhci_ttys(self) -> list[str]:
        """/dev/tty* (e.g. ttyACM0) of this device's copies behind vhci_hcd (nodes
        that exist)."""
        out: list[str] = []
        for d in self.vhci_devices():
            for tty in sorted(d.path.glob("*:*/tty/tty*")):
                node = Path("/dev") / tty.name
                if node.exists():
                    out.append(str(node))
        return out

    def vhci_interfaces(self) -> list[str]:
        """Network interfaces of this device's copies behind vhci_hcd, once udev has
        named them (it renames cdc_ether's usb0 to enx<MAC>; moving an interface
        before that races the rename)."""
        out: list[str] = []
        for d in self.vhci_devices():
            for net in sorted(d.path.glob("*:*/net/*")):
                if udev_named(net):
                    out.append(net.name)
        return out


def udev_named(net: Path) -> bool:
    """udev has handled the network interface at sysfs `net` (its database entry
    exists, written after any rename) and the interface still has that name."""
    ifindex = _read(net / "ifindex")
    return bool(ifindex) and (UDEV_DATA / f"n{ifindex}").exists() and net.exists()


def unplug_all(gadgets: Sequence[Gadget], *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Pull several gadgets at once: every cable first (soft_connect), then wait
    until each local device is gone, then unbind each, as `Gadget.unplug` does
    for one."""
    pulled: list[Gadget] = []
    try:
        for g in gadgets:
            udc = g.udc
            if udc and udc.startswith("dummy_udc."):
                pulled.append(g)
                with contextlib.suppress(OSError):
                    _write(UDC_CLASS / udc / "soft_connect", "disconnect")
            else:
                g.unplug(timeout=timeout)
        for g in pulled:
            g.wait_gone(timeout=timeout)
    finally:
        for g in pulled:
            _write(g.path / "UDC", "\n")


class MassStorageGadget(Gadget):
    """A configfs mass-storage gadget backed by a file.

    >>> load_gadget_modules()                                  # doctest: +SKIP
    >>> with MassStorageGadget(size=4 << 20) as g:             # doctest: +SKIP
    ...     g.plug("dummy_udc.0")
    ...     busid = g.wait_busid()
    ...     disk = g.wait_block_device()
    ...     g.unplug()

    Removing it deletes the backing file too.
    """

    CONFIGURATION = "mass storage"

    def __init__(
        self,
        *,
        size: int = 4 << 20,
        backing_dir: str | Path | None = None,
        removable: bool = True,
        **ids: Unpack[GadgetIds],
    ) -> None:
        self.storage = MassStorageFunction(size=size, removable=removable, backing_dir=backing_dir)
        ids.setdefault("product", "Test Disk")
        super().__init__([self.storage], **ids)

    @property
    def size(self) -> int:
        return self.storage.size

    @property
    def removable(self) -> bool:
        return self.storage.removable

    @property
    def backing_file(self) -> Path | None:
        return self.storage.backing_file

    def wait_block_device(self, *, timeout: float = DEFAULT_TIMEOUT) -> BlockDevice:
        """The usb-storage disk of the locally enumerated device."""
        deadline = time.monotonic() + timeout
        busid = self.wait_busid(timeout=timeout)
        return wait_block_device(busid, timeout=max(0.1, deadline - time.monotonic()))

    def by_id_links(self) -> list[Path]:
        """udev's /dev/disk/by-id links that carry this gadget's serial."""
        d = Path("/dev/disk/by-id")
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if self.serial in p.name)

    def read_backing(self, offset: int, length: int) -> bytes:
        """Bytes of the backing file, as the gadget stored them."""
        return self.storage.read_backing(offset, length)


class StorageAcmGadget(MassStorageGadget):
    """A composite device: the mass-storage function and a CDC ACM serial port
    (`acm`) in one configuration, as a debug probe with a disk has."""

    CONFIGURATION = "mass storage + serial"

    def __init__(
        self,
        *,
        size: int = 4 << 20,
        backing_dir: str | Path | None = None,
        removable: bool = True,
        **ids: Unpack[GadgetIds],
    ) -> None:
        ids.setdefault("product", "Test Disk + Serial")
        super().__init__(size=size, backing_dir=backing_dir, removable=removable, **ids)
        self.acm = AcmFunction()
        self.functions.append(self.acm)


class AcmGadget(Gadget):
    """A CDC ACM serial adapter: the device side's end is `acm.wait_tty()`
    (/dev/ttyGSn), the host's the /dev/ttyACMn that cdc_acm makes (`vhci_ttys()`
    for the copy behind vhci_hcd)."""

    CONFIGURATION = "serial"

    def __init__(self, **ids: Unpack[GadgetIds]) -> None:
        self.acm = AcmFunction()
        ids.setdefault("product", "Test Serial")
        super().__init__([self.acm], **ids)


class NetworkGadget(Gadget):
    """A USB network adapter, CDC ECM (default) or NCM. Its MAC addresses derive
    from the serial: `net.dev_addr` on the device side's interface
    (`net.wait_interface()`), `net.host_addr` on the host's (`vhci_interfaces()`
    for the copy behind vhci_hcd)."""

    CONFIGURATION = "network"

    def __init__(
        self, *, protocol: Literal["ecm", "ncm"] = "ecm", **ids: Unpack[GadgetIds]
    ) -> None:
        ids.setdefault("product", f"Test Network ({protocol.upper()})")
        super().__init__(**ids)
        kind = EcmFunction if protocol == "ecm" else NcmFunction
        self.net: NetworkFunction = kind(
            dev_addr=_mac(0x02, self.serial), host_addr=_mac(0x06, self.serial)
        )
        self.functions.append(self.net)


class HidKeyboardGadget(Gadget):
    """A configfs HID boot keyboard (`usb_f_hid`); reports are written to /dev/hidgN.

    Its configuration is remote-wakeup capable, as real keyboards are: the
    host then lets it autosuspend while its input device is open (usbhid asks
    for remote wakeup), which is what USB/IP cannot carry (issue 16).
    """

    CONFIGURATION = "boot keyboard"
    BM_ATTRIBUTES = 0xA0  # bus powered, remote wakeup

    def __init__(self, **ids: Unpack[GadgetIds]) -> None:
        self.keyboard = HidKeyboardFunction()
        ids.setdefault("product", "Test Keyboard")
        super().__init__([self.keyboard], **ids)

    def hidg_device(self) -> str | None:
        """/dev/hidgN of this function while plugged, once its node exists."""
        return self.keyboard.hidg_device()

    def wait_hidg_device(self, *, timeout: float = DEFAULT_TIMEOUT) -> str:
        return wait_until(self.hidg_device, timeout=timeout, what=f"/dev/hidg* of {self.name}")

    @staticmethod
    def send_report(hidg: str, report: bytes, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Write one report; wait (bounded) while the previous one is still queued."""
        fd = os.open(hidg, os.O_WRONLY | os.O_NONBLOCK)
        try:

            def sent() -> bool:
                try:
                    return os.write(fd, report) == len(report)
                except BlockingIOError:
                    return False

            wait_until(sent, timeout=timeout, what=f"{hidg} to take a report")
        finally:
            os.close(fd)

    def vhci_event_devices(self) -> list[str]:
        """/dev/input/eventN of the keyboard's copy behind vhci_hcd (nodes that exist)."""
        return [e for d in self.vhci_devices() for e in _event_nodes(d)]

    def local_event_devices(self) -> list[str]:
        """/dev/input/eventN of the keyboard as this machine's own (not a vhci copy)."""
        device = self.find_device()
        return _event_nodes(device) if device is not None else []


def _event_nodes(device: UsbDevice) -> list[str]:
    out: list[str] = []
    for event in sorted(device.path.glob("*:*/*/input/input*/event*")):
        node = Path("/dev/input") / event.name
        if node.exists():
            out.append(str(node))
    return out


# ---------------------------------------------------------------------------
# usbmon: what a device on a dummy_hcd bus was sent


# struct mon_bin_hdr as read(2) returns it from /dev/usbmonN (Documentation/usb/
# usbmon.rst, the 48-byte header): id, type ('S'ubmit, 'C'omplete, 'E'rror),
# transfer type (2 = control), endpoint, device address, bus, flag_setup (0: the
# setup packet follows), flag_data, seconds, microseconds, status, lengths; then
# the 8-byte setup packet.
_MON_HDR = struct.Struct("<QBBBBHbbqiiII")
_MON_HDR_LEN = 48
MON_IOCT_RING_SIZE = 0x9204  # _IO(0x92, 4): the kernel's buffer for this reader
USB_REQ_SET_CONFIGURATION = 0x09


class SetConfigurationCounter:
    """Every SET_CONFIGURATION a host controller's bus carried, as usbmon saw it.

    On a dummy_hcd bus every control request a gadget receives is an URB
    submitted to that bus (by the hub driver, the generic driver, usbip-host
    forwarding the application side's requests), so usbmon's binary interface
    (/dev/usbmonN, `usbmon` module) sees each one the device was sent. Read
    from the start by a thread into a 1 MiB ring: the text interface drops
    events when a reader falls behind (a mass-storage probe is hundreds of
    URBs), this one does not at these rates. Each entry is (monotonic time of
    reading, device address, configuration value).
    """

    def __init__(self, busnum: int) -> None:
        modprobe("usbmon")
        node = Path(f"/dev/usbmon{busnum}")
        if not node.exists():  # udev makes it; not yet, or no udev rule for it
            dev = wait_until(
                lambda: _read(SYS / f"class/usbmon/usbmon{busnum}/dev"),
                timeout=10,
                what=f"usbmon{busnum} in /sys/class/usbmon",
            )
            major, minor = (int(x) for x in dev.split(":"))
            with contextlib.suppress(FileExistsError):
                os.mknod(node, 0o600 | 0o020000, os.makedev(major, minor))
        self.fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.ioctl(self.fd, MON_IOCT_RING_SIZE, 1 << 20)
        self.seen: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="usbmon", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.fd], [], [], 0.2)[0]:
                continue
            try:
                event = os.read(self.fd, 1 << 16)
            except OSError:
                return
            if len(event) < _MON_HDR_LEN:
                continue
            _, kind, xfer, _, devnum, _, setup_flag, *_ = _MON_HDR.unpack_from(event)
            setup = event[40:48]
            if kind == ord("S") and xfer == 2 and setup_flag == 0 and setup[:2] == b"\x00\x09":
                self.seen.append((time.monotonic(), devnum, setup[2]))

    def count(
        self, devnum: int | None = None, since: float | None = None, until: float | None = None
    ) -> int:
        """SET_CONFIGURATIONs sent (to device address `devnum`), read between
        `since` and `until` (time.monotonic())."""
        return sum(
            1
            for t, dev, _ in list(self.seen)
            if (devnum is None or dev == devnum)
            and (since is None or t >= since)
            and (until is None or t <= until)
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dummy_busnum(udc: str) -> int:
    """The bus number of the dummy_hcd that serves `dummy_udc.N` (its root hub usbB)."""
    hcd = SYS / "devices/platform" / f"dummy_hcd.{udc.rsplit('.', 1)[1]}"
    hubs = [p.name for p in hcd.iterdir() if re.fullmatch(r"usb[0-9]+", p.name)]
    if len(hubs) != 1:
        raise RuntimeError(f"{hcd}: expected one root hub, found {hubs}")
    return int(hubs[0][3:])


def remove_all_gadgets(prefix: str = NAME_PREFIX) -> list[str]:
    """Remove leftover gadgets made by this module (after a crashed test), and
    the backing files their mass-storage functions made."""
    removed: list[str] = []
    if not GADGETS.is_dir():
        return removed
    for g in sorted(GADGETS.iterdir()):
        if not g.name.startswith(prefix):
            continue
        luns = (_read(f) for f in sorted(g.glob("functions/mass_storage.*/lun.*/file")))
        backing_files = [Path(lun) for lun in luns if lun]
        leftover = Gadget(name=g.name, serial=_read(g / "strings/0x409/serialnumber"))
        leftover.created = True
        leftover.remove()
        for backing in backing_files:
            with contextlib.suppress(OSError):
                backing.unlink()
            if backing.parent.name.startswith(BACKING_DIR_PREFIX):
                with contextlib.suppress(OSError):
                    backing.parent.rmdir()
        removed.append(g.name)
    return removed


# ---------------------------------------------------------------------------
# udev


class UdevWatcher:
    """pyudev monitor for the guest's udev events; a context manager.

    Start it before the action, then `wait_for(...)` the event:

    >>> with UdevWatcher(subsystem="usb", device_type="usb_device") as w:  # doctest: +SKIP
    ...     gadget.plug()
    ...     ev = w.wait_for("add", lambda d: d.attributes.get("serial") == b"X")
    """

    def __init__(self, *, subsystem: str | None = None, device_type: str | None = None) -> None:
        import pyudev  # imported here: the rest of this module needs only sysfs

        self._pyudev: Any = pyudev
        self.context: Any = pyudev.Context()
        self.monitor: Any = pyudev.Monitor.from_netlink(self.context, source="udev")
        if subsystem is not None:
            self.monitor.filter_by(subsystem=subsystem, device_type=device_type)
        self.seen: list[tuple[str, Any]] = []

    def __enter__(self) -> UdevWatcher:
        self.monitor.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # pyudev closes the netlink socket when the monitor is released.
        self.monitor = None

    def events(self, timeout: float) -> Iterator[tuple[str, Any]]:
        """(action, device) pairs until `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            device = self.monitor.poll(timeout=min(left, 1.0))
            if device is not None:
                item = (str(device.action), device)
                self.seen.append(item)
                yield item

    def wait_for(
        self,
        actions: str | Iterable[str],
        match: Callable[[Any], bool] = lambda _d: True,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """The first device event with one of `actions` for which `match` is true."""
        wanted = {actions} if isinstance(actions, str) else set(actions)
        for action, device in self.events(timeout):
            if action in wanted and match(device):
                return device
        seen = ", ".join(f"{a} {getattr(d, 'sys_name', d)}" for a, d in self.seen[-10:])
        raise WaitTimeout(
            f"timed out after {timeout:.0f}s waiting for udev {'/'.join(sorted(wanted))}"
            f" event (last seen: {seen or 'none'})"
        )


def udev_serial(device: Any) -> str | None:
    """The `serial` sysfs attribute of a pyudev device, as text."""
    raw = device.attributes.get("serial")
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


# ---------------------------------------------------------------------------
# vhci status


@dataclass(frozen=True)
class VhciPort:
    """One line of /sys/devices/platform/vhci_hcd.N/status (6.1 format)."""

    hub: str  # "hs" or "ss"
    port: int  # global port number, as `attach`/`detach` want it
    status: int  # 4 free, 5 not assigned, 6 used, 7 error
    speed: int
    devid: int
    sockfd: int
    local_busid: str

    @property
    def free(self) -> bool:
        return self.status == 4


def vhci_status_files() -> list[Path]:
    """status, status.1, ... of vhci_hcd.0, in controller order."""
    files = [VHCI0 / "status"]
    files += sorted(VHCI0.glob("status.*"), key=lambda p: int(p.name.split(".")[1]))
    return [f for f in files if f.is_file()]


def parse_vhci_status(text: str) -> list[VhciPort]:
    """Parse a status file by its header's column names, not fixed columns."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    cols = lines[0].split()
    out: list[VhciPort] = []
    for ln in lines[1:]:
        row = dict(zip(cols, ln.split(), strict=False))
        out.append(
            VhciPort(
                hub=row.get("hub", "hs"),
                port=int(row["port"]),
                status=int(row["sta"]),
                speed=int(row["spd"]),
                devid=int(row["dev"], 16),
                sockfd=int(row.get("sockfd", "0")),
                local_busid=row.get("local_busid", "0-0"),
            )
        )
    return out


def vhci_ports() -> list[VhciPort]:
    """All vhci ports of all controllers."""
    ports: list[VhciPort] = []
    for f in vhci_status_files():
        ports += parse_vhci_status(f.read_text())
    return ports


def run(argv: Sequence[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command, raise with its output if it fails (bounded)."""
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout.strip()}\n{r.stderr.strip()}"
        )
    return r


def odirect_write_read(dev: str, offset: int, data: bytes) -> bytes:
    """Write `data` at `offset` of block device `dev` with O_DIRECT and read it back.

    O_DIRECT bypasses the page cache, so what comes back went through the
    device (and, for a USB/IP disk, across the link). Raises OSError on a
    short write or read.
    """
    buf = mmap.mmap(-1, len(data))  # page aligned, as O_DIRECT wants
    buf[:] = data
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT | os.O_SYNC)
    try:
        if os.pwrite(fd, buf, offset) != len(data):
            raise OSError(f"{dev}: short O_DIRECT write at {offset}")
        os.fsync(fd)
        back = mmap.mmap(-1, len(data))
        if os.preadv(fd, [back], offset) != len(data):
            raise OSError(f"{dev}: short O_DIRECT read at {offset}")
        return bytes(back)
    finally:
        os.close(fd)
