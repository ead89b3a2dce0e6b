"""The USB bus's automatic driver probing: hold new devices back, hand them over.

Facts (docs/PROTOCOL.md, "Holding devices back: drivers_autoprobe"; checked on
Debian's 6.1 in the test VM):

- With `/sys/bus/usb/drivers_autoprobe` 0 the kernel still enumerates a new
  device (address, descriptors: its ids, strings and `descriptors` file are in
  sysfs, udev gets its "add") but probes no driver for it, so nothing chooses
  a configuration: `bConfigurationValue` is empty and it has no interfaces.
  The same holds for the root hub of a host controller registered meanwhile
  (`usbN`), behind which nothing enumerates until its hub driver runs.
- Writing a name to `/sys/bus/usb/drivers_probe` probes that one device (or
  interface) as the kernel would have: a device gets the generic driver
  `usb`, which chooses a configuration (one SET_CONFIGURATION), and its
  interfaces appear, without drivers: autoprobe 0 holds them back too, so
  each is probed by name as well. A root hub `usbN`'s interface is `N-0:1.0`.
- A driver registered while autoprobe is 0 (udev loading usb-storage for an
  interface that just appeared) does not look for devices to bind, so an
  interface probed before its module was loaded stays driverless until it is
  probed again; udev reports the registration (SUBSYSTEM=drivers,
  DEVPATH=/bus/usb/drivers/NAME).
- usbip-host takes an unconfigured device as it is (an explicit `bind`); the
  application side's SET_CONFIGURATION is then the only one the device sees.
  Its interfaces never get a driver while usbip-host holds the device (it
  claims the device's port), so they are left alone here.

Everything that is written goes through `SysfsWriter.write` (the fake kernel
in tests takes the kernel's part there).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from hotplug.kernel.stub import STUB_DRIVER
from hotplug.kernel.sysfs import (
    BUSID_RE,
    KernelError,
    SysfsPaths,
    SysfsWriter,
    busid_sort_key,
    driver_name,
    read_int,
)
from hotplug.usb import HUB_CLASS

ROOT_HUB_RE = re.compile(r"\Ausb([0-9]+)\Z")
INTERFACE_RE = re.compile(r"\A([0-9]+-[0-9]+(?:\.[0-9]+)*):[0-9]+\.[0-9]+\Z")


def device_of_interface(name: str) -> str | None:
    """`1-1.2` for the interface `1-1.2:1.0`; `usb3` for a root hub's `3-0:1.0`."""
    m = INTERFACE_RE.match(name)
    if m is None:
        return None
    bus, _, port = m.group(1).partition("-")
    return f"usb{bus}" if port == "0" else m.group(1)


def interface_prefix(device: str) -> str:
    """What the names of a device's interfaces start with: `1-1:`, or `3-0:` for `usb3`."""
    m = ROOT_HUB_RE.match(device)
    return f"{m.group(1)}-0:" if m else f"{device}:"


class UsbBus(SysfsWriter):
    """The usb bus's `drivers_autoprobe` and `drivers_probe`."""

    def __init__(self, paths: SysfsPaths | None = None) -> None:
        self.paths = paths or SysfsPaths.from_env()

    @property
    def autoprobe_file(self) -> Path:
        return self.paths.sys / "bus/usb/drivers_autoprobe"

    @property
    def probe_file(self) -> Path:
        return self.paths.sys / "bus/usb/drivers_probe"

    def autoprobe(self) -> bool | None:
        """Whether the kernel probes new USB devices by itself; None: no USB here."""
        try:
            text = self.autoprobe_file.read_text().strip()
        except OSError:
            return None
        return text != "0"

    def set_autoprobe(self, on: bool) -> None:
        self.write(self.autoprobe_file, "1" if on else "0")

    # -- what waits

    def _dir(self, name: str) -> Path:
        """A device's directory, or an interface's (a child of its device's)."""
        device = device_of_interface(name)
        if device is None:
            return self.paths.usb_devices / name
        return self.paths.usb_devices / device / name

    def _class(self, name: str) -> int:
        return read_int(self._dir(name) / "bDeviceClass", 16)

    def devices(self) -> list[str]:
        """Every USB device (root hubs too), hubs first: root hubs, then hubs
        nearer the root, then the rest. A device behind a hub only appears once
        the hub has a driver, so this is also the order to hand them over in."""
        try:
            names = os.listdir(self.paths.usb_devices)
        except OSError:
            return []

        def order(name: str) -> tuple[int, int, tuple[int, ...]]:
            root = ROOT_HUB_RE.match(name)
            if root:
                return (0, 0, (int(root.group(1)),))
            key = busid_sort_key(name)
            return (1 if self._class(name) == HUB_CLASS else 2, len(key), key)

        return sorted((n for n in names if ROOT_HUB_RE.match(n) or BUSID_RE.match(n)), key=order)

    def interfaces(self, device: str) -> list[str]:
        prefix = interface_prefix(device)
        try:
            names = os.listdir(self._dir(device))
        except OSError:
            return []
        return sorted(n for n in names if n.startswith(prefix) and INTERFACE_RE.match(n))

    def waiting(self) -> list[str]:
        """Devices without a driver, in `devices()` order: held back by autoprobe 0
        (or given up by a driver and not claimed since)."""
        return [d for d in self.devices() if driver_name(self._dir(d)) is None]

    def driverless_interfaces(self, device: str) -> list[str]:
        """Interfaces of `device` without a driver, unless usbip-host holds the
        device (its interfaces are the far side's business then)."""
        if driver_name(self._dir(device)) in (None, STUB_DRIVER):
            return []
        return [i for i in self.interfaces(device) if driver_name(self._dir(i)) is None]

    # -- handing over

    def probe(self, name: str) -> None:
        """Probe one device or interface as the kernel would have on its own."""
        self.write(self.probe_file, name)

    def hand_over(self, device: str) -> list[str]:
        """Give a device (and its interfaces) to its usual drivers; return the names
        probed. A device bound to usbip-host meanwhile is left alone; one that
        went meanwhile is no error."""
        probed: list[str] = []
        try:
            if driver_name(self._dir(device)) is None:
                self.probe(device)
                probed.append(device)
            for interface in self.driverless_interfaces(device):
                self.probe(interface)
                probed.append(interface)
        except KernelError:
            if self._dir(device).exists():
                raise
        return probed

    def hand_over_interface(self, name: str) -> bool:
        """Probe one interface that appeared, if it still has no driver and its
        device has one other than usbip-host (a configured device of this machine)."""
        device = device_of_interface(name)
        if device is None or name not in self.driverless_interfaces(device):
            return False
        try:
            self.probe(name)
        except KernelError:
            if self._dir(name).exists():
                raise
            return False
        return True

    def sweep(self, *, devices: bool = True) -> list[str]:
        """Hand every waiting device (unless `devices` is false: only the driverless
        interfaces of devices that have a driver) to the usual drivers, hubs first:
        what the kernel does when a driver registers, or would have done with
        autoprobe on."""
        probed: list[str] = []
        for device in self.devices():
            if not devices and driver_name(self._dir(device)) is None:
                continue  # waits for the daemon's decision
            with contextlib.suppress(KernelError):  # one device's refusal stops no other
                probed += self.hand_over(device)
        return probed

    def restore(self) -> list[str]:
        """Autoprobe back on, then everything that waited handed over; the names probed."""
        self.set_autoprobe(True)
        return self.sweep()
