"""hotplug.udev: pyudev devices -> Device, monitor draining; hotplug.events: the FIFO source."""

from __future__ import annotations

import os
import select
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from hotplug.device.events import DeviceEvent
from hotplug.device.udev import UdevSource, device_from_udev, event_from_udev
from hotplug.kernel.sysfs import read_device
from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice
from hotplug.testing.fifo_events import JsonLinesSource, write_event
from hotplug.usb import Interface, Speed


@dataclass
class FakeAttributes:
    values: dict[str, bytes]

    def get(self, attribute: str, default: Any = None) -> Any:
        return self.values.get(attribute, default)


@dataclass
class FakeUdevDevice:
    """pyudev.Device's shape: attributes are bytes, properties are strings."""

    sys_name: str
    sys_path: str
    attrs: dict[str, bytes] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    driver: str | None = "usb"
    action: str | None = None
    subsystem: str | None = "usb"

    @property
    def attributes(self) -> FakeAttributes:
        return FakeAttributes(self.attrs)


KEYBOARD_ATTRS = {
    "busnum": b"1\n",
    "devnum": b"7\n",
    "speed": b"12\n",
    "idVendor": b"046d\n",
    "idProduct": b"c52b\n",
    "bcdDevice": b"1211\n",
    "bDeviceClass": b"00\n",
    "bDeviceSubClass": b"00\n",
    "bDeviceProtocol": b"00\n",
    "bConfigurationValue": b"1\n",
    "bNumConfigurations": b"1\n",
    "serial": b"ABC123\n",
    "manufacturer": b"Logitech\n",
    "product": b"USB Receiver\n",
}


def _sysfs_device(tmp_path: Path, busid: str = "1-1.2") -> Path:
    path = tmp_path / "devices/pci0000:00/usb1" / busid
    for number, klass in enumerate((0x03, 0x03)):
        iface = path / f"{busid}:1.{number}"
        iface.mkdir(parents=True)
        (iface / "bInterfaceNumber").write_text(f"{number:02x}\n")
        (iface / "bInterfaceClass").write_text(f"{klass:02x}\n")
        (iface / "bInterfaceSubClass").write_text("01\n")
        (iface / "bInterfaceProtocol").write_text(f"{number + 1:02x}\n")
    return path


def test_device_from_udev(tmp_path: Path) -> None:
    path = _sysfs_device(tmp_path)
    dev = FakeUdevDevice(
        "1-1.2", str(path), KEYBOARD_ATTRS, {"ID_MODEL": "USB_Receiver", "DEVTYPE": "usb_device"}
    )
    device = device_from_udev(dev)
    assert device is not None
    assert (device.busid, device.path, device.busnum, device.devnum) == ("1-1.2", str(path), 1, 7)
    assert device.speed == Speed.FULL
    assert (device.vendor, device.product, device.bcd_device) == (0x046D, 0xC52B, 0x1211)
    assert (device.serial, device.manufacturer, device.product_name) == (
        "ABC123",
        "Logitech",
        "USB Receiver",
    )
    assert device.interfaces == (Interface(3, 1, 1), Interface(3, 1, 2))
    assert device.driver == "usb"
    assert device.properties["ID_MODEL"] == "USB_Receiver"


def test_device_from_udev_skips_root_hubs_interfaces_and_vanished(tmp_path: Path) -> None:
    assert device_from_udev(FakeUdevDevice("usb1", "/sys/devices/x/usb1", KEYBOARD_ATTRS)) is None
    assert device_from_udev(FakeUdevDevice("1-1:1.0", "/x", KEYBOARD_ATTRS)) is None
    # Unplugged while we read: the attributes are gone.
    assert device_from_udev(FakeUdevDevice("1-1", str(tmp_path / "gone"), {})) is None


