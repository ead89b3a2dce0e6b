"""Reading USB devices from sysfs, under a configurable root.

Everything here reads files the kernel publishes; writes to the kernel's
control files go through `SysfsWriter.write` so that one place turns errno
values into messages a user can act on (and so the fake kernel used in tests
can take the kernel's part by overriding that one method).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hotplug.errors import HotplugError
from hotplug.usb import Device, Interface, device_from_attributes, interfaces_from_descriptors

# A USB device (not a root hub "usb1", not an interface "1-1:1.0"). ASCII digits
# and \Z, not \d and $: "1-1\n" and fullwidth or Arabic-Indic digits are not busids.
BUSID_RE = re.compile(r"\A[0-9]+-[0-9]+(?:\.[0-9]+)*\Z")


class KernelError(HotplugError):
    """A kernel interface refused or is missing; the message says what to do."""


class DeviceNotFound(KernelError):
    def __init__(self, busid: str) -> None:
        super().__init__(f"no USB device with busid {busid} (see 'usbip-hotplug list -l')")
        self.busid = busid


@dataclass(frozen=True)
class SysfsPaths:
    """Where the kernel's files are. `root` is "/" except in tests."""

    root: Path = Path("/")

    @classmethod
    def from_env(cls) -> SysfsPaths:
        return cls(Path(os.environ.get("USBIP_HOTPLUG_SYSFS_ROOT", "/")))

    @property
    def sys(self) -> Path:
        return self.root / "sys"

    @property
    def usb_devices(self) -> Path:
        return self.sys / "bus/usb/devices"

    @property
    def usb_drivers(self) -> Path:
        return self.sys / "bus/usb/drivers"

    @property
    def stub_driver(self) -> Path:
        return self.usb_drivers / "usbip-host"

    @property
    def platform(self) -> Path:
        return self.sys / "devices/platform"

    @property
    def vhci_records(self) -> Path:
        # Mainline `usbip attach` keeps its per-port records here; `usbip port` reads them.
        return self.root / "var/run/vhci_hcd"

    def device_dir(self, busid: str) -> Path:
        return self.usb_devices / busid

    def usbfs_node(self, busnum: int, devnum: int) -> Path:
        """The device's usbfs file; holding it open keeps the kernel's device alive."""
        return self.root / f"dev/bus/usb/{busnum:03d}/{devnum:03d}"

    def unrooted(self, path: Path) -> str:
        """The path as the kernel would name it (without our test root)."""
        rel = os.path.relpath(path, self.root)
        return "/" + rel


def validate_busid(busid: str) -> str:
    if not BUSID_RE.match(busid):
        raise KernelError(f"'{busid}' is not a USB busid (expected e.g. 1-1 or 3-2.4)")
    return busid


class SysfsWriter:
    """Writes to kernel control files with errors a user can act on."""

    def write(self, path: Path, text: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError as exc:
            raise KernelError(f"{path} does not exist") from exc
        except PermissionError as exc:
            raise KernelError(f"permission denied writing {path}: run as root") from exc
        try:
            os.write(fd, text.encode())
        except OSError as exc:
            raise KernelError(explain_write_error(path, text, exc)) from exc
        finally:
            os.close(fd)


def explain_write_error(path: Path, text: str, exc: OSError) -> str:
    what = f"writing '{text.strip()}' to {path}"
    reasons = {
        errno.ENODEV: "no such device",
        errno.EBUSY: "busy (already in use)",
        errno.EINVAL: "the kernel rejected the value",
        errno.EEXIST: "already there",
        errno.EPERM: "not permitted: run as root",
        errno.EACCES: "permission denied: run as root",
        errno.EBADF: "bad file descriptor",
        errno.ENOTSOCK: "not a socket",
    }
    reason = reasons.get(exc.errno or 0, os.strerror(exc.errno or 0))
    if path.name == "match_busid" and exc.errno in (errno.EIO, errno.ENOMEM):
        # Linux keeps the entry of a device unplugged while bound, and `del`
        # does not free it: 16 such busids fill the table until the module reloads.
        reason = (
            "usbip-host's table of 16 busids is full (Linux keeps the busid of every "
            "device unplugged while exported); when nothing is exported, free it with "
            "'modprobe -r usbip-host && modprobe usbip-host'"
        )
    return f"{what} failed: {reason}"


def read_attr(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        # Some attributes (serial of a dying device) fail with EIO or ENODEV.
        return None


def read_int(path: Path, base: int, default: int = 0) -> int:
    """An integer attribute; `default` when it is missing, empty or not a number."""
    text = read_attr(path)
    if not text:
        return default
    try:
        return int(text, base)
    except ValueError:
        return default


def driver_name(dev_dir: Path) -> str | None:
    """The name of the driver bound to the device in `dev_dir`, or None."""
    link = dev_dir / "driver"
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


def read_interfaces(dev_dir: Path, busid: str) -> tuple[Interface, ...]:
    """The device's interfaces: its interface directories once it is configured;
    before that (no configuration chosen: bConfigurationValue is empty, as when
    drivers_autoprobe is 0), those its descriptors promise for the first one."""
    found: list[tuple[int, Interface]] = []
    prefix = busid + ":"
    try:
        entries = list(dev_dir.iterdir())
    except OSError:
        return ()
    if not any(e.name.startswith(prefix) for e in entries) and not read_attr(
        dev_dir / "bConfigurationValue"
    ):
        try:
            return interfaces_from_descriptors((dev_dir / "descriptors").read_bytes())
        except OSError:
            return ()
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        number = read_int(entry / "bInterfaceNumber", 16, default=len(found))
        found.append(
            (
                number,
                Interface(
                    klass=read_int(entry / "bInterfaceClass", 16),
                    subclass=read_int(entry / "bInterfaceSubClass", 16),
                    protocol=read_int(entry / "bInterfaceProtocol", 16),
                ),
            )
        )
    return tuple(iface for _, iface in sorted(found, key=lambda item: item[0]))


def read_device(paths: SysfsPaths, busid: str) -> Device:
    validate_busid(busid)
    dev_dir = paths.device_dir(busid)
    if not dev_dir.exists():
        raise DeviceNotFound(busid)
    try:
        real = Path(os.path.realpath(dev_dir))
    except OSError as e:  # unplugged between the lstat and the readlink
        raise DeviceNotFound(busid) from e
    return device_from_attributes(
        busid,
        paths.unrooted(real),
        lambda name: read_attr(dev_dir / name),
        interfaces=read_interfaces(dev_dir, busid),
        driver=driver_name(dev_dir),
    )


def list_busids(paths: SysfsPaths) -> list[str]:
    try:
        names = os.listdir(paths.usb_devices)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if BUSID_RE.match(n)), key=busid_sort_key)


def busid_sort_key(busid: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.split(r"[-.]", busid))


def list_devices(paths: SysfsPaths) -> list[Device]:
    devices = []
    for busid in list_busids(paths):
        try:
            devices.append(read_device(paths, busid))
        except DeviceNotFound:
            continue  # unplugged while we listed
    return devices
