"""usbip-host ("the stub"): bind a device, hand it a socket, give it back.

Facts (PROTOCOL.md, checked on Debian's 6.1 kernel): bind = unbind from the
current driver, `match_busid add`, write the busid to `usbip-host/bind`;
release = `usbip-host/unbind`, `match_busid del`, `rebind`. Per device,
`usbip_status` (1 available, 2 used, 3 error) and `usbip_sockfd`.
"""

from __future__ import annotations

import contextlib
import socket
from enum import IntEnum

from hotplug.device import Device
from hotplug.kernel.sysfs import (
    DeviceNotFound,
    KernelError,
    SysfsPaths,
    SysfsWriter,
    read_attr,
    read_device,
    validate_busid,
)

STUB_DRIVER = "usbip-host"


class StubStatus(IntEnum):
    AVAILABLE = 1
    USED = 2
    ERROR = 3


class UsbipHost(SysfsWriter):
    def __init__(self, paths: SysfsPaths | None = None) -> None:
        self.paths = paths or SysfsPaths.from_env()

    @property
    def loaded(self) -> bool:
        return self.paths.stub_driver.is_dir()

    def require_loaded(self) -> None:
        if not self.loaded:
            raise KernelError("usbip-host is not loaded: run 'modprobe usbip-host' as root")

    def driver_of(self, busid: str) -> str | None:
        return read_device(self.paths, busid).driver

    def status(self, busid: str) -> StubStatus | None:
        """The stub's status, or None when the device is not bound to usbip-host."""
        text = read_attr(self.paths.device_dir(busid) / "usbip_status")
        if text is None:
            return None
        try:
            return StubStatus(int(text))
        except ValueError:
            return StubStatus.ERROR

    def bind(self, busid: str, device: Device | None = None) -> None:
        """Take the device from its driver and give it to usbip-host.

        Idempotent: a device already bound to usbip-host is left as it is.
        `device` saves reading sysfs again when the caller just did.
        """
        validate_busid(busid)
        self.require_loaded()
        if device is None:
            device = read_device(self.paths, busid)
        if device.is_hub:
            raise KernelError(f"{busid} is a USB hub; hubs cannot be exported")
        if device.driver == STUB_DRIVER:
            return
        dev_dir = self.paths.device_dir(busid)
        # The table entry first: if usbip-host has no room (16 busids), the device
        # has not been taken from its driver yet.
        self.write(self.paths.stub_driver / "match_busid", f"add {busid}")
        try:
            if device.driver is not None:
                self.write(dev_dir / "driver/unbind", busid)
            self.write(self.paths.stub_driver / "bind", busid)
        except KernelError:
            self._reprobe(busid)  # back to the driver we took it from; entry dropped
            raise

    def release(self, busid: str) -> None:
        """Give the device back to its usual driver. Idempotent."""
        validate_busid(busid)
        if not self.loaded:
            return
        try:
            driver = self.driver_of(busid)
        except DeviceNotFound:
            self._forget(busid)
            return
        if driver == STUB_DRIVER:
            self.write(self.paths.stub_driver / "unbind", busid)
        if driver in (STUB_DRIVER, None):
            self._reprobe(busid)
        else:
            self._forget(busid)

    def hand_over(self, busid: str, sock: socket.socket) -> None:
        """Start the data phase: the kernel takes its own reference to `sock`.

        The kernel resolves the fd number in the writing process, which is why
        this process (the one holding the socket) must do the write.
        """
        if self.status(busid) is None:
            raise KernelError(f"{busid} is not bound to usbip-host")
        self.write(self.paths.device_dir(busid) / "usbip_sockfd", str(sock.fileno()))

    def stop(self, busid: str) -> None:
        """Stop the data phase (the kernel closes its end of the connection)."""
        if self.status(busid) == StubStatus.USED:
            self.write(self.paths.device_dir(busid) / "usbip_sockfd", "-1")

    def _forget(self, busid: str) -> None:
        # ENODEV: not in the table, nothing to forget
        with contextlib.suppress(KernelError):
            self.write(self.paths.stub_driver / "match_busid", f"del {busid}")

    def _reprobe(self, busid: str) -> None:
        # `rebind` marks the busid so usbip-host's own probe skips it, probes the
        # usual driver and drops the busid from match_busid: one atomic step.
        # Forgetting first and then probing would let usbip-host grab it again.
        with contextlib.suppress(KernelError):  # ENODEV: not in match_busid, or gone
            self.write(self.paths.stub_driver / "rebind", busid)
            return
        self._forget(busid)
        if self.paths.device_dir(busid).exists():
            self.write(self.paths.sys / "bus/usb/drivers_probe", busid)
