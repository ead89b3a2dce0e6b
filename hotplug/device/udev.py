"""pyudev: coldplug enumeration and the netlink monitor, as `Device` events.

pyudev has no asyncio adapter; the daemon watches `UdevSource.fileno()` with
`loop.add_reader` and drains the monitor without blocking. The translation
from a pyudev device (`device_from_udev`) takes any object with pyudev's
shape (`UdevDevice`), so it is tested with a small fake.

udev actions: "add", "bind" and "change" all mean "present, here are its
details now". The "bind" that follows "add" is the one to trust for
interfaces: the usual driver has chosen a configuration by then. "unbind"
is ignored (the device is still there; our own binding to usbip-host
causes one). Root hubs ("usb1") are not devices we can export.

Holding devices back (settings.claim: before-probe), the monitor also listens
to interfaces and to driver registrations (`claims`), which become "waiting"
and "driver" events (device/events.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from hotplug import log
from hotplug.device.events import DeviceEvent
from hotplug.kernel.autoprobe import INTERFACE_RE, ROOT_HUB_RE
from hotplug.kernel.sysfs import BUSID_RE, KernelError, SysfsPaths, list_devices, read_interfaces
from hotplug.usb import Device, device_from_attributes

logger = log.get("hotplug.udev")

PRESENT_ACTIONS = frozenset({"add", "bind", "change", "move"})


class UdevAttributes(Protocol):
    def get(self, attribute: str, default: Any = None) -> Any: ...


class UdevDevice(Protocol):
    """The part of pyudev.Device we use."""

    @property
    def sys_name(self) -> str: ...

    @property
    def subsystem(self) -> str | None: ...

    @property
    def sys_path(self) -> str: ...

    @property
    def driver(self) -> str | None: ...

    @property
    def action(self) -> str | None: ...

    @property
    def properties(self) -> Mapping[str, str]: ...

    @property
    def attributes(self) -> UdevAttributes: ...


class UdevMonitor(Protocol):
    """The part of pyudev.Monitor we use (tests pass a fake built on a pipe)."""

    def fileno(self) -> int: ...

    def poll(self, timeout: float | None = None) -> Any: ...


def _text(attrs: UdevAttributes, name: str) -> str | None:
    raw = attrs.get(name)
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text.strip()


def _number(attrs: UdevAttributes, name: str, base: int) -> int | None:
    text = _text(attrs, name)
    if not text:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def device_from_udev(dev: UdevDevice) -> Device | None:
    """A `Device` from a pyudev device, or None if it is not an exportable USB device
    (a root hub, an interface) or vanished while we read it."""
    busid = dev.sys_name
    if not BUSID_RE.match(busid):
        return None
    attrs = dev.attributes
    vendor = _number(attrs, "idVendor", 16)
    product = _number(attrs, "idProduct", 16)
    if vendor is None or product is None:
        return None  # unplugged while we looked: its attributes are gone

    return device_from_attributes(
        busid,
        dev.sys_path,
        lambda name: _text(attrs, name),
        # Interfaces are child directories in sysfs; reading them there is cheaper
        # than a udev enumeration of the children, and the same on every kernel.
        interfaces=read_interfaces(Path(dev.sys_path), busid),
        driver=dev.driver,
        properties=dict(dev.properties),
    )


USB_DRIVERS = "/bus/usb/drivers/"
CLAIM_ACTIONS = frozenset({"waiting", "driver"})  # only while holding devices back


def event_from_udev(dev: UdevDevice) -> DeviceEvent | None:
    """A monitor event as a `DeviceEvent`, or None if it is nothing for us."""
    busid = dev.sys_name
    action = dev.action or "add"
    if not BUSID_RE.match(busid):
        if action != "add":
            return None
        if dev.subsystem == "drivers":
            return DeviceEvent("driver", busid) if USB_DRIVERS in dev.sys_path else None
        if dev.subsystem == "usb" and (ROOT_HUB_RE.match(busid) or INTERFACE_RE.match(busid)):
            return DeviceEvent("waiting", busid)
        return None
    if action == "remove":
        return DeviceEvent("remove", busid)
    if action not in PRESENT_ACTIONS:
        return None
    device = device_from_udev(dev)
    return DeviceEvent("add", busid, device) if device is not None else None


def devices_from_udev(devices: Iterable[UdevDevice]) -> list[Device]:
    found = [device_from_udev(dev) for dev in devices]
    return [d for d in found if d is not None]


class UdevSource:
    """Coldplug from the udev database, then the udev netlink monitor.

    The monitor starts before the enumeration, so that a device plugged in
    between the two is not missed (it may be reported twice, which is harmless).
    """

    def __init__(self, context: Any = None, monitor: UdevMonitor | None = None) -> None:
        if context is None or monitor is None:
            import pyudev

            context = context or pyudev.Context()
            if monitor is None:
                real = pyudev.Monitor.from_netlink(context)
                real.filter_by("usb", "usb_device")
                real.start()
                monitor = real
        self.context = context
        self.monitor = monitor
        self.claiming = False

    def claims(self, on: bool) -> None:
        """Interfaces and driver registrations too (filters run in the kernel:
        without them, those events never wake us)."""
        if on == self.claiming:
            return
        filter_by = getattr(self.monitor, "filter_by", None)
        if filter_by is None:
            self.claiming = on
            return
        if on:
            filter_by("usb", "usb_interface")
            filter_by("drivers")
        else:
            getattr(self.monitor, "remove_filter")()  # noqa: B009 (not in UdevMonitor)
            filter_by("usb", "usb_device")
        self.claiming = on

    def coldplug(self) -> list[Device]:
        devices = self.context.list_devices(subsystem="usb", DEVTYPE="usb_device")
        return devices_from_udev(devices)

    def fileno(self) -> int:
        return self.monitor.fileno()

    def read_events(self) -> list[DeviceEvent]:
        events = []
        while True:
            try:
                dev = self.monitor.poll(timeout=0)
            except OSError as exc:
                # ENOBUFS: the socket overflowed and events were lost. The daemon
                # enumerates again rather than trusting an incomplete picture.
                logger.warning("udev monitor: %s; enumerating devices again", exc)
                events.append(DeviceEvent("rescan", ""))
                break
            if dev is None:
                break
            event = event_from_udev(dev)
            if event is not None and (self.claiming or event.action not in CLAIM_ACTIONS):
                events.append(event)
        return events

    def close(self) -> None:
        stop = getattr(self.monitor, "stop", None)
        if stop is not None:
            with contextlib.suppress(Exception):
                stop()


def enumerate_devices(paths: SysfsPaths) -> list[Device]:
    """The devices plugged in now, with udev properties when udev is there to ask.

    Under a test root (USBIP_HOTPLUG_SYSFS_ROOT) only sysfs is read.
    """
    if paths.root == Path("/"):
        try:
            import pyudev

            return devices_from_udev(
                pyudev.Context().list_devices(subsystem="usb", DEVTYPE="usb_device")
            )
        except (ImportError, OSError) as exc:
            log.event(logger, logging.DEBUG, f"udev unavailable ({exc}); reading sysfs")
    try:
        return list_devices(paths)
    except KernelError:
        return []
