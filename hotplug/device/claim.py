"""settings.claim: before-probe: new USB devices wait for the daemon's decision.

While the daemon runs in this mode, the usb bus's `drivers_autoprobe` is 0
(kernel/autoprobe.py): a new device is enumerated but no driver touches it, so
a device the policy exports goes to usbip-host unconfigured and is enumerated
once, by the application side; every other device is handed to its usual
drivers at once (reconcile's `Probe`).

Fail-safe: the marker file `claim.json` in the daemon's state directory
records that we set autoprobe to 0, before we do. Whoever finds it with no
daemon holding it puts autoprobe back and hands every waiting device to its
drivers: the daemon when it stops, the systemd unit's ExecStopPost
(`usbip-hotplug restore-autoprobe`, also after a crash or SIGKILL), and the
next start. A device that arrived while no daemon was deciding is thus
probed normally, as it would have been without us.

This module imports little: `restore-autoprobe` runs it from ExecStopPost on
every stop of the unit, in either mode.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from hotplug import log
from hotplug.kernel.autoprobe import UsbBus
from hotplug.kernel.sysfs import KernelError
from hotplug.state import (
    AlreadyLocked,
    InstanceLock,
    StateError,
    default_dir,
    read_json,
    write_json_atomic,
)

logger = log.get("hotplug.daemon")

MARKER = "claim.json"


class Claim:
    """The daemon's hold on new devices: on (`begin`), off (`end`), and what a
    previous run left (`recover`)."""

    def __init__(self, bus: UsbBus, state_dir: Path) -> None:
        self.bus = bus
        self.marker = state_dir / MARKER
        self.active = False

    def left_over(self) -> dict[str, object] | None:
        """The marker a run that did not end cleanly left, if any."""
        if not self.marker.exists():
            return None
        data = read_json(self.marker)  # a damaged one still says "autoprobe may be 0 by us"
        return data if isinstance(data, dict) else {}

    def recover(self, claiming: bool) -> list[str] | None:
        """At start: undo what a previous run left (its marker), and, when this
        run is to hold devices back and someone else set autoprobe to 0, hand over
        what waits already: a device that arrived while no daemon decided is
        probed as the kernel would have. None: there was nothing to undo."""
        if self.left_over() is not None:
            probed = self.bus.restore()
            self.marker.unlink(missing_ok=True)
            return probed
        if claiming and self.bus.autoprobe() is False:
            return self.bus.sweep()
        return None

    def begin(self) -> None:
        """Hold new devices back: marker first, so a crash in between is undone too."""
        write_json_atomic(self.marker, {"pid": os.getpid(), "since": time.time()})
        try:
            self.bus.set_autoprobe(False)
        except KernelError:
            self.marker.unlink(missing_ok=True)
            raise
        self.active = True

    def end(self) -> list[str]:
        """Autoprobe back on, every waiting device handed over; the names probed."""
        self.active = False
        probed = self.bus.restore()
        self.marker.unlink(missing_ok=True)
        return probed


def describe(probed: list[str]) -> str:
    if not probed:
        return "nothing was waiting"
    shown = " ".join(probed[:12]) + (f" and {len(probed) - 12} more" if len(probed) > 12 else "")
    return f"handed to their drivers: {shown}"


# --------------------------------------------------------------------------- restore-autoprobe


def cmd_restore_autoprobe(args: argparse.Namespace) -> int:
    """`usbip-hotplug restore-autoprobe` (the unit's ExecStopPost): if the daemon
    held devices back and did not undo it (a crash, SIGKILL), undo it now."""
    from hotplug.kernel import make_bus

    state_dir = default_dir("device")
    claim = Claim(make_bus(), state_dir)
    if claim.left_over() is None:
        if not args.quiet:
            print("drivers_autoprobe was not changed by usbip-hotplug: nothing to restore")
        return 0
    try:
        # The daemon's own lock: one that still runs keeps its hold (and undoes it
        # when it stops); a killed one holds no lock any more.
        with InstanceLock(state_dir):
            probed = claim.end()
    except AlreadyLocked as exc:
        print(f"usbip-hotplug: not restoring drivers_autoprobe: {exc}", file=sys.stderr)
        return 1
    except (KernelError, StateError) as exc:
        print(f"usbip-hotplug: cannot restore drivers_autoprobe: {exc}", file=sys.stderr)
        return 1
    message = (
        "drivers_autoprobe was left at 0 by a daemon that did not end cleanly; restored, "
        + describe(probed)
    )
    log.event(logger, logging.WARNING, message, event="autoprobe-restored")
    return 0
