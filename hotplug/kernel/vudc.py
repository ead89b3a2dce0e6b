"""usbip-vudc: export a USB gadget (configfs) instead of a physical device.

Checked on Debian's 6.1 kernel (PROTOCOL.md, vUDC): the module registers UDCs
named usbip-vudc.N; a gadget bound to one is exported like a device, with no
bind/unbind. Its record: path = the platform device's sysfs path, busid = the
UDC name, busnum = devnum = 0, ids and classes from `dev_desc` (the 18-byte
device descriptor, little-endian, readable once a gadget is bound), speed from
the UDC's `current_speed`. The socket goes to the platform device's
`usbip_sockfd`, whose `usbip_status` goes 1 -> 2; writing -1 stops it.
"""

from __future__ import annotations

import os
import re
import socket
import struct

from hotplug.kernel.sysfs import KernelError, SysfsPaths, SysfsWriter, read_attr
from hotplug.usb import Speed
from hotplug.wire.protocol import DeviceRecord

VUDC_RE = re.compile(r"\Ausbip-vudc\.[0-9]+\Z")
DESCRIPTOR = struct.Struct("<BBHBBBBHHHBBBB")

# usb_speed_string() in the kernel's drivers/usb/common/common.c
UDC_SPEEDS = {
    "UNKNOWN": Speed.UNKNOWN,
    "low-speed": Speed.LOW,
    "full-speed": Speed.FULL,
    "high-speed": Speed.HIGH,
    "wireless": Speed.WIRELESS,
    "super-speed": Speed.SUPER,
    "super-speed-plus": Speed.SUPER_PLUS,
}


def record_from_descriptor(name: str, path: str, desc: bytes, speed_text: str) -> DeviceRecord:
    """The export record of a vUDC from its device descriptor. Pure."""
    if len(desc) < DESCRIPTOR.size or desc[1] != 0x01:
        raise KernelError(
            f"{name}: no device descriptor yet (is a gadget bound to it? "
            f"write '{name}' to the gadget's UDC file)"
        )
    (
        _,
        _,
        _bcd_usb,
        klass,
        subclass,
        protocol,
        _mps,
        vendor,
        product,
        bcd_device,
        _imanufacturer,
        _iproduct,
        _iserial,
        num_configurations,
    ) = DESCRIPTOR.unpack_from(desc)
    return DeviceRecord(
        path=path,
        busid=name,
        busnum=0,
        devnum=0,
        speed=UDC_SPEEDS.get(speed_text.strip(), Speed.UNKNOWN),
        id_vendor=vendor,
        id_product=product,
        bcd_device=bcd_device,
        device_class=klass,
        device_subclass=subclass,
        device_protocol=protocol,
        configuration_value=0,
        num_configurations=num_configurations,
        num_interfaces=0,
    )


class Vudc(SysfsWriter):
    def __init__(self, paths: SysfsPaths | None = None) -> None:
        self.paths = paths or SysfsPaths.from_env()

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.paths.sys / "class/udc")
        except FileNotFoundError:
            return []
        return sorted(n for n in entries if VUDC_RE.match(n))

    def require(self, name: str) -> None:
        if not VUDC_RE.match(name):
            raise KernelError(f"'{name}' is not a vUDC name (expected usbip-vudc.N)")
        if not (self.paths.platform / name).is_dir():
            if not self.names():
                raise KernelError("usbip-vudc is not loaded: run 'modprobe usbip-vudc' as root")
            raise KernelError(f"no vUDC named {name} (have: {', '.join(self.names())})")

    def status(self, name: str) -> int | None:
        text = read_attr(self.paths.platform / name / "usbip_status")
        return int(text) if text and text.isdigit() else None

    def gadget_bound(self, name: str) -> bool:
        desc = self._descriptor(name)
        return len(desc) >= DESCRIPTOR.size and desc[1] == 0x01

    def _descriptor(self, name: str) -> bytes:
        try:
            return (self.paths.platform / name / "dev_desc").read_bytes()
        except OSError:
            return b""

    def record(self, name: str) -> DeviceRecord:
        self.require(name)
        speed = read_attr(self.paths.sys / "class/udc" / name / "current_speed") or "UNKNOWN"
        path = self.paths.unrooted(self.paths.platform / name)
        return record_from_descriptor(name, path, self._descriptor(name), speed)

    def hand_over(self, name: str, sock: socket.socket) -> None:
        self.write(self.paths.platform / name / "usbip_sockfd", str(sock.fileno()))

    def stop(self, name: str) -> None:
        if self.status(name) == 2:
            try:
                self.write(self.paths.platform / name / "usbip_sockfd", "-1")
            except KernelError:
                # The far side's detach (OP_UNEXPORT) closes the link, and usbip-vudc
                # may stop by itself between our read and this write: EINVAL then
                # (seen in the VM). Stopped is what we wanted.
                if self.status(name) == 2:
                    raise
