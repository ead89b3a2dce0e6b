import struct

import pytest

from hotplug.kernel.sysfs import KernelError
from hotplug.kernel.vudc import record_from_descriptor
from hotplug.usb import Speed

# A mass-storage gadget's device descriptor as dev_desc shows it (little-endian).
DESC = struct.pack(
    "<BBHBBBBHHHBBBB", 18, 1, 0x0200, 0, 0, 0, 64, 0x1D6B, 0x0104, 0x0100, 1, 2, 3, 1
)


def test_record_from_descriptor() -> None:
    record = record_from_descriptor(
        "usbip-vudc.0", "/sys/devices/platform/usbip-vudc.0", DESC, "high-speed\n"
    )
    assert record.busid == "usbip-vudc.0"
    assert (record.busnum, record.devnum, record.devid) == (0, 0, 0)
    assert (record.id_vendor, record.id_product, record.bcd_device) == (0x1D6B, 0x0104, 0x0100)
    assert record.speed == Speed.HIGH and record.num_configurations == 1


@pytest.mark.parametrize("desc", [b"", b"\0" * 18, DESC[:10]])
def test_no_gadget_bound(desc: bytes) -> None:
    with pytest.raises(KernelError, match="is a gadget bound to it"):
        record_from_descriptor("usbip-vudc.0", "/x", desc, "UNKNOWN")
