"""The kernel's USB/IP interfaces: usbip-host (stub) and vhci_hcd, via sysfs."""

from __future__ import annotations

import os
from pathlib import Path

from hotplug.kernel.stub import StubStatus, UsbipHost
from hotplug.kernel.sysfs import DeviceNotFound, KernelError, SysfsPaths
from hotplug.kernel.vhci import Vhci, VhciPort

__all__ = [
    "DeviceNotFound",
    "KernelError",
    "StubStatus",
    "SysfsPaths",
    "UsbipHost",
    "Vhci",
    "VhciPort",
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
        from hotplug.kernel.fake import FakeUsbipHost

        return FakeUsbipHost(paths, server)
    return UsbipHost(paths)


def make_vhci() -> Vhci:
    paths = SysfsPaths.from_env()
    server = _fake_server()
    if server is not None:
        from hotplug.kernel.fake import FakeVhci

        return FakeVhci(paths, server)
    return Vhci(paths)
