"""Where the daemon learns that devices come and go: the event source interface
(udev.py is the real source; hotplug/testing/fifo_events.py the tests' one).

A source enumerates the devices present at start (coldplug) and then reports
changes through a file descriptor the daemon watches with `loop.add_reader`.
`DeviceEvent("add")` means "present, here is what it looks like now": udev's
add, bind and change all map to it, so a device's details are refreshed
whenever udev has news. `DeviceEvent("remove")` means unplugged.
`DeviceEvent("rescan")` means events were lost: enumerate again.

While the daemon holds new devices back from their drivers (settings.claim:
before-probe, `claims(True)`), a source also reports what then needs a
driver without a policy decision: `DeviceEvent("waiting", name)` for a root
hub (`usb3`) or an interface (`1-1:1.0`) that appeared, and
`DeviceEvent("driver", name)` for a USB driver that registered (`usb-storage`:
interfaces probed before its module was loaded can have it now).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from hotplug import log
from hotplug.usb import Device

logger = log.get("hotplug.events")


@dataclass(frozen=True)
class DeviceEvent:
    action: Literal["add", "remove", "rescan", "waiting", "driver"]
    busid: str  # the name of the root hub, interface or driver for "waiting" and "driver"
    device: Device | None = None  # set for "add"


class EventSource(Protocol):
    def coldplug(self) -> list[Device]:
        """The devices present now."""
        ...

    def fileno(self) -> int:
        """Readable when events may be waiting."""
        ...

    def read_events(self) -> list[DeviceEvent]:
        """The events waiting now; never blocks."""
        ...

    def claims(self, on: bool) -> None:
        """Report "waiting" and "driver" events from now on (or stop)."""
        ...

    def close(self) -> None: ...