def test_device_from_udev_defaults_for_odd_attributes(tmp_path: Path) -> None:
    attrs = {"idVendor": b"1d6b", "idProduct": b"0104", "speed": b"weird", "busnum": b"x"}
    device = device_from_udev(FakeUdevDevice("2-1", str(tmp_path), attrs, driver=None))
    assert device is not None
    # Missing or unreadable numbers are 0 ("not known"), as read_device reads them
    # from sysfs: both sources go through usb.device_from_attributes.
    assert (device.speed, device.busnum, device.configuration_value) == (Speed.UNKNOWN, 0, 0)
    assert device.serial is None and device.driver is None and device.interfaces == ()


def test_udev_and_sysfs_read_one_device_alike(tmp_path: Path) -> None:
    """The same device, read from sysfs (coldplug, export) and from a udev event,
    is the same Device: both go through usb.device_from_attributes."""
    tree = FakeTree(tmp_path).create(stub=False, vhci=False)
    real = tree.add_device(FakeUsbDevice(busid="1-2", vendor=0x1D6B, product=0x0104, serial="S"))
    attrs = {p.name: p.read_bytes() for p in real.iterdir() if p.is_file()}
    from_udev = device_from_udev(FakeUdevDevice("1-2", str(real), attrs, driver="usb"))
    from_sysfs = read_device(tree.paths, "1-2")
    assert from_udev is not None and from_sysfs.driver == "usb"
    assert replace(from_sysfs, path=from_udev.path) == from_udev


@pytest.mark.parametrize(
    ("action", "expected"),
    [("add", "add"), ("bind", "add"), ("change", "add"), ("remove", "remove"), ("unbind", None)],
)
def test_event_from_udev_actions(tmp_path: Path, action: str, expected: str | None) -> None:
    dev = FakeUdevDevice("1-1.2", str(_sysfs_device(tmp_path)), KEYBOARD_ATTRS, action=action)
    event = event_from_udev(dev)
    assert (event.action if event else None) == expected
    if expected == "add":
        assert event is not None and event.device is not None and event.device.vendor == 0x046D
    if expected == "remove":
        assert event == DeviceEvent("remove", "1-1.2")


class PipeMonitor:
    """pyudev.Monitor's shape on a real pipe: readable exactly when events wait."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.queue: deque[Any] = deque()
        self.error: OSError | None = None

    def push(self, device: Any) -> None:
        self.queue.append(device)
        os.write(self.write_fd, b"x")

    def fileno(self) -> int:
        return self.read_fd

    def poll(self, timeout: float | None = None) -> Any:
        assert timeout == 0, "the daemon must never block in poll"
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if not self.queue:
            return None
        os.read(self.read_fd, 1)
        return self.queue.popleft()


class FakeContext:
    def __init__(self, devices: list[Any]) -> None:
        self.devices = devices
        self.asked: dict[str, Any] = {}

    def list_devices(self, **filters: Any) -> list[Any]:
        self.asked = filters
        return self.devices


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_udev_source_drains_the_monitor(tmp_path: Path) -> None:
    path = _sysfs_device(tmp_path)
    monitor = PipeMonitor()
    context = FakeContext([FakeUdevDevice("1-1.2", str(path), KEYBOARD_ATTRS)])
    source = UdevSource(context, monitor)
    coldplug = source.coldplug()
    assert [d.busid for d in coldplug] == ["1-1.2"]
    assert context.asked == {"subsystem": "usb", "DEVTYPE": "usb_device"}
    assert not _readable(source.fileno())
    monitor.push(FakeUdevDevice("1-1.2", str(path), KEYBOARD_ATTRS, action="bind"))
    monitor.push(FakeUdevDevice("usb2", "/x", KEYBOARD_ATTRS, action="add"))
    monitor.push(FakeUdevDevice("1-1.2", str(path), {}, action="remove"))
    assert _readable(source.fileno())
    events = source.read_events()
    assert [(e.action, e.busid) for e in events] == [("add", "1-1.2"), ("remove", "1-1.2")]
    assert not _readable(source.fileno())
    assert source.read_events() == []


class FilteringMonitor(PipeMonitor):
    """With pyudev's filter calls, recorded: what the kernel would let through."""

    def __init__(self) -> None:
        super().__init__()
        self.filters: list[tuple[str, str | None]] = [("usb", "usb_device")]

    def filter_by(self, subsystem: str, device_type: str | None = None) -> None:
        self.filters.append((subsystem, device_type))

    def remove_filter(self) -> None:
        self.filters = []


