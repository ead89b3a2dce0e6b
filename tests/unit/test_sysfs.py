"""kernel/sysfs.py: reading a device as it goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotplug.kernel import sysfs
from hotplug.kernel.sysfs import SysfsPaths


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
