"""kernel/autoprobe.py: what waits for a driver while drivers_autoprobe is 0, in which
order it is handed over, and what is left alone; on the fake kernel, which holds
devices back as Debian's 6.1 does (docs/PROTOCOL.md)."""

from __future__ import annotations

import os

from hotplug.kernel.autoprobe import device_of_interface, interface_prefix
from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice, descriptors

HUB = FakeUsbDevice("1-1", 0x05E3, 0x0608, device_class=0x09, interfaces=((0x09, 0, 0),))
DISK = FakeUsbDevice("1-2", 0x1D6B, 0x0104, serial="D1")
BEHIND = FakeUsbDevice("1-1.3", 0x1D6B, 0x0105, serial="K1", interfaces=((0x03, 1, 1),))


def driver(tree: FakeTree, name: str) -> str | None:
    device = device_of_interface(name)
    path = tree.paths.usb_devices / (name if device is None else f"{device}/{name}")
    try:
        return os.path.basename(os.readlink(path / "driver"))
    except OSError:
        return None


def add_root_hub(tree: FakeTree, bus: int) -> None:
    """A root hub registered while autoprobe is 0: no driver, no interface yet."""
    real = tree.paths.sys / f"devices/fake/usb{bus}"
    real.mkdir(parents=True)
    (real / "bDeviceClass").write_text("09\n")
    (real / "bConfigurationValue").write_text("\n")
    (real / "descriptors").write_bytes(
        descriptors(
            FakeUsbDevice(f"usb{bus}", 0x1D6B, 0x0002, device_class=9, interfaces=((9, 0, 0),))
        )
    )
    (tree.paths.usb_devices / f"usb{bus}").symlink_to(real)


def test_names() -> None:
    assert device_of_interface("1-1.2:1.0") == "1-1.2"
    assert device_of_interface("3-0:1.0") == "usb3"  # a root hub's interface
    assert device_of_interface("1-1") is None and device_of_interface("usb3") is None
    assert interface_prefix("usb3") == "3-0:" and interface_prefix("1-1") == "1-1:"


def test_held_back_devices_wait_and_are_handed_over_hubs_first(tree: FakeTree) -> None:
    bus = tree.bus()
    bus.set_autoprobe(False)
    assert bus.autoprobe() is False
    add_root_hub(tree, 1)
    for dev in (DISK, HUB, BEHIND):
        tree.add_device(dev)
    # Held back: no driver, no configuration, no interfaces.
    assert driver(tree, "1-2") is None and not bus.interfaces("1-2")
    assert bus.waiting() == ["usb1", "1-1", "1-2", "1-1.3"]
    assert bus.sweep(devices=False) == []  # a driver registering: nobody waiting has a driver

    assert bus.hand_over("1-2") == ["1-2", "1-2:1.0"]
    assert driver(tree, "1-2") == "usb" and driver(tree, "1-2:1.0") == "usb-storage"
    assert bus.hand_over("1-2") == []  # once

    # Autoprobe on first: the interfaces the generic driver makes then get their
    # drivers from the kernel itself.
    assert bus.restore() == ["usb1", "1-1", "1-1.3"]
    assert bus.autoprobe() is True and bus.waiting() == []
    assert driver(tree, "1-0:1.0") == "hub" and driver(tree, "1-1.3:1.0") == "usbhid"


def test_a_device_usbip_host_holds_is_left_alone(tree: FakeTree) -> None:
    """Its interfaces are the application side's; an interface's own probe refuses
    such a device anyway (usbip-host claims its port)."""
    bus = tree.bus()
    bus.set_autoprobe(False)
    tree.add_device(DISK)
    tree.stub().bind("1-2")
    assert driver(tree, "1-2") == "usbip-host"
    assert bus.waiting() == [] and bus.hand_over("1-2") == [] and bus.restore() == []


def test_an_interface_waits_for_a_driver_of_its_own(tree: FakeTree) -> None:
    """Interfaces that appear (a release, a configuration chosen by someone else) or
    that were probed before their driver was loaded: only these, one by one."""
    bus = tree.bus()
    tree.add_device(DISK)  # autoprobe on: configured, its interface has its driver
    assert driver(tree, "1-2:1.0") == "usb-storage"
    bus.set_autoprobe(False)
    (tree.paths.usb_devices / "1-2/1-2:1.0/driver").unlink()  # as after a module reload
    assert bus.hand_over_interface("1-2:1.0") is True
    assert driver(tree, "1-2:1.0") == "usb-storage"
    assert bus.hand_over_interface("1-2:1.0") is False  # has one now
    assert bus.hand_over_interface("1-9:1.0") is False  # no such device
    (tree.paths.usb_devices / "1-2/1-2:1.0/driver").unlink()
    assert bus.sweep(devices=False) == ["1-2:1.0"]
