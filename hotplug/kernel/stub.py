"""usbip-host ("the stub"): bind a device, hand it a socket, give it back.

Facts (docs/PROTOCOL.md, "usbip-host's busid table"; checked on Debian's 6.1
kernel): bind = `match_busid add`, unbind from the current driver, write the
busid to `usbip-host/bind`. Per device, `usbip_status` (1 available, 2 used,
3 error) and `usbip_sockfd`.

Giving a device back is where the kernel can be crashed. `usbip-host/rebind`
is the only write that frees a table entry, and it calls device_attach() on
the device usbip-host's probe last recorded for that entry, with no check and
no reference: NULL for an entry no device was ever bound through, a freed
device for one whose device was unplugged after usbip-host let it go. So
`rebind` is written only while (1) the device at that busid is bound to
usbip-host right now (its probe recorded *this* device) and (2) this process
holds the device open through usbfs (/dev/bus/usb/BBB/DDD), which keeps the
kernel's struct usb_device alive even if it is unplugged during the write.
Where that cannot be had, the entry is left in the table (`leftovers()`)
rather than risk an oops.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path

from hotplug.faultpoints import reach
from hotplug.kernel.sysfs import (
    DeviceNotFound,
    KernelError,
    SysfsPaths,
    SysfsWriter,
    driver_name,
    read_attr,
    read_device,
    validate_busid,
)
from hotplug.usb import Device

STUB_DRIVER = "usbip-host"
# stub_main.c's busid_table: entries are freed only by `rebind` or a module reload.
TABLE_SLOTS = 16
# How long release() waits for a device in the middle of a reset to show its
# usbfs file again.
HOLD_WAIT = 5.0
# How long release() waits for usbip-host to be done with a link that ended
# (its shutdown and its reset of the device; 0.1-0.3 s in the VM).
LINK_END_WAIT = 5.0


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

    def table(self) -> list[str]:
        """The busids in usbip-host's table (`match_busid` lists them on one line)."""
        text = read_attr(self.paths.stub_driver / "match_busid") or ""
        return text.split()

    def leftovers(self) -> list[str]:
        """Table entries with no device bound through them: slots lost until a module
        reload, unless a device at that busid is bound and given back again."""
        return [b for b in self.table() if self._driver_now(b) != STUB_DRIVER]

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
        reach("bind.after-match-add")
        try:
            if device.driver is not None:
                self.write(dev_dir / "driver/unbind", busid)
                reach("bind.after-driver-unbind")
            self.write(self.paths.stub_driver / "bind", busid)
            reach("bind.after-stub-bind")
        except BaseException:
            # Pulled out mid-bind, typically; or a one-shot command stopped by a
            # signal (issue 12, finding 8). Never `rebind` blindly here: the
            # entry may not point at this device (see the module's docstring).
            with contextlib.suppress(KernelError):
                self.release(busid, device.devid)
            raise

    def release(self, busid: str, devid: int | None = None) -> None:
        """Give the device back to its usual driver, without risking a kernel oops.

        Idempotent. A device that is gone leaves its table entry behind (nothing
        can free it safely); see `leftovers()`.

        `devid` (busnum << 16 | devnum) names the device the caller worked on.
        If another device is at `busid` now (that one was unplugged and a new
        one plugged in), the new one is not the caller's and is left alone: in
        the moment after plug-in it has no driver yet, and taking it for a device
        whose bind did not finish would claim a stranger. Without `devid`, a
        device with no driver is handed to the usual drivers, never bound here.
        """
        validate_busid(busid)
        if not self.loaded:
            return
        with self.held(busid) as device:
            if device is None or (devid is not None and device.devid != devid):
                return
            driver = device.driver
            if driver is None and devid is not None and busid in self.table():
                # Taken from its driver by our bind that did not finish: bind it to
                # usbip-host first, so that the entry records this very device and
                # `rebind` below frees the entry safely.
                with contextlib.suppress(KernelError):
                    self.write(self.paths.stub_driver / "bind", busid)
                driver = self._driver_now(busid)
            if driver == STUB_DRIVER:
                self._end_link(busid)
                reach("release.before-unbind")
                # Pulled out just now, usbip-host lets go of it by itself, and its
                # entry still records this device, which we hold.
                self._write_unless_gone(self.paths.stub_driver / "unbind", busid)
                reach("release.before-rebind")
                # Safe: usbip-host's probe recorded this device, and we hold it
                # (so even a device unplugged meanwhile is alive for the write).
                self._write_unless_gone(self.paths.stub_driver / "rebind", busid)
            elif driver is None:
                self.write(self.paths.sys / "bus/usb/drivers_probe", busid)
            else:
                # `del` frees only an entry a failed rebind left; it never touches
                # the device, so it is always safe.
                with contextlib.suppress(KernelError):
                    self.write(self.paths.stub_driver / "match_busid", f"del {busid}")

    @contextlib.contextmanager
    def held(self, busid: str) -> Iterator[Device | None]:
        """The device at `busid`, kept alive in the kernel by an open usbfs file
        for the duration; None if there is no device (or it was replaced)."""
        deadline = time.monotonic() + HOLD_WAIT
        while True:
            try:
                device = read_device(self.paths, busid)
            except DeviceNotFound:
                yield None
                return
            node = self.paths.usbfs_node(device.busnum, device.devnum)
            try:
                fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
                break
            except OSError as exc:
                if not self.paths.device_dir(busid).exists() or exc.errno == errno.ENODEV:
                    yield None
                    return
                # usbip-host resets the device when its link ends, and during the
                # reset sysfs shows devnum 0 (seen in the VM, under systemd): wait
                # for the reset to finish rather than give up on the release.
                if exc.errno == errno.ENOENT and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise KernelError(
                    f"cannot open {node} to hold {busid} while giving it back ({exc.strerror});"
                    " not writing usbip-host's rebind without that (Linux would oops if the"
                    " device went meanwhile): the device stays with usbip-host. Under systemd,"
                    " the unit needs DeviceAllow=char-usb_device r and /dev/bus/usb"
                ) from exc
        try:
            try:
                now = read_device(self.paths, busid)
            except DeviceNotFound:
                yield None
                return
            # devnum grows with every enumeration on a bus: the same number means
            # the file we hold is the device sysfs shows at this busid.
            yield now if (now.busnum, now.devnum) == (device.busnum, device.devnum) else None
        finally:
            os.close(fd)

    def _end_link(self, busid: str) -> None:
        """Let usbip-host finish with the device's link before it is given back.

        When a link ends (stopped here, or closed by the far side), usbip-host's
        event handler shuts it down and then resets the device, and only then
        reads "available" (1) or "error" (3) instead of "used" (2). Giving the
        device to its driver while that reset may still come is a race with the
        driver's probe (in the VM once: the disk offline right after it came
        home, and a task hung). So a link still up is stopped, and the handler
        gets LINK_END_WAIT seconds to be done.
        """
        if self.status(busid) != StubStatus.USED:
            return
        with contextlib.suppress(KernelError):
            self.write(self.paths.device_dir(busid) / "usbip_sockfd", "-1")
        deadline = time.monotonic() + LINK_END_WAIT
        while self.status(busid) == StubStatus.USED and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the kernel's state: it has no event for this

    def _driver_now(self, busid: str) -> str | None:
        return driver_name(self.paths.device_dir(busid))

    def _write_unless_gone(self, path: Path, busid: str) -> None:
        """Write the busid to `path`; a refusal because the device went is no error."""
        try:
            self.write(path, busid)
        except KernelError:
            if self.paths.device_dir(busid).exists():
                raise

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
