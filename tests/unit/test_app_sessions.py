"""usbipa's watch on attached ports whose device never gets through enumeration.

On the real kernel (tests/vm/guest/test_export_real.py) such a port goes
NOTASSIGNED -> USED, with the devid and a local busid, as soon as vhci answers
the hub's SET_ADDRESS, and stays so with its link open; only the USB device
directory below vhci's root hub tells enumerated from stuck. The stand-in
(stand_in_vhci.py) answers `enumerated()` from a set, the way `Vhci.enumerated` answers from
sysfs (and the fake kernel's tree agrees: last test).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hotplug.app.config import AppdConfig, ConfigError, Limits, parse_config
from hotplug.app.server import Appd
from hotplug.kernel.vhci import PortState
from hotplug.testing.fake_kernel import FakeTree
from hotplug.usb import Speed
from tests.unit.stand_in_vhci import DEVID, StandInVhci, session


def test_a_port_whose_device_never_enumerates_is_detached_after_the_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    vhci = StandInVhci(
        {
            0: (PortState.USED, False),  # attached 31 s ago, SET_ADDRESS seen, no device
            1: (PortState.NOTASSIGNED, False),  # attached 31 s ago, not even reset
            2: (PortState.USED, False),  # attached 5 s ago: still enumerating
            3: (PortState.USED, True),  # enumerated
        }
    )
    config = AppdConfig(state_dir=str(tmp_path), limits=replace(Limits(), enumeration_timeout=30))
    appd = Appd(config, vhci)  # type: ignore[arg-type]
    # Port 1 attached first: no older port holds the hub up, so its clock runs.
    for port, age, busid in ((0, 31, "17-1"), (1, 32, "18-1"), (2, 5, "19-1"), (3, 300, "20-1")):
        appd.sessions.add(session(port, now - age, busid))
        appd.sessions.clock[port] = time.monotonic() - age
    with caplog.at_level(logging.INFO, logger="usbipa"):
        appd._detach_unenumerated()
    assert vhci.detached == [0, 1]
    assert sorted(appd.sessions.by_port) == [2, 3]
    assert "detached port 0: 17-1 from 127.0.0.1 (never enumerated within 30 s)" in caplog.text

    # Once seen enumerated, a port is not judged again (its device may be reset later).
    vhci.table[2] = (PortState.USED, True)
    appd._detach_unenumerated()
    vhci.table[2] = (PortState.USED, False)
    appd.sessions.clock[2] = time.monotonic() - 600
    appd._detach_unenumerated()
    assert vhci.detached == [0, 1] and sorted(appd.sessions.by_port) == [2, 3]


@pytest.fixture
def tree_vhci(tmp_path: Path) -> Iterator[tuple[FakeTree, Any]]:
    tree = FakeTree(tmp_path / "root").create()
    server = tree.start_server()
    try:
        yield tree, tree.vhci()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_port_the_hub_has_not_reached_is_not_timed_out(tmp_path: Path) -> None:
    """Issue 16: a port still NOTASSIGNED behind an older port that stalls the same
    root hub keeps its clock at zero; once the older one is gone, its clock runs."""
    vhci = StandInVhci({0: (PortState.USED, False), 1: (PortState.NOTASSIGNED, False)})
    vhci.other_hub = {2}
    vhci.table[2] = (PortState.NOTASSIGNED, False)  # on another root hub: not held up
    config = AppdConfig(state_dir=str(tmp_path), limits=replace(Limits(), enumeration_timeout=30))
    appd = Appd(config, vhci)  # type: ignore[arg-type]
    for port, age in ((0, 40), (1, 35), (2, 35)):
        appd.sessions.add(session(port, time.time() - age, f"1{port}-1"))
        appd.sessions.clock[port] = time.monotonic() - age
    appd._detach_unenumerated()
    assert vhci.detached == [0, 2]  # port 1 waited for the hub, port 2 did not
    appd._detach_unenumerated()
    assert vhci.detached == [0, 2] and 1 in appd.sessions.by_port
    appd.sessions.clock[1] -= 31  # 31 s after the hub became free for it
    appd._detach_unenumerated()
    assert vhci.detached == [0, 2, 1]


def test_an_enumerated_device_is_kept_awake(tree_vhci: tuple[FakeTree, Any]) -> None:
    """Issue 16, item 4: usbipa sets power/control = on for the device it attached
    (USB/IP has no remote wakeup), also when udev set it to auto afterwards."""
    tree, vhci = tree_vhci
    left, right = socket.socketpair()
    with left, right:
        vhci.attach(0, left, DEVID, Speed.HIGH)
        port = vhci.port(0)
        assert port is not None
        control = tree.paths.platform / "vhci_hcd.0" / "usb2" / port.local_busid / "power/control"
        control.write_text("auto\n")  # what udev's autosuspend rule does
        appd = Appd(AppdConfig(state_dir=str(tree.root / "state")), vhci)
        appd.sessions.add(session(0, time.time(), "1-1"))
        appd._detach_unenumerated()
        assert control.read_text() == "on\n"
        control.write_text("auto\n")
        appd._detach_unenumerated()
        assert control.read_text() == "on\n"


def test_the_enumeration_timeout_runs_on_the_monotonic_clock(tmp_path: Path) -> None:
    """Issue 12, finding 14: a wall-clock step must neither detach a session still
    enumerating (forward step) nor disable the rule (backward step)."""
    vhci = StandInVhci({0: (PortState.USED, False), 1: (PortState.USED, False)})
    config = AppdConfig(state_dir=str(tmp_path), limits=replace(Limits(), enumeration_timeout=30))
    appd = Appd(config, vhci)  # type: ignore[arg-type]
    # Wall-clock `since` a day in the past (clock stepped forward after attach) and a
    # day in the future (stepped back): neither counts, only the monotonic clock.
    appd.sessions.add(session(0, time.time() - 86400, "17-1"))
    appd.sessions.add(session(1, time.time() + 86400, "18-1"))
    appd._detach_unenumerated()
    assert vhci.detached == []
    appd.sessions.clock[1] = time.monotonic() - 31  # attached 31 s ago, by the monotonic clock
    appd._detach_unenumerated()
    assert vhci.detached == [1]


def test_the_timeout_is_configurable_and_checked() -> None:
    config = parse_config("limits:\n  enumeration_timeout: 2.5\n", "usbipa.yaml")
    assert config.limits.enumeration_timeout == 2.5
    assert AppdConfig().limits.enumeration_timeout == 30.0
    with pytest.raises(ConfigError, match=r"limits\.enumeration_timeout: expected a positive"):
        parse_config("limits:\n  enumeration_timeout: 0\n", "usbipa.yaml")


def test_the_fake_kernel_registers_the_device_below_the_root_hub_like_the_kernel(
    tmp_path: Path,
) -> None:
    tree = FakeTree(tmp_path / "root", vhci_controllers=2).create()
    server = tree.start_server()
    vhci = tree.vhci()
    a, b = socket.socketpair()
    try:
        port = vhci.find_free_port(Speed.HIGH)
        assert port is not None and not vhci.enumerated(port)
        vhci.attach(port.port, a, DEVID, Speed.HIGH)
        attached = vhci.port(port.port)
        assert attached is not None and vhci.enumerated(attached)
        device = tree.paths.platform / "vhci_hcd.0" / "usb2" / attached.local_busid
        assert device.is_dir()
        assert not (tree.paths.usb_devices / attached.local_busid).exists()
        vhci.detach(port.port)
        freed = vhci.port(port.port)
        assert freed is not None and freed.free and not vhci.enumerated(freed)
        assert not device.exists()
    finally:
        a.close()
        b.close()
        server.terminate()
        server.wait(timeout=10)
