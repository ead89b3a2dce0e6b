"""What the fake kernel says about an export, as the one-shot tests (`connect`,
`disconnect` and hand-made peers against usbipa) judge it: the device's driver,
usbip-host's status for it, the vhci ports in use; and `assert_untouched`, the
verdict after an export that failed.

`used_ports` here gives port numbers; daemon_rig.used_ports, which the daemon
tests use, gives the ports themselves.
"""

from __future__ import annotations

import os

from hotplug.kernel.vhci import PortState
from hotplug.testing.fake_kernel import FakeTree


def used_ports(tree: FakeTree) -> list[int]:
    return [p.port for p in tree.vhci().ports() if p.state == PortState.USED]


def driver(tree: FakeTree, busid: str) -> str | None:
    try:
        return os.path.basename(os.readlink(tree.paths.usb_devices / busid / "driver"))
    except OSError:
        return None


def stub_status(tree: FakeTree, busid: str) -> str | None:
    path = tree.paths.usb_devices / busid / "usbip_status"
    return path.read_text().strip() if path.exists() else None


def assert_untouched(tree: FakeTree, busid: str = "1-1") -> None:
    """The device is back with its usual driver and the far side holds no port."""
    assert driver(tree, busid) == "usb"
    assert stub_status(tree, busid) is None
    assert used_ports(tree) == []
    match = (tree.paths.stub_driver / "match_busid").read_text()
    assert busid not in match.split()
