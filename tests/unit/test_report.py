"""device/report.py: the state a device shows in `status`."""

from __future__ import annotations

from hotplug.device.reconcile import Slot, Wanted
from hotplug.device.report import display_state


def test_display_state() -> None:
    export = Wanted("export", "r", "why", ())
    assert display_state(Slot(phase="backoff"), export) == "retrying"
    assert display_state(Slot(phase="exported"), export) == "exported"
    assert display_state(Slot(), None) == "unplugged"
    assert display_state(Slot(), Wanted("ignore", "r", "why")) == "ignored"
    assert display_state(Slot(), Wanted("none", None, "no rule matched")) == "not matched"
