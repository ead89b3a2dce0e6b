"""A rule's `follow:` on the fake kernel: a device that re-enumerates with other ids
at the same busid (a bootloader, a firmware update) stays with its target within
the window, and after it the rules decide as for any device.

The real daemon process and the real usbipa over loopback, device events from the
FIFO; verdicts from the fake kernel (usbip_status, vhci ports), the ids from the
daemon's log and `status`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hotplug.testing.fake_kernel import FakeTree, FakeUsbDevice
from tests.helpers import wait_for
from tests.integration.daemon_rig import driver, exported, policy_text, target, used_ports
from tests.rig import running_usbipa

APP = FakeUsbDevice("1-1", 0x1D6B, 0x0104, serial="PROBE01", product_name="Probe")
# The same socket, re-enumerated as its bootloader: other product id, no serial.
BOOT = FakeUsbDevice("1-1", 0x1D6B, 0x0105, serial=None, product_name="Probe DFU")
WINDOW = 3.0  # seconds of `follow:`; the waits below are far shorter, or bounded past it


def test_a_device_that_comes_back_with_other_ids_follows_within_the_window(
    tree: FakeTree, state: Path, daemons: Any
) -> None:
    with running_usbipa(tree, state) as (_, port):
        rule = f'  - {{name: fw, match: {{id: "1d6b:0104"}}, export: lab, follow: {WINDOW:g}}}'
        daemon = daemons(policy_text({"lab": target(port)}, [rule])).start()
        daemon.plug(APP, devnum=2)
        wait_for(lambda: exported(tree, "1-1"), 5, "1d6b:0104 exported")

        # Into the bootloader: it leaves, and comes back at once as 1d6b:0105,
        # which no rule matches by itself.
        daemon.unplug("1-1")
        wait_for(lambda: daemon.state_of("1-1") == "awaiting", 5, "1-1 awaiting a device")
        row = daemon.device("1-1")
        assert row is not None and row["target"] == "lab" and row["rule"] == "fw"
        assert row["follow"].startswith("1d6b:0104 left; until ") and row["follow_until"]
        daemon.plug(BOOT, devnum=3)
        vport = wait_for(lambda: exported(tree, "1-1"), 5, "the bootloader exported")
        assert vport.devid == (1 << 16) | 3  # the new device, not a stale link
        row = daemon.device("1-1")
        assert row is not None and row["vid_pid"] == "1d6b:0105" and row["target"] == "lab"
        assert "follows 1d6b:0104" in row["follow"] and "came back as 1d6b:0105" in row["follow"]
        assert re.search(
            r"1-1: came back as 1d6b:0105 [0-9.]+ s after 1d6b:0104 left", daemon.text()
        )

        # Back to the application firmware: followed again (a followed export is the
        # rule's own), and then it matches by itself anyway.
        daemon.unplug("1-1")
        wait_for(lambda: daemon.state_of("1-1") == "awaiting", 5, "awaiting again")
        daemon.plug(APP, devnum=4)
        wait_for(lambda: exported(tree, "1-1"), 5, "the application firmware exported")
        assert "came back as 1d6b:0104" in daemon.text()

        # Too late: the bootloader appears after the window; no rule matches it.
        daemon.unplug("1-1")
        wait_for(
            lambda: "no longer following it" in daemon.text(),
            WINDOW + 5,
            "the window to close",
        )
        wait_for(lambda: daemon.device("1-1") is None, 5, "1-1 forgotten")
        daemon.plug(BOOT, devnum=5)
        wait_for(lambda: daemon.state_of("1-1") == "not matched", 5, "the late bootloader seen")
        assert exported(tree, "1-1") is None and driver(tree, "1-1") == "usb"
        assert not used_ports(tree)
    text = daemon.text()
    assert text.count("follow-armed") == 3 and text.count("event=followed") == 2, text


def test_without_follow_a_device_with_other_ids_is_not_exported(
    tree: FakeTree, state: Path, daemons: Any
) -> None:
    """The same re-enumeration under a rule without `follow:`: nothing follows (the
    check above fails for the right reason, not because anything goes anywhere)."""
    with running_usbipa(tree, state) as (_, port):
        rule = '  - {name: fw, match: {id: "1d6b:0104"}, export: lab}'
        daemon = daemons(policy_text({"lab": target(port)}, [rule])).start()
        daemon.plug(APP, devnum=2)
        wait_for(lambda: exported(tree, "1-1"), 5, "1d6b:0104 exported")
        daemon.unplug("1-1")
        daemon.plug(BOOT, devnum=3)
        wait_for(lambda: daemon.state_of("1-1") == "not matched", 5, "the bootloader seen")
        assert exported(tree, "1-1") is None
    assert "event=follow" not in daemon.text()
