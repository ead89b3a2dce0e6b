"""The kernel's USB/IP interfaces, via sysfs: usbip-host (stub.py, the device
side), vhci_hcd (vhci.py, the application side), usbip-vudc (vudc.py), and the
reading of devices (sysfs.py).

`make_stub`, `make_vhci` and `make_bus` are the one seam where the product may load a
test double: with USBIP_HOTPLUG_FAKE_KERNEL set they return the fake kernel's
writers (hotplug.testing.fake_kernel), which send each write to a process
playing the kernel. Every program gets its stub, vhci and usb bus (autoprobe.py:
drivers_autoprobe, drivers_probe) from here.
"""

from __future__ import annotations

import os
from pathlib import Path

from hotplug.kernel.autoprobe import UsbBus
from hotplug.kernel.stub import StubStatus, UsbipHost
from hotplug.kernel.sysfs import DeviceNotFound, KernelError, SysfsPaths
from hotplug.kernel.vhci import Vhci, VhciPort

__all__ = [
    "DeviceNotFound",
    "KernelError",
    "StubStatus",
    "SysfsPaths",
    "UsbBus",
    "UsbipHost",
    "Vhci",
    "VhciPort",
    "make_bus",
    "make_stub",
    "make_vhci",
]


def _fake_server() -> Path | None:
    server = os.environ.get("USBIP_HOTPLUG_FAKE_KERNEL")
    return Path(server) if server else None


def make_stub() -> UsbipHost:
    """The stub driver interface; the test kernel when the environment asks for it."""
    paths = SysfsPaths.from_env()
    server = _fake_server()
    if server is not None:
        from hotplug.testing.fake_kernel import FakeUsbipHost

        return FakeUsbipHost(paths, server)
    return UsbipHost(paths)


def make_vhci() -> Vhci:
    paths = SysfsPaths.from_env()
    server = _fake_server()
    if server is not None:
        from hotplug.testing.fake_kernel import FakeVhci

        return FakeVhci(paths, server)
    return Vhci(paths)


def make_bus() -> UsbBus:
    """The usb bus's drivers_autoprobe and drivers_probe (settings.claim: before-probe)."""
    paths = SysfsPaths.from_env()
    server = _fake_server()
    if server is not None:
        from hotplug.testing.fake_kernel import FakeUsbBus

        return FakeUsbBus(paths, server)
    return UsbBus(paths)
