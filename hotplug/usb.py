"""What we know about one USB device on the device side.

`Device` is plain data: built from sysfs (hotplug.kernel.sysfs) or from a udev
event (hotplug.device.udev), both through `device_from_attributes` so that
the two agree, and consumed by the policy matcher and the exporter. This
module does no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

HUB_CLASS = 0x09


class Speed(IntEnum):
    """USB speed as carried in the USB/IP device record (enum usb_device_speed)."""

    UNKNOWN = 0
    LOW = 1
    FULL = 2
    HIGH = 3
    WIRELESS = 4
    SUPER = 5
    SUPER_PLUS = 6

    @property
    def needs_superspeed_port(self) -> bool:
        return self >= Speed.SUPER


# The sysfs `speed` attribute is in Mbit/s; map it to the wire enum.
SYSFS_SPEEDS: Mapping[str, Speed] = {
    "1.5": Speed.LOW,
    "12": Speed.FULL,
    "480": Speed.HIGH,
    "53.3-480": Speed.WIRELESS,
    "5000": Speed.SUPER,
    "10000": Speed.SUPER_PLUS,
    "20000": Speed.SUPER_PLUS,
}


@dataclass(frozen=True)
class Interface:
    klass: int
    subclass: int
    protocol: int


@dataclass(frozen=True)
class Device:
    busid: str
    path: str  # sysfs path of the device, e.g. /sys/devices/.../1-1
    busnum: int
    devnum: int
    speed: Speed
    vendor: int  # idVendor
    product: int  # idProduct
    bcd_device: int = 0
    device_class: int = 0
    device_subclass: int = 0
    device_protocol: int = 0
    configuration_value: int = 1
    num_configurations: int = 1
    interfaces: tuple[Interface, ...] = ()
    serial: str | None = None
    manufacturer: str | None = None
    product_name: str | None = None
    driver: str | None = None  # driver bound to the device (usb, usbip-host, ...)
    properties: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def devid(self) -> int:
        return (self.busnum << 16) | self.devnum

    @property
    def is_hub(self) -> bool:
        return self.device_class == HUB_CLASS

    @property
    def on_vhci(self) -> bool:
        """Attached through vhci_hcd: imported from another machine, not plugged in here.

        Exporting it again would send it back where it came from, and on a
        machine that is both sides it loops (seen in the demo VM).
        """
        return "/vhci_hcd." in self.path

    @property
    def vid_pid(self) -> str:
        return f"{self.vendor:04x}:{self.product:04x}"


# USB descriptor types (USB 2.0, table 9-5) and the one configuration descriptor field read.
_DT_CONFIG = 0x02
_DT_INTERFACE = 0x04
_DEVICE_DESCRIPTOR_LENGTH = 18


def interfaces_from_descriptors(raw: bytes) -> tuple[Interface, ...]:
    """The interfaces of the first configuration in a device's `descriptors` file.

    The kernel keeps the device descriptor (18 bytes) and then every
    configuration descriptor with all that follows it, as the device sent
    them, whether or not a configuration is chosen yet. A device that no driver
    has configured (settings.claim: before-probe) has no interface directories
    in sysfs; this is what it will have once configured with its first
    configuration (the one the kernel chooses for all but a few multi-
    configuration devices). Alternate settings other than 0 are skipped.
    Malformed or cut-short data yields what was read up to there.
    """
    interfaces: list[Interface] = []
    pos = _DEVICE_DESCRIPTOR_LENGTH
    configs = 0
    while pos + 2 <= len(raw):
        length, kind = raw[pos], raw[pos + 1]
        if length < 2:
            break  # a zero length would loop for ever; the rest cannot be trusted
        if kind == _DT_CONFIG:
            configs += 1
            if configs > 1:
                break
        elif (
            kind == _DT_INTERFACE
            and configs == 1
            and length >= 9
            and pos + 9 <= len(raw)
            and raw[pos + 3] == 0  # bAlternateSetting
        ):
            interfaces.append(Interface(raw[pos + 5], raw[pos + 6], raw[pos + 7]))
        pos += length
    return tuple(interfaces)


def device_from_attributes(
    busid: str,
    path: str,
    attribute: Callable[[str], str | None],
    *,
    interfaces: tuple[Interface, ...],
    driver: str | None,
    properties: Mapping[str, str] | None = None,
) -> Device:
    """A `Device` from its sysfs attributes, however they are read (files under
    /sys, a udev device's attributes): `attribute(name)` is the text, stripped,
    or None. A number missing or unreadable is 0, the kernel's "not known" (an
    unconfigured device shows an empty bConfigurationValue)."""

    def number(name: str, base: int) -> int:
        text = attribute(name)
        try:
            return int(text, base) if text else 0
        except ValueError:
            return 0

    return Device(
        busid=busid,
        path=path,
        busnum=number("busnum", 10),
        devnum=number("devnum", 10),
        speed=SYSFS_SPEEDS.get(attribute("speed") or "", Speed.UNKNOWN),
        vendor=number("idVendor", 16),
        product=number("idProduct", 16),
        bcd_device=number("bcdDevice", 16),
        device_class=number("bDeviceClass", 16),
        device_subclass=number("bDeviceSubClass", 16),
        device_protocol=number("bDeviceProtocol", 16),
        configuration_value=number("bConfigurationValue", 10),
        num_configurations=number("bNumConfigurations", 10),
        interfaces=interfaces,
        serial=attribute("serial"),
        manufacturer=attribute("manufacturer"),
        product_name=attribute("product"),
        driver=driver,
        properties=dict(properties or {}),
    )
