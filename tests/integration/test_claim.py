"""settings.claim: before-probe on the fake kernel: new devices wait for the daemon,
an exported one goes to usbip-host untouched, the others to their drivers at once,
and however the daemon ends, nothing is left waiting.

The fake kernel holds devices back as Debian's 6.1 does with drivers_autoprobe 0
(no driver, no configuration, no interfaces; docs/PROTOCOL.md), and records every
write when USBIP_HOTPLUG_FAKE_KERNEL_TRACE is set: the verdict "no driver ever had
it" comes from there and from sysfs, not from the daemon's log.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from hotplug.testing.fake_kernel import TRACE_FILE, FakeTree, FakeUsbDevice
from hotplug.testing.fifo_events import write_event
from tests.helpers import wait_for
from tests.integration.daemon_rig import driver, exported, policy_text, rule, target
from tests.rig import run_cli, running_usbipa

DISK = FakeUsbDevice("1-1", 0x1D6B, 0x0104, serial="DISK01", product_name="Disk")
KEY = FakeUsbDevice("1-2", 0x2222, 0x0001, serial="KEY01", interfaces=((0x03, 1, 1),))
LATE = FakeUsbDevice("1-3", 0x3333, 0x0001, serial="LATE01", interfaces=((0x03, 1, 1),))
CLAIM = "claim: before-probe"


@pytest.fixture(autouse=True)
def _trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake kernel writes its trace (autouse: set before `tree` starts it)."""
    monkeypatch.setenv("USBIP_HOTPLUG_FAKE_KERNEL_TRACE", "1")


def autoprobe(tree: FakeTree) -> str:
    return (tree.paths.sys / "bus/usb/drivers_autoprobe").read_text().strip()


def interface_driver(tree: FakeTree, name: str) -> str | None:
    device = name.split(":")[0]
    try:
        return os.path.basename(os.readlink(tree.paths.usb_devices / device / name / "driver"))
    except OSError:
        return None


def writes(tree: FakeTree, busid: str) -> list[str]:
    """The kernel's record of every write naming `busid` (path and value)."""
    try:
        lines = (tree.root / TRACE_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [" ".join(line.split()[2:]) for line in lines if busid in line.split(" -> ")[0]]


def test_exported_devices_skip_their_drivers_the_rest_get_them_at_once(
    tree: FakeTree, state: Path, daemons: Any
) -> None:
    with running_usbipa(tree, state) as (_, port):
        policy = policy_text({"lab": target(port)}, [rule("disks", "1d6b", "lab")], CLAIM)
        daemon = daemons(policy).start()
        assert autoprobe(tree) == "0" and (state / "device/claim.json").exists()
        assert daemon.status()["daemon"]["claim"] == "before-probe"

        daemon.plug(DISK)
        wait_for(lambda: exported(tree, "1-1"), 5, "the disk exported")
        # Straight from "no driver" to usbip-host: no generic driver chose a
        # configuration, no usual driver was unbound first.
        history = writes(tree, "1-1")
        assert any("usbip-host/bind" in w for w in history), history
        assert not any("drivers_probe" in w or "driver/unbind" in w for w in history), history
        assert (tree.paths.usb_devices / "1-1/bConfigurationValue").read_text().strip() == ""

        daemon.plug(KEY)  # no rule: to its drivers at once, interfaces too
        wait_for(lambda: interface_driver(tree, "1-2:1.0") == "usbhid", 5, "usbhid on 1-2")
        assert driver(tree, "1-2") == "usb"

        # A driver registered after the interface was probed (udev loading its
        # module): the interface gets it then, as autoprobe would have given it.
        (tree.paths.usb_devices / "1-2/1-2:1.0/driver").unlink()
        write_event(daemon.fifo, "driver", "usbhid")
        wait_for(lambda: interface_driver(tree, "1-2:1.0") == "usbhid", 5, "usbhid again")

        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        # Stopped: autoprobe back, the disk given back to its drivers.
        assert autoprobe(tree) == "1" and not (state / "device/claim.json").exists()
        assert driver(tree, "1-1") == "usb" and interface_driver(tree, "1-1:1.0") == "usb-storage"
    text = daemon.text()
    assert "holding new USB devices back" in text and "drivers_autoprobe back to 1" in text


def test_a_killed_daemon_leaves_nothing_waiting(tree: FakeTree, state: Path, daemons: Any) -> None:
    """SIGKILL while autoprobe is 0: a device plugged meanwhile waits until the unit's
    ExecStopPost (`restore-autoprobe`) or the next start hands it to its drivers."""
    with running_usbipa(tree, state) as (_, port):
        policy = policy_text({"lab": target(port)}, [rule("disks", "1d6b", "lab")], CLAIM)
        daemon = daemons(policy).start()
        assert autoprobe(tree) == "0"
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        tree.add_device(KEY)  # while no daemon decides
        assert driver(tree, "1-2") is None and autoprobe(tree) == "0"

        # What ExecStopPost runs.
        result = run_cli(tree, state, "restore-autoprobe")
        assert result.returncode == 0, result.stderr
        assert autoprobe(tree) == "1" and driver(tree, "1-2") == "usb"
        assert interface_driver(tree, "1-2:1.0") == "usbhid"
        assert "restored, handed to their drivers: 1-2 " in result.stderr
        again = run_cli(tree, state, "restore-autoprobe")
        assert again.returncode == 0 and "nothing to restore" in again.stdout

        # Killed again; this time the next start is what undoes it.
        daemon.start()
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        tree.add_device(LATE)
        assert driver(tree, "1-3") is None
        daemon.start()
        assert driver(tree, "1-3") == "usb" and interface_driver(tree, "1-3:1.0") == "usbhid"
        assert autoprobe(tree) == "0"  # and held back again for what comes next
        assert "a previous run did not end cleanly" in daemon.text()

        # While a daemon runs, restore-autoprobe leaves its hold alone.
        busy = run_cli(tree, state, "restore-autoprobe")
        assert busy.returncode == 1 and "another usbip-hotplug daemon is running" in busy.stderr
        assert autoprobe(tree) == "0"

        # A reload back to the kernel's order lets go at once.
        daemon.policy.write_text(policy.replace(CLAIM, "claim: after-probe"))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: autoprobe(tree) == "1", 5, "autoprobe back on after the reload")
        assert not (state / "device/claim.json").exists()
