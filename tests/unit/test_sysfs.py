"""kernel/sysfs.py: reading a device as it goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotplug.kernel import sysfs
from hotplug.kernel.sysfs import SysfsPaths
from hotplug.usb import Interface, interfaces_from_descriptors


def test_read_device_of_a_device_unplugged_mid_lookup_is_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's realpath lstat()s the busid link and then readlink()s it; a
    device unplugged in between raised FileNotFoundError out of read_device (seen
    in the VM suite). It must read as "no such device"."""
    paths = SysfsPaths(tmp_path)
    real = tmp_path / "sys/devices/platform/dummy_hcd.0/usb1/1-1"
    real.mkdir(parents=True)
    paths.usb_devices.mkdir(parents=True)
    (paths.usb_devices / "1-1").symlink_to(real)

    def gone_meanwhile(path: object, *, strict: bool = False) -> str:
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(sysfs.os.path, "realpath", gone_meanwhile)
    with pytest.raises(sysfs.DeviceNotFound):
        sysfs.read_device(paths, "1-1")


# The `descriptors` file of the configfs mass-storage gadget on dummy_hcd, read in the
# test VM (Debian's 6.1) with drivers_autoprobe 0: device, configuration, one
# interface (08/06/50), two bulk endpoints.
GADGET_DESCRIPTORS = bytes.fromhex(
    "12010002000000406b1d040100010102030109022000010104803209040000020806500507058102"
    "00020007050202000201"
)


def test_interfaces_of_an_unconfigured_device_come_from_its_descriptors() -> None:
    assert interfaces_from_descriptors(GADGET_DESCRIPTORS) == (Interface(0x08, 0x06, 0x50),)
    # Only the first configuration; alternate settings skipped; cut short or broken: what was read.
    second = bytes.fromhex("09022000010204803209040000020202000000")
    alt = bytes.fromhex("090401010203ff0000")
    assert interfaces_from_descriptors(GADGET_DESCRIPTORS + alt + second) == (
        Interface(0x08, 0x06, 0x50),
    )
    assert interfaces_from_descriptors(GADGET_DESCRIPTORS[:30]) == ()
    assert interfaces_from_descriptors(GADGET_DESCRIPTORS[:18] + b"\x00\x02" * 8) == ()
    assert interfaces_from_descriptors(b"") == ()


def test_read_device_of_an_unconfigured_device(tmp_path: Path) -> None:
    """drivers_autoprobe 0: no configuration chosen, no interface directories; the
    policy still sees the interfaces it will have (what udev's ID_USB_INTERFACES says)."""
    paths = SysfsPaths(tmp_path)
    real = tmp_path / "sys/devices/platform/dummy_hcd.0/usb1/1-1"
    real.mkdir(parents=True)
    paths.usb_devices.mkdir(parents=True)
    (paths.usb_devices / "1-1").symlink_to(real)
    for name, value in {"idVendor": "1d6b", "idProduct": "0104", "bConfigurationValue": ""}.items():
        (real / name).write_text(value + "\n")
    (real / "descriptors").write_bytes(GADGET_DESCRIPTORS)
    device = sysfs.read_device(paths, "1-1")
    assert device.configuration_value == 0 and device.driver is None
    assert device.interfaces == (Interface(0x08, 0x06, 0x50),)
    # Configured: its interface directories, not its descriptors.
    (real / "bConfigurationValue").write_text("1\n")
    assert sysfs.read_device(paths, "1-1").interfaces == ()