def test_while_claiming_root_hubs_interfaces_and_usb_drivers_are_reported(
    tmp_path: Path,
) -> None:
    """settings.claim: before-probe: what needs a driver without a policy decision
    (a root hub, an interface) and a USB driver registering; none of it otherwise."""
    monitor = FilteringMonitor()
    source = UdevSource(FakeContext([]), monitor)
    news = [
        FakeUdevDevice("usb3", "/sys/devices/platform/vhci_hcd.0/usb3", action="add"),
        FakeUdevDevice("1-1:1.0", "/sys/devices/x/usb1/1-1/1-1:1.0", action="add"),
        FakeUdevDevice("1-1:1.0", "/sys/devices/x/usb1/1-1/1-1:1.0", action="bind"),
        FakeUdevDevice("usbhid", "/sys/bus/usb/drivers/usbhid", action="add", subsystem="drivers"),
        FakeUdevDevice("hid-generic", "/sys/bus/hid/drivers/hid-generic", subsystem="drivers"),
        FakeUdevDevice(
            "usbhid", "/sys/bus/usb/drivers/usbhid", action="remove", subsystem="drivers"
        ),
    ]
    for dev in news:
        monitor.push(dev)
    assert source.read_events() == []  # not claiming: nothing of this
    source.claims(True)
    assert monitor.filters == [("usb", "usb_device"), ("usb", "usb_interface"), ("drivers", None)]
    for dev in news:
        monitor.push(dev)
    assert [(e.action, e.busid) for e in source.read_events()] == [
        ("waiting", "usb3"),
        ("waiting", "1-1:1.0"),
        ("driver", "usbhid"),
    ]
    source.claims(False)
    assert monitor.filters == [("usb", "usb_device")]


def test_udev_source_asks_for_a_rescan_when_events_were_lost() -> None:
    monitor = PipeMonitor()
    monitor.error = OSError(105, "No buffer space available")
    source = UdevSource(FakeContext([]), monitor)
    assert [e.action for e in source.read_events()] == ["rescan"]


def test_live_udev_enumeration() -> None:
    """Needs a udev database with USB devices; the real monitor is exercised in the VM tests."""
    if not Path("/run/udev/control").exists() or not Path("/sys/bus/usb/devices").is_dir():
        pytest.skip("no live udev here (no /run/udev/control or /sys/bus/usb)")
    source = UdevSource()
    try:
        for device in source.coldplug():
            assert device.busid and device.path.startswith("/sys/")
    finally:
        source.close()


# --------------------------------------------------------------------------- the FIFO source


def test_json_lines_source(tmp_path: Path) -> None:
    tree = FakeTree(tmp_path / "root").create()
    tree.add_device(FakeUsbDevice("1-1", 0x1D6B, 0x0104, serial="S1"), devnum=4)
    fifo = tmp_path / "events"
    source = JsonLinesSource(fifo, tree.paths)
    try:
        assert [d.busid for d in source.coldplug()] == ["1-1"]
        assert source.read_events() == []
        write_event(fifo, "add", "1-1")
        write_event(fifo, "remove", "1-1")
        with open(fifo, "w") as f:  # junk is logged and skipped, not fatal
            f.write(
                'not json\n{"action": "poke", "busid": "1-1"}\n{"action": "add", "busid": "usb1"}\n'
            )
            f.write('{"action": "add", "busid": "1-9"}\n{"action": "add", "bus')
        events = source.read_events()
        assert [(e.action, e.busid) for e in events] == [("add", "1-1"), ("remove", "1-1")]
        assert events[0].device is not None and events[0].device.serial == "S1"
        # The writers are gone but the FIFO does not read as EOF forever (no busy loop).
        assert not _readable(source.fileno())
        with open(fifo, "w") as f:
            f.write('id": "1-1"}\n')  # the rest of the half line above
        assert [e.action for e in source.read_events()] == ["add"]
    finally:
        source.close()
