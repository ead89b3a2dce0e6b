"""device/report.py: the state a device shows in `status`."""

from __future__ import annotations

import time

from hotplug.device.policy.model import Target
from hotplug.device.reconcile import Following, Slot, Trail, Wanted
from hotplug.device.report import device_rows, display_state
from hotplug.usb import Device, Speed


def test_display_state() -> None:
    export = Wanted("export", "r", "why", ())
    assert display_state(Slot(phase="backoff"), export) == "retrying"
    assert display_state(Slot(phase="exported"), export) == "exported"
    assert display_state(Slot(), None) == "unplugged"
    assert display_state(Slot(), Wanted("ignore", "r", "why")) == "ignored"
    assert display_state(Slot(), Wanted("none", None, "no rule matched")) == "not matched"


def test_rows_of_a_follow_awaiting_and_of_the_device_that_came_back() -> None:
    """`status` while a rule's follow waits at a busid (no device there), and for the
    device that came back on it: where it goes, why, and until when."""
    lab = Target(name="lab", host="10.0.0.1", port=3240)
    now = time.monotonic()
    trail = Trail("fw", "lab", 10.0, "1d6b:0104", until=now + 8)
    boot = Device("1-2", "/sys/devices/x/1-2", 1, 3, Speed.HIGH, 0x1D6B, 0x0105)
    following = Following(Trail("fw", "lab", 10.0, "1d6b:0104", now + 9), "1d6b:0105", 1.2)

    def wanted_of(device: Device) -> Wanted:
        return Wanted("export", "fw", following.reason, (lab,), 10.0)

    rows = device_rows(
        {"1-2": boot},
        {"1-2": Slot(phase="exported", exported_to=lab, target=lab)},
        (),
        wanted_of,
        {"1-1": trail},
        {"1-2": following},
    )
    awaiting, back = rows
    assert (awaiting["busid"], awaiting["state"], awaiting["target"]) == ("1-1", "awaiting", "lab")
    assert awaiting["rule"] == "fw" and awaiting["vid_pid"] is None
    assert awaiting["follow"] is not None and awaiting["follow"].startswith("1d6b:0104 left; until")
    assert awaiting["follow_until"] is not None
    assert abs(awaiting["follow_until"] - (time.time() + 8)) < 1
    assert (back["busid"], back["state"], back["vid_pid"]) == ("1-2", "exported", "1d6b:0105")
    assert back["follow"] == following.reason and back["follow_until"] is None
